"""Offsets as the kernels read them: int32 tensors on the device, made without waiting for a
GPU, and the offsets of fixed blocks, which are never listed on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch

INT32_MAX = 2**31 - 1
CAPTURE_ADVICE = (
    "in captured code pass cu_seqlens as an int32 tensor on q's device together with "
    "max_seqlen (the longest block's length): the offsets then stay on the device, unchecked"
)


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
