"""How a call's blocks are described: the one home of ``block_size`` / ``cu_seqlens`` /
``cu_seqlens_k`` / ``max_seqlen`` / :class:`BlockLayout`.

Everything below the public API describes blocks the same way: offsets
``0 = c0 <= c1 <= ... <= cm = N`` (block ``j`` is tokens ``[c_j, c_{j+1})``, possibly empty)
plus the longest block's length, for the queries and for the keys. :func:`resolve_blocks` turns
any accepted form of the API's arguments into a :class:`CallBlocks`, which gives the kernels'
int32 device offsets (:meth:`CallBlocks.for_kernels`) or the offsets listed on the host
(:meth:`CallBlocks.on_host`, for the dense reference, the module's weights and the distributed
schedule).

Offsets come in two forms. Listed on the host (lists, tensors without ``max_seqlen``, fixed
blocks, a :class:`BlockLayout`) they are checked here. Given as a tensor with ``max_seqlen``
(FlashAttention's varlen convention) they stay on the device unread, so a GPU call never waits
and CUDA graphs can capture it; the operators then check their values on the CPU, and the CUDA
kernels clamp them to the tensors (wrong rows, never a stray access).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, overload

import torch

from block_attn.validation import as_int

__all__ = ["BlockLayout", "CallBlocks", "KernelOffsets", "padded_cache_blocks", "resolve_blocks"]

INT32_MAX = 2**31 - 1
CAPTURE_ADVICE = (
    "in captured code pass cu_seqlens as an int32 tensor on q's device together with "
    "max_seqlen (the longest block's length): the offsets then stay on the device, unchecked"
)

CuSeqlens = torch.Tensor | Sequence[int]


class EvenOffsets(Sequence[int]):
    """The offsets ``(*range(0, seqlen, step), seqlen)`` of fixed blocks, never listed.

    Listing them would cost a tuple of N / step ints on every call; this answers ``len``,
    indexing and comparisons arithmetically, and lets the device make the offsets with one
    kernel.
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
    """``offsets`` as an int32 tensor on ``device``, made without waiting for a GPU.

    A plain copy of a Python list to a GPU waits until the GPU has finished all queued work and
    cannot be captured in a CUDA graph. So evenly spaced offsets are made by device kernels, and
    others are copied from pinned memory without blocking (stream-ordered).
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


class KernelOffsets(NamedTuple):
    """Blocks as the operators take them: contiguous int32 offsets on q's device."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass(frozen=True)
