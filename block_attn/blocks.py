"""Block structure: validation of ``block_size`` / ``cu_seqlens`` into one representation.

Everything below the public API describes blocks the same way: ``cu_seqlens`` offsets
``0 = c0 < c1 < ... < cm = N`` (block ``j`` is tokens ``[c_j, c_{j+1})``) plus the longest
block's length. ``block_size`` is only a way to build those offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import torch

INT32_MAX = 2**31 - 1
CAPTURE_ADVICE = (
    "in captured code pass cu_seqlens as an int32 tensor on q's device together with "
    "max_seqlen (the longest block's length): the offsets then stay on the device, unchecked"
)


@dataclass(frozen=True)
class BlockLayout:
    """Validated block boundaries for queries and keys.

    Attributes:
        offsets_q: query offsets, ``num_blocks + 1`` Python ints from 0 to ``Nq``: a tuple, or
            :class:`EvenOffsets` for fixed blocks and one block.
        offsets_k: key offsets, ``num_blocks + 1`` Python ints from 0 to ``Nk``.
        max_len_q: the longest query block.
        max_len_k: the longest key block.
    """

    offsets_q: Sequence[int]
    offsets_k: Sequence[int]
    max_len_q: int
    max_len_k: int

    @property
    def num_blocks(self) -> int:
        return len(self.offsets_q) - 1

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets as int32 tensors on ``device``, as the kernels take them.

        Nothing here waits for a GPU: fixed offsets are made on the device, others copied from
        pinned memory without blocking.
        """
        cu_q = offsets_tensor(self.offsets_q, device)
        if self.offsets_k is self.offsets_q or self.offsets_k == self.offsets_q:
            return cu_q, cu_q
        return cu_q, offsets_tensor(self.offsets_k, device)

    def mask(self, causal: bool, device: torch.device | None = None) -> torch.Tensor:
        """The dense boolean mask (Nq, Nk), True where a query may attend a key (for tests)."""
        nq, nk = self.offsets_q[-1], self.offsets_k[-1]
        allowed = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        for j in range(self.num_blocks):
            q0, q1 = self.offsets_q[j], self.offsets_q[j + 1]
            k0, k1 = self.offsets_k[j], self.offsets_k[j + 1]
            block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=device)
            if causal:
                # Bottom-right alignment: local query i sees local key t iff t <= i + Lk - Lq.
                block = torch.tril(block, diagonal=(k1 - k0) - (q1 - q0))
            allowed[q0:q1, k0:k1] = block
        return allowed


class EvenOffsets(Sequence[int]):
    """The offsets ``(*range(0, seqlen, step), seqlen)`` of fixed blocks, never listed.

    Listing them would cost a tuple of N / step ints on every call (milliseconds for a million
    tokens in blocks of 16); this answers ``len``, indexing and comparisons arithmetically, and
    lets the device make the offsets with one kernel.
    """

    __slots__ = ("seqlen", "step")

    def __init__(self, seqlen: int, step: int) -> None:
        if seqlen < 0 or step <= 0:
            raise ValueError(f"EvenOffsets needs seqlen >= 0 and step > 0, got {seqlen}, {step}")
        self.seqlen = seqlen
        self.step = step

    def __len__(self) -> int:
        return -(-self.seqlen // self.step) + 1

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        count = len(self)
        position = index + count if index < 0 else index
        if not 0 <= position < count:
            raise IndexError(f"offset index {index} out of range for {count} offsets")
        return min(position * self.step, self.seqlen)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EvenOffsets) and len(other) != len(self):
            return False
        if isinstance(other, EvenOffsets) and (len(self) <= 2 or other.step == self.step):
            return other.seqlen == self.seqlen
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"EvenOffsets(seqlen={self.seqlen}, step={self.step})"


