"""Context-parallel block attention on packed documents, one process per device.

Launch (gloo on CPU, NCCL when GPUs are present):

    torchrun --nproc-per-node 2 examples/context_parallel.py

Every rank holds a zigzag shard of one long packed sequence; the script checks that the
distributed forward and backward equal single-process attention on the full sequence and
prints how many bytes each rank sent under the block-aware schedule and the classic ring.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import block_attn
from block_attn.distributed import (
    STATS,
    context_parallel_attention,
    shard_sequence,
    unshard_sequence,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="global sequence length N")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    # The same full batch on every rank (same seed): documents of 100-500 tokens packed
    # into one sequence; documents cross shard boundaries.
    generator = torch.Generator().manual_seed(0)
    offsets = [0]
    while offsets[-1] < args.tokens:
        length = int(torch.randint(100, 500, (1,), generator=generator))
        offsets.append(min(args.tokens, offsets[-1] + length))
    shape = (1, args.heads, args.tokens, args.head_dim)
    q_full, k_full, v_full = (torch.randn(shape, generator=generator).to(device) for _ in range(3))

    # Each rank keeps only its shard (zigzag: chunks r and 2W-1-r of 2W).
    q, k, v = (shard_sequence(t, dim=2).requires_grad_() for t in (q_full, k_full, v_full))

    for schedule in ("ring", "block"):
        STATS.reset()
        out = context_parallel_attention(
            q, k, v, cu_seqlens=offsets, causal=True, schedule=schedule
        )
        out.sum().backward()
        sent = torch.tensor([STATS.bytes_sent], device=device)
        per_rank = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(per_rank, sent)
        if rank == 0:
            kib = ", ".join(f"{int(b) / 1024:.0f}" for b in per_rank)
            print(f"{schedule:5s} schedule: KiB sent per rank (forward + backward): [{kib}]")

    # Check against one process computing the whole sequence.
    full = block_attn.attention(q_full, k_full, v_full, cu_seqlens=offsets, causal=True)
    gathered = unshard_sequence(out.detach(), dim=2)
    error = (gathered - full).abs().max().item()
    if rank == 0:
        print(
            f"{world} ranks, {len(offsets) - 1} documents, N = {args.tokens}: "
            f"max |distributed - single process| = {error:.2e}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
