"""Context-parallel attention on CPU processes: bytes sent per rank and time, vs one process.

Spawns 2 and 4 gloo processes on this machine and runs forward and forward + backward of
``block_attn.distributed.context_parallel_attention`` under the classic ring schedule and the
block-aware one, on packed documents and on plain causal attention; the single-process op on
the full sequence is the baseline. Writes ``bench/results/distributed_cpu.json``.

Run: ``python -m bench.distributed_bench [--tokens 4096] [--repeats 3]``.

All processes share one machine, so with more processes than cores the timings measure
contention as much as parallelism; the byte counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import block_attn
from bench.timing import median_ms, sample_ms, summarize
from block_attn.distributed import (
    STATS,
    build_schedule,
    context_parallel_attention,
    shard_sequence,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def document_offsets(total: int, mean_length: int, seed: int = 0) -> list[int]:
    """Packed documents with long-tailed (lognormal) lengths, filling ``total`` tokens."""
    generator = torch.Generator().manual_seed(seed)
    offsets = [0]
    while offsets[-1] < total:
        draw = torch.empty(1).log_normal_(mean=0.0, std=0.8, generator=generator).item()
        length = max(16, int(draw * mean_length / 1.377))  # E[lognormal(0, 0.8)] = 1.377
        offsets.append(min(total, offsets[-1] + length))
    return offsets


def workloads(args: argparse.Namespace) -> dict[str, list[int] | None]:
    return {
        "packed": document_offsets(args.tokens, args.mean_document),
        "causal": None,
    }


def inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.heads, args.tokens, args.head_dim)
    return tuple(torch.randn(shape, generator=generator) for _ in range(4))


def timed(fn, repeats: int, group: dist.ProcessGroup | None = None) -> float:
    """Median over repeats of the slowest rank's time, in milliseconds."""
    if not dist.is_initialized():
        return median_ms(fn, repeats)
    samples = sample_ms({"fn": fn}, "cpu", repeats, before_call=lambda: dist.barrier(group))["fn"]
    slowest = torch.tensor(samples)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return summarize(slowest.tolist())["ms"]


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    rows = []
    q_full, k_full, v_full, grad_full = inputs(args)
    for layout in ("zigzag", "contiguous"):
        q, k, v, grad = (
            shard_sequence(t, dim=2, layout=layout) for t in (q_full, k_full, v_full, grad_full)
        )
        rows += run_layout(world, layout, q, k, v, grad, args)
    if rank == 0:
        with open(os.path.join(out_dir, f"w{world}.json"), "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_layout(
    world: int,
    layout: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    args: argparse.Namespace,
) -> list[dict]:
    """Rows for one layout: each workload under each schedule."""
    rows = []
    for workload, offsets in workloads(args).items():
        for schedule in ("ring", "block"):

            def forward(q=q, offsets=offsets, schedule=schedule):
                with torch.no_grad():
                    return context_parallel_attention(
                        q,
                        k,
                        v,
                        cu_seqlens=offsets,
                        causal=True,
                        layout=layout,
                        schedule=schedule,
                    )

            def forward_backward(offsets=offsets, schedule=schedule):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = context_parallel_attention(
                    *leaves,
                    cu_seqlens=offsets,
                    causal=True,
                    layout=layout,
                    schedule=schedule,
                )
                out.backward(grad)

            STATS.reset()
            forward()
            sent_forward = STATS.bytes_sent
            STATS.reset()
            forward_backward()
            sent_total = STATS.bytes_sent
            row = {
                "processes": world,
                "workload": workload,
                "layout": layout,
                "schedule": schedule,
                "bytes_sent_forward": sent_forward,
                "bytes_sent_forward_backward": sent_total,
                "forward_ms": timed(forward, args.repeats),
                "forward_backward_ms": timed(forward_backward, args.repeats),
            }
            sent = torch.tensor([sent_forward, sent_total])
            gathered = [torch.empty_like(sent) for _ in range(world)]
            dist.all_gather(gathered, sent)
            row["bytes_sent_forward_per_rank"] = [int(t[0]) for t in gathered]
            row["bytes_sent_forward_backward_per_rank"] = [int(t[1]) for t in gathered]
            if schedule == "block":
                plan = build_schedule(tuple(offsets or (0, args.tokens)), world, layout, True)
                row["shard_transfers_forward"] = plan.num_transfers()
            rows.append(row)
    return rows


def single_process(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    q, k, v, grad = inputs(args)
    rows = []
    for workload, offsets in workloads(args).items():

        def forward(offsets=offsets):
            with torch.no_grad():
                return block_attn.attention(q, k, v, cu_seqlens=offsets, causal=True)

        def forward_backward(offsets=offsets):
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            block_attn.attention(*leaves, cu_seqlens=offsets, causal=True).backward(grad)

        rows.append(
            {
                "processes": 1,
                "workload": workload,
                "schedule": "none",
                "forward_ms": timed(forward, args.repeats),
                "forward_backward_ms": timed(forward_backward, args.repeats),
            }
        )
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="global sequence length N")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mean-document", type=int, default=256)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "distributed_cpu.json"))
    args = parser.parse_args()

    rows = single_process(args)
    with tempfile.TemporaryDirectory() as out_dir:
        for world in args.processes:
            mp.spawn(worker, args=(world, free_port(), args, out_dir), nprocs=world, join=True)
            with open(os.path.join(out_dir, f"w{world}.json")) as f:
                rows += json.load(f)
    offsets = workloads(args)["packed"]
    result = {
        "description": __doc__.splitlines()[0],
        "command": "python -m bench.distributed_bench "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "output"
        ),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "block_attn_build": block_attn.build_info(),
            "op_kernels": os.path.basename(block_attn._C.__file__),
            "note": "all processes share this machine's cores; with more processes than "
            "cores the timings include contention",
        },
        "config": {
            "tokens": args.tokens,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "dtype": "float32",
            "causal": True,
            "packed_documents": len(offsets) - 1,
            "packed_offsets": offsets,
        },
        "runs": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    for row in rows:
        sent = row.get("bytes_sent_forward_backward_per_rank", [0])
        print(
            f"{row['processes']} proc  {row['workload']:7s} {row.get('layout', ''):10s} "
            f"{row['schedule']:5s}  "
            f"fwd {row['forward_ms']:8.1f} ms  fwd+bwd {row['forward_backward_ms']:8.1f} ms  "
            f"max bytes sent/rank fwd+bwd {max(sent) / 2**20:7.2f} MiB"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
