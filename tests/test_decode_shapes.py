"""Queries of a few tokens per sequence against their own cached keys (decoding, short chunks):
the forward packs the query heads of a kv head into one tile, and on CPU tiles of at most eight
(query, head) lanes take the dot-product path. Shapes cover both paths and the switch between
them: 1-3 queries per sequence, 1-8 query heads per kv head, head dims that are not whole
vectors, key blocks across the 256-key tiles, both stride layouts. On CUDA, float16 and bfloat16
blocks of at most 16 queries against longer key blocks split each block's keys over several
CTAs; the long-cache cases cover rows whose heads straddle 16-lane tiles, empty caches and
every head-dim tile.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from common import assert_close, assert_within_reference_error, grads, make_qkv
from conftest import requires_cuda

import block_attn
from block_attn import reference
from block_attn.cuda_kernels import decoding_kernel_applies

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


LONG_KEY_LENGTHS = [1500, 130, 0, 700]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("queries_per_sequence", [1, 5, 16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 2), (32, 1)], ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}")
def test_half_precision_against_long_caches(
    device, heads, queries_per_sequence, head_dim, causal, layout
):
    hq, hkv = heads
    lengths_q = [queries_per_sequence] * len(LONG_KEY_LENGTHS)
    q, k, v = make_qkv(
        1, hq, hkv, sum(lengths_q), sum(LONG_KEY_LENGTHS), head_dim,
        dtype=torch.bfloat16, device=device, layout=layout,
    )  # fmt: skip
    blocks = {"cu_seqlens": _offsets(lengths_q), "cu_seqlens_k": _offsets(LONG_KEY_LENGTHS)}
    out, lse = block_attn.attention(q, k, v, causal=causal, return_lse=True, **blocks)
    low = reference.attention(q, k, v, causal=causal, **blocks)
    high, want_lse = reference.attention(
        q.double(), k.double(), v.double(), causal=causal, return_lse=True, **blocks
    )
    what = f"{heads} x{queries_per_sequence} D{head_dim}"
    assert_within_reference_error(out, low, high, factor=2, atol=1e-3, what=f"out {what}")
    assert_close(lse, want_lse, atol=1e-4, rtol=1e-4, what=f"lse {what}")


@pytest.mark.parametrize("queries_per_sequence", [1, 16])
def test_float16_against_long_caches(device, queries_per_sequence):
    lengths_q = [queries_per_sequence] * len(LONG_KEY_LENGTHS)
    q, k, v = make_qkv(
        2, 8, 2, sum(lengths_q), sum(LONG_KEY_LENGTHS), 128, dtype=torch.float16, device=device
    )
    blocks = {"cu_seqlens": _offsets(lengths_q), "cu_seqlens_k": _offsets(LONG_KEY_LENGTHS)}
    out = block_attn.attention(q, k, v, causal=True, **blocks)
    low = reference.attention(q, k, v, causal=True, **blocks)
    high = reference.attention(q.double(), k.double(), v.double(), causal=True, **blocks)
    assert_within_reference_error(out, low, high, factor=2, atol=1e-3, what="float16 out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_gradients_after_a_split_forward(device, dtype):
    """The backward reads the lse that the split-key forward merged."""
    lengths_q = [2] * len(LONG_KEY_LENGTHS)
    q, k, v = make_qkv(
        1, 8, 2, sum(lengths_q), sum(LONG_KEY_LENGTHS), 64,
        dtype=dtype, device=device, requires_grad=True,
    )  # fmt: skip
    blocks = {"cu_seqlens": _offsets(lengths_q), "cu_seqlens_k": _offsets(LONG_KEY_LENGTHS)}
    grad_out = torch.randn(q.shape, dtype=dtype, device=device)
    out = block_attn.attention(q, k, v, causal=True, **blocks)
    got = grads(out, (q, k, v), grad_out)
    low = reference.attention(q, k, v, causal=True, **blocks)
    high_inputs = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    high = reference.attention(*high_inputs, causal=True, **blocks)
    want_low = grads(low, (q, k, v), grad_out)
    want_high = grads(high, high_inputs, grad_out.double())
    for name, g, lo, hi in zip("qkv", got, want_low, want_high, strict=True):
        assert_within_reference_error(g, lo, hi, factor=3, atol=1e-3, what=f"grad_{name}")


@requires_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_decoding_kernel_and_general_forward_agree(causal, monkeypatch):
    """The split-key kernel and the general forward (BLOCK_ATTN_DECODE_KERNEL=0) on the same
    inputs: both within the reference's error, with matching lse."""
    lengths_q = [5] * len(LONG_KEY_LENGTHS)
    q, k, v = make_qkv(
        1, 8, 2, sum(lengths_q), sum(LONG_KEY_LENGTHS), 128, dtype=torch.bfloat16, device="cuda"
    )
    blocks = {"cu_seqlens": _offsets(lengths_q), "cu_seqlens_k": _offsets(LONG_KEY_LENGTHS)}
    monkeypatch.delenv("BLOCK_ATTN_DECODE_KERNEL", raising=False)
    assert decoding_kernel_applies("cuda", torch.bfloat16, 5, max(LONG_KEY_LENGTHS))
    split = block_attn.attention(q, k, v, causal=causal, return_lse=True, **blocks)
    monkeypatch.setenv("BLOCK_ATTN_DECODE_KERNEL", "0")
    assert not decoding_kernel_applies("cuda", torch.bfloat16, 5, max(LONG_KEY_LENGTHS))
    general = block_attn.attention(q, k, v, causal=causal, return_lse=True, **blocks)
    low = reference.attention(q, k, v, causal=causal, **blocks)
    high = reference.attention(q.double(), k.double(), v.double(), causal=causal, **blocks)
    for name, (out, _) in {"split": split, "general": general}.items():
        assert_within_reference_error(out, low, high, factor=2, atol=1e-3, what=f"{name} out")
    assert_close(split[1], general[1], atol=1e-4, rtol=1e-4, what="lse, split against general")


