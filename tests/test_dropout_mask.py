"""The dropout mask rule (block_attn.dropout_mask): Philox4x32-10 and the keep decisions."""

from __future__ import annotations

import math

import pytest
import torch

from block_attn.dropout_mask import draw_seed_offset, keep_mask, philox4x32, threshold

WORD = 0xFFFFFFFF

# Known-answer vectors of Philox4x32-10 published with the Random123 library.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((WORD, WORD, WORD, WORD), (WORD, WORD), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in words) == expected


def seed_offset(seed: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def test_keep_rate_is_one_minus_p():
    p = 0.3
    mask = keep_mask(seed_offset(1234), p, 2, 3, torch.arange(300), torch.arange(301))
    n = mask.numel()
    rate = mask.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 4 * sigma, (rate, 1 - p, sigma)


def test_mask_is_keyed_by_global_indices():
    """Any sub-range of rows and keys sees the same decisions as the whole problem."""
    full = keep_mask(seed_offset(-7, 5), 0.5, 2, 2, torch.arange(40), torch.arange(37))
    part = keep_mask(seed_offset(-7, 5), 0.5, 2, 2, torch.arange(13, 29), torch.arange(3, 30))
    assert torch.equal(part, full[:, :, 13:29, 3:30])


def test_seed_and_offset_change_the_mask():
    rows, keys = torch.arange(64), torch.arange(64)
    base = keep_mask(seed_offset(99, 0), 0.5, 1, 1, rows, keys)
    assert not torch.equal(base, keep_mask(seed_offset(100, 0), 0.5, 1, 1, rows, keys))
    assert not torch.equal(base, keep_mask(seed_offset(99, 1), 0.5, 1, 1, rows, keys))
    # Heads and batch rows get their own decisions.
    both = keep_mask(seed_offset(99, 0), 0.5, 2, 2, rows, keys)
    assert not torch.equal(both[0, 0], both[0, 1]) and not torch.equal(both[0, 0], both[1, 0])


def test_threshold_edges():
    assert threshold(0.0) == 0
    assert threshold(0.5) == 2**31
    assert threshold(1 - 2**-40) == WORD  # p < 1 keeps a few
    everything = keep_mask(seed_offset(3), 0.0, 1, 1, torch.arange(8), torch.arange(8))
    assert everything.all()


def test_draw_follows_the_generator():
    first = draw_seed_offset(torch.Generator().manual_seed(5), torch.device("cpu"))
    again = draw_seed_offset(torch.Generator().manual_seed(5), torch.device("cpu"))
    other = draw_seed_offset(torch.Generator().manual_seed(6), torch.device("cpu"))
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(11)
    default = draw_seed_offset(None, torch.device("cpu"))
    torch.manual_seed(11)
    assert torch.equal(default, draw_seed_offset(None, torch.device("cpu")))
