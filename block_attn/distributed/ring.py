"""The distributed forward and backward passes: shards travel, pairs are computed and merged.

Rounds. In round i (1 <= i < W) rank r obtains the keys and values of rank (r - i) mod W:

* ``"block"`` schedule: straight from their owner, and only when the pair schedule says rank r
  needs them; a shard nobody needs is never sent (block-aligned shards: nothing at all).
* ``"ring"`` schedule: from rank r - 1, which relays what it got in the previous round, so
  every shard visits every rank (the classic ring; the baseline).

The transfer of round i + 1 is posted before round i is computed, so communication overlaps
compute. The backward pass fetches the keys and values again the same way and returns the
key/value gradients to their owners: directly under ``"block"``; under ``"ring"`` as
accumulators that travel with the shards and arrive home after W hops.

Every rank posts its transfers in the same order (keys/values of a round before that round's
gradients), so point-to-point messages between two ranks always match, on gloo and NCCL alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from block_attn import ops
from block_attn.distributed.comm import exchange, pack, unpack, wait_all
from block_attn.distributed.merge import merge_into
from block_attn.distributed.schedule import PairPlan, Schedule

__all__ = ["PairOptions", "ring_backward", "ring_forward"]


@dataclass(frozen=True)
class PairOptions:
    """The variants every pair's op call takes (checked by :mod:`block_attn.variants`).

    The window and ALiBi are measured between global positions, and dropout is keyed by global
    rows, so each pair call gets its chunks' global starts as ``query_offset`` / ``key_offset``
    (plain calls and softcap alone need none, and keep the plain kernels).
    """

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed_offset: torch.Tensor | None = None

    def op_arguments(self, q_start: int, k_start: int) -> dict:
        """Keyword arguments of ``ops.attention_forward`` / ``attention_backward`` for a pair
        of chunks starting at global rows ``q_start`` and ``k_start``."""
        arguments = dict(
            window_left=self.window_left,
            window_right=self.window_right,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes,
            dropout_p=self.dropout_p,
            dropout_seed_offset=self.dropout_seed_offset,
        )
        positional = (
            self.window_left >= 0
            or self.window_right >= 0
            or self.alibi_slopes is not None
            or self.dropout_p > 0
        )
        if positional:
            arguments.update(query_offset=q_start, key_offset=k_start)
        return arguments


@dataclass(frozen=True)
class _Round:
    """One rank's transfers in one round of key/value movement."""

    send_peer: int | None
    send_shard: int
    recv_peer: int | None
    recv_shard: int


def _kv_rounds(schedule: Schedule, rank: int, mode: str) -> list[_Round]:
    w = schedule.world_size
    rounds = []
    for i in range(1, w):
        if mode == "ring":
            relay = _Round((rank + 1) % w, (rank - i + 1) % w, (rank - 1) % w, (rank - i) % w)
            rounds.append(relay)
            continue
        dest, source = (rank + i) % w, (rank - i) % w
        rounds.append(
            _Round(
                dest if schedule.needs(dest, rank) else None,
                rank,
                source if schedule.needs(rank, source) else None,
                source,
            )
        )
    return rounds


