"""The Hopper (wgmma) kernels against the mma.sync kernels and the float64 reference.

On an sm_90 GPU with a build that has sm_90a code, bf16/fp16 attention runs the wgmma kernels
where the C++ plan takes them (csrc/cuda/hopper/hopper_shapes.h lists the head dims: the backward
at 64 and 128, in deterministic mode with a dQ kernel instead of atomics; the forward at 256, and
at 128 over long key blocks). BLOCK_ATTN_HOPPER_KERNELS=0 selects the mma.sync kernels, read at
every call. Which kernels ran is observed (torch.profiler), not inferred. Elsewhere the
comparisons skip.
"""

from __future__ import annotations

import pytest
import torch
from common import LAYOUTS, assert_within_reference_error, grads, make_qkv

import block_attn
from block_attn import reference
from block_attn.cuda_kernels import hopper_kernels_apply, kernel_paths, kernels_launched

CASES = [
    pytest.param(1, 4, 4, 300, {"causal": True}, id="causal"),
    pytest.param(2, 4, 2, 257, {"cu_seqlens": [0, 1, 64, 65, 200, 257]}, id="ragged-gqa"),
    pytest.param(1, 6, 2, 400, {"cu_seqlens": [0, 130, 131, 400], "causal": True}, id="docs"),
    pytest.param(1, 2, 1, 96, {"block_size": 32, "causal": True}, id="small-blocks-mqa"),
    # A key block longer than the head_dim 128 forward shape's kMinKeys: the wgmma forward too.
    pytest.param(1, 2, 1, 4160, {"cu_seqlens": [0, 4099, 4160], "causal": True}, id="long"),
]


def run(q, k, v, grad_out, kwargs):
    """Forward and backward: ``(out, grad_q, grad_k, grad_v)``, and the names of the kernels the
    forward and the backward launched."""
    outputs = {}

    def forward():
        outputs["out"] = block_attn.attention(q, k, v, **kwargs)

    def backward():
        outputs["grads"] = grads(outputs["out"], (q, k, v), grad_out)

    forward_kernels = kernels_launched(forward)
    backward_kernels = kernels_launched(backward)
    return (outputs["out"], *outputs["grads"]), forward_kernels, backward_kernels


def assert_paths(kernels, expected, what):
    """The launched ``kernels`` belong to the path ``expected`` only."""
    assert kernel_paths(kernels) == {expected}, f"{what} launched {kernels}, not {expected}"


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
    Hopper kernels) runs, and whether the plan takes the forward and the backward there; skips
    elsewhere."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs_backward = hopper_kernels_apply(device, dtype, D, backward=True)
    runs_forward = hopper_kernels_apply(device, dtype, D, max_seqlen_k=N)
    if not (runs_backward or (runs_forward and not backward)):
        pytest.skip("the Hopper kernels need an sm_90 GPU and a build with sm_90a code")
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype=dtype, device=device, layout=layout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, torch.randn_like(q), runs_forward, runs_backward


@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "kwargs"), CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_hopper_and_mma_kernels_within_reference_error(
    B, Hq, Hkv, N, kwargs, layout, dtype, D, monkeypatch
):
    q, k, v, grad_out, runs_forward, runs_backward = hopper_inputs(B, Hq, Hkv, N, D, dtype, layout)
    hopper, forward_kernels, backward_kernels = run(q, k, v, grad_out, kwargs)
    assert_paths(forward_kernels, "hopper" if runs_forward else "tensor_core", "the forward")
    assert_paths(backward_kernels, "hopper" if runs_backward else "tensor_core", "the backward")
    monkeypatch.setenv("BLOCK_ATTN_HOPPER_KERNELS", "0")
    mma, forward_kernels, backward_kernels = run(q, k, v, grad_out, kwargs)
    monkeypatch.delenv("BLOCK_ATTN_HOPPER_KERNELS")
    assert_paths(forward_kernels, "tensor_core", "the forward with the Hopper kernels off")
    assert_paths(backward_kernels, "tensor_core", "the backward with the Hopper kernels off")
    check_against_reference(q, k, v, grad_out, kwargs, {"hopper": hopper, "mma.sync": mma})


@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_deterministic_hopper_backward(B, Hq, Hkv, N, kwargs, dtype, D, deterministic_algorithms):
    """The dQ kernel that replaces the atomics: launched, within the reference's error, and
    bitwise repeatable."""
    q, k, v, grad_out, _, _ = hopper_inputs(B, Hq, Hkv, N, D, dtype, "bhnd", backward=True)
    first, _, backward_kernels = run(q, k, v, grad_out, kwargs)
    assert_paths(backward_kernels, "hopper", "the deterministic backward")
    assert any("dq_wgmma_kernel" in name for name in backward_kernels), backward_kernels
    assert not any("dq_convert_kernel" in name for name in backward_kernels), backward_kernels
    again, _, _ = run(q, k, v, grad_out, kwargs)
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
    """The mma.sync forward was as fast there (csrc/cuda/hopper/hopper_shapes.h)."""
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
