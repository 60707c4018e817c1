"""Decoding against padded (static) key/value caches with ``padded_cache_blocks``: every
sequence's new tokens against the valid rows of its own slot, checked per sequence against the
float64 reference; the unused rows are never read (they hold NaN here) and get zero gradients.
"""

from __future__ import annotations

import pytest
import torch
from common import assert_close, assert_within_reference_error, grads
from conftest import requires_cuda

import block_attn
from block_attn import reference

CACHE_SIZE = 300
LENGTHS = [300, 17, 0, 130]  # a full slot, a short one, an empty one


def packed(x: torch.Tensor) -> torch.Tensor:
    """(B, rows, H, D) -> (1, H, B * rows, D), a view."""
    return x.flatten(0, 1).unsqueeze(0).transpose(1, 2)


def make_cache(device, dtype, heads_q=8, heads_kv=2, new_tokens=1, head_dim=64):
    """q (B, new_tokens, Hq, D) and a (B, CACHE_SIZE, Hkv, D) cache whose unused rows are NaN."""
    count = len(LENGTHS)
    q = torch.randn(count, new_tokens, heads_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(count, CACHE_SIZE, heads_kv, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    for i, length in enumerate(LENGTHS):
        k[i, length:] = float("nan")
        v[i, length:] = float("nan")
    return q, k, v


def per_sequence_reference(q, k, v, new_tokens, dtype=torch.float64):
    """Each sequence alone: its tokens against its valid rows, causal bottom-right."""
    outs = []
    for i, length in enumerate(LENGTHS):
        qi = q[i : i + 1].transpose(1, 2).to(dtype)
        ki, vi = (t[i : i + 1, :length].transpose(1, 2).to(dtype) for t in (k, v))
        if length == 0:  # no key: out 0
            outs.append(torch.zeros_like(qi))
        else:
            outs.append(reference.attention(qi, ki, vi, causal=True))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("container", ["list", "tensor"])
@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_sequence_attends_its_own_slot(device, dtype, new_tokens, container):
    q, k, v = make_cache(device, dtype, new_tokens=new_tokens)
    lengths = LENGTHS if container == "list" else torch.tensor(LENGTHS, device=device)
    blocks = block_attn.padded_cache_blocks(lengths, CACHE_SIZE, new_tokens=new_tokens)
    out = block_attn.attention(packed(q), packed(k), packed(v), causal=True, **blocks)
    assert torch.isfinite(out).all(), "an unused (NaN) cache row was read"
    high = per_sequence_reference(q, k, v, new_tokens)
    if dtype == torch.float32:
        assert_close(out, high, atol=2e-6, rtol=2e-5, what="out")
    else:
        low = per_sequence_reference(q, k, v, new_tokens, dtype=dtype)
        assert_within_reference_error(out, low, high, factor=2, atol=1e-3, what="out")


def test_gradients_reach_only_the_valid_rows(device):
    q, k, v = make_cache(device, torch.float64, new_tokens=2)
    k, v = (t.nan_to_num(0.0) for t in (k, v))  # finite, so that gradients are comparable
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    blocks = block_attn.padded_cache_blocks(LENGTHS, CACHE_SIZE, new_tokens=2)
    out = block_attn.attention(packed(q), packed(k), packed(v), causal=True, **blocks)
    expected = per_sequence_reference(q, k, v, 2)
    grad_out = torch.randn_like(out)
    got = grads(out, (q, k, v), grad_out)
    want = grads(expected, (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert_close(g, w, atol=1e-10, rtol=1e-9, what=f"grad_{name}")
    for i, length in enumerate(LENGTHS):
        assert not got[1][i, length:].any(), f"slot {i}: unused rows got a key gradient"


def test_offsets_pair_tokens_with_slots():
    blocks = block_attn.padded_cache_blocks([5, 0, 3], 8, new_tokens=2)
    assert blocks == {"cu_seqlens": [0, 2, 2, 4, 4, 6, 6], "cu_seqlens_k": [0, 5, 8, 8, 16, 19, 24]}
    made = block_attn.padded_cache_blocks(torch.tensor([5, 0, 3]), 8, new_tokens=2)
    assert made["cu_seqlens"].tolist() == blocks["cu_seqlens"]
    assert made["cu_seqlens_k"].tolist() == blocks["cu_seqlens_k"]
    assert made["cu_seqlens"].dtype == made["cu_seqlens_k"].dtype == torch.int32
    assert (made["max_seqlen"], made["max_seqlen_k"]) == (2, 8)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([9], 8), ValueError, r"cache_lengths\[0\] = 9 is outside \[0, cache_size = 8\]"),
        (([3, -1], 8), ValueError, r"cache_lengths\[1\] = -1"),
        (([], 8), ValueError, "at least one sequence"),
        (([3], -1), ValueError, "cache_size must be an int >= 0"),
        (([3], 8, 0), ValueError, "new_tokens must be an int >= 1"),
        (([3.0], 8), TypeError, r"cache_lengths\[0\] must be an int"),
        (("3", 8), TypeError, "cache_lengths must be a sequence of ints or an integer tensor"),
        ((torch.tensor([[3]]), 8), ValueError, "non-empty 1-D tensor"),
        ((torch.tensor([3.0]), 8), TypeError, "integer tensor"),
        ((torch.tensor([3]), 2**30, 1), ValueError, None),
    ],
)
def test_bad_arguments_name_the_problem(args, error, match):
    if match is None:  # two slots would overflow int32 offsets
        args = (torch.tensor([3, 3]), *args[1:])
        match = "exceed int32 offsets"
    with pytest.raises(error, match=match):
        block_attn.padded_cache_blocks(*args)


@requires_cuda
def test_decoding_step_in_a_cuda_graph_follows_new_lengths():
    """Lengths kept on the GPU: the offsets are made there, so the step can be captured, and
    lengths copied into the same tensor between replays take effect."""
    q, k, v = make_cache("cuda", torch.bfloat16)
    k, v = (t.nan_to_num(0.0) for t in (k, v))
    lengths = torch.tensor(LENGTHS, device="cuda")

    def step():
        blocks = block_attn.padded_cache_blocks(lengths, CACHE_SIZE)
        return block_attn.attention(packed(q), packed(k), packed(v), causal=True, **blocks)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lengths in ([300, 17, 0, 130], [1, 299, 150, 0]):
        lengths.copy_(torch.tensor(new_lengths))
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        assert_close(out, expected, atol=0, rtol=0, what=f"replay with lengths {new_lengths}")
