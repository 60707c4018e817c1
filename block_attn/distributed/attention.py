"""Exact context-parallel block attention: the public function and its autograd wiring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from block_attn.blocks import resolve_blocks
from block_attn.distributed.checks import check_local_inputs, check_same_on_all_ranks
from block_attn.distributed.ring import PairOptions, ring_backward, ring_forward
from block_attn.distributed.schedule import Schedule, build_schedule
from block_attn.dropout_mask import draw_seed_offset
from block_attn.validation import as_bool, check_qkv, resolve_scale, with_unit_last_stride
from block_attn.variants import Variants, add_sinks, resolve_variants

__all__ = ["context_parallel_attention"]


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        schedule: Schedule,
        rank: int,
        scale: float,
        mode: str,
        group: dist.ProcessGroup | None,
        options: PairOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = ring_forward(q, k, v, schedule, rank, scale, mode, group, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.schedule, ctx.rank, ctx.scale, ctx.mode, ctx.group = schedule, rank, scale, mode, group
        ctx.options = options
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v = ring_backward(
            with_unit_last_stride(grad_out),
            q,
            k,
            v,
            out,
            lse,
            ctx.schedule,
            ctx.rank,
            ctx.scale,
            ctx.mode,
            ctx.group,
            grad_lse,
            ctx.options,
        )
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    block_size: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    schedule: str = "block",
    validate: bool = True,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Block attention over a sequence sharded across the ranks of ``group``.

    Collective: every rank of ``group`` calls it with its own shards (see
    :func:`~block_attn.distributed.shard_sequence`). Each rank's output equals its slice of
    ``block_attn.attention`` on the full sequence, and so do the gradients of q, k and v.

    Args:
        q: (B, Hq, N / W, D) this rank's queries.
        k: (B, Hkv, N / W, D) this rank's keys; ``Hq % Hkv == 0`` (GQA / MQA).
        v: (B, Hkv, N / W, D) this rank's values.
        cu_seqlens: block offsets of the GLOBAL sequence, ``0 = c0 <= ... <= cm = N`` (packed
            documents), identical on every rank. Documents may cross shard boundaries.
        block_size: fixed blocks of the GLOBAL sequence; at most one of this and cu_seqlens.
        causal: causal mask inside each block, by global position.
        scale: multiplies q·k before the softmax; default 1/sqrt(D).
        group: the process group (default: the world); W is its size.
        layout: how the sequence is sharded: ``"zigzag"`` (2W chunks, rank r holds chunks r
            and 2W-1-r; balances causal work) or ``"contiguous"`` (rank r holds chunk r).
        schedule: ``"block"`` sends a key/value shard only to ranks whose queries share a
            block with it (none at all when shards are block-aligned); ``"ring"`` passes every
            shard around the whole ring (the classic ring attention, for comparison).
        validate: check with one small all_gather that all ranks pass matching shapes, blocks
            and options, so a mismatch raises ValueError on every rank instead of hanging.
        window_size, softcap, alibi_slopes: the variants of :func:`block_attn.attention`, by
            global position, the same on every rank. A pair of shards that no window reaches is
            neither computed nor sent.
        sinks: (Hq,) attention sinks as in :func:`block_attn.attention`, the same on every
            rank; added once to each merged row. Each rank's gradient of ``sinks`` covers its
            own rows: sum it over the ranks, as for any parameter the ranks share.
        dropout_p, generator: attention dropout as in :func:`block_attn.attention`. The
            (seed, offset) drawn from the group's first rank's ``generator`` is sent to every
            rank (each rank's ``generator`` advances alike), and the mask is keyed by global
            positions: it is the mask of the single-process call with that generator state.

    Returns:
        (B, Hq, N / W, D) this rank's output, in q's dtype.

    Raises:
        ValueError: N is not a multiple of 2W (zigzag) or W (contiguous), or the ranks
            disagree on shapes, blocks or options.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # Local checks first, but raise only after the ranks have compared notes: a rank that
    # raised alone would leave the others waiting for it forever.
    offsets: tuple[int, ...] = ()
    variants = Variants()
    local_error: Exception | None = None
    try:
        causal = as_bool(causal, "causal")
        check_qkv(q, k, v)
        scale = resolve_scale(scale, q.shape[-1])
        check_local_inputs(q, k, v, scale, world_size, layout, schedule)
        variants = resolve_variants(
            q,
            causal=causal,
            window_size=window_size,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            sinks=sinks,
            dropout_p=dropout_p,
            generator=generator,
        )
        seqlen = q.shape[2] * world_size
        blocks = resolve_blocks(
            seqlen, seqlen, q.device, block_size=block_size, cu_seqlens=cu_seqlens
        )
        offsets = tuple(blocks.on_host().offsets_q)
    except (TypeError, ValueError) as error:
        if not validate:
            raise
        local_error = error
    if validate:
        check_same_on_all_ranks(
            q, k, offsets, causal, scale, layout, schedule, group, local_error, variants
        )
    window = (variants.window_left, variants.window_right)
    plan = build_schedule(offsets, world_size, layout, causal, q.shape[2] * world_size, window)
    seed_offset = None
    if variants.dropout_p > 0:
        seed_offset = draw_seed_offset(variants.generator, q.device)
        dist.broadcast(seed_offset, dist.get_global_rank(group or dist.group.WORLD, 0), group)
    options = PairOptions(
        *window, variants.softcap, variants.alibi_slopes, variants.dropout_p, seed_offset
    )
    out, lse = _ContextParallelAttention.apply(
        with_unit_last_stride(q),
        with_unit_last_stride(k),
        with_unit_last_stride(v),
        plan,
        rank,
        scale,
        schedule,
        group,
        options,
    )
    return out if sinks is None else add_sinks(out, lse, sinks)[0]
