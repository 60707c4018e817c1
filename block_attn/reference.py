"""Pure-PyTorch reference attention: materialises the (Nq, Nk) mask. The tests' ground truth.

It computes in the inputs' dtype (the softmax in float32), so running it on float64 inputs
gives the high-precision answer and on float16/bfloat16 inputs the low-precision baseline that
a kernel's error is compared against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_attn.blocks import BlockLayout, resolve_blocks
from block_attn.validation import check_qkv, check_tensors, resolve_scale

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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`block_attn.attention`, computed densely. O(Nq·Nk) memory.

    With ``max_seqlen`` the offsets are read on the host here and their contract checked.
    """
    check_qkv(q, k, v)
    scale = resolve_scale(scale, q.shape[-1])
    check_tensors(q, k, v, scale)
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
    allowed = layout.mask(causal, device=q.device, shape=(q.shape[2], k.shape[2]))
    probs, lse = probabilities(q, k, allowed, scale)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(probs, v)
    return (out, lse) if return_lse else out


def probabilities(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention probabilities and their log-normaliser.

    Args:
        q: (B, Hq, Nq, D).
        k: (B, Hkv, Nk, D); query head h reads kv head ``h // (Hq // Hkv)``.
        allowed: (Nq, Nk) bool, True where a query may attend a key.
        scale: multiplies q·k before the softmax.

    Returns:
        probs: (B, Hq, Nq, Nk) in q's dtype; a row with no allowed key is all zeros.
        lse: (B, Hq, Nq), float64 for float64 inputs, else float32; -inf for such a row.
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = scores.float() if scores.dtype != torch.float64 else scores
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no allowed key: softmax would be NaN; they get zeros.
    has_key = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1)
    return probs.masked_fill(~has_key, 0.0).to(q.dtype), lse