def offsets_tensor(offsets: Sequence[int], device: torch.device) -> torch.Tensor:
    """``offsets`` as an int32 tensor on ``device``.

    A plain copy of a Python list to a GPU waits until the GPU has finished all queued work,
    which would stall every call, and cannot be captured in a CUDA graph. So evenly spaced
    offsets are made by device kernels, and others are copied from pinned memory without
    blocking (stream-ordered, like any input prepared on the current stream).
    """
    if isinstance(offsets, EvenOffsets) and offsets.seqlen + offsets.step <= INT32_MAX:
        seqlen, step = offsets.seqlen, offsets.step
        made = torch.arange(0, seqlen + step, step, dtype=torch.int32, device=device)
        return made if seqlen % step == 0 else made.clamp_(max=seqlen)
    if torch.compiler.is_compiling():
        return torch.tensor(tuple(offsets), dtype=torch.int32, device=device)
    if device.type != "cuda":
        return torch.tensor(offsets, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "cu_seqlens given as a list cannot be captured in a CUDA graph (the copy to the GPU "
            "would read host memory that is reused after capture); " + CAPTURE_ADVICE
        )
    pinned = torch.tensor(offsets, dtype=torch.int32, pin_memory=True)
    return pinned.to(device, non_blocking=True)


def full_layout(seqlen_q: int, seqlen_k: int) -> BlockLayout:
    """One block: every query may attend every key (before any causal mask)."""
    offsets_q = EvenOffsets(seqlen_q, seqlen_q) if seqlen_q > 0 else (0, 0)
    offsets_k = EvenOffsets(seqlen_k, seqlen_k) if seqlen_k > 0 else (0, 0)
    return BlockLayout(offsets_q, offsets_k, seqlen_q, seqlen_k)


def fixed_layout(seqlen: int, block_size: int) -> BlockLayout:
    """Blocks ``[i*b, (i+1)*b)``; the last one may be shorter."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size}")
    offsets = EvenOffsets(seqlen, block_size)
    longest = min(block_size, seqlen)
    return BlockLayout(offsets, offsets, longest, longest)


def offsets_from_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    """Reads ``cu_seqlens`` (a 1-D int32/int64 tensor on any device, or a list of ints).

    A CUDA tensor is copied to the host once here (one synchronisation, so not in a CUDA graph
    capture).
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "cu_seqlens as a CUDA tensor is read on the host to be checked, which a CUDA "
                "graph capture cannot do; " + CAPTURE_ADVICE
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"cu_seqlens must be 1-D, got {cu_seqlens.dim()}-D shape {tuple(cu_seqlens.shape)}"
            )
        return tuple(int(c) for c in cu_seqlens.tolist())
    if isinstance(cu_seqlens, (list, tuple)):
        for c in cu_seqlens:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(
                    f"cu_seqlens must contain ints, got an element of type {type(c).__name__}"
                )
        return tuple(cu_seqlens)
    raise TypeError(
        f"cu_seqlens must be a 1-D int tensor or a list of ints, got {type(cu_seqlens).__name__}"
    )


def validate_offsets(offsets: Sequence[int], seqlen: int, name: str = "cu_seqlens") -> int:
    """Checks ``0 = c0 < c1 < ... < cm = seqlen`` and returns the longest block's length."""
    if len(offsets) < 2:
        raise ValueError(f"{name} must hold at least 2 offsets (0 and N), got {list(offsets)}")
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    too_large = [c for c in offsets if c > INT32_MAX]
    if too_large:
        raise ValueError(
            f"{name} offsets must fit in int32 for indexing, got {too_large[0]} > {INT32_MAX}"
        )
    for j in range(len(offsets) - 1):
        if offsets[j + 1] < offsets[j]:
            raise ValueError(
                f"{name} must be increasing, but offset {j + 1} ({offsets[j + 1]}) < "
                f"offset {j} ({offsets[j]})"
            )
        if offsets[j + 1] == offsets[j]:
            raise ValueError(
                f"{name} has an empty block: offsets {j} and {j + 1} are both {offsets[j]}"
            )
    if offsets[-1] > seqlen:
        raise ValueError(
            f"{name} goes beyond the sequence: last offset {offsets[-1]} > N = {seqlen}"
        )
    if offsets[-1] != seqlen:
        raise ValueError(f"{name} must end at N = {seqlen}, got last offset {offsets[-1]}")
    return max(offsets[j + 1] - offsets[j] for j in range(len(offsets) - 1))


