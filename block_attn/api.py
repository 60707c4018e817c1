"""Public attention functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_attn import func_transforms
from block_attn.blocks import BlockLayout, resolve_blocks
from block_attn.dropout_mask import draw_seed_offset
from block_attn.validation import as_bool, check_qkv, resolve_scale, with_unit_last_stride
from block_attn.variants import add_sinks, resolve_variants

__all__ = ["attention", "block_diagonal_attention", "causal_attention"]

CuSeqlens = torch.Tensor | Sequence[int]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | None = None,
    cu_seqlens: CuSeqlens | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    max_seqlen: int | None = None,
    cu_seqlens_k: CuSeqlens | None = None,
    max_seqlen_k: int | None = None,
    blocks: BlockLayout | None = None,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention with block-diagonal and/or causal masks.

    Never materialises an Nq×Nk matrix; work grows with Σ b_i² (the blocks' squared lengths),
    not N².

    Args:
        q: (B, Hq, Nq, D) queries, PyTorch SDPA's layout. Any strides with unit stride in the
            last dim are used without a copy (e.g. ``x.view(B, N, H, D).transpose(1, 2)``).
        k: (B, Hkv, Nk, D) keys. ``Hq % Hkv == 0``: query head h reads kv head
            ``h // (Hq // Hkv)`` (GQA / MQA).
        v: (B, Hkv, Nk, D) values.
        block_size: tokens ``[i*b, (i+1)*b)`` form block i; the last block may be shorter.
        cu_seqlens: block offsets ``0 = c0 <= c1 <= ... <= cm <= N`` as a 1-D int32/int64
            tensor (any device; a CUDA tensor is read once on the host) or a list of ints;
            block j is ``[c_j, c_{j+1})`` (packed documents; empty blocks are allowed). Rows
            after ``cm`` belong to no block: they output 0 with lse = -inf, are never attended
            and get no gradient (a buffer holding fewer valid tokens than its length).
            ``block_size`` and ``cu_seqlens`` need Nq == Nk; pass at most one. Neither means
            one block (full attention).
        causal: inside a block, query i attends key j iff j <= i. With no blocks and Nq != Nk
            the mask is aligned bottom-right: query i attends key j iff j <= i + Nk - Nq
            (FlashAttention's convention). PyTorch SDPA's ``is_causal`` aligns top-left
            (j <= i) instead; the two agree when Nq == Nk. A query with no allowed key outputs
            0 and lse = -inf.
        scale: multiplies q·k before the softmax; default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores over allowed keys.
        max_seqlen: with ``cu_seqlens`` as a tensor on q's device: at least the longest block's
            length. The offsets are then not read on the host, so a GPU call never waits and can
            be captured in a CUDA graph (copy new offsets into the same tensor between replays:
            as many blocks, none longer than ``max_seqlen``). Their values are not checked on
            CUDA, where the kernels clamp them to the tensors (bad offsets give wrong rows, not
            stray memory accesses); the CPU kernels check them.
        cu_seqlens_k: the keys' offsets when they differ from the queries' (``cu_seqlens``):
            query block j ``[cq_j, cq_{j+1})`` attends key block j ``[ck_j, ck_{j+1})``, e.g.
            each packed sequence's new tokens against its cached keys. Ends at most at Nk; as many
            blocks as ``cu_seqlens``. With ``causal`` each block is aligned bottom-right: local
            query i attends local key t iff t <= i + Lk_j - Lq_j.
        max_seqlen_k: with ``cu_seqlens_k`` kept on the device (``max_seqlen`` given): at least
            the longest key block.
        blocks: a :class:`BlockLayout` built once (``BlockLayout.from_seqlens(lengths)``,
            ``from_offsets``, ``fixed``, ``full``) and reused across calls, e.g. by every layer
            of a model; instead of the block arguments above. Its offsets end at most at Nq / Nk.
        window_size: ``(left, right)``, FlashAttention's sliding window: inside its block, query
            i (at ``i' = i + Lk - Lq``, aligned bottom-right to its key block) attends key j iff
            ``i' - left <= j <= i' + right``; -1 leaves a side unbounded, and with ``causal``
            the right side is 0. Key tiles outside the window are never visited: the cost grows
            with N·window, not N².
        softcap: when > 0, each scaled score s becomes ``softcap * tanh(s / softcap)`` (Gemma 2),
            in the forward and the backward.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)`` on q's device: adds
            ``-slope * |i' - j|`` to the (capped) score of query i and key j of a block
            (FlashAttention's ALiBi). Not differentiable: the slopes get no gradient.
        sinks: (Hq,) per-head logits, any floating dtype, differentiable (attention sinks, as in
            GPT-OSS): each row's softmax normaliser gains ``exp(sinks[h])``, a virtual key whose
            value is zero. The lse returned is the log of that normaliser, sink included, and a
            query with no allowed key outputs 0 with lse = ``sinks[h]``.
        dropout_p: each normalised probability is kept with probability ``1 - dropout_p`` and
            scaled by ``1 / (1 - dropout_p)``, as in PyTorch's SDPA; also under
            ``torch.no_grad()`` (it is the caller's flag). The mask is a pure function of
            (batch, query head, query row, key row) and a seed and offset drawn from
            ``generator`` (:mod:`block_attn.dropout_mask`): the same generator state gives the
            same mask on every device, thread count and kernel path, and
            :func:`block_attn.reference.attention` reproduces it. The backward regenerates it.
            The lse is that of the probabilities before dropout.
        generator: where the dropout seed comes from; default the default generator of q's
            device (so ``torch.manual_seed`` reproduces a run).

    Returns:
        out: (B, Hq, Nq, D) in q's dtype, in q's memory layout when q is dense.
        lse: (B, Hq, Nq), only with ``return_lse=True``: float64 for float64 inputs, else
            float32.

    Float16 and bfloat16 are computed with float32 accumulation. NaN or Inf in q, k or v
    propagate to the outputs of the rows that see them (as in any softmax attention); they are
    not detected. On CUDA the float16/bfloat16 backward sums the gradient of q with atomics,
    so it may differ in the last bit from run to run, unless
    ``torch.use_deterministic_algorithms(True)`` is on.
    """
    check_qkv(q, k, v)
    causal = as_bool(causal, "causal")
    return_lse = as_bool(return_lse, "return_lse")
    scale = resolve_scale(scale, q.shape[-1])
    call_blocks = resolve_blocks(
        q.shape[2],
        k.shape[2],
        q.device,
        blocks=blocks,
        block_size=block_size,
        cu_seqlens=cu_seqlens,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen=max_seqlen,
        max_seqlen_k=max_seqlen_k,
    )
    offsets = call_blocks.for_kernels(q.device)
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
    seed_offset = None
    if variants.dropout_p > 0:
        seed_offset = draw_seed_offset(variants.generator, q.device)
    out, lse = func_transforms.attention_forward(
        with_unit_last_stride(q),
        with_unit_last_stride(k),
        with_unit_last_stride(v),
        *offsets,
        causal,
        scale,
        variants.window_left,
        -1 if causal else variants.window_right,  # causal bounds the right side already
        variants.softcap,
        variants.alibi_slopes,
        variants.dropout_p,
        seed_offset,
    )
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def block_diagonal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int | None = None,
    *,
    cu_seqlens: CuSeqlens | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    max_seqlen: int | None = None,
    cu_seqlens_k: CuSeqlens | None = None,
    max_seqlen_k: int | None = None,
    blocks: BlockLayout | None = None,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to diagonal blocks; exactly one of ``block_size``, ``cu_seqlens``
    and ``blocks``.

    Same arguments and shapes as :func:`attention`.
    """
    if block_size is None and cu_seqlens is None and blocks is None:
        raise ValueError(
            "block_diagonal_attention needs block_size, cu_seqlens or blocks, got none of them"
        )
    return attention(
        q,
        k,
        v,
        block_size=block_size,
        cu_seqlens=cu_seqlens,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
        max_seqlen=max_seqlen,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_k=max_seqlen_k,
        blocks=blocks,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        dropout_p=dropout_p,
        generator=generator,
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the whole sequence (bottom-right aligned when Nq != Nk).

    Same arguments and shapes as :func:`attention`.
    """
    return attention(
        q,
        k,
        v,
        causal=True,
        scale=scale,
        return_lse=return_lse,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        dropout_p=dropout_p,
        generator=generator,
    )
