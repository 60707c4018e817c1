"""Point-to-point transfers between ranks, and a per-process byte counter.

Every transfer of this package goes through :func:`exchange`, so :data:`STATS` counts
exactly what a rank sent and received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["STATS", "CommStats", "exchange", "pack", "unpack"]


@dataclass
class CommStats:
    """Bytes and messages this process has sent and received through point-to-point ops.

    Attributes:
        bytes_sent: payload bytes sent.
        bytes_received: payload bytes received.
        messages_sent: number of tensors sent.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0

    def reset(self) -> None:
        """Sets every counter back to 0."""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0


STATS = CommStats()


def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    group: dist.ProcessGroup | None,
) -> list[dist.Work]:
    """Posts sends and receives together and returns without waiting.

    Args:
        sends: (contiguous tensor, destination rank in ``group``) pairs.
        recvs: (contiguous buffer to fill, source rank in ``group``) pairs.
        group: the process group (default: the world).

    Returns:
        The pending works; ``wait()`` on each before reading a buffer or freeing a sent tensor.
    """
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for t, peer in recvs]
    if not ops:
        return []
    for t, _ in sends:
        STATS.bytes_sent += t.numel() * t.element_size()
        STATS.messages_sent += 1
    for t, _ in recvs:
        STATS.bytes_received += t.numel() * t.element_size()
    return dist.batch_isend_irecv(ops)


def wait_all(works: list[dist.Work]) -> None:
    """Waits for every work in ``works``."""
    for work in works:
        work.wait()


def pack(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Two same-shaped tensors as one flat buffer, so a pair travels as one message."""
    dtype = dtype or a.dtype
    return torch.cat([a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)])


def unpack(buffer: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: two views of ``buffer`` with ``shape``."""
    half = buffer.numel() // 2
    return buffer[:half].view(shape), buffer[half:].view(shape)
