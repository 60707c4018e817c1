"""Queries of a few tokens per sequence against their own cached keys (decoding, short chunks):
the forward packs the query heads of a kv head into one tile, and tiles of at most eight
(query, head) lanes take the dot-product path. Shapes cover both paths and the switch between
them: 1-3 queries per sequence, 1-8 query heads per kv head, head dims that are not whole
vectors, key blocks across the 256-key tiles, both stride layouts.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from common import assert_close, assert_within_reference_error, grads, make_qkv

import block_attn
from block_attn import reference

KEY_LENGTHS = [5, 300, 70]


def _offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def _problem(device, dtype, heads, head_dim, queries_per_sequence, layout, requires_grad=False):
    hq, hkv = heads
    lengths_q = [queries_per_sequence] * len(KEY_LENGTHS)
    q, k, v = make_qkv(
        2, hq, hkv, sum(lengths_q), sum(KEY_LENGTHS), head_dim,
        dtype=dtype, device=device, layout=layout, requires_grad=requires_grad,
    )  # fmt: skip
    blocks = {"cu_seqlens": _offsets(lengths_q), "cu_seqlens_k": _offsets(KEY_LENGTHS)}
    return q, k, v, blocks


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [16, 40, 128])
@pytest.mark.parametrize("queries_per_sequence", [1, 2, 3])
@pytest.mark.parametrize(
    "heads", [(4, 4), (4, 2), (6, 2), (8, 2), (8, 1), (16, 2)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}"
)
def test_float32_matches_float64_reference(
    device, heads, queries_per_sequence, head_dim, causal, layout
):
    q, k, v, blocks = _problem(device, torch.float32, heads, head_dim, queries_per_sequence, layout)
    out, lse = block_attn.attention(q, k, v, causal=causal, return_lse=True, **blocks)
    want_out, want_lse = reference.attention(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True, **blocks
    )
    what = f"{heads} x{queries_per_sequence} D{head_dim}"
    assert_close(out, want_out, atol=2e-6, rtol=2e-5, what=f"out {what}")
    assert_close(lse, want_lse, atol=2e-6, rtol=2e-6, what=f"lse {what}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("heads", [(4, 1), (8, 1)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_other_dtypes_within_reference_error(device, dtype, heads, head_dim):
    q, k, v, blocks = _problem(device, dtype, heads, head_dim, 1, "bnhd")
    out = block_attn.attention(q, k, v, causal=True, **blocks)
    low = reference.attention(q, k, v, causal=True, **blocks)
    high = reference.attention(q.double(), k.double(), v.double(), causal=True, **blocks)
    assert out.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 1e-3
    assert_within_reference_error(out, low, high, factor=2, atol=atol, what=f"{dtype} out")


@pytest.mark.parametrize("heads", [(4, 2), (8, 1)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_gradients_after_a_packed_forward(device, heads):
    """The backward reads the lse the packed forward wrote for every head."""
    q, k, v, blocks = _problem(device, torch.float64, heads, 24, 2, "bhnd", requires_grad=True)
    out = block_attn.attention(q, k, v, causal=True, **blocks)
    expected = reference.attention(q, k, v, causal=True, **blocks)
    grad_out = torch.randn_like(out)
    for name, got, want in zip(
        "qkv", grads(out, (q, k, v), grad_out), grads(expected, (q, k, v), grad_out), strict=True
    ):
        assert_close(got, want, atol=1e-10, rtol=1e-9, what=f"grad_{name}")
