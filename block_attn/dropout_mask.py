"""The attention-dropout mask: which probabilities a call keeps, as a pure function of indices.

Every kernel path (CPU, each CUDA family, the reference) computes the same mask, so a run is
reproducible across devices, tilings and thread counts, and the backward regenerates the forward's
mask instead of storing anything N×N.

The rule. A call draws ``seed_offset``, an int64 tensor ``(seed, offset)``, from its generator
(:func:`draw_seed_offset`). Probability ``(b, h, i, j)`` (batch, query head, query row and key row,
global indices into q and k) is kept iff ``u >= threshold(p)``, where ``threshold(p) =
floor(p · 2³²)`` and ``u`` is word ``j mod 4`` of Philox4x32-10 (Salmon et al., SC'11) applied to

- counter ``(j div 4, i, b · Hq + h, offset mod 2³²)``,
- key ``(seed mod 2³², (seed div 2³²) mod 2³²)``, the seed read as an unsigned 64-bit integer.

Kept probabilities are scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import torch

__all__ = ["draw_seed_offset", "keep_mask", "philox4x32", "threshold"]

_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
_WORD = 0xFFFFFFFF
_ROUNDS = 10


def threshold(dropout_p: float) -> int:
    """The uint32 below which a probability is dropped: ``floor(p · 2³²)``."""
    return int(dropout_p * 2**32)


def draw_seed_offset(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(seed, offset)`` as an int64 tensor on ``device``, drawn from ``generator`` (default: the
    default generator of ``device``), without reading anything on the host (so a CUDA graph can
    capture it)."""
    source = generator.device if generator is not None else device
    drawn = torch.randint(
        -(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator, device=source
    )
    return drawn.to(device, non_blocking=True)


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a · multiplier`` for uint32 ``a`` held in int64.

    The multiplier is split in 16-bit halves so that no product leaves int64's range.
    """
    low = a * (multiplier & 0xFFFF)
    high = a * (multiplier >> 16)
    middle = high + (low >> 16)
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor | int, torch.Tensor | int],
) -> list[torch.Tensor]:
    """Philox4x32-10 of ``counter`` (four uint32 words as int64 tensors, broadcast together) under
    ``key`` (two uint32 words); returns the four output words as int64 tensors in [0, 2³²)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(_ROUNDS):
        high0, low0 = _mulhilo(c0, _MULTIPLIERS[0])
        high1, low1 = _mulhilo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        if round_index + 1 < _ROUNDS:
            k0 = (k0 + _WEYL[0]) & _WORD
            k1 = (k1 + _WEYL[1]) & _WORD
    return [c0, c1, c2, c3]


def keep_mask(
    seed_offset: torch.Tensor,
    dropout_p: float,
    batch: int,
    heads: int,
    rows: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """The keep decisions (batch, heads, len(rows), len(keys)) for the given global query rows and
    key rows (1-D int64 tensors), on their device."""
    seed, offset = (int(x) % 2**64 for x in seed_offset.tolist())
    device = rows.device
    key = (seed & _WORD, (seed >> 32) & _WORD)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    i = rows.to(torch.int64).view(1, 1, -1, 1)
    j = keys.to(torch.int64).view(1, 1, 1, -1)
    words = philox4x32(
        (j >> 2, i, (b * heads + h) & _WORD, torch.tensor(offset & _WORD, device=device)), key
    )
    lane = j & 3
    chosen = torch.zeros(torch.broadcast_shapes(*(w.shape for w in words)), dtype=torch.int64,
                         device=device)  # fmt: skip
    for index, word in enumerate(words):
        chosen = torch.where(lane == index, word, chosen)
    return chosen >= threshold(dropout_p)
