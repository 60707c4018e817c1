"""Forward correctness against the float64 reference and PyTorch SDPA with an explicit mask."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from common import (
    LAYOUTS,
    MASKS,
    MaskSpec,
    assert_close,
    hand_mask,
    make_qkv,
    masked_scores,
    sdpa_with_mask,
)

import block_attn
from block_attn import reference

BATCHES = (1, 2)
HEADS = ((1, 1), (4, 4), (8, 2), (4, 1))
SEQLENS = (1, 7, 64, 129, 1000)
HEAD_DIMS = (1, 16, 64, 80, 128, 256)

# Float32 kernels against a float64 answer: sums over up to 1000 keys and 256 dims. Float64
# kernels compute, scale and return lse in float64, so only float64 rounding separates them.
TOLERANCE = {
    torch.float32: {"atol": 3e-5, "rtol": 3e-4},
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
}
LSE_TOLERANCE = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-5},
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
}


def check_forward(
    device: str,
    B: int,
    heads: tuple[int, int],
    N: int,
    D: int,
    mask: MaskSpec,
    causal: bool,
    layout: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Runs one configuration and compares out and lse with three independent answers."""
    Hq, Hkv = heads
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype=dtype, device=device, layout=layout)
    kwargs, offsets = mask.resolve(N, device, seed=N * 7 + D)
    out, lse = block_attn.attention(q, k, v, causal=causal, return_lse=True, **kwargs)

    assert out.shape == q.shape, f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}"
    assert out.dtype == q.dtype and out.device == q.device
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.shape == (B, Hq, N) and lse.dtype == lse_dtype
    if layout == "bnhd":
        assert out.transpose(1, 2).is_contiguous(), (
            f"out should keep q's (B, N, H, D) memory layout, got strides {out.stride()}"
        )
    else:
        assert out.is_contiguous(), f"out should be contiguous like q, got strides {out.stride()}"

    tol, lse_tol = TOLERANCE[dtype], LSE_TOLERANCE[dtype]
    ref_out, ref_lse = reference.attention(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True, **kwargs
    )
    assert_close(out, ref_out, **tol, what="out vs float64 reference")
    assert_close(lse, ref_lse, **lse_tol, what="lse vs float64 reference")

    allowed = hand_mask(offsets, N, N, causal, device=device)
    scores = masked_scores(q, k, allowed)
    assert_close(lse, torch.logsumexp(scores, dim=-1), **lse_tol, what="lse vs logsumexp")
    has_key = allowed.any(dim=-1)
    sdpa = sdpa_with_mask(q, k, v, allowed)
    assert_close(out[..., has_key, :], sdpa[..., has_key, :], **tol, what="out vs SDPA")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_every_mask_kind(device, mask, causal, layout):
    check_forward(device, 2, (8, 2), 129, 80, mask, causal, layout)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", SEQLENS)
def test_every_length_and_head_dim(device, N, D):
    check_forward(device, 1, (4, 1), N, D, MaskSpec("cu_seqlens", "int32"), True, "bhnd")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("B", BATCHES)
def test_every_batch_and_head_count(device, B, heads, causal):
    check_forward(device, B, heads, 129, 64, MaskSpec("block_size", 64), causal, "bnhd")


def _sampled_grid(count: int, seed: int) -> list:
    """A fixed, reproducible sample of the full product (too large to run whole)."""
    grid = list(
        itertools.product(BATCHES, HEADS, SEQLENS, HEAD_DIMS, MASKS, (False, True), LAYOUTS)
    )
    sample = random.Random(seed).sample(grid, count)
    return [
        pytest.param(
            *config,
            id=f"B{config[0]}-Hq{config[1][0]}-Hkv{config[1][1]}-N{config[2]}-D{config[3]}-"
            f"{config[4]}-{'causal' if config[5] else 'noncausal'}-{config[6]}",
        )
        for config in sample
    ]