class BlockLayout:
    """Validated block boundaries for queries and keys, listed on the host.

    Build one with :meth:`from_seqlens`, :meth:`from_offsets`, :meth:`fixed` or :meth:`full`
    and pass it as ``attention(..., blocks=layout)``: it is checked once, however many calls
    (layers) reuse it.

    Attributes:
        offsets_q: query offsets, ``num_blocks + 1`` Python ints from 0 to at most ``Nq``.
        offsets_k: key offsets, ``num_blocks + 1`` Python ints from 0 to at most ``Nk``.

    Rows after the last offset (of a tensor longer than the layout covers) belong to no block:
    such queries output 0 with lse = -inf and such keys are never read; neither gets a gradient.
        max_len_q: the longest query block.
        max_len_k: the longest key block.
    """

    offsets_q: Sequence[int]
    offsets_k: Sequence[int]
    max_len_q: int
    max_len_k: int

    @classmethod
    def from_offsets(
        cls, cu_seqlens: CuSeqlens, cu_seqlens_k: CuSeqlens | None = None
    ) -> BlockLayout:
        """Blocks ``[c_j, c_{j+1})`` from offsets (a list of ints or a 1-D int tensor, read on
        the host); ``cu_seqlens_k`` gives the keys' own offsets (as many blocks)."""
        offsets_q = _read_offsets(cu_seqlens, "cu_seqlens")
        max_q = _check_offsets(offsets_q, offsets_q[-1] if offsets_q else 0, "cu_seqlens")
        if cu_seqlens_k is None:
            return cls(offsets_q, offsets_q, max_q, max_q)
        offsets_k = _read_offsets(cu_seqlens_k, "cu_seqlens_k")
        max_k = _check_offsets(offsets_k, offsets_k[-1] if offsets_k else 0, "cu_seqlens_k")
        _check_block_counts(len(offsets_q), len(offsets_k))
        return cls(offsets_q, offsets_k, max_q, max_k)

    @classmethod
    def from_seqlens(
        cls, seqlens: Sequence[int], seqlens_k: Sequence[int] | None = None
    ) -> BlockLayout:
        """Consecutive blocks of the given lengths (e.g. packed documents); ``seqlens_k`` gives
        each block's key count when it differs from its query count."""

        def offsets_of(lengths: Sequence[int], name: str) -> list[int]:
            offsets = [0]
            for i, length in enumerate(_int_sequence(lengths, name)):
                if length < 0:
                    raise ValueError(f"{name}[{i}] must be >= 0, got {length}")
                offsets.append(offsets[-1] + length)
            return offsets

        cu_k = None if seqlens_k is None else offsets_of(seqlens_k, "seqlens_k")
        return cls.from_offsets(offsets_of(seqlens, "seqlens"), cu_k)

    @classmethod
    def fixed(cls, seqlen: int, block_size: int) -> BlockLayout:
        """Blocks ``[i*b, (i+1)*b)`` over ``seqlen`` tokens; the last one may be shorter."""
        seqlen = _check_seqlen(seqlen, "seqlen")
        block_size = as_int(block_size, "block_size")
        if block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size}")
        offsets = EvenOffsets(seqlen, block_size) if seqlen > 0 else (0, 0)
        longest = min(block_size, seqlen)
        return cls(offsets, offsets, longest, longest)

    @classmethod
    def full(cls, seqlen_q: int, seqlen_k: int) -> BlockLayout:
        """One block: every query may attend every key (before any causal mask)."""
        seqlen_q = _check_seqlen(seqlen_q, "seqlen_q")
        seqlen_k = _check_seqlen(seqlen_k, "seqlen_k")
        offsets_q = EvenOffsets(seqlen_q, seqlen_q) if seqlen_q > 0 else (0, 0)
        offsets_k = EvenOffsets(seqlen_k, seqlen_k) if seqlen_k > 0 else (0, 0)
        return cls(offsets_q, offsets_k, seqlen_q, seqlen_k)

    @property
    def num_blocks(self) -> int:
        return len(self.offsets_q) - 1

    @property
    def seqlen_q(self) -> int:
        """The query rows the blocks cover (the last query offset)."""
        return self.offsets_q[-1]

    @property
    def seqlen_k(self) -> int:
        """The key rows the blocks cover (the last key offset)."""
        return self.offsets_k[-1]

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets as int32 tensors on ``device``, made without waiting for a GPU."""
        cu_q = offsets_tensor(self.offsets_q, device)
        if self.offsets_k is self.offsets_q or self.offsets_k == self.offsets_q:
            return cu_q, cu_q
        return cu_q, offsets_tensor(self.offsets_k, device)

    def mask(
        self,
        causal: bool,
        device: torch.device | str | None = None,
        shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The dense boolean mask (Nq, Nk), True where a query may attend a key (for tests and
        inspection: O(Nq·Nk) memory). ``shape`` gives (Nq, Nk) when the tensors have rows after
        the last offsets; by default the offsets' ends."""
        in_block, behind = self.positions(device, shape)
        return in_block & (behind >= 0) if causal else in_block

    def positions(
        self, device: torch.device | str | None = None, shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (Nq, Nk) maps: whether query and key share a block, and how far the key is
        behind the query, ``i' - t`` for local query i aligned bottom-right (``i' = i + Lk - Lq``)
        and local key t (0 outside blocks)."""
        rows, cols = (self.seqlen_q, self.seqlen_k) if shape is None else shape
        in_block = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        behind = torch.zeros(rows, cols, dtype=torch.int64, device=device)
        for j in range(self.num_blocks):
            q0, q1 = self.offsets_q[j], self.offsets_q[j + 1]
            k0, k1 = self.offsets_k[j], self.offsets_k[j + 1]
            aligned = torch.arange(q1 - q0, device=device) + (k1 - k0) - (q1 - q0)
            keys = torch.arange(k1 - k0, device=device)
            in_block[q0:q1, k0:k1] = True
            behind[q0:q1, k0:k1] = aligned[:, None] - keys[None, :]
        return in_block, behind


@dataclass(frozen=True)
class CallBlocks:
    """One call's blocks: listed on the host (``layout``) or kept on the device (``kept``)."""

    layout: BlockLayout | None = None
    kept: KernelOffsets | None = None
    # The tensors' lengths, which kept offsets may not go beyond.
    seqlen_q: int = 0
    seqlen_k: int = 0

    def for_kernels(self, device: torch.device) -> KernelOffsets:
        """The offsets the operators take, without reading kept offsets on the host."""
        if self.kept is not None:
            return self.kept
        assert self.layout is not None
        cu_q, cu_k = self.layout.tensors(device)
        return KernelOffsets(cu_q, cu_k, self.layout.max_len_q, self.layout.max_len_k)

    def on_host(self) -> BlockLayout:
        """The offsets listed on the host; kept offsets are read (one synchronisation on a GPU)
        and checked against the contract the CUDA kernels assume without checking."""
        if self.layout is not None:
            return self.layout
        assert self.kept is not None
        cu_q, cu_k, max_q, max_k = self.kept
        offsets_q = tuple(int(c) for c in cu_q.tolist())
        separate_keys = cu_k is not cu_q
        q_names = ("cu_seqlens", "Nq" if separate_keys else "N")
        _check_offsets(offsets_q, self.seqlen_q, *q_names, max_q, "max_seqlen")
        if not separate_keys:
            return BlockLayout(offsets_q, offsets_q, max_q, max_k)
        offsets_k = tuple(int(c) for c in cu_k.tolist())
        _check_offsets(offsets_k, self.seqlen_k, "cu_seqlens_k", "Nk", max_k, "max_seqlen_k")
        return BlockLayout(offsets_q, offsets_k, max_q, max_k)


