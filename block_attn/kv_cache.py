"""Block offsets for decoding against padded (static) key/value caches.

A static cache keeps every sequence's keys in a fixed-size slot: ``(B, L, Hkv, D)`` with
``cache_lengths[i] <= L`` valid rows in slot i. Viewed as one packed row of ``B * L`` keys, the
slots are consecutive key blocks, each followed by its unused rows; a query block of no rows
pairs with those, so ``attention`` never reads them and the padding needs no mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from block_attn.offsets import INT32_MAX

__all__ = ["padded_cache_blocks"]


def padded_cache_blocks(
    cache_lengths: Sequence[int] | torch.Tensor, cache_size: int, new_tokens: int = 1
) -> dict[str, object]:
    """Keyword arguments for ``attention`` that pair each sequence's new tokens with the valid
    rows of its slot in a padded key/value cache.

    Layout (FlashAttention's ``flash_attn_with_kvcache`` cache layout, rows first):

    - queries: ``new_tokens`` per sequence, packed in sequence order, e.g.
      ``q.flatten(0, 1).unsqueeze(0).transpose(1, 2)`` for q of shape ``(B, new_tokens, Hq, D)``
      gives ``(1, Hq, B * new_tokens, D)`` without a copy;
    - keys and values: a ``(B, cache_size, Hkv, D)`` cache viewed the same way as
      ``(1, Hkv, B * cache_size, D)``.

    Sequence i's queries attend rows ``[0, cache_lengths[i])`` of slot i. With
    ``causal=True`` the mask is aligned bottom-right, so for decoding ``cache_lengths[i]``
    counts the new tokens' own keys, already written into the cache: new token r then sees the
    cache up to its own position.

    Args:
        cache_lengths: (B,) valid rows per slot, each in ``[0, cache_size]``: a list of ints,
            or an integer tensor. On a GPU the tensor stays there: the offsets are made on its
            device without waiting for it (so a decoding step can be captured in a CUDA graph,
            with new lengths copied into the same tensor between replays), and its values are
            not checked there.
        cache_size: rows per slot, L.
        new_tokens: queries per sequence (1 for decoding, more for a chunk or draft tokens).

    Returns:
        ``cu_seqlens`` and ``cu_seqlens_k`` (2B blocks: each sequence's, then its slot's
        unused rows against no queries), as lists for listed lengths; for a tensor, int32
        tensors on its device plus ``max_seqlen`` and ``max_seqlen_k`` (bounds, as kept
        offsets need). Pass them to ``attention(..., **blocks)``.

    Raises:
        ValueError: a size or length out of range. TypeError: lengths of another kind.
    """
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    if isinstance(cache_lengths, torch.Tensor):
        return _tensor_blocks(cache_lengths, cache_size, new_tokens)
    if isinstance(cache_lengths, (str, bytes)) or not isinstance(cache_lengths, Sequence):
        raise TypeError(
            "cache_lengths must be a sequence of ints or an integer tensor, "
            f"got {type(cache_lengths).__name__}"
        )
    cu_seqlens, cu_seqlens_k = [0], [0]
    for i, length in enumerate(cache_lengths):
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"cache_lengths[{i}] must be an int, got {type(length).__name__}")
        if not 0 <= length <= cache_size:
            raise ValueError(
                f"cache_lengths[{i}] = {length} is outside [0, cache_size = {cache_size}]"
            )
        cu_seqlens += [(i + 1) * new_tokens] * 2
        cu_seqlens_k += [i * cache_size + length, (i + 1) * cache_size]
    if len(cu_seqlens) == 1:
        raise ValueError("cache_lengths is empty: there must be at least one sequence")
    return {"cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k}


def _tensor_blocks(lengths: torch.Tensor, cache_size: int, new_tokens: int) -> dict[str, object]:
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"cache_lengths must be a non-empty 1-D tensor, got shape {lengths.shape}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"cache_lengths must be an integer tensor, got {lengths.dtype}")
    count = lengths.numel()
    if count * max(cache_size, new_tokens) > INT32_MAX:
        raise ValueError(
            f"{count} slots of {cache_size} rows (or {new_tokens} queries) exceed int32 offsets"
        )
    device = lengths.device
    index = torch.arange(count, dtype=torch.int32, device=device)
    ends_q = (index + 1) * new_tokens
    starts_k = index * cache_size
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_seqlens = torch.cat([zero, torch.stack([ends_q, ends_q], dim=1).flatten()])
    cu_seqlens_k = torch.cat(
        [
            zero,
            torch.stack([starts_k + lengths.to(torch.int32), starts_k + cache_size], 1).flatten(),
        ]
    )
    return {
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_k": cu_seqlens_k,
        "max_seqlen": new_tokens,
        "max_seqlen_k": max(cache_size, 1),
    }
