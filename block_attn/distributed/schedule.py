"""The block-aware pair schedule: which (query chunk, key chunk) pairs need computing.

From the global block offsets every rank derives the same plan, so the ranks agree on which
key/value shards must travel where without communicating. A pair of chunks needs work iff
some block holds positions of both; under a causal mask the key chunk must also not lie after
the query chunk.

Causal masking per pair. Chunks come from one partition of the sequence, so two chunks are
either the same or disjoint:

* same chunk: every block's query and key pieces are the same positions, so the op's
  bottom-right causal mask (which equals top-left when Lq == Lk) is the global causal mask;
* key chunk before the query chunk: every key precedes every query, so the pair is full
  (non-causal) inside each shared block;
* key chunk after the query chunk: nothing is visible; the pair is skipped.

Sliding windows. A pair is skipped when no query of it is within the window of any key it
shares a block with (the window is measured between global positions), so its shards never
travel.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch

from block_attn.blocks import offsets_tensor
from block_attn.distributed.layout import chunk_ranges

__all__ = ["PairPlan", "Schedule", "build_schedule", "plan_pair"]


@dataclass(frozen=True)
class PairPlan:
    """One op call: a query chunk against a key chunk.

    Attributes:
        q_chunk: index of the query chunk within the query rank's shard.
        k_chunk: index of the key chunk within the key rank's shard.
        causal: whether the op's (bottom-right) causal mask applies.
        cu_seqlens_q: offsets of the blocks within the query chunk (starting at 0, ending at
            the chunk length); blocks absent from one side have length 0 there.
        cu_seqlens_k: the same blocks' offsets within the key chunk.
        max_seqlen_q: the longest query piece.
        max_seqlen_k: the longest key piece.
    """

    q_chunk: int
    k_chunk: int
    causal: bool
    cu_seqlens_q: tuple[int, ...]
    cu_seqlens_k: tuple[int, ...]
    max_seqlen_q: int
    max_seqlen_k: int

    def offsets(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets as int32 tensors on ``device``, as the op takes them, made without
        waiting for a GPU (see :func:`block_attn.blocks.offsets_tensor`)."""
        return (
            offsets_tensor(self.cu_seqlens_q, device),
            offsets_tensor(self.cu_seqlens_k, device),
        )


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _window_reaches(q: tuple[int, int], k: tuple[int, int], window: tuple[int, int]) -> bool:
    """Whether some query in global range ``q`` is within ``window`` (left, right; -1:
    unbounded) of some key in range ``k``: some ``q_pos - k_pos`` in ``[-right, left]``."""
    left, right = window
    behind_most = q[1] - 1 - k[0]  # the largest q_pos - k_pos
    behind_least = q[0] - (k[1] - 1)  # the smallest
    return (left < 0 or behind_least <= left) and (right < 0 or behind_most >= -right)


def plan_pair(
    offsets: tuple[int, ...],
    q_range: tuple[int, int],
    k_range: tuple[int, int],
    causal: bool,
    q_chunk: int = 0,
    k_chunk: int = 0,
    window: tuple[int, int] = (-1, -1),
) -> PairPlan | None:
    """The op call for queries in ``q_range`` against keys in ``k_range``, or None if no work.

    Args:
        offsets: global block offsets ``0 = c0 <= ... <= cm <= N``.
        q_range: global ``[start, end)`` of the query chunk.
        k_range: global ``[start, end)`` of the key chunk; equal to or disjoint from q_range.
        causal: the global causal flag.
        q_chunk: index recorded in the plan.
        k_chunk: index recorded in the plan.
        window: the sliding window (left, right) by global position, -1 unbounded.
    """
    same = q_range == k_range
    if not same and _overlap(*q_range, *k_range) > 0:
        raise ValueError(f"chunks must be equal or disjoint, got {q_range} and {k_range}")
    if causal and not same and k_range[0] >= q_range[1]:
        return None
    lo = min(q_range[0], k_range[0])
    hi = max(q_range[1], k_range[1])
    first = bisect.bisect_right(offsets, lo) - 1
    lengths_q, lengths_k = [], []
    shared = False
    for j in range(first, len(offsets) - 1):
        b0, b1 = offsets[j], offsets[j + 1]
        if b0 >= hi:
            break
        length_q = _overlap(b0, b1, *q_range)
        length_k = _overlap(b0, b1, *k_range)
        if length_q == 0 and length_k == 0:
            continue
        if length_q > 0 and length_k > 0:
            q_piece = (max(b0, q_range[0]), min(b1, q_range[1]))
            k_piece = (max(b0, k_range[0]), min(b1, k_range[1]))
            shared = shared or _window_reaches(q_piece, k_piece, window)
        lengths_q.append(length_q)
        lengths_k.append(length_k)
    if not shared:
        return None
    cu_q, cu_k = [0], [0]
    for length_q, length_k in zip(lengths_q, lengths_k, strict=True):
        cu_q.append(cu_q[-1] + length_q)
        cu_k.append(cu_k[-1] + length_k)
    return PairPlan(
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        causal=causal and same,
        cu_seqlens_q=tuple(cu_q),
        cu_seqlens_k=tuple(cu_k),
        max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k),
    )


@dataclass(frozen=True)
class Schedule:
    """The pair plans of every (query rank, key rank) pair, identical on all ranks.

    Attributes:
        world_size: number of ranks W.
        chunks: ``chunks[r]`` are the global ranges rank r holds.
        pairs: ``pairs[r][s]`` are the op calls for rank r's queries against rank s's keys;
            empty when rank r never needs rank s's keys and values.
    """

    world_size: int
    chunks: tuple[tuple[tuple[int, int], ...], ...]
    pairs: tuple[tuple[tuple[PairPlan, ...], ...], ...]

    def needs(self, q_rank: int, k_rank: int) -> bool:
        """Whether ``q_rank`` needs the keys and values of ``k_rank``."""
        return bool(self.pairs[q_rank][k_rank])

    def num_transfers(self) -> int:
        """How many shards travel between ranks in a forward pass under this schedule."""
        w = self.world_size
        return sum(self.needs(r, s) for r in range(w) for s in range(w) if r != s)


@functools.lru_cache(maxsize=64)
def build_schedule(
    offsets: tuple[int, ...],
    world_size: int,
    layout: str,
    causal: bool,
    seqlen: int | None = None,
    window: tuple[int, int] = (-1, -1),
) -> Schedule:
    """The schedule for global block ``offsets`` over ``seqlen`` rows (by default the last
    offset; rows after it belong to no block) split over ``world_size`` ranks, for a sliding
    ``window`` (left, right) by global position (-1: unbounded)."""
    seqlen = offsets[-1] if seqlen is None else seqlen
    chunks = tuple(chunk_ranges(seqlen, world_size, r, layout) for r in range(world_size))
    pairs = tuple(
        tuple(
            tuple(
                plan
                for qi, q_range in enumerate(chunks[r])
                for ki, k_range in enumerate(chunks[s])
                if (plan := plan_pair(offsets, q_range, k_range, causal, qi, ki, window))
                is not None
            )
            for s in range(world_size)
        )
        for r in range(world_size)
    )
    return Schedule(world_size, chunks, pairs)
