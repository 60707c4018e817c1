"""build_info() reports how the extension was built."""

from __future__ import annotations

import torch

import block_attn


def test_build_info_has_documented_keys():
    info = block_attn.build_info()
    expected = {"cuda", "cuda_archs", "torch_version", "openmp", "cpu_threads", "parallel_backend"}
    assert set(info) == expected, f"keys {sorted(info)} != documented {sorted(expected)}"
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