def _stream_kv(
    own: torch.Tensor | None, rank: int, rounds: list[_Round], group: dist.ProcessGroup | None
) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Yields (round, buffer of shard (rank - round) mod W or None when it did not come).

    Round 0 yields ``own``. Round i + 1's transfer is in flight while the caller works on
    round i.
    """
    held: dict[int, torch.Tensor] = {} if own is None else {rank: own}

    def post(rnd: _Round) -> tuple[list[dist.Work], torch.Tensor | None]:
        sends = [] if rnd.send_peer is None else [(held[rnd.send_shard], rnd.send_peer)]
        buffer = None if rnd.recv_peer is None else torch.empty_like(own)
        recvs = [] if buffer is None else [(buffer, rnd.recv_peer)]
        return exchange(sends, recvs, group), buffer

    pending = post(rounds[0]) if rounds else None
    yield 0, own
    for i, rnd in enumerate(rounds, start=1):
        works, buffer = pending
        wait_all(works)
        if buffer is not None:
            held = {rank: own, rnd.recv_shard: buffer}
        if i < len(rounds):
            pending = post(rounds[i])
        yield i, buffer


class _Offsets:
    """int32 offset tensors of each pair plan, made once per device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: dict[PairPlan, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, plan: PairPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if plan not in self.cache:
            self.cache[plan] = plan.offsets(self.device)
        return self.cache[plan]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(t: torch.Tensor, index: int, size: int) -> torch.Tensor:
    return t.narrow(2, index * size, size)


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    schedule: Schedule,
    rank: int,
    scale: float,
    mode: str,
    group: dist.ProcessGroup | None,
    options: PairOptions = PairOptions(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel forward for this rank's queries.

    Args:
        q: (B, Hq, n, D) this rank's queries, n = N / W, unit stride in D.
        k: (B, Hkv, n, D) this rank's keys.
        v: (B, Hkv, n, D) this rank's values.
        schedule: the pair schedule (same on every rank).
        rank: this rank in ``group``.
        scale: multiplies q·k before the softmax.
        mode: ``"block"`` or ``"ring"``.
        group: the process group.
        options: the variants of every pair call.

    Returns:
        out (B, Hq, n, D) in q's dtype and lse (B, Hq, n), float64 for float64 q else float32.
    """
    chunk_size = q.shape[2] // len(schedule.chunks[rank])
    offsets = _Offsets(q.device)
    out_acc = torch.zeros(q.shape, dtype=_accumulate_dtype(q.dtype), device=q.device)
    lse_acc = torch.full(
        q.shape[:3], float("-inf"), dtype=_accumulate_dtype(q.dtype), device=q.device
    )
    rounds = _kv_rounds(schedule, rank, mode)
    own = pack(k, v) if rounds else None
    for i, buffer in _stream_kv(own, rank, rounds, group):
        source = (rank - i) % schedule.world_size
        if buffer is None and i > 0:
            continue
        k_s, v_s = (k, v) if i == 0 else unpack(buffer, k.shape)
        for plan in schedule.pairs[rank][source]:
            cu_q, cu_k = offsets(plan)
            starts = (
                schedule.chunks[rank][plan.q_chunk][0],
                schedule.chunks[source][plan.k_chunk][0],
            )
            out, lse = ops.attention_forward(
                _chunk(q, plan.q_chunk, chunk_size),
                _chunk(k_s, plan.k_chunk, chunk_size),
                _chunk(v_s, plan.k_chunk, chunk_size),
                cu_q,
                cu_k,
                plan.max_seqlen_q,
                plan.max_seqlen_k,
                plan.causal,
                scale,
                **options.op_arguments(*starts),
            )
            merge_into(
                _chunk(out_acc, plan.q_chunk, chunk_size),
                lse_acc.narrow(2, plan.q_chunk * chunk_size, chunk_size),
                out,
                lse,
            )
    return out_acc.to(q.dtype), lse_acc


def _shard_grads(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    out: torch.Tensor,
    lse_chunks: list[torch.Tensor],
    grad_lse_chunks: list[torch.Tensor | None],
    plans: tuple[PairPlan, ...],
    offsets: _Offsets,
    chunk_size: int,
    scale: float,
    grad_q: torch.Tensor,
    starts: tuple[tuple[int, int], ...],
    key_starts: tuple[tuple[int, int], ...],
    options: PairOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds this rank's queries' gradient against one key shard into grad_q; returns that
    shard's (grad_k, grad_v) contributions in the accumulation dtype. ``starts`` and
    ``key_starts``: the global ranges of this rank's chunks and of the key shard's."""
    dtype = grad_q.dtype
    grad_k = torch.zeros(k_s.shape, dtype=dtype, device=k_s.device)
    grad_v = torch.zeros(v_s.shape, dtype=dtype, device=v_s.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    for plan in plans:
        cu_q, cu_k = offsets(plan)
        dq, dk, dv = ops.attention_backward(
            _chunk(grad_out, plan.q_chunk, chunk_size),
            _chunk(q, plan.q_chunk, chunk_size),
            _chunk(k_s, plan.k_chunk, chunk_size),
            _chunk(v_s, plan.k_chunk, chunk_size),
            _chunk(out, plan.q_chunk, chunk_size),
            lse_chunks[plan.q_chunk],
            grad_lse_chunks[plan.q_chunk],
            cu_q,
            cu_k,
            plan.max_seqlen_q,
            plan.max_seqlen_k,
            plan.causal,
            scale,
            deterministic,
            **options.op_arguments(starts[plan.q_chunk][0], key_starts[plan.k_chunk][0]),
        )
        _chunk(grad_q, plan.q_chunk, chunk_size).add_(dq)
        _chunk(grad_k, plan.k_chunk, chunk_size).add_(dk)
        _chunk(grad_v, plan.k_chunk, chunk_size).add_(dv)
    return grad_k, grad_v


def ring_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    schedule: Schedule,
    rank: int,
    scale: float,
    mode: str,
    group: dist.ProcessGroup | None,
    grad_lse: torch.Tensor | None = None,
    options: PairOptions = PairOptions(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Context-parallel backward (FlashAttention-2 style, from the merged out and lse).

    Each pair's gradients use the final softmax statistics (``out``, ``lse`` of the whole
    row), so they are exact parts of the full gradient and simply add up.

    Args:
        grad_out: (B, Hq, n, D) gradient of this rank's output.
        q, k, v, out: as in and from :func:`ring_forward`.
        lse: (B, Hq, n) float32 from :func:`ring_forward`.
        schedule, rank, scale, mode, group, options: as in :func:`ring_forward`.
        grad_lse: (B, Hq, n) gradient of the merged lse, or None.

    Returns:
        grad_q, grad_k, grad_v shaped and typed like q, k, v.
    """
    w = schedule.world_size
    chunk_size = q.shape[2] // len(schedule.chunks[rank])
    offsets = _Offsets(q.device)
    dtype = _accumulate_dtype(q.dtype)
    lse_chunks = [
        lse.narrow(2, c * chunk_size, chunk_size).contiguous()
        for c in range(len(schedule.chunks[rank]))
    ]
    grad_lse_chunks: list[torch.Tensor | None] = (
        [None] * len(lse_chunks)
        if grad_lse is None
        else [c.to(lse.dtype).contiguous() for c in grad_lse.split(chunk_size, dim=2)]
    )
    grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
    own_grad_kv = torch.zeros(2 * k.numel(), dtype=dtype, device=k.device)
    rounds = _kv_rounds(schedule, rank, mode)
    own = pack(k, v) if rounds else None
    # Pending gradient transfers, with their tensors kept alive until the transfers end.
    in_flight: tuple[list[dist.Work], list[torch.Tensor]] = ([], [])
    arriving: list[torch.Tensor] = []  # "block": gradients of our shard from other ranks
    travelling: torch.Tensor | None = None  # "ring": the accumulator received last round
    for i, buffer in _stream_kv(own, rank, rounds, group):
        source = (rank - i) % w
        plans = schedule.pairs[rank][source] if (i == 0 or buffer is not None) else ()
        if plans:
            k_s, v_s = (k, v) if i == 0 else unpack(buffer, k.shape)
            grad_k, grad_v = _shard_grads(
                grad_out,
                q,
                k_s,
                v_s,
                out,
                lse_chunks,
                grad_lse_chunks,
                plans,
                offsets,
                chunk_size,
                scale,
                grad_q,
                schedule.chunks[rank],
                schedule.chunks[source],
                options,
            )
            contribution = pack(grad_k, grad_v)
        else:
            contribution = None
        wait_all(in_flight[0])
        if mode == "ring":
            if w == 1:
                own_grad_kv += contribution if contribution is not None else 0
                break
            total = travelling if travelling is not None else torch.zeros_like(own_grad_kv)
            if contribution is not None:
                total = total + contribution
            travelling = torch.empty_like(own_grad_kv)
            works = exchange([(total, (rank + 1) % w)], [(travelling, (rank - 1) % w)], group)
            in_flight = (works, [total, travelling])
            continue
        if i == 0:
            if contribution is not None:
                own_grad_kv += contribution
            continue
        sends = [] if contribution is None else [(contribution, source)]
        sender = (rank + i) % w
        recvs = []
        if schedule.needs(sender, rank):
            arriving.append(torch.empty_like(own_grad_kv))
            recvs = [(arriving[-1], sender)]
        in_flight = (exchange(sends, recvs, group), [t for t, _ in sends])
    wait_all(in_flight[0])
    if mode == "ring" and w > 1:
        own_grad_kv += travelling
    for part in arriving:
        own_grad_kv += part
    grad_k, grad_v = unpack(own_grad_kv, k.shape)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
