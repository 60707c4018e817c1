"""Which global sequence positions each rank holds: the shard index maps.

The global sequence of N tokens is cut into equal chunks. With world size W:

* ``"contiguous"``: W chunks; rank r holds chunk r.
* ``"zigzag"``: 2W chunks; rank r holds chunks r and 2W-1-r, in that order. Under a causal
  mask every rank then does the same amount of work (an early chunk with little to attend to
  is paired with a late one with much).

A rank's local shard is its chunks concatenated along the sequence dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "LAYOUTS",
    "check_layout",
    "chunk_ranges",
    "num_chunks",
    "shard_sequence",
    "unshard_sequence",
]

LAYOUTS = ("zigzag", "contiguous")

ChunkRange = tuple[int, int]


def check_layout(layout: str) -> None:
    """Raises ValueError unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def check_divisible(seqlen: int, world_size: int, layout: str) -> None:
    """Raises ValueError unless the global length splits into equal chunks."""
    chunks = num_chunks(world_size, layout)
    if seqlen <= 0 or seqlen % chunks != 0:
        what = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(
            f"the global sequence length must be a positive multiple of {what} = {chunks} "
            f"for layout {layout!r} with world_size {world_size}, got N = {seqlen}; "
            f"pad the sequence to a multiple of {chunks}"
        )


def chunk_ranges(seqlen: int, world_size: int, rank: int, layout: str) -> tuple[ChunkRange, ...]:
    """The global ``[start, end)`` ranges rank ``rank`` holds, in local order.

    Args:
        seqlen: global sequence length N, a multiple of :func:`num_chunks`.
        world_size: number of ranks W.
        rank: the rank, ``0 <= rank < W``.
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        One range per chunk; their lengths sum to N / W.
    """
    check_divisible(seqlen, world_size, layout)
    size = seqlen // num_chunks(world_size, layout)
    indices = (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)
    return tuple((i * size, (i + 1) * size) for i in indices)


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def shard_sequence(
    x: torch.Tensor, *, dim: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor.

    Args:
        x: the full tensor, identical on every rank; ``x.shape[dim]`` is the global length N,
            e.g. (B, H, N, D) with ``dim=2``.
        dim: the sequence dimension.
        group: the process group (default: the world).
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        A new tensor with N / W positions along ``dim`` (this rank's chunks concatenated);
        differentiable with respect to ``x``.
    """
    world_size, rank = _group_info(group)
    ranges = chunk_ranges(x.shape[dim], world_size, rank, layout)
    return torch.cat([x.narrow(dim, start, end - start) for start, end in ranges], dim=dim)


def unshard_sequence(
    x_local: torch.Tensor,
    *,
    dim: int,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
) -> torch.Tensor:
    """Gathers every rank's shard back into the full sequence (inverse of shard_sequence).

    Collective: every rank in ``group`` must call it with same-shaped shards. Not
    differentiable (it is meant for outputs, checks and logging).

    Args:
        x_local: this rank's shard, N / W positions along ``dim``.
        dim: the sequence dimension.
        group: the process group (default: the world).
        layout: ``"zigzag"`` or ``"contiguous"``.

    Returns:
        The full tensor, N positions along ``dim``, identical on every rank.
    """
    world_size, _ = _group_info(group)
    dim = dim % x_local.dim()
    seqlen = x_local.shape[dim] * world_size
    check_divisible(seqlen, world_size, layout)
    shards = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(shards, x_local.contiguous(), group=group)
    pieces: dict[int, torch.Tensor] = {}
    for rank, shard in enumerate(shards):
        offset = 0
        for start, end in chunk_ranges(seqlen, world_size, rank, layout):
            pieces[start] = shard.narrow(dim, offset, end - start)
            offset += end - start
    return torch.cat([pieces[start] for start in sorted(pieces)], dim=dim)
