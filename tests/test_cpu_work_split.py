"""CPU backward over blocks long enough to be split into key ranges across threads.

Each key range writes its own dQ partial and the partials are summed in range order; these
tests pin the thread count so that the split happens, and check gradients against a dense
float64 answer and run-to-run bitwise equality.
"""

from __future__ import annotations

import pytest
import torch
from common import assert_close
from test_separate_key_blocks import dense_reference, offsets

from block_attn import ops
from block_attn.blocks import BlockLayout

# (query block lengths, key block lengths, causal): one long block beside short ones, so that
# only the long one is split; equal and unequal query/key lengths.
LAYOUTS = [
    pytest.param([700, 5, 40], [700, 5, 40], True, id="long-causal"),
    pytest.param([13, 650], [13, 650], False, id="long-full"),
    pytest.param([600], [300], True, id="causal-Nq>Nk"),
    pytest.param([260], [900], True, id="causal-Nq<Nk"),
    pytest.param([520, 0], [520, 9], True, id="empty-query-block"),
]


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def gradients(q, k, v, layout, causal, scale, grad_out):
    cu_q, cu_k = layout.tensors(torch.device("cpu"))
    out, _ = ops.attention_forward(
        q, k, v, cu_q, cu_k, layout.max_len_q, layout.max_len_k, causal, scale
    )
    return torch.autograd.grad(out, (q, k, v), grad_out)


@pytest.mark.parametrize(("lengths_q", "lengths_k", "causal"), LAYOUTS)
def test_split_blocks_match_dense(threads, lengths_q, lengths_k, causal):
    off_q, off_k = offsets(lengths_q), offsets(lengths_k)
    layout = BlockLayout(tuple(off_q), tuple(off_k), max(lengths_q), max(lengths_k))
    gen = torch.Generator().manual_seed(sum(lengths_q) + threads)
    q = torch.randn(1, 4, off_q[-1], 24, dtype=torch.float64, generator=gen)
    k = torch.randn(1, 2, off_k[-1], 24, dtype=torch.float64, generator=gen)
    v = torch.randn(1, 2, off_k[-1], 24, dtype=torch.float64, generator=gen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=gen)

    got = gradients(q, k, v, layout, causal, 0.3, grad_out)
    expected_out, _ = dense_reference(q, k, v, layout, causal, 0.3)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), got, expected, strict=True):
        assert_close(a, b, atol=1e-11, rtol=1e-9, what=f"{name} with {threads} threads")


def test_split_blocks_are_bitwise_repeatable(threads):
    layout = BlockLayout((0, 900, 950), (0, 900, 950), 900, 900)
    gen = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (torch.randn(1, 2, 950, 64, generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    first = gradients(q, k, v, layout, True, 0.125, grad_out)
    for run in range(1, 3):
        again = gradients(q, k, v, layout, True, 0.125, grad_out)
        for name, a, b in zip(("grad_q", "grad_k", "grad_v"), again, first, strict=True):
            assert torch.equal(a, b), f"{name} differs between run 0 and run {run}"
