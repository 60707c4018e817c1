"""Block structure: validation of ``block_size`` / ``cu_seqlens`` into one representation.

Everything below the public API describes blocks the same way: ``cu_seqlens`` offsets
``0 = c0 <= c1 <= ... <= cm = N`` (block ``j`` is tokens ``[c_j, c_{j+1})``, possibly empty)
plus the longest block's length. ``block_size`` is only a way to build those offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from block_attn.offsets import CAPTURE_ADVICE, INT32_MAX, EvenOffsets, offsets_tensor


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


def offsets_from_cu_seqlens(
    cu_seqlens: torch.Tensor | Sequence[int], name: str = "cu_seqlens"
) -> tuple[int, ...]:
    """Reads ``cu_seqlens`` (a 1-D int32/int64 tensor on any device, or a list of ints).

    A CUDA tensor is copied to the host once here (one synchronisation, so not in a CUDA graph
    capture).
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{name} as a CUDA tensor is read on the host to be checked, which a CUDA graph "
                "capture cannot do; " + CAPTURE_ADVICE
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D, got {cu_seqlens.dim()}-D shape {tuple(cu_seqlens.shape)}"
            )
        return tuple(int(c) for c in cu_seqlens.tolist())
    if isinstance(cu_seqlens, (list, tuple)):
        for c in cu_seqlens:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(
                    f"{name} must contain ints, got an element of type {type(c).__name__}"
                )
        return tuple(cu_seqlens)
    raise TypeError(
        f"{name} must be a 1-D int tensor or a list of ints, got {type(cu_seqlens).__name__}"
    )


def validate_offsets(
    offsets: Sequence[int],
    seqlen: int,
    name: str = "cu_seqlens",
    length_name: str = "N",
    max_len: int | None = None,
    max_name: str = "max_seqlen",
) -> int:
    """Checks ``0 = c0 <= c1 <= ... <= cm = seqlen`` and returns the longest block's length.

    Empty blocks are allowed (e.g. offsets padded to a fixed count by repeating N). With
    ``max_len``, no block may be longer.
    """
    if len(offsets) < 2:
        raise ValueError(f"{name} must hold at least 2 offsets (0 and N), got {list(offsets)}")
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    too_large = [c for c in offsets if c > INT32_MAX]
    if too_large:
        raise ValueError(
            f"{name} offsets must fit in int32 for indexing, got {too_large[0]} > {INT32_MAX}"
        )
    longest = 0
    for j in range(len(offsets) - 1):
        length = offsets[j + 1] - offsets[j]
        if length < 0:
            raise ValueError(
                f"{name} must be non-decreasing, but offset {j + 1} ({offsets[j + 1]}) < "
                f"offset {j} ({offsets[j]})"
            )
        if max_len is not None and length > max_len:
            raise ValueError(
                f"{name} block {j} has {length} tokens, more than {max_name} = {max_len}"
            )
        longest = max(longest, length)
    if offsets[-1] > seqlen:
        raise ValueError(
            f"{name} goes beyond the sequence: last offset {offsets[-1]} > {length_name} = {seqlen}"
        )
    if offsets[-1] != seqlen:
        raise ValueError(
            f"{name} must end at {length_name} = {seqlen}, got last offset {offsets[-1]}"
        )
    return longest


def varlen_layout(seqlen: int, cu_seqlens: torch.Tensor | Sequence[int]) -> BlockLayout:
    """Blocks ``[c_j, c_{j+1})`` from validated ``cu_seqlens`` (the packed-documents case)."""
    offsets = offsets_from_cu_seqlens(cu_seqlens)
    max_len = validate_offsets(offsets, seqlen)
    return BlockLayout(offsets, offsets, max_len, max_len)


def paired_layout(
    seqlen_q: int,
    seqlen_k: int,
    cu_seqlens: torch.Tensor | Sequence[int],
    cu_seqlens_k: torch.Tensor | Sequence[int],
) -> BlockLayout:
    """Query block j ``[cq_j, cq_{j+1})`` attends key block j ``[ck_j, ck_{j+1})`` (e.g. each
    sequence's new tokens against its cached keys)."""
    offsets_q = offsets_from_cu_seqlens(cu_seqlens)
    offsets_k = offsets_from_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    max_len_q = validate_offsets(offsets_q, seqlen_q, "cu_seqlens", "Nq")
    max_len_k = validate_offsets(offsets_k, seqlen_k, "cu_seqlens_k", "Nk")
    if len(offsets_q) != len(offsets_k):
        raise ValueError(
            "cu_seqlens and cu_seqlens_k must describe the same number of blocks, got "
            f"{len(offsets_q) - 1} and {len(offsets_k) - 1}"
        )
    return BlockLayout(offsets_q, offsets_k, max_len_q, max_len_k)


def make_layout(
    seqlen_q: int,
    seqlen_k: int,
    block_size: int | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
    cu_seqlens_k: torch.Tensor | Sequence[int] | None = None,
) -> BlockLayout:
    """The layout for the public API's ``block_size`` / ``cu_seqlens`` / ``cu_seqlens_k``."""
    if block_size is not None and cu_seqlens is not None:
        raise ValueError("pass at most one of block_size and cu_seqlens, got both")
    if cu_seqlens_k is not None:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens_k (key offsets) needs cu_seqlens (query offsets)")
        return paired_layout(seqlen_q, seqlen_k, cu_seqlens, cu_seqlens_k)
    if block_size is None and cu_seqlens is None:
        return full_layout(seqlen_q, seqlen_k)
    if seqlen_q != seqlen_k:
        what = "block_size" if block_size is not None else "cu_seqlens"
        hint = "" if block_size is not None else " (or pass the keys' offsets as cu_seqlens_k)"
        raise ValueError(
            f"{what} needs as many queries as keys (Nq == Nk), got Nq = {seqlen_q}, "
            f"Nk = {seqlen_k}{hint}"
        )
    if block_size is not None:
        return fixed_layout(seqlen_q, block_size)
    return varlen_layout(seqlen_q, cu_seqlens)
