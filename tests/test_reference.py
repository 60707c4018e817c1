"""The reference itself, against PyTorch SDPA and a hand-built mask (no kernel involved)."""

from __future__ import annotations

import pytest
import torch
from common import MASKS, assert_close, hand_mask, make_qkv, masked_scores, sdpa_with_mask

from block_attn import reference
from block_attn.blocks import BlockLayout, resolve_blocks


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_reference_matches_sdpa(mask, causal):
    q, k, v = make_qkv(2, 4, 2, 70, 70, 16, dtype=torch.float64)
    kwargs, offsets = mask.resolve(70, "cpu", seed=3)
    out, lse = reference.attention(q, k, v, causal=causal, return_lse=True, **kwargs)
    allowed = hand_mask(offsets, 70, 70, causal)
    assert_close(out, sdpa_with_mask(q, k, v, allowed), atol=1e-12, rtol=1e-10)
    logsumexp = torch.logsumexp(masked_scores(q, k, allowed), dim=-1)
    assert_close(lse, logsumexp, atol=1e-12, rtol=1e-10, what="lse")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("Nq", "Nk"), [(3, 9), (9, 3), (1, 1), (5, 5)])
def test_layout_mask_matches_hand_mask(Nq, Nk, causal):
    assert torch.equal(BlockLayout.full(Nq, Nk).mask(causal), hand_mask([0, Nk], Nq, Nk, causal))


def test_layout_mask_for_blocks():
    layout = resolve_blocks(10, 10, torch.device("cpu"), cu_seqlens=[0, 3, 4, 10]).on_host()
    expected = hand_mask([0, 3, 4, 10], 10, 10, causal=True)
    assert torch.equal(layout.mask(True), expected)
    assert layout.max_len_q == layout.max_len_k == 6
    fixed = BlockLayout.fixed(10, 4)
    assert fixed.offsets_q == (0, 4, 8, 10) and fixed.max_len_q == 4
    assert BlockLayout.fixed(10, 25).offsets_q == (0, 10)