def _check_seqlen(value: object, name: str) -> int:
    """A sequence length: an int in [0, INT32_MAX], the kernels' offsets being int32."""
    value = as_int(value, name)
    if not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be in [0, {INT32_MAX}] (int32 offsets), got {value}")
    return value


def resolve_blocks(
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
    *,
    blocks: BlockLayout | None = None,
    block_size: int | None = None,
    cu_seqlens: CuSeqlens | None = None,
    cu_seqlens_k: CuSeqlens | None = None,
    max_seqlen: int | None = None,
    max_seqlen_k: int | None = None,
) -> CallBlocks:
    """The blocks of a call with ``seqlen_q`` queries and ``seqlen_k`` keys on ``device``, from
    the public API's arguments (see :func:`block_attn.attention` for their meaning).

    Raises:
        TypeError: an argument of the wrong kind. ValueError: offsets that break the contract,
        or arguments that do not go together.
    """
    if blocks is not None:
        if not isinstance(blocks, BlockLayout):
            raise TypeError(f"blocks must be a BlockLayout, got {type(blocks).__name__}")
        given = [n for n, a in (("block_size", block_size), ("cu_seqlens", cu_seqlens),
                                ("cu_seqlens_k", cu_seqlens_k), ("max_seqlen", max_seqlen),
                                ("max_seqlen_k", max_seqlen_k)) if a is not None]  # fmt: skip
        if given:
            raise ValueError(f"blocks already describes the blocks; leave out {', '.join(given)}")
        if blocks.seqlen_q > seqlen_q or blocks.seqlen_k > seqlen_k:
            raise ValueError(
                f"blocks covers {blocks.seqlen_q} queries and {blocks.seqlen_k} keys, more than "
                f"the tensors have: Nq = {seqlen_q}, Nk = {seqlen_k}"
            )
        return CallBlocks(layout=blocks)
    if max_seqlen is None and max_seqlen_k is None:
        layout = _listed_layout(seqlen_q, seqlen_k, block_size, cu_seqlens, cu_seqlens_k)
        return CallBlocks(layout=layout)
    kept = _kept_offsets(
        block_size, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, seqlen_q, seqlen_k, device
    )
    return CallBlocks(kept=kept, seqlen_q=seqlen_q, seqlen_k=seqlen_k)


