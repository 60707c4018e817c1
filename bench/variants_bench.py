"""The attention variants against the plain path, side by side in one process on the same inputs.

Sliding window (causal): time and useful GFLOP/s (4·D flops per (query, allowed key) pair in
the forward, 2.5 times that in the backward) against plain causal attention at the same N, and
the time at the largest N over the time at the smallest for a fixed window. Softcap, ALiBi,
sinks and dropout: forward+backward time over the plain path's at one shape. Medians after a
warm-up round, steps interleaved so a slow stretch of the machine hits them alike.

    python -m bench.variants_bench --out bench/results/variants_cpu.json
    python -m bench.variants_bench --seqlens 4096 16384 --windows 512 --dims 64 --quick
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch

import block_attn
from bench.timing import sample_ms, summarize

BACKWARD_FLOPS_FACTOR = 2.5  # five tile products against the forward's two


def allowed_pairs(seqlen: int, window: int | None) -> int:
    """(query, key) pairs of causal attention over ``seqlen`` tokens, within ``window`` keys
    behind each query when given."""
    if window is None or window + 1 >= seqlen:
        return seqlen * (seqlen + 1) // 2
    # The first `window` rows see i + 1 keys, the others window + 1.
    return window * (window + 1) // 2 + (seqlen - window) * (window + 1)


def make_step(q, k, v, backward: bool, **kwargs) -> Callable[[], object]:
    def forward():
        return block_attn.attention(q, k, v, **kwargs)

    if not backward:
        return forward
    grad_out = torch.randn_like(q)

    def forward_backward():
        out = block_attn.attention(q, k, v, **kwargs)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return forward_backward


def window_rows(args, dtype, dim) -> list[dict]:
    rows = []
    for seqlen in args.seqlens:
        q, k, v = (
            torch.randn(1, args.heads, seqlen, dim, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        for backward in (False, True):
            steps = {"causal": make_step(q, k, v, backward, causal=True)}
            for window in args.windows:
                steps[f"window {window}"] = make_step(
                    q, k, v, backward, causal=True, window_size=(window, 0)
                )
            times = sample_ms(steps, "cpu", reps=args.reps, warmup=1)
            factor = 1 + (BACKWARD_FLOPS_FACTOR if backward else 0)
            for name, samples in times.items():
                window = None if name == "causal" else int(name.split()[1])
                stats = summarize(samples)
                flops = 4 * dim * allowed_pairs(seqlen, window) * args.heads * factor
                rows.append(
                    dict(
                        kind="window",
                        dtype=str(dtype).removeprefix("torch."),
                        dim=dim,
                        seqlen=seqlen,
                        window=window,
                        direction="fwd+bwd" if backward else "fwd",
                        median_ms=stats["median"],
                        useful_gflops=flops / stats["median"] / 1e6,
                    )
                )
    return rows


def overhead_rows(args, dtype, dim) -> list[dict]:
    seqlen = args.overhead_seqlen
    q, k, v = (
        torch.randn(1, args.heads, seqlen, dim, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    sinks = torch.randn(args.heads, requires_grad=True)
    variants = {
        "plain": {},
        "softcap": dict(softcap=30.0),
        "alibi": dict(alibi_slopes=torch.rand(args.heads) * 0.1),
        "sinks": dict(sinks=sinks),
        "dropout 0.1": dict(dropout_p=0.1),
    }
    steps = {name: make_step(q, k, v, True, causal=True, **kw) for name, kw in variants.items()}
    times = {n: summarize(s)["median"] for n, s in sample_ms(steps, "cpu", args.reps).items()}
    return [
        dict(
            kind="overhead",
            dtype=str(dtype).removeprefix("torch."),
            dim=dim,
            seqlen=seqlen,
            variant=name,
            median_ms=ms,
            ratio_to_plain=ms / times["plain"],
        )
        for name, ms in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--overhead-seqlen", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the overhead rows")
    parser.add_argument("--out", help="write the rows and the machine's facts as JSON")
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for dim in args.dims:
            for row in window_rows(args, dtype, dim):
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.quick:
                for row in overhead_rows(args, dtype, dim):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        info = block_attn.build_info()
        machine = dict(
            processor=platform.processor() or platform.machine(),
            cpu_capability=info["cpu_capability"],
            threads=torch.get_num_threads(),
            torch=torch.__version__,
        )
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
