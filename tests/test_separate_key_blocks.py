"""The operators with separate query and key block offsets (``cu_seqlens_q != cu_seqlens_k``).

Block j pairs queries [cq_j, cq_{j+1}) with keys [ck_j, ck_{j+1}); causal masking is
bottom-right aligned per block, and blocks may be empty on either side. This is what
context-parallel attention calls for each (query shard, key shard) pair.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from common import assert_close, assert_within_reference_error

import block_attn
from block_attn import ops
from block_attn.blocks import BlockLayout

# (query block lengths, key block lengths): ragged, Lq < Lk, Lq > Lk, empty on either side.
BLOCK_PAIRS = [
    pytest.param([5, 17, 1], [9, 3, 30], id="ragged"),
    pytest.param([8, 8], [24, 40], id="fewer-queries"),
    pytest.param([33, 12], [7, 12], id="more-queries"),
    pytest.param([0, 10, 6], [4, 0, 6], id="empty-blocks"),
    pytest.param([70], [130], id="one-block-off-tile"),
]


def dense_reference(q, k, v, layout: BlockLayout, causal: bool, scale: float):
    """``block_attn.reference`` over ``layout``: (out, lse)."""
    return block_attn.reference.attention(
        q, k, v, blocks=layout, causal=causal, scale=scale, return_lse=True
    )


def offsets(lengths: list[int]) -> list[int]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out


@pytest.mark.parametrize(("lengths_q", "lengths_k"), BLOCK_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads_q", "heads_kv"), [(2, 2), (4, 1)])
def test_forward_and_gradients_match_dense(device, lengths_q, lengths_k, causal, heads_q, heads_kv):
    off_q, off_k = offsets(lengths_q), offsets(lengths_k)
    layout = BlockLayout(tuple(off_q), tuple(off_k), max(lengths_q), max(lengths_k))
    head_dim, scale = 24, 0.3
    q = torch.randn(2, heads_q, off_q[-1], head_dim, dtype=torch.float64, device=device)
    k = torch.randn(2, heads_kv, off_k[-1], head_dim, dtype=torch.float64, device=device)
    v = torch.randn_like(k)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    cu_q, cu_k = layout.tensors(torch.device(device))

    out, lse = ops.attention_forward(
        q, k, v, cu_q, cu_k, layout.max_len_q, layout.max_len_k, causal, scale
    )
    expected_out, expected_lse = dense_reference(q, k, v, layout, causal, scale)
    assert_close(out, expected_out, atol=1e-12, rtol=1e-10, what="out")
    assert torch.equal(lse.isinf(), expected_lse.isinf()), "rows without keys differ"
    finite = ~expected_lse.isinf()
    assert_close(lse[finite], expected_lse[finite], atol=1e-12, rtol=1e-10, what="lse")

    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse).masked_fill(~finite, 0.0)
    loss = (out * grad_out).sum() + (lse.masked_fill(~finite, 0.0) * grad_lse).sum()
    got = torch.autograd.grad(loss, (q, k, v))
    expected_loss = (expected_out * grad_out).sum() + (
        expected_lse.masked_fill(~finite, 0.0) * grad_lse
    ).sum()
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), got, expected, strict=True):
        assert_close(a, b, atol=1e-11, rtol=1e-9, what=name)


def test_gradcheck_separate_blocks(device):
    off_q, off_k = [0, 3, 3, 9], [0, 5, 7, 11]
    layout = BlockLayout(tuple(off_q), tuple(off_k), 6, 5)
    cu_q, cu_k = layout.tensors(torch.device(device))
    inputs = [
        torch.randn(1, 2, n, 4, dtype=torch.float64, device=device, requires_grad=True)
        for n in (9, 11, 11)
    ]
    inputs[1] = inputs[1][:, :1].detach().requires_grad_()
    inputs[2] = inputs[2][:, :1].detach().requires_grad_()

    def fn(q, k, v):
        return ops.attention_forward(q, k, v, cu_q, cu_k, 6, 5, True, 0.5)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_random_layouts_match_dense(device):
    rng = random.Random(1)
    for _ in range(10):
        blocks = rng.randint(1, 5)
        lengths_q = [rng.randint(0, 40) for _ in range(blocks)]
        lengths_k = [rng.randint(0, 40) for _ in range(blocks)]
        lengths_q[0] = max(lengths_q[0], 1)
        lengths_k[0] = max(lengths_k[0], 1)
        causal = rng.random() < 0.5
        off_q, off_k = offsets(lengths_q), offsets(lengths_k)
        layout = BlockLayout(tuple(off_q), tuple(off_k), max(lengths_q), max(lengths_k))
        q = torch.randn(1, 3, off_q[-1], 16, dtype=torch.float32, device=device)
        k = torch.randn(1, 3, off_k[-1], 16, dtype=torch.float32, device=device)
        v = torch.randn_like(k)
        cu_q, cu_k = layout.tensors(torch.device(device))
        out, _ = ops.attention_forward(
            q, k, v, cu_q, cu_k, layout.max_len_q, layout.max_len_k, causal, 0.25
        )
        expected, _ = dense_reference(q.double(), k.double(), v.double(), layout, causal, 0.25)
        assert_close(
            out, expected, atol=1e-5, rtol=1e-4, what=f"out for {lengths_q}/{lengths_k} {causal=}"
        )


# Lengths on both sides of the tensor-core kernels' 64- and 128-row tiles, Lq < Lk and Lq > Lk
# (whose first queries see no key under the causal mask), with an empty block.
LOW_PRECISION_PAIRS = [
    pytest.param([70, 200, 1, 0], [130, 150, 300, 5], id="tile-edges"),
    pytest.param([129, 64], [64, 257], id="one-tile-off"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("lengths_q", "lengths_k"), LOW_PRECISION_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_low_precision_separate_blocks(device, dtype, lengths_q, lengths_k, causal, head_dim):
    off_q, off_k = offsets(lengths_q), offsets(lengths_k)
    layout = BlockLayout(tuple(off_q), tuple(off_k), max(lengths_q), max(lengths_k))
    cu_q, cu_k = layout.tensors(torch.device(device))
    scale = head_dim**-0.5
    q = torch.randn(1, 4, off_q[-1], head_dim, dtype=dtype, device=device)
    k = torch.randn(1, 2, off_k[-1], head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    grad_out = torch.randn_like(q)

    def forward_and_grads(fn, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = fn(q, k, v)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype)))

    ours = forward_and_grads(
        lambda q, k, v: ops.attention_forward(
            q, k, v, cu_q, cu_k, layout.max_len_q, layout.max_len_k, causal, scale
        ),
        q, k, v,
    )  # fmt: skip
    reference = lambda q, k, v: dense_reference(q, k, v, layout, causal, scale)  # noqa: E731
    low = forward_and_grads(reference, q, k, v)
    high = forward_and_grads(reference, q.double(), k.double(), v.double())

    finite = ~high[1].isinf()
    assert torch.equal(ours[1].isinf().cpu(), (~finite).cpu()), "rows without keys differ"
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    for name, a, a_low, a_high in zip(names, ours, low, high, strict=True):
        if name == "lse":
            a, a_low, a_high = a[finite], a_low[finite], a_high[finite]
        assert_within_reference_error(
            a, a_low, a_high, factor=2 if name in ("out", "lse") else 3, atol=1e-3,
            what=f"{dtype} {name}",
        )  # fmt: skip


# The public API's cu_seqlens_k: packed sequences whose queries attend their own keys (e.g. new
# tokens against a per-sequence cache, bottom-right causal), given three ways.
API_CONTAINERS = ["list", "int64-tensor", "on-device"]


def _api_blocks(device: str, container: str, off_q: list[int], off_k: list[int]) -> dict:
    if container == "list":
        return {"cu_seqlens": off_q, "cu_seqlens_k": off_k}
    if container == "int64-tensor":
        return {"cu_seqlens": torch.tensor(off_q), "cu_seqlens_k": torch.tensor(off_k)}
    longest_q = max(b - a for a, b in itertools.pairwise(off_q))
    longest_k = max(b - a for a, b in itertools.pairwise(off_k))
    return {
        "cu_seqlens": torch.tensor(off_q, dtype=torch.int32, device=device),
        "cu_seqlens_k": torch.tensor(off_k, dtype=torch.int32, device=device),
        "max_seqlen": longest_q + 1,
        "max_seqlen_k": longest_k + 2,
    }


@pytest.mark.parametrize("container", API_CONTAINERS)
@pytest.mark.parametrize("causal", [False, True])
def test_public_api_with_key_offsets(device, container, causal):
    # Empty blocks on either side: block 2 has keys but no queries, block 4 queries but no keys
    # (they output 0, with lse = -inf).
    lengths_q, lengths_k = [3, 17, 0, 1, 4, 30], [9, 17, 6, 30, 0, 5]
    off_q, off_k = offsets(lengths_q), offsets(lengths_k)
    layout = BlockLayout(tuple(off_q), tuple(off_k), max(lengths_q), max(lengths_k))
    q = torch.randn(2, 4, off_q[-1], 16, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(2, 2, off_k[-1], 16, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn_like(k).requires_grad_()
    blocks = _api_blocks(device, container, off_q, off_k)
    out, lse = block_attn.attention(q, k, v, causal=causal, return_lse=True, **blocks)
    expected_out, expected_lse = dense_reference(q, k, v, layout, causal, 16**-0.5)
    assert_close(out, expected_out, atol=1e-12, rtol=1e-10, what="out")
    finite = ~expected_lse.isinf()
    assert_close(lse[finite], expected_lse[finite], atol=1e-12, rtol=1e-10, what="lse")
    reference_out = block_attn.reference.attention(q, k, v, causal=causal, **blocks)
    assert_close(out, reference_out, atol=1e-12, rtol=1e-10, what="out vs block_attn.reference")

    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), got, expected, strict=True):
        assert_close(a, b, atol=1e-11, rtol=1e-9, what=name)


def test_public_api_key_offsets_gradcheck(device):
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 1, 11, 4, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn_like(k).requires_grad_()
    blocks = {"cu_seqlens": [0, 3, 9], "cu_seqlens_k": [0, 5, 11], "causal": True}
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_attn.attention(q, k, v, **blocks), (q, k, v), atol=1e-5
    )