def _listed_layout(
    seqlen_q: int,
    seqlen_k: int,
    block_size: int | None,
    cu_seqlens: CuSeqlens | None,
    cu_seqlens_k: CuSeqlens | None,
) -> BlockLayout:
    if block_size is not None and cu_seqlens is not None:
        raise ValueError("pass at most one of block_size and cu_seqlens, got both")
    if cu_seqlens_k is not None:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens_k (key offsets) needs cu_seqlens (query offsets)")
        offsets_q = _read_offsets(cu_seqlens, "cu_seqlens")
        offsets_k = _read_offsets(cu_seqlens_k, "cu_seqlens_k")
        max_q = _check_offsets(offsets_q, seqlen_q, "cu_seqlens", "Nq")
        max_k = _check_offsets(offsets_k, seqlen_k, "cu_seqlens_k", "Nk")
        _check_block_counts(len(offsets_q), len(offsets_k))
        return BlockLayout(offsets_q, offsets_k, max_q, max_k)
    if cu_seqlens is None and max(seqlen_q, seqlen_k) > INT32_MAX:
        # The operators' own check, made before offsets are made for these lengths.
        raise ValueError(
            f"sequence lengths must fit in int32, got Nq = {seqlen_q}, Nk = {seqlen_k}"
        )
    if block_size is None and cu_seqlens is None:
        return BlockLayout.full(seqlen_q, seqlen_k)
    if seqlen_q != seqlen_k:
        what = "block_size" if block_size is not None else "cu_seqlens"
        hint = "" if block_size is not None else " (or pass the keys' offsets as cu_seqlens_k)"
        raise ValueError(
            f"{what} needs as many queries as keys (Nq == Nk), got Nq = {seqlen_q}, "
            f"Nk = {seqlen_k}{hint}"
        )
    if block_size is not None:
        return BlockLayout.fixed(seqlen_q, block_size)
    offsets = _read_offsets(cu_seqlens, "cu_seqlens")
    longest = _check_offsets(offsets, seqlen_q, "cu_seqlens")
    return BlockLayout(offsets, offsets, longest, longest)


def _int_sequence(values: object, name: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a 1-D int tensor or a list of ints, got {type(values).__name__}"
        )
    listed = []
    for value in values:
        try:
            listed.append(as_int(value, name))
        except TypeError:
            raise TypeError(
                f"{name} must contain ints, got an element of type {type(value).__name__}"
            ) from None
    return tuple(listed)


def _read_offsets(cu_seqlens: object, name: str) -> tuple[int, ...]:
    """Offsets given as a 1-D int32/int64 tensor on any device, or a list of ints, as a tuple.

    A CUDA tensor is copied to the host once here (one synchronisation, so not in a CUDA graph
    capture).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        return _int_sequence(cu_seqlens, name)
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{name} as a CUDA tensor is read on the host to be checked, which a CUDA graph "
            "capture cannot do; " + CAPTURE_ADVICE
        )
    _check_offsets_dtype(cu_seqlens, name)
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{name} given as a tensor is read on the host to be checked, which torch.compile "
            f"cannot trace: pass it as a list, or as an int32 tensor on q's device together with "
            f"max_seqlen (the longest block's length), which keeps its values on the device"
        )
    if cu_seqlens.device.type == "meta":
        raise ValueError(
            f"{name} on the meta device has no values to read: pass a list, or a tensor on q's "
            "device together with max_seqlen"
        )
    if cu_seqlens.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D, got {cu_seqlens.dim()}-D shape {tuple(cu_seqlens.shape)}"
        )
    return tuple(int(c) for c in cu_seqlens.tolist())


def _check_offsets_dtype(cu_seqlens: torch.Tensor, name: str) -> None:
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {cu_seqlens.dtype}")


def _check_offsets(
    offsets: Sequence[int],
    seqlen: int,
    name: str,
    length_name: str = "N",
    max_len: int | None = None,
    max_name: str = "max_seqlen",
) -> int:
    """Checks ``0 = c0 <= c1 <= ... <= cm <= seqlen`` and returns the longest block's length.

    Empty blocks are allowed (e.g. offsets padded to a fixed count by repeating N), and so are
    rows after ``cm``, which belong to no block. With ``max_len``, no block may be longer.
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
    return longest


def _check_block_counts(count_q: int, count_k: int) -> None:
    if count_q != count_k:
        raise ValueError(
            "cu_seqlens and cu_seqlens_k must describe the same number of blocks, got "
            f"{count_q - 1} and {count_k - 1}"
        )


def _check_max_seqlen(value: object, name: str) -> int:
    value = as_int(value, name)
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
    _check_offsets_dtype(cu_seqlens, name)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{name} must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(
            f"{name} with {max_name} must be on q's device {device}, got {cu_seqlens.device}"
        )
    return _narrowed_to_int32(cu_seqlens, name)