def varlen_layout(seqlen: int, cu_seqlens: torch.Tensor | Sequence[int]) -> BlockLayout:
    """Blocks ``[c_j, c_{j+1})`` from validated ``cu_seqlens`` (the packed-documents case)."""
    offsets = offsets_from_cu_seqlens(cu_seqlens)
    max_len = validate_offsets(offsets, seqlen)
    return BlockLayout(offsets, offsets, max_len, max_len)


def make_layout(
    seqlen_q: int,
    seqlen_k: int,
    block_size: int | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
) -> BlockLayout:
    """The layout for the public API's ``block_size`` / ``cu_seqlens`` arguments."""
    if block_size is not None and cu_seqlens is not None:
        raise ValueError("pass at most one of block_size and cu_seqlens, got both")
    if block_size is None and cu_seqlens is None:
        return full_layout(seqlen_q, seqlen_k)
    if seqlen_q != seqlen_k:
        what = "block_size" if block_size is not None else "cu_seqlens"
        raise ValueError(
            f"{what} needs as many queries as keys (Nq == Nk), got Nq = {seqlen_q}, Nk = {seqlen_k}"
        )
    if block_size is not None:
        return fixed_layout(seqlen_q, block_size)
    return varlen_layout(seqlen_q, cu_seqlens)


def device_offsets(
    cu_seqlens: object, max_seqlen: object, seqlen_q: int, seqlen_k: int, device: torch.device
) -> torch.Tensor:
    """``cu_seqlens`` given with ``max_seqlen``: checked for everything but its values, which stay
    on the device (no synchronisation, so CUDA graphs can capture the call).

    Returns the offsets as a contiguous int32 tensor on ``device``. Their values must still be
    ``0 = c0 <= c1 <= ... <= cm = N`` with no block longer than ``max_seqlen``; the CPU kernels
    check that, the CUDA kernels clamp them to the tensors (wrong rows, never a stray access).
    """
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen <= 0 or max_seqlen > INT32_MAX:
        raise ValueError(f"max_seqlen must be in [1, {INT32_MAX}], got {max_seqlen}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            "max_seqlen goes with cu_seqlens given as a tensor on q's device (so its values need "
            f"not be read on the host), got cu_seqlens of type {type(cu_seqlens).__name__}; "
            "with a list, leave max_seqlen out"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(
            f"cu_seqlens with max_seqlen must be on q's device {device}, got {cu_seqlens.device}"
        )
    if seqlen_q != seqlen_k:
        raise ValueError(
            f"cu_seqlens needs as many queries as keys (Nq == Nk), got Nq = {seqlen_q}, "
            f"Nk = {seqlen_k}"
        )
    return cu_seqlens.to(torch.int32).contiguous()


def layout_from_device_offsets(
    cu_seqlens: torch.Tensor, max_seqlen: int, seqlen: int
) -> BlockLayout:
    """The layout that offsets from :func:`device_offsets` describe, read on the host and checked
    against their contract (for the reference and tests; empty blocks are allowed here)."""
    offsets = tuple(int(c) for c in cu_seqlens.tolist())
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    for j in range(len(offsets) - 1):
        length = offsets[j + 1] - offsets[j]
        if length < 0:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, but offset {j + 1} ({offsets[j + 1]}) < "
                f"offset {j} ({offsets[j]})"
            )
        if length > max_seqlen:
            raise ValueError(
                f"cu_seqlens block {j} has {length} tokens, more than max_seqlen = {max_seqlen}"
            )
    if offsets[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at N = {seqlen}, got last offset {offsets[-1]}")
    return BlockLayout(offsets, offsets, max_seqlen, max_seqlen)
