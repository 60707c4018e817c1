"""Blocks given with ``max_seqlen``: offsets that stay on the device, unread by the host.

FlashAttention's varlen convention. Everything about the offsets but their values is checked,
so a GPU call never waits and CUDA graphs can capture it. The values must still keep the raw
operators' contract (``0 = c0 <= c1 <= ... <= cm = N``, no block longer than its max_seqlen);
the CPU kernels check it, the CUDA kernels clamp the offsets to the tensors (wrong rows, never a
stray access).
"""

from __future__ import annotations

import torch

from block_attn.blocks import BlockLayout, make_layout, validate_offsets
from block_attn.offsets import INT32_MAX


def _check_max_seqlen(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or value > INT32_MAX:
        raise ValueError(f"{name} must be in [1, {INT32_MAX}], got {value}")
    return value


def _device_offsets(
    cu_seqlens: object, name: str, max_name: str, device: torch.device
) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"{max_name} goes with {name} given as a tensor on q's device (so its values need "
            f"not be read on the host), got {name} of type {type(cu_seqlens).__name__}; with a "
            f"list, leave {max_name} out"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(
            f"{name} with {max_name} must be on q's device {device}, got {cu_seqlens.device}"
        )
    return cu_seqlens.to(torch.int32).contiguous()


def offsets_kept_on_device(
    block_size: object,
    cu_seqlens: object,
    cu_seqlens_k: object,
    max_seqlen: object,
    max_seqlen_k: object,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Checks the API's arguments when ``max_seqlen`` is given and returns ``(cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for the raw operator: contiguous int32 tensors
    on ``device`` (the inputs themselves when they already are)."""
    if max_seqlen is None:
        raise ValueError("max_seqlen_k (the longest key block) needs max_seqlen as well")
    if block_size is not None:
        raise ValueError("max_seqlen goes with cu_seqlens, not with block_size")
    max_q = _check_max_seqlen(max_seqlen, "max_seqlen")
    cu_q = _device_offsets(cu_seqlens, "cu_seqlens", "max_seqlen", device)
    if cu_seqlens_k is None:
        if max_seqlen_k is not None:
            raise ValueError("max_seqlen_k goes with cu_seqlens_k (the keys' offsets)")
        if seqlen_q != seqlen_k:
            raise ValueError(
                f"cu_seqlens needs as many queries as keys (Nq == Nk), got Nq = {seqlen_q}, "
                f"Nk = {seqlen_k} (or pass the keys' offsets as cu_seqlens_k)"
            )
        return cu_q, cu_q, max_q, max_q
    if max_seqlen_k is None:
        raise ValueError(
            "cu_seqlens_k kept on the device needs max_seqlen_k (the longest key block)"
        )
    max_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    cu_k = _device_offsets(cu_seqlens_k, "cu_seqlens_k", "max_seqlen_k", device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(
            "cu_seqlens and cu_seqlens_k must describe the same number of blocks, got "
            f"{cu_q.numel() - 1} and {cu_k.numel() - 1}"
        )
    return cu_q, cu_k, max_q, max_k


def read_kept_offsets(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    seqlen: int,
    name: str,
    max_name: str,
    length_name: str = "N",
) -> tuple[int, ...]:
    """Offsets kept on the device, read on the host and checked against their contract (for the
    reference)."""
    offsets = tuple(int(c) for c in cu_seqlens.tolist())
    validate_offsets(offsets, seqlen, name, length_name, max_seqlen, max_name)
    return offsets


def layout_of_kept_offsets(
    kept: tuple[torch.Tensor, torch.Tensor, int, int], seqlen_q: int, seqlen_k: int
) -> BlockLayout:
    """The layout that :func:`offsets_kept_on_device`'s result describes (read on the host)."""
    cu_q, cu_k, max_q, max_k = kept
    if cu_k is cu_q:
        offsets_q = read_kept_offsets(cu_q, max_q, seqlen_q, "cu_seqlens", "max_seqlen")
        return BlockLayout(offsets_q, offsets_q, max_q, max_k)
    offsets_q = read_kept_offsets(cu_q, max_q, seqlen_q, "cu_seqlens", "max_seqlen", "Nq")
    offsets_k = read_kept_offsets(cu_k, max_k, seqlen_k, "cu_seqlens_k", "max_seqlen_k", "Nk")
    return BlockLayout(offsets_q, offsets_k, max_q, max_k)


def host_layout(
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
    block_size: object = None,
    cu_seqlens: object = None,
    cu_seqlens_k: object = None,
    max_seqlen: object = None,
    max_seqlen_k: object = None,
) -> BlockLayout:
    """The layout of the public API's block arguments, read on the host whichever way they
    came (for the reference and the module's dense weights)."""
    if max_seqlen is None and max_seqlen_k is None:
        return make_layout(seqlen_q, seqlen_k, block_size, cu_seqlens, cu_seqlens_k)
    kept = offsets_kept_on_device(
        block_size, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, seqlen_q, seqlen_k, device
    )
    return layout_of_kept_offsets(kept, seqlen_q, seqlen_k)