def _narrowed_to_int32(cu_seqlens: torch.Tensor, name: str) -> torch.Tensor:
    """int64 offsets as the int32 the kernels read, refused when a value does not fit.

    On the CPU the values are read here; on a GPU (and in traced code) an asynchronous device
    assert checks them, so the host never waits.
    """
    if cu_seqlens.dtype == torch.int32:
        return cu_seqlens.contiguous()
    outside = (cu_seqlens < 0) | (cu_seqlens > INT32_MAX)
    message = f"{name} offsets must be in [0, {INT32_MAX}] to fit in int32"
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(outside.any()):
            raise ValueError(f"{message}, got {int(cu_seqlens[outside][0])}")
    else:
        torch._assert_async(~outside.any(), message)
    return cu_seqlens.to(torch.int32).contiguous()


def _kept_offsets(
    block_size: object,
    cu_seqlens: object,
    cu_seqlens_k: object,
    max_seqlen: object,
    max_seqlen_k: object,
    seqlen_q: int,
    seqlen_k: int,
    device: torch.device,
) -> KernelOffsets:
    """Checks everything about offsets given with ``max_seqlen`` but their values."""
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
        return KernelOffsets(cu_q, cu_q, max_q, max_q)
    if max_seqlen_k is None:
        raise ValueError(
            "cu_seqlens_k kept on the device needs max_seqlen_k (the longest key block)"
        )
    max_k = _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    cu_k = _device_offsets(cu_seqlens_k, "cu_seqlens_k", "max_seqlen_k", device)
    _check_block_counts(cu_q.numel(), cu_k.numel())
    return KernelOffsets(cu_q, cu_k, max_q, max_k)


def padded_cache_blocks(
    cache_lengths: Sequence[int] | torch.Tensor, cache_size: int, new_tokens: int = 1
) -> dict[str, object]:
    """Keyword arguments for ``attention`` that pair each sequence's new tokens with the valid
    rows of its slot in a padded (static) key/value cache.

    A static cache keeps every sequence's keys in a fixed-size slot: ``(B, L, Hkv, D)`` with
    ``cache_lengths[i] <= L`` valid rows in slot i. Viewed as one packed row of ``B * L`` keys,
    the slots are consecutive key blocks, each followed by its unused rows; a query block of no
    rows pairs with those, so ``attention`` never reads them and the padding needs no mask.

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
    cache_size = as_int(cache_size, "cache_size")
    new_tokens = as_int(new_tokens, "new_tokens")
    if cache_size < 0:
        raise ValueError(f"cache_size must be an int >= 0, got {cache_size}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1, got {new_tokens}")
    if isinstance(cache_lengths, torch.Tensor):
        return _cache_blocks_on_device(cache_lengths, cache_size, new_tokens)
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
    _check_cache_room(len(cache_lengths), cache_size, new_tokens)
    return {"cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k}


def _check_cache_room(count: int, cache_size: int, new_tokens: int) -> None:
    if count * max(cache_size, new_tokens) > INT32_MAX:
        raise ValueError(
            f"{count} slots of {cache_size} rows (or {new_tokens} queries) exceed int32 offsets"
        )


def _cache_blocks_on_device(
    lengths: torch.Tensor, cache_size: int, new_tokens: int
) -> dict[str, object]:
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"cache_lengths must be a non-empty 1-D tensor, got shape {lengths.shape}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"cache_lengths must be an integer tensor, got {lengths.dtype}")
    count = lengths.numel()
    _check_cache_room(count, cache_size, new_tokens)
    device = lengths.device
    index = torch.arange(count, dtype=torch.int32, device=device)
    ends_q = (index + 1) * new_tokens
    starts_k = index * cache_size
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu_seqlens = torch.cat([zero, torch.stack([ends_q, ends_q], dim=1).flatten()])
    valid_ends = starts_k + lengths.to(torch.int32)
    cu_seqlens_k = torch.cat(
        [zero, torch.stack([valid_ends, starts_k + cache_size], dim=1).flatten()]
    )
    return {
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_k": cu_seqlens_k,
        "max_seqlen": new_tokens,
        "max_seqlen_k": max(cache_size, 1),
    }
