"""build_info() reports how the extension was built."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

import block_attn


def test_build_info_has_documented_keys():
    info = block_attn.build_info()
    expected = {"cuda", "cuda_archs", "torch_version", "openmp", "cpu_threads", "parallel_backend",
                "cpu_capabilities", "cpu_capability"}  # fmt: skip
    assert set(info) == expected, f"keys {sorted(info)} != documented {sorted(expected)}"
    assert info["cpu_capability"] in info["cpu_capabilities"], info
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert isinstance(info["parallel_backend"], str)
    assert isinstance(info["cpu_threads"], int) and info["cpu_threads"] >= 1, info["cpu_threads"]
    assert torch.__version__.startswith(info["torch_version"]), (
        f"built against torch {info['torch_version']}, running {torch.__version__}"
    )
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build should list its archs"


def test_cuda_build_when_gpu_is_usable():
    """A GPU machine running a CPU-only build would silently skip every CUDA test."""
    info = block_attn.build_info()
    if torch.cuda.is_available() and torch.version.cuda is not None:
        assert info["cuda"], "torch sees a GPU but block_attn was built without CUDA kernels"


def run_module(*args: str) -> str:
    """Output of ``python -m block_attn ARGS`` run in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "block_attn", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}; stderr:\n{result.stderr}"
    return result.stdout


def test_build_info_table_is_short_and_readable():
    info = block_attn.build_info()
    table = block_attn.build_info_table(info)
    lines = table.splitlines()
    assert 4 <= len(lines) <= 10, f"{len(lines)} lines:\n{table}"
    assert "\\n" not in table and "{" not in table, f"escaped or raw dict in the table:\n{table}"
    assert all(len(line) <= 100 for line in lines), f"a line over 100 characters:\n{table}"
    labels = [line.split("  ")[0] for line in lines]
    for label in ("block_attn", "torch", "CPU kernels", "CUDA kernels", "parallel backend"):
        assert label in labels, f"no {label!r} row in:\n{table}"
    assert block_attn.__version__ in table and info["torch_version"] in table, table
    assert f"{info['cpu_threads']} threads" in table, table
    if info["cuda"]:
        assert info["cuda_archs"].split(";")[0] in table, table


def test_build_info_table_lists_unknown_keys_on_one_line():
    info = {**block_attn.build_info(), "vector_isa": "avx512\nmore detail"}
    table = block_attn.build_info_table(info)
    assert any(line.split() == ["vector_isa", "avx512"] for line in table.splitlines()), table


def test_module_info_prints_the_table_only():
    out = run_module("--info")
    assert out.strip() == block_attn.build_info_table(), out
    assert "max |block_attn" not in out, f"--info ran the demo:\n{out}"


def test_module_json_prints_build_info():
    out = run_module("--json")
    assert json.loads(out) == block_attn.build_info(), out