@pytest.mark.parametrize(("B", "heads", "N", "D", "mask", "causal", "layout"), _sampled_grid(48, 0))
def test_sampled_grid(device, B, heads, N, D, mask, causal, layout):
    check_forward(device, B, heads, N, D, mask, causal, layout)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mask", [MaskSpec("full"), MaskSpec("block_size", 3)], ids=str)
def test_float64_inputs(device, mask, causal):
    check_forward(device, 2, (4, 2), 64, 40, mask, causal, "bnhd", dtype=torch.float64)


def test_custom_scale(device):
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, device=device)
    out, lse = block_attn.attention(q, k, v, block_size=8, scale=0.37, return_lse=True)
    ref_out, ref_lse = reference.attention(
        q.double(), k.double(), v.double(), block_size=8, scale=0.37, return_lse=True
    )
    assert_close(out, ref_out, **TOLERANCE[torch.float32], what="out with scale=0.37")
    assert_close(lse, ref_lse, **LSE_TOLERANCE[torch.float32], what="lse with scale=0.37")


def test_wrappers_match_attention(device):
    q, k, v = make_qkv(1, 2, 1, 50, 50, 16, device=device)
    assert torch.equal(
        block_attn.block_diagonal_attention(q, k, v, 8, causal=True),
        block_attn.attention(q, k, v, block_size=8, causal=True),
    )
    assert torch.equal(
        block_attn.block_diagonal_attention(q, k, v, cu_seqlens=[0, 20, 50]),
        block_attn.attention(q, k, v, cu_seqlens=[0, 20, 50]),
    )
    assert torch.equal(
        block_attn.causal_attention(q, k, v), block_attn.attention(q, k, v, causal=True)
    )


def test_non_unit_last_stride_is_accepted(device):
    """A q whose head_dim is not contiguous is copied, not rejected."""
    base = torch.randn(1, 2, 16, 40, device=device)
    q = base.transpose(-1, -2)  # (1, 2, 40, 16) with stride 40 in the last dim
    k, v = torch.randn(2, 1, 2, 40, 16, device=device).unbind(0)
    out = block_attn.attention(q, k, v, block_size=10)
    ref = reference.attention(q.double(), k.double(), v.double(), block_size=10)
    assert_close(out, ref, **TOLERANCE[torch.float32], what="out for a strided q")


# Full attention with Nq != Nk (no blocks): causal is bottom-right aligned.
CROSS_LENGTHS = ((7, 129), (129, 7), (64, 1000), (1, 64), (64, 1), (33, 32))


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("Nq", "Nk"), CROSS_LENGTHS, ids=lambda n: str(n))
def test_full_attention_different_lengths(device, Nq, Nk, causal):
    q, k, v = make_qkv(2, 4, 2, Nq, Nk, 64, device=device, layout="bnhd")
    out, lse = block_attn.attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = reference.attention(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True
    )
    assert_close(out, ref_out, **TOLERANCE[torch.float32], what="out vs float64 reference")
    assert_close(lse, ref_lse, **LSE_TOLERANCE[torch.float32], what="lse vs float64 reference")

    allowed = hand_mask([0, Nk], Nq, Nk, causal, device=device)
    has_key = allowed.any(dim=-1)
    sdpa = sdpa_with_mask(q, k, v, allowed)
    assert_close(out[..., has_key, :], sdpa[..., has_key, :], **TOLERANCE[torch.float32])
    logsumexp = torch.logsumexp(masked_scores(q, k, allowed), dim=-1)
    assert_close(lse, logsumexp, **LSE_TOLERANCE[torch.float32], what="lse vs logsumexp")
    # Queries with no allowed key (causal, Nq > Nk): out exactly 0 and lse -inf.
    assert torch.all(out[..., ~has_key, :] == 0), "rows with no allowed key must output 0"
    assert torch.all(lse[..., ~has_key] == float("-inf")), "rows with no key must have lse -inf"


