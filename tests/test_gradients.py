"""Gradients: gradcheck in float64 for every mask kind, float32 against float64 gradients."""

from __future__ import annotations

import pytest
import torch
from common import assert_close, grads, make_qkv

import block_attn
from block_attn import reference

# (Hq, Hkv, Nq, Nk, D, kwargs): small, ragged, every mask kind, GQA included.
MASK_KINDS = [
    pytest.param(2, 1, 7, 7, 4, {}, id="full"),
    pytest.param(2, 2, 8, 8, 3, {"block_size": 3}, id="fixed"),
    pytest.param(4, 2, 9, 9, 4, {"cu_seqlens": [0, 1, 5, 9]}, id="ragged-gqa"),
    pytest.param(2, 1, 7, 7, 5, {"causal": True}, id="causal-mqa"),
    pytest.param(2, 1, 10, 10, 4, {"cu_seqlens": [0, 4, 6, 10], "causal": True}, id="both"),
    pytest.param(
        2, 1, 9, 9, 4, {"cu_seqlens": [0, 0, 4, 4, 9, 9], "causal": True}, id="empty-blocks"
    ),
    pytest.param(2, 2, 5, 8, 4, {"causal": True}, id="full-causal-Nq<Nk"),
    pytest.param(4, 2, 8, 5, 4, {"causal": True}, id="full-causal-Nq>Nk"),
    pytest.param(2, 2, 4, 9, 4, {}, id="full-Nq<Nk"),
]


@pytest.mark.parametrize(("Hq", "Hkv", "Nq", "Nk", "D", "kwargs"), MASK_KINDS)
def test_gradcheck(device, Hq, Hkv, Nq, Nk, D, kwargs):
    q, k, v = make_qkv(2, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_attn.attention(q, k, v, **kwargs), inputs, atol=1e-5
    )


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradcheck_with_offsets_kept_on_the_device(device, causal):
    """cu_seqlens on the device with max_seqlen: int64 (converted on the device), an empty block,
    max_seqlen above the longest block."""
    q, k, v = make_qkv(2, 4, 2, 9, 9, 4, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    cu_seqlens = torch.tensor([0, 4, 4, 9], device=device)
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": 7, "causal": causal}
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_attn.attention(q, k, v, **kwargs), inputs, atol=1e-5
    )
    grad_out = torch.randn_like(q)
    ours = block_attn.attention(*inputs, **kwargs)
    expected = reference.attention(*inputs, cu_seqlens=[0, 4, 9], causal=causal)
    assert_close(ours, expected, atol=1e-12, rtol=1e-10, what="out")
    for name, got, want in zip(
        "qkv", grads(ours, inputs, grad_out), grads(expected, inputs, grad_out), strict=True
    ):
        assert_close(got, want, atol=1e-12, rtol=1e-10, what=f"grad_{name}")


# Float64 inputs get a float64 lse, so gradcheck's default step and tolerances apply to it too.
LSE_GRADCHECK_TOLERANCE = {"atol": 1e-8, "rtol": 1e-6}


@pytest.mark.parametrize(
    ("Hq", "Hkv", "Nq", "Nk", "D", "kwargs"),
    [p for p in MASK_KINDS if p.id != "full-causal-Nq>Nk"],  # lse = -inf rows are not smooth
)
def test_gradcheck_through_lse(device, Hq, Hkv, Nq, Nk, D, kwargs):
    q, k, v = make_qkv(1, Hq, Hkv, Nq, Nk, D, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def out_and_lse(q, k, v):
        out, lse = block_attn.attention(q, k, v, return_lse=True, **kwargs)
        assert lse.dtype == torch.float64
        return out, lse

    assert torch.autograd.gradcheck(out_and_lse, inputs, **LSE_GRADCHECK_TOLERANCE)


def test_gradcheck_lse_only(device):
    """A loss that uses only lse: the backward gets grad_out = None."""
    q, k, v = make_qkv(1, 2, 1, 9, 9, 4, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_attn.attention(q, k, v, block_size=4, return_lse=True)[1],
        inputs,
        **LSE_GRADCHECK_TOLERANCE,
    )


FLOAT32_CONFIGS = [
    pytest.param(2, 8, 2, 129, 80, {"block_size": 64, "causal": True}, "bhnd", id="fixed-causal"),
    pytest.param(1, 4, 4, 300, 64, {"cu_seqlens": [0, 10, 11, 200, 300]}, "bnhd", id="ragged"),
    pytest.param(1, 4, 1, 100, 128, {"causal": True}, "bnhd", id="causal-mqa"),
    pytest.param(2, 2, 2, 77, 16, {"block_size": 1}, "bhnd", id="block1"),
    pytest.param(1, 2, 1, 64, 256, {"block_size": 100}, "bhnd", id="block>N-D256"),
]


@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "D", "kwargs", "layout"), FLOAT32_CONFIGS)
@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
def test_float32_gradients_match_float64_reference(
    device, B, Hq, Hkv, N, D, kwargs, layout, use_lse
):
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, device=device, layout=layout, requires_grad=True)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(B, Hq, N, device=device) if use_lse else None

    def run(attention, inputs):
        out, lse = attention(*inputs, return_lse=True, **kwargs)
        if not use_lse:
            return grads(out, inputs, grad_out.to(out.dtype))
        return grads((out, lse), inputs, (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))

    ours = run(block_attn.attention, (q, k, v))
    high = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    expected = run(reference.attention, high)
    for name, g, g_ref in zip("qkv", ours, expected, strict=True):
        assert g.shape == g_ref.shape and g.dtype == torch.float32
        assert_close(g, g_ref, atol=1e-4, rtol=1e-3, what=f"grad_{name}")
    if layout == "bnhd":
        # Gradients flow back to the (B, N, H, D) storage; nothing is lost in the transpose.
        assert ours[0].shape == q.shape


def test_lse_gradient_formula(device):
    """Gradient through lse alone equals the softmax-weighted sum of keys (times scale)."""
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, dtype=torch.float64, device=device, requires_grad=True)
    _, lse = block_attn.attention(q, k, v, causal=True, return_lse=True)
    (grad_q,) = torch.autograd.grad(lse.sum(), (q,))
    scores = (q @ k.transpose(-2, -1)) * 0.5
    mask = torch.ones(6, 6, dtype=torch.bool, device=device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert_close(grad_q, 0.5 * probs @ k, atol=1e-5, rtol=1e-5, what="d(sum lse)/dq")


def test_double_backward_raises_instead_of_a_wrong_number(device):
    """A gradient of the gradients (gradient penalties) raises a clear error, never a number."""
    q, k, v = make_qkv(1, 1, 1, 6, 6, 4, dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    out = block_attn.attention(*inputs, causal=True)
    first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    penalty = sum(g.square().sum() for g in first)
    with pytest.raises(RuntimeError, match="block_attn does not support double backward"):
        torch.autograd.grad(penalty, inputs)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.gradgradcheck(lambda q, k, v: block_attn.attention(q, k, v), inputs)
