"""Pure-PyTorch reference attention: materialises the (Nq, Nk) mask. The tests' ground truth.

It computes in the inputs' dtype (the softmax in float32), so running it on float64 inputs
gives the high-precision answer and on float16/bfloat16 inputs the low-precision baseline that
a kernel's error is compared against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_attn.blocks import BlockLayout, resolve_blocks
from block_attn.dropout_mask import draw_seed_offset, keep_mask
from block_attn.validation import as_bool, check_qkv, check_tensors, resolve_scale
from block_attn.variants import Variants, resolve_variants

__all__ = ["attention", "probabilities"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int | None = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    max_seqlen: int | None = None,
    cu_seqlens_k: torch.Tensor | Sequence[int] | None = None,
    max_seqlen_k: int | None = None,
    blocks: BlockLayout | None = None,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`block_attn.attention`, computed densely. O(Nq·Nk) memory.

    With ``max_seqlen`` the offsets are read on the host here and their contract checked.
    ``window_size``, ``softcap``, ``alibi_slopes``, ``sinks``, ``dropout_p`` and ``generator``
    are the attention variants defined in :mod:`block_attn.variants`.
    """
    check_qkv(q, k, v)
    causal = as_bool(causal, "causal")
    scale = resolve_scale(scale, q.shape[-1])
    check_tensors(q, k, v, scale)
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
    layout = resolve_blocks(
        q.shape[2],
        k.shape[2],
        q.device,
        blocks=blocks,
        block_size=block_size,
        cu_seqlens=cu_seqlens,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen=max_seqlen,
        max_seqlen_k=max_seqlen_k,
    ).on_host()
    in_block, behind = layout.positions(q.device, shape=(q.shape[2], k.shape[2]))
    allowed = in_block & (behind >= 0) if causal else in_block
    if variants.window_left >= 0:
        allowed = allowed & (behind <= variants.window_left)
    if variants.window_right >= 0:
        allowed = allowed & (behind >= -variants.window_right)
    bias = None
    if variants.alibi_slopes is not None:
        slopes = variants.alibi_slopes.view(-1, q.shape[1], 1, 1)
        bias = -slopes.double() * behind.abs()
    probs, lse = probabilities(
        q, k, allowed, scale, softcap=variants.softcap, bias=bias, sinks=variants.sinks
    )
    probs = _dropped(probs, variants, q.device)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(probs, v)
    return (out, lse) if return_lse else out


def probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    *,
    softcap: float = 0.0,
    bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention probabilities and their log-normaliser.

    Args:
        q: (B, Hq, Nq, D).
        k: (B, Hkv, Nk, D); query head h reads kv head ``h // (Hq // Hkv)``.
        allowed: (Nq, Nk) bool, True where a query may attend a key.
        scale: multiplies q·k before the softmax.
        softcap: when > 0, scaled scores s become ``softcap · tanh(s / softcap)``.
        bias: added to the (capped) scores, broadcast to (B, Hq, Nq, Nk); not differentiated.
        sinks: (Hq,) logits whose exponentials join each row's normaliser.

    Returns:
        probs: (B, Hq, Nq, Nk) in q's dtype; a row with no allowed key is all zeros.
        lse: (B, Hq, Nq), float64 for float64 inputs, else float32: the log of the normaliser,
        -inf for such a row (the sink's logit with sinks).
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = scores.float() if scores.dtype != torch.float64 else scores
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.detach().to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
        return torch.exp(scores - lse[..., None]).to(q.dtype), lse
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no allowed key: softmax would be NaN; they get zeros.
    has_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1)
    return probs.masked_fill(~has_key, 0.0).to(q.dtype), lse


def _dropped(probs: torch.Tensor, variants: Variants, device: torch.device) -> torch.Tensor:
    """``probs`` with the dropout mask of :mod:`block_attn.dropout_mask` applied (kept ones
    scaled by 1 / (1 - p)); unchanged without dropout, and then no random number is drawn."""
    if variants.dropout_p == 0:
        return probs
    batch, heads, rows, keys = probs.shape
    seed_offset = draw_seed_offset(variants.generator, device)
    keep = keep_mask(
        seed_offset,
        variants.dropout_p,
        batch,
        heads,
        torch.arange(rows, device=device),
        torch.arange(keys, device=device),
    )
    return probs * keep.to(probs.dtype) / (1 - variants.dropout_p)
