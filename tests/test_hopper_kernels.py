"""The Hopper (wgmma) kernels against the mma.sync kernels and the float64 reference.

On an sm_90 GPU with a build that has sm_90a code, bf16/fp16 attention with head_dim 64 or 128
runs the wgmma backward (in deterministic mode with a dQ kernel instead of atomics); the wgmma
forward runs at head_dim 256, and at head_dim 128 over key blocks longer than
HOPPER_FORWARD_MIN_KEYS. BLOCK_ATTN_HOPPER_KERNELS=0 selects the mma.sync kernels, read at every
call. Elsewhere the comparisons skip.
"""

from __future__ import annotations

import pytest
import torch
from common import LAYOUTS, assert_within_reference_error, grads, make_qkv

import block_attn
from block_attn import reference
from block_attn.cuda_kernels import hopper_kernels_apply

CASES = [
    pytest.param(1, 4, 4, 300, {"causal": True}, id="causal"),
    pytest.param(2, 4, 2, 257, {"cu_seqlens": [0, 1, 64, 65, 200, 257]}, id="ragged-gqa"),
    pytest.param(1, 6, 2, 400, {"cu_seqlens": [0, 130, 131, 400], "causal": True}, id="docs"),
    pytest.param(1, 2, 1, 96, {"block_size": 32, "causal": True}, id="small-blocks-mqa"),
    # Longer than HOPPER_FORWARD_MIN_KEYS: the wgmma forward at head_dim 128 too.
    pytest.param(1, 2, 1, 4160, {"cu_seqlens": [0, 4099, 4160], "causal": True}, id="long"),
]


def run(q, k, v, grad_out, kwargs):
    out = block_attn.attention(q, k, v, **kwargs)
    return (out, *grads(out, (q, k, v), grad_out))


def check_against_reference(q, k, v, grad_out, kwargs, results):
    """Each of ``results`` ({path: (out, grad_q, grad_k, grad_v)}) within 2x (outputs) / 3x
    (gradients) of the low-precision reference's error from float64."""
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact_out = reference.attention(*exact_inputs, **kwargs)
    exact = (exact_out, *grads(exact_out, tuple(exact_inputs), grad_out.double()))
    low_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_out = reference.attention(*low_inputs, **kwargs)
    low = (low_out, *grads(low_out, tuple(low_inputs), grad_out))
    names = ("out", "grad_q", "grad_k", "grad_v")
    for path, got in results.items():
        for name, g, lo, ex in zip(names, got, low, exact, strict=True):
            factor = 2.0 if name == "out" else 3.0
            assert_within_reference_error(
                g, lo, ex, factor=factor, atol=1e-3, what=f"{name} ({path} kernels)"
            )


def hopper_inputs(B, Hq, Hkv, N, D, dtype, layout, backward=False):
    """Inputs for a problem where the Hopper backward (or, without ``backward``, either of the
    Hopper kernels) runs; skips elsewhere."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs_backward = hopper_kernels_apply(device, dtype, D, backward=True)
    runs_forward = hopper_kernels_apply(device, dtype, D, max_seqlen_k=N)
    if not (runs_backward or (runs_forward and not backward)):
        pytest.skip("the Hopper kernels need an sm_90 GPU and a build with sm_90a code")
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype=dtype, device=device, layout=layout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, torch.randn_like(q)


@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "kwargs"), CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_hopper_and_mma_kernels_within_reference_error(
    B, Hq, Hkv, N, kwargs, layout, dtype, D, monkeypatch
):
    q, k, v, grad_out = hopper_inputs(B, Hq, Hkv, N, D, dtype, layout)
    hopper = run(q, k, v, grad_out, kwargs)
    monkeypatch.setenv("BLOCK_ATTN_HOPPER_KERNELS", "0")
    mma = run(q, k, v, grad_out, kwargs)
    monkeypatch.delenv("BLOCK_ATTN_HOPPER_KERNELS")
    check_against_reference(q, k, v, grad_out, kwargs, {"hopper": hopper, "mma.sync": mma})


@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_deterministic_hopper_backward(B, Hq, Hkv, N, kwargs, dtype, D, deterministic_algorithms):
    """The dQ kernel that replaces the atomics: within the reference's error, and bitwise
    repeatable."""
    q, k, v, grad_out = hopper_inputs(B, Hq, Hkv, N, D, dtype, "bhnd", backward=True)
    first = run(q, k, v, grad_out, kwargs)
    again = run(q, k, v, grad_out, kwargs)
    for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), first, again, strict=True):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    check_against_reference(q, k, v, grad_out, kwargs, {"deterministic hopper": first})


@pytest.mark.parametrize(
    ("device", "dtype", "D"),
    [
        ("cpu", torch.bfloat16, 128),
        ("cuda", torch.float32, 128),
        ("cuda", torch.float64, 64),
        ("cuda", torch.bfloat16, 80),
        ("cuda", torch.float16, 512),
    ],
)
def test_hopper_kernels_never_claim_other_problems(device, dtype, D):
    """CPU tensors, float32/float64 and head dims other than 64, 128 (and 256 forward) never
    take them."""
    assert not hopper_kernels_apply(device, dtype, D)
    assert not hopper_kernels_apply(device, dtype, D, backward=True)


def test_no_hopper_backward_at_head_dim_256():
    assert not hopper_kernels_apply("cuda", torch.bfloat16, 256, backward=True)


@pytest.mark.parametrize(("D", "max_seqlen_k"), [(64, 16384), (128, 4096), (128, None)])
def test_hopper_forward_not_over_short_key_blocks_or_head_dim_64(D, max_seqlen_k):
    """The mma.sync forward was as fast there (csrc/cuda/launch.cu has the figures)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert not hopper_kernels_apply(device, torch.bfloat16, D, max_seqlen_k=max_seqlen_k)


def test_environment_variable_turns_hopper_kernels_off(monkeypatch):
    monkeypatch.delenv("BLOCK_ATTN_HOPPER_KERNELS", raising=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not hopper_kernels_apply(device, torch.bfloat16, 128, backward=True):
        pytest.skip("the Hopper kernels need an sm_90 GPU and a build with sm_90a code")
    assert hopper_kernels_apply(device, torch.bfloat16, 128, max_seqlen_k=8192)
    monkeypatch.setenv("BLOCK_ATTN_HOPPER_KERNELS", "0")
    assert not hopper_kernels_apply(device, torch.bfloat16, 128, backward=True)
    assert not hopper_kernels_apply(device, torch.bfloat16, 128, max_seqlen_k=8192)
