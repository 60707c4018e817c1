"""Block layouts: the offsets of fixed blocks (never listed), and the offset tensors the
kernels read, made on each device without waiting for it.
"""

from __future__ import annotations

import pytest
import torch

from block_attn.blocks import BlockLayout, EvenOffsets


def test_even_offsets_behave_as_their_tuple():
    for seqlen in range(40):
        for step in range(1, 45):
            offsets = EvenOffsets(seqlen, step)
            listed = (*range(0, seqlen, step), seqlen)
            assert tuple(offsets) == listed, (seqlen, step)
            assert offsets == listed and listed == offsets and offsets == list(listed)
            assert len(offsets) == len(listed) and hash(offsets) == hash(listed)
            assert offsets[-1] == seqlen and offsets[1:3] == listed[1:3]
    assert EvenOffsets(10, 20) == EvenOffsets(10, 30)  # both (0, 10)
    assert EvenOffsets(10, 3) != EvenOffsets(10, 4)
    assert EvenOffsets(10, 3) != (0, 3, 6, 10)
    with pytest.raises(IndexError, match="out of range"):
        EvenOffsets(10, 3)[5]
    with pytest.raises(ValueError, match="step > 0"):
        EvenOffsets(10, 0)


def test_fixed_layout_of_a_million_tokens_lists_nothing():
    layout = BlockLayout.fixed(1 << 20, 16)
    assert isinstance(layout.offsets_q, EvenOffsets)
    assert layout.num_blocks == 1 << 16 and layout.offsets_q[12345] == 12345 * 16


FIXED_CASES = [(1, 1), (5, 3), (127, 64), (128, 64), (129, 64), (100, 500), (4096, 128)]


@pytest.mark.parametrize(("seqlen", "block_size"), FIXED_CASES)
def test_fixed_offsets_made_on_device_match_the_layout(device, seqlen, block_size):
    layout = BlockLayout.fixed(seqlen, block_size)
    cu_q, cu_k = layout.tensors(torch.device(device))
    assert cu_q.dtype == torch.int32 and cu_q.device.type == device
    assert cu_q.tolist() == list(layout.offsets_q), (seqlen, block_size)
    assert cu_k is cu_q


@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(1, 1), (7, 300), (300, 7)])
def test_one_block_offsets_made_on_device(device, seqlen_q, seqlen_k):
    cu_q, cu_k = BlockLayout.full(seqlen_q, seqlen_k).tensors(torch.device(device))
    assert (cu_q.tolist(), cu_k.tolist()) == ([0, seqlen_q], [0, seqlen_k])
    assert cu_q.dtype == cu_k.dtype == torch.int32


def test_listed_offsets_copied_to_device(device):
    offsets = [0, 3, 4, 17, 40]
    cu_q, cu_k = BlockLayout.from_offsets(offsets).tensors(torch.device(device))
    assert cu_q.tolist() == offsets and cu_q.dtype == torch.int32
    assert cu_q.device.type == device and cu_k is cu_q


def test_layout_passed_as_blocks_matches_the_keyword_arguments():
    """``attention(..., blocks=layout)`` equals the same blocks given as keyword arguments, for
    every way of building the layout."""
    import block_attn

    q = torch.randn(2, 4, 40, 8, dtype=torch.float64)
    k, v = (
        torch.randn(2, 2, 40, 8, dtype=torch.float64),
        torch.randn(2, 2, 40, 8, dtype=torch.float64),
    )
    k_short, v_short = k[:, :, :25], v[:, :, :25]
    cases = [
        (BlockLayout.from_seqlens([3, 1, 36]), {"cu_seqlens": [0, 3, 4, 40]}, k, v),
        (
            BlockLayout.from_offsets(torch.tensor([0, 3, 4, 40])),
            {"cu_seqlens": [0, 3, 4, 40]},
            k,
            v,
        ),
        (BlockLayout.fixed(40, 16), {"block_size": 16}, k, v),
        (BlockLayout.full(40, 40), {}, k, v),
        (
            BlockLayout.from_seqlens([10, 30], [5, 20]),
            {"cu_seqlens": [0, 10, 40], "cu_seqlens_k": [0, 5, 25]},
            k_short,
            v_short,
        ),
    ]
    for layout, kwargs, keys, values in cases:
        for causal in (False, True):
            got = block_attn.attention(q, keys, values, blocks=layout, causal=causal)
            expected = block_attn.attention(q, keys, values, causal=causal, **kwargs)
            assert torch.equal(got, expected), (layout, causal)
            reference = block_attn.reference.attention(
                q, keys, values, blocks=layout, causal=causal
            )
            assert torch.allclose(got, reference, atol=1e-12, rtol=1e-10), (layout, causal)


def test_empty_sequence_layouts_have_one_empty_block():
    for layout in (BlockLayout.fixed(0, 4), BlockLayout.full(0, 0), BlockLayout.full(3, 0)):
        assert layout.num_blocks == 1 and layout.offsets_q[0] == 0
