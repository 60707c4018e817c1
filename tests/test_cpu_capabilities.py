"""The CPU kernels of every compiled capability this machine supports, each forced in turn.

The rest of the suite runs the capability chosen by default (the best one); here each other one
runs the seeded fuzz cases in a fresh interpreter with ``BLOCK_ATTN_CPU_CAPABILITY`` set, so a
capability that only some machines pick cannot rot unseen.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

import block_attn
from block_attn import _C

INFO = block_attn.build_info()
COMPILED = INFO["cpu_capabilities"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fuzz seeds per forced capability: the default one runs the full count in test_fuzz.py.
FUZZ_CASES = os.environ.get("BLOCK_ATTN_CAPABILITY_FUZZ_CASES", "80")


def run_python(code: str, capability: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BLOCK_ATTN_CPU_CAPABILITY=capability)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_default_choice_is_the_best_supported():
    """Every capability more capable than the chosen one is refused by this CPU."""
    better = COMPILED[: COMPILED.index(INFO["cpu_capability"])]
    for capability in better:
        result = run_python("import block_attn", capability)
        assert result.returncode != 0 and "not supported by this CPU" in result.stderr, (
            f"{capability} works here, yet {INFO['cpu_capability']} was chosen:\n{result.stderr}"
        )


def test_portable_build_has_every_x86_capability():
    if os.uname().machine != "x86_64" or len(COMPILED) == 1:
        pytest.skip(f"not a portable x86-64 build: {COMPILED}")
    assert COMPILED == ["avx512_bf16", "avx512", "avx2", "default"]


@pytest.mark.parametrize("capability", COMPILED)
def test_forced_capability_runs_the_fuzz_cases(capability):
    if capability == INFO["cpu_capability"]:
        pytest.skip("the default capability runs the whole suite")
    probe = run_python("import block_attn; print(block_attn.build_info()['cpu_capability'])",
                       capability)  # fmt: skip
    if probe.returncode != 0:
        assert "not supported by this CPU" in probe.stderr, probe.stderr
        pytest.skip(f"this CPU does not support {capability}")
    assert probe.stdout.strip() == capability, probe.stdout
    env = dict(
        os.environ,
        BLOCK_ATTN_CPU_CAPABILITY=capability,
        BLOCK_ATTN_FUZZ_CASES=FUZZ_CASES,
    )
    env.pop("BLOCK_ATTN_FUZZ_SEED", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(ROOT, "tests", "test_fuzz.py"), "-k", "cpu"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{capability}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    )
    assert " passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("avx1024", r"BLOCK_ATTN_CPU_CAPABILITY=avx1024 is not one this build has; it has: "),
        ("AVX2", r"BLOCK_ATTN_CPU_CAPABILITY=AVX2 is not one this build has"),
    ],
)
def test_unknown_capability_is_a_clear_error(value, match):
    result = run_python("import block_attn", value)
    assert result.returncode != 0
    assert "ValueError" in result.stderr, result.stderr[-2000:]
    assert re.search(match, result.stderr), result.stderr[-2000:]


def test_selection_is_repeatable_in_process():
    objects = block_attn.cpu_kernels.kernel_objects()
    assert _C.select_cpu_kernels(objects) == INFO["cpu_capability"]


def mnemonics_and_registers(path: str) -> tuple[set[str], str]:
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True
    ).stdout
    names = {line.split()[1] for line in listing.splitlines() if line.startswith(" ")
             and len(line.split()) > 1}  # fmt: skip
    return names, listing


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_extension_itself_needs_only_baseline_x86_64():
    """The extension, which every CPU loads, has no AVX instruction: only the kernel objects,
    loaded where the CPU has them, do. An AVX2 object has no AVX-512 register."""
    if "default" not in COMPILED or os.uname().machine != "x86_64":
        pytest.skip(f"not a portable x86-64 build: {COMPILED}")
    names, _ = mnemonics_and_registers(_C.__file__)
    vex = sorted(n for n in names if n.startswith("v") and n not in ("verr", "verw"))
    assert not vex, f"the extension uses VEX/EVEX instructions: {vex[:10]}"
    avx2 = block_attn.cpu_kernels.kernel_objects().get("avx2")
    if avx2 is not None:
        _, listing = mnemonics_and_registers(avx2)
        assert "%zmm" not in listing and "%k1" not in listing, "AVX-512 code in the AVX2 kernels"