@pytest.mark.parametrize(
    ("device", "dtype", "max_seqlen_q", "max_seqlen_k"),
    [
        ("cpu", torch.bfloat16, 1, 2048),
        ("cuda", torch.float32, 1, 2048),
        ("cuda", torch.float64, 1, 2048),
        ("cuda", torch.bfloat16, 17, 2048),
        ("cuda", torch.float16, 1, 127),
    ],
)
def test_decoding_kernel_never_claims_other_problems(device, dtype, max_seqlen_q, max_seqlen_k):
    """CPU tensors, float32/float64, blocks of more than 16 queries and short key blocks never
    take it."""
    assert not decoding_kernel_applies(device, dtype, max_seqlen_q, max_seqlen_k)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_tile_split_over_threads_matches_one_thread(dtype, restore_threads):
    """CPU: one token of 32 query heads against one kv head is a single tile, whose keys are
    split over the threads (here 4) and merged; on one thread the tile stays whole. Both match
    the reference, and the split run repeats bitwise."""
    q, k, v = make_qkv(1, 32, 1, 3, 3000, 64, dtype=dtype)
    blocks = {"cu_seqlens": [0, 1, 2, 3], "cu_seqlens_k": [0, 2900, 2950, 3000]}
    torch.set_num_threads(4)
    split = block_attn.attention(q, k, v, causal=True, return_lse=True, **blocks)
    again = block_attn.attention(q, k, v, causal=True, return_lse=True, **blocks)
    torch.set_num_threads(1)
    whole = block_attn.attention(q, k, v, causal=True, return_lse=True, **blocks)
    want_out, want_lse = reference.attention(
        q.double(), k.double(), v.double(), causal=True, return_lse=True, **blocks
    )
    assert torch.equal(split[0], again[0]) and torch.equal(split[1], again[1])
    atol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    for name, (out, lse) in {"split": split, "one thread": whole}.items():
        assert_close(out, want_out, atol=atol, rtol=atol, what=f"{name} out")
        assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, what=f"{name} lse")


def test_nan_in_one_key_range_stays_visible(restore_threads):
    """A NaN key in one of the split ranges makes its rows NaN, as without the split."""
    q, k, v = make_qkv(1, 8, 1, 1, 4000, 32)
    k[0, 0, 3500, 0] = float("nan")
    torch.set_num_threads(4)
    out, lse = block_attn.attention(q, k, v, return_lse=True)
    assert out.isnan().all() and lse.isnan().all()