def test_causal_alignment_differs_from_sdpa_is_causal(device):
    """Documented difference: SDPA's is_causal aligns top-left, we align bottom-right.

    Both agree when Nq == Nk; with Nq != Nk SDPA lets query i see keys j <= i, we let it see
    j <= i + Nk - Nq (the last query sees every key, as in decoding with a KV cache).
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = make_qkv(1, 2, 2, 4, 9, 16, device=device)
    ours = block_attn.attention(q, k, v, causal=True)
    top_left = sdpa(q, k, v, is_causal=True)
    assert not torch.allclose(ours, top_left, atol=1e-3), "expected bottom-right != top-left"
    bottom_right = torch.ones(4, 9, dtype=torch.bool, device=device).tril(diagonal=9 - 4)
    assert_close(ours, sdpa(q, k, v, attn_mask=bottom_right), **TOLERANCE[torch.float32])

    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, device=device)
    assert_close(
        block_attn.attention(q, k, v, causal=True),
        sdpa(q, k, v, is_causal=True),
        **TOLERANCE[torch.float32],
        what="Nq == Nk: same as SDPA is_causal",
    )


def test_rows_without_keys_output_zero(device):
    """Causal with Nq > Nk: the first Nq - Nk queries see nothing; their gradients are 0."""
    q, k, v = make_qkv(1, 2, 1, 10, 4, 8, device=device, requires_grad=True)
    out, lse = block_attn.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :6] == 0), f"out rows 0..5 should be 0, got {out[:, :, :6]}"
    assert torch.all(lse[:, :, :6] == float("-inf")), f"lse rows 0..5: {lse[:, :, :6]}"
    assert torch.isfinite(lse[:, :, 6:]).all()
    (grad_q,) = torch.autograd.grad(out, (q,), torch.randn_like(out))
    assert torch.all(grad_q[:, :, :6] == 0), "queries with no key must get zero gradient"
    assert torch.isfinite(grad_q).all()


def test_no_keys_at_all(device):
    """Nk = 0: every query has no allowed key."""
    q = torch.randn(2, 2, 5, 8, device=device)
    k = v = torch.randn(2, 2, 0, 8, device=device)
    out, lse = block_attn.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and torch.all(out == 0), f"expected zeros, got {out}"
    assert torch.all(lse == float("-inf"))


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (0, 3, 5, 8)], ids=["N=0", "B=0"])
@pytest.mark.parametrize("kwargs", [{}, {"block_size": 4}, {"causal": True}], ids=str)
def test_empty_inputs(device, shape, kwargs):
    q = torch.randn(shape, device=device, requires_grad=True)
    k = torch.randn(shape, device=device, requires_grad=True)
    v = torch.randn(shape, device=device, requires_grad=True)
    out, lse = block_attn.attention(q, k, v, return_lse=True, **kwargs)
    assert out.shape == shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == shape[:3] and lse.dtype == torch.float32
    grad_q, grad_k, grad_v = torch.autograd.grad(out.sum(), (q, k, v))
    assert grad_q.shape == shape and grad_k.shape == shape and grad_v.shape == shape


def test_empty_queries_with_keys(device):
    """Nq = 0 and Nk > 0 (full attention): empty output; k and v get zero gradients."""
    q = torch.randn(1, 2, 0, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, device=device, requires_grad=True)
    out = block_attn.attention(q, k, v, causal=True)
    assert out.shape == (1, 2, 0, 8)
    grad_k, grad_v = torch.autograd.grad(out.sum(), (k, v))
    assert torch.all(grad_k == 0) and torch.all(grad_v == 0)


def test_zero_keys_with_strided_views(device):
    """Zero keys give zero outputs whatever the strides of the empty k and v views."""
    q = torch.randn(1, 1, 4, 8, device=device)
    k = torch.randn(1, 1, 0, 16, device=device)[..., ::2]
    v = torch.randn(1, 1, 0, 16, device=device)[..., ::2]
    out, lse = block_attn.attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.all(lse == float("-inf"))
