"""Benchmarks run as a CPU of a lower instruction-set capability would run them.

block_attn and every peer are restricted alike, each through its own documented switch:
block_attn's ``BLOCK_ATTN_CPU_CAPABILITY``, ATen's ``ATEN_CPU_CAPABILITY`` (its vectorised
kernels), MKL's ``MKL_ENABLE_INSTRUCTIONS`` (its GEMMs) and oneDNN's ``ONEDNN_MAX_CPU_ISA``. The
libraries read them once, when loaded, so a benchmark re-executes itself with them set
(:func:`reexec_limited`), and :func:`verify` reads back what each library actually uses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

__all__ = ["LIMITS", "reexec_limited", "verify"]

LIMITS: dict[str, dict[str, str]] = {
    "default": {
        "BLOCK_ATTN_CPU_CAPABILITY": "default",
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
    "avx2": {
        "BLOCK_ATTN_CPU_CAPABILITY": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "avx512": {
        "BLOCK_ATTN_CPU_CAPABILITY": "avx512",
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
}

# Reads back the capability each library runs at: ATen's from torch, block_attn's from its build
# info, oneDNN's from its verbose log of one convolution. MKL does not report its instruction set,
# so its float32 GEMM rate is measured, to be compared with the rate without the limit.
_PROBE = """
import json, time, torch, torch.nn.functional as F
import block_attn
F.conv2d(torch.randn(1, 64, 56, 56), torch.randn(64, 64, 3, 3))
a = torch.randn(2048, 2048)
a @ a
times = []
for _ in range(5):
    start = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - start)
print("PROBE" + json.dumps({"aten": torch.backends.cpu.get_cpu_capability(),
                             "block_attn": block_attn.build_info()["cpu_capability"],
                             "mkl_sgemm_gflops": round(2 * 2048**3 / min(times) / 1e9)}))
"""


def reexec_limited(capability: str, argv: list[str], module: str) -> None:
    """Re-runs ``python -m module argv`` with ``capability``'s limits unless they are set."""
    limits = LIMITS[capability]
    if all(os.environ.get(name) == value for name, value in limits.items()):
        return
    env = dict(os.environ, **limits)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def verify(capability: str) -> dict[str, str]:
    """What each library runs at under ``capability``'s limits, read back in a fresh process.

    Raises:
        RuntimeError: a library ignored its limit.
    """
    found = _probe(dict(os.environ, **LIMITS[capability], ONEDNN_VERBOSE="1"))
    unlimited = {k: v for k, v in os.environ.items() if k not in LIMITS[capability]}
    found["mkl_sgemm_gflops_unlimited"] = _probe(unlimited)["mkl_sgemm_gflops"]
    expected_aten = LIMITS[capability]["ATEN_CPU_CAPABILITY"].upper()
    if found["aten"].upper() != expected_aten or found["block_attn"] != capability:
        raise RuntimeError(f"limits to {capability} not honoured: {found}")
    return found


def _probe(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    found: dict = {}
    for line in result.stdout.splitlines():
        if line.startswith("PROBE"):
            found.update(json.loads(line[len("PROBE") :]))
        onednn = re.search(r"onednn_verbose.*,cpu,isa:(.*)", line)
        if onednn:
            found.setdefault("onednn", onednn.group(1).strip())
    if result.returncode != 0 or "aten" not in found:
        raise RuntimeError(f"capability probe failed:\n{result.stderr[-2000:]}")
    return found
