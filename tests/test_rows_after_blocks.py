"""Offsets that end before the tensors' length: the rows after them belong to no block.

Such query rows output 0 with lse = -inf and get no gradient; such key rows are never read and
get no gradient. Their inputs hold NaN here, so a kernel that read them would poison the rows it
computes. The expected values come from a mask built row by row in this file.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from common import assert_close, make_qkv

import block_attn
from block_attn import reference

TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def mask_from_rows(offsets_q, offsets_k, seqlen_q, seqlen_k, causal):
    """(Nq, Nk): query i attends key j iff both lie in block b and (causal) j - k0 <= i - q0 +
    Lk - Lq; rows past the last offsets lie in no block."""
    allowed = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for b in range(len(offsets_q) - 1):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        for i in range(q0, q1):
            for j in range(k0, k1):
                allowed[i, j] = not causal or j - k0 <= i - q0 + (k1 - k0) - (q1 - q0)
    return allowed


def expected(q, k, v, allowed, scale):
    """Float64 outputs and lse computed from a dense mask, NaN inputs outside it zeroed."""
    q, k, v = (t.detach().double().nan_to_num(0.0) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


def poison_rows(t, first_row):
    """NaN in rows [first_row, N) of a (B, H, N, D) view, in place, without autograd."""
    with torch.no_grad():
        t[:, :, first_row:] = float("nan")


CASES = {
    # name: (query offsets, key offsets or None, Nq, Nk, causal, Hq, Hkv)
    "query-tail": ([0, 5, 9, 20], None, 26, 26, True, 4, 2),
    "no-blocks-at-all-covered": ([0, 0], None, 7, 7, False, 2, 2),
    "separate-keys-both-tails": ([0, 3, 3, 17], [0, 6, 9, 30], 19, 41, True, 3, 1),
    "key-tail-only": ([0, 4, 12], [0, 7, 20], 12, 23, False, 2, 1),
    "long-tail-past-max-seqlen": ([0, 2, 5], None, 150, 150, True, 2, 1),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kept", [False, True], ids=["listed", "kept"])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_rows_after_the_last_offset(device, dtype, case, kept, layout):
    offsets_q, offsets_k, seqlen_q, seqlen_k, causal, hq, hkv = CASES[case]
    separate = offsets_k is not None
    offsets_k = offsets_k if separate else offsets_q
    q, k, v = make_qkv(
        2, hq, hkv, seqlen_q, seqlen_k, 16, dtype=dtype, device=device, layout=layout,
        requires_grad=True,
    )  # fmt: skip
    poison_rows(q, offsets_q[-1])
    poison_rows(k, offsets_k[-1])
    poison_rows(v, offsets_k[-1])
    kwargs = {"causal": causal, "scale": 0.4, "return_lse": True}
    if kept:
        longest = max(b - a for a, b in itertools.pairwise(offsets_q))
        kwargs |= {"cu_seqlens": torch.tensor(offsets_q, dtype=torch.int32, device=device),
                   "max_seqlen": max(longest, 1)}  # fmt: skip
        if separate:
            longest_k = max(b - a for a, b in itertools.pairwise(offsets_k))
            kwargs |= {"cu_seqlens_k": torch.tensor(offsets_k, dtype=torch.int32, device=device),
                       "max_seqlen_k": max(longest_k, 1)}  # fmt: skip
    else:
        kwargs |= {"cu_seqlens": offsets_q} | ({"cu_seqlens_k": offsets_k} if separate else {})
    out, lse = block_attn.attention(q, k, v, **kwargs)

    allowed = mask_from_rows(offsets_q, offsets_k, seqlen_q, seqlen_k, causal).to(device)
    want_out, want_lse = expected(q, k, v, allowed, 0.4)
    tol = TOLERANCES[dtype]
    assert_close(out, want_out, atol=tol, rtol=tol)
    assert_close(lse, want_lse.float() if dtype != torch.float64 else want_lse, atol=tol, rtol=tol)
    tail = offsets_q[-1]
    assert (out[:, :, tail:] == 0).all(), "rows after the last query offset must output 0"
    assert torch.isneginf(lse[:, :, tail:]).all(), "their lse must be -inf"

    grad_out = torch.randn_like(out)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
    assert (grad_q[:, :, tail:] == 0).all()
    assert (grad_k[:, :, offsets_k[-1] :] == 0).all()
    assert (grad_v[:, :, offsets_k[-1] :] == 0).all()
    leaves = [t.detach().double().nan_to_num(0.0).requires_grad_() for t in (q, k, v)]
    want_grads = torch.autograd.grad(
        expected_differentiable(*leaves, allowed, 0.4), leaves, grad_out.double()
    )
    for name, got, want in zip("qkv", (grad_q, grad_k, grad_v), want_grads, strict=True):
        assert_close(got, want, atol=10 * tol, rtol=10 * tol, what=f"grad_{name}")


def expected_differentiable(q, k, v, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~has_key, 0.0)
    return probs @ v


def test_reference_and_layout_agree(device):
    q, k, v = make_qkv(1, 2, 2, 12, 12, 8, dtype=torch.float64, device=device)
    layout = block_attn.BlockLayout.from_seqlens([3, 5])
    ours = block_attn.attention(q, k, v, blocks=layout, causal=True)
    theirs = reference.attention(q, k, v, cu_seqlens=[0, 3, 8], causal=True)
    assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    assert (theirs[:, :, 8:] == 0).all()


def test_gradcheck_with_tails():
    q, k, v = make_qkv(1, 2, 1, 7, 9, 4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return block_attn.attention(
            q, k, v, cu_seqlens=[0, 2, 5], cu_seqlens_k=[0, 4, 6], causal=True
        )

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_module_need_weights_with_a_tail():
    module = block_attn.nn.MultiheadBlockAttention(16, 2, causal=True, dtype=torch.float64)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    out, weights = module(x, cu_seqlens=[0, 4, 7], need_weights=True)
    assert weights.shape[-2:] == (10, 10)
    assert (weights[..., 7:, :] == 0).all() and (weights[..., :, 7:] == 0).all()
    rows = weights[..., :7, :].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
    assert out.shape == x.shape
