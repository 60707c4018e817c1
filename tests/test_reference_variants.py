"""The reference's attention variants (block_attn.variants) against a loop over every query and
key written from their definitions, plus dropout, gradients and argument checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from block_attn import BlockLayout, reference
from block_attn.dropout_mask import draw_seed_offset, keep_mask

DT = torch.float64
OFFSETS_Q = [0, 4, 4, 9]
OFFSETS_K = [0, 6, 7, 11]  # separate key blocks: Lk > Lq, an empty query block, Lk < Lq


def inputs(seed=0, sinks=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 9, 5, dtype=DT, generator=gen)
    k = torch.randn(2, 2, 11, 5, dtype=DT, generator=gen)
    v = torch.randn(2, 2, 11, 5, dtype=DT, generator=gen)
    s = torch.randn(4, dtype=DT, generator=gen) if sinks else None
    return q, k, v, s


def by_definition(q, k, v, causal, window, softcap, slopes, sinks, scale):
    """out, lse from the variants' definitions, one (batch, head, query) at a time."""
    batch, heads, rows, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, rows), -math.inf, dtype=DT)
    left, right = window
    if causal:
        right = 0
    for b, h, i in itertools.product(range(batch), range(heads), range(rows)):
        block = next(
            (j for j in range(len(OFFSETS_Q) - 1) if OFFSETS_Q[j] <= i < OFFSETS_Q[j + 1]), None
        )
        terms = []
        if block is not None:
            q0, k0, k1 = OFFSETS_Q[block], OFFSETS_K[block], OFFSETS_K[block + 1]
            len_q = OFFSETS_Q[block + 1] - q0
            aligned = (i - q0) + (k1 - k0) - len_q
            for t in range(k1 - k0):
                behind = aligned - t
                if causal and behind < 0:
                    continue
                if left >= 0 and behind > left:
                    continue
                if right >= 0 and behind < -right:
                    continue
                s = scale * float(q[b, h, i] @ k[b, h // group, k0 + t])
                if softcap > 0:
                    s = softcap * math.tanh(s / softcap)
                if slopes is not None:
                    slope = slopes[b, h] if slopes.dim() == 2 else slopes[h]
                    s -= float(slope) * abs(behind)
                terms.append((s, v[b, h // group, k0 + t]))
        logits = [s for s, _ in terms] + ([float(sinks[h])] if sinks is not None else [])
        if not logits:
            continue
        top = max(logits)
        total = top + math.log(sum(math.exp(x - top) for x in logits))
        lse[b, h, i] = total
        for s, value in terms:
            out[b, h, i] += math.exp(s - total) * value
    return out, lse


CASES = {
    "window-both-sides": dict(causal=False, window=(2, 1)),
    "window-causal-left": dict(causal=True, window=(3, -1)),
    "window-right-only": dict(causal=False, window=(-1, 0)),
    "softcap": dict(causal=True, softcap=0.7),
    "alibi-per-head": dict(causal=True, slopes="heads"),
    "alibi-per-batch-and-head": dict(causal=False, slopes="batch"),
    "sinks": dict(causal=True, sinks=True),
    "all-together": dict(causal=True, window=(2, -1), softcap=1.3, slopes="heads", sinks=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_definition(case):
    spec = CASES[case]
    q, k, v, sinks = inputs(sinks=spec.get("sinks", False))
    slopes = {"heads": torch.tensor([0.5, 0.25, 0.125, 0.0625]),
              "batch": torch.rand(2, 4)}.get(spec.get("slopes"))  # fmt: skip
    kwargs = dict(
        causal=spec["causal"],
        window_size=spec.get("window", (-1, -1)),
        softcap=spec.get("softcap", 0.0),
        alibi_slopes=slopes,
        sinks=sinks,
    )
    out, lse = reference.attention(
        q, k, v, cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, scale=0.6, return_lse=True, **kwargs
    )
    want_out, want_lse = by_definition(
        q, k, v, spec["causal"], kwargs["window_size"], kwargs["softcap"], slopes, sinks, 0.6
    )
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_unbounded_window_is_the_plain_path():
    q, k, v, _ = inputs(1)
    plain = reference.attention(q, k, v, cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True)
    windowed = reference.attention(
        q, k, v, cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True, window_size=(-1, -1)
    )
    assert torch.equal(plain, windowed)


def test_a_key_outside_every_window_changes_nothing():
    q, k, v, _ = inputs(2)
    kwargs = dict(cu_seqlens=[0, 9], cu_seqlens_k=[0, 11], causal=True, window_size=(1, -1))
    before = reference.attention(q, k, v, **kwargs)
    # Key 0 sits at aligned distance >= 2 behind every query (i' = i + 2), outside a window of 1.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 0] += 100.0
    v2[:, :, 0] -= 50.0
    assert torch.equal(reference.attention(q, k2, v2, **kwargs), before)
    k2[:, :, 2] += 1.0  # key 2 is inside query 0's window
    assert not torch.equal(reference.attention(q, k2, v, **kwargs), before)


def test_gradients_including_sinks():
    q, k, v, sinks = inputs(3, sinks=True)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])

    def f(q, k, v, sinks):
        return reference.attention(
            q, k, v, cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True,
            window_size=(3, -1), softcap=1.1, alibi_slopes=slopes, sinks=sinks, return_lse=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, leaves)


def test_row_without_keys_with_sinks():
    q, k, v, sinks = inputs(4, sinks=True)
    # Queries [4, 9) attend key block [7, 11); with a window of 0 on both sides the first query
    # (aligned position -1) sees none of them.
    out, lse = reference.attention(
        q, k, v, cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, window_size=(0, 0), sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    assert (out[:, :, 4] == 0).all()
    assert torch.equal(lse[:, :, 4], sinks.expand(2, 4))


def test_dropout_applies_the_mask_rule():
    q, k, v, _ = inputs(5)
    p = 0.3
    kwargs = dict(cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True)
    dropped = reference.attention(
        q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(8), **kwargs
    )
    seed_offset = draw_seed_offset(torch.Generator().manual_seed(8), q.device)
    keep = keep_mask(seed_offset, p, 2, 4, torch.arange(9), torch.arange(11))
    allowed = BlockLayout.from_offsets(OFFSETS_Q, OFFSETS_K).mask(True)
    probs, _ = reference.probabilities(q, k, allowed, 1 / math.sqrt(5))
    expected = (probs * keep / (1 - p)) @ v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(dropped, expected, rtol=1e-12, atol=1e-12)
    again = reference.attention(
        q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(8), **kwargs
    )
    assert torch.equal(dropped, again)


def test_no_dropout_draws_no_random_numbers():
    torch.manual_seed(3)
    q, k, v, _ = inputs(6)
    reference.attention(q, k, v, dropout_p=0.0)
    drawn = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(window_size=4), TypeError, r"window_size must be a pair of ints"),
        (dict(window_size=(1, 2, 3)), ValueError, r"window_size must be a pair"),
        (dict(window_size=(1.5, 2)), TypeError, r"window_size must be an int"),
        (dict(window_size=(-2, 0)), ValueError, r"window_size sides must be >= 0, or -1"),
        (dict(softcap=-1.0), ValueError, r"softcap must be a finite float >= 0"),
        (dict(softcap="1"), TypeError, r"softcap must be a float"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(generator=3), TypeError, r"generator must be a torch.Generator"),
        (dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a torch.Tensor"),
        (dict(alibi_slopes=torch.ones(4, dtype=DT)), TypeError, r"alibi_slopes must be float32"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\)"),
        (dict(sinks=torch.ones(2, 4)), ValueError, r"sinks must have shape \(Hq,\)"),
        (dict(sinks=torch.ones(4, dtype=torch.int64)), TypeError, r"sinks must be a floating"),
    ],
)
def test_bad_variant_arguments(kwargs, error, match):
    q, k, v, _ = inputs()
    with pytest.raises(error, match=match):
        reference.attention(q, k, v, **kwargs)
