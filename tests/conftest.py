"""Shared fixtures: the device every correctness test runs on, and a fixed seed per test."""

from __future__ import annotations

import pytest
import torch

import block_attn


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if not block_attn.build_info()["cuda"]:
        return "block_attn was built without CUDA kernels"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
requires_cuda = pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test taking ``device`` runs on the CPU and on CUDA (skipped without a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def deterministic_algorithms():
    """Turns on ``torch.use_deterministic_algorithms`` for one test and restores it after."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
