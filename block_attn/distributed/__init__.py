"""Exact context-parallel block attention over ``torch.distributed``.

The sequence dimension is sharded across the ranks of a process group (gloo on CPU, NCCL on
GPU); :func:`context_parallel_attention` gives every rank the exact slice of the
single-process result, forward and backward. Keys and values travel between ranks by
point-to-point transfers, only where a block (document) spans both ranks.
"""

import torch.distributed

if not torch.distributed.is_available():
    raise ImportError("block_attn.distributed needs a torch build with torch.distributed")

from block_attn.distributed.attention import context_parallel_attention
from block_attn.distributed.comm import STATS, CommStats
from block_attn.distributed.layout import chunk_ranges, shard_sequence, unshard_sequence
from block_attn.distributed.schedule import Schedule, build_schedule

__all__ = [
    "STATS",
    "CommStats",
    "Schedule",
    "build_schedule",
    "chunk_ranges",
    "context_parallel_attention",
    "shard_sequence",
    "unshard_sequence",
]
