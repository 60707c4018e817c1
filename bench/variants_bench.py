"""The attention variants against the plain path, side by side in one process on the same inputs.

Sliding window (causal): time and useful GFLOP/s (4·D flops per (query, allowed key) pair in
the forward, 2.5 times that in the backward) against plain causal attention at the same N, and
the time at the largest N over the time at the smallest for a fixed window. Softcap, ALiBi,
sinks and dropout: forward+backward time over the plain path's at one shape. With ``--peers``,
the sliding window (forward) against compiled FlexAttention with a sliding-window ``mask_mod``
and SDPA with the dense mask, and dropout (forward+backward) against SDPA's. Medians after a
warm-up round, steps interleaved so a slow stretch of the machine hits them alike.

    python -m bench.variants_bench --out bench/results/variants_cpu.json
    python -m bench.variants_bench --seqlens 4096 16384 --windows 512 --dims 64 --quick
    python -m bench.variants_bench --peers --out bench/results/variants_peers_cpu.json
    python -m bench.variants_bench --device cuda --seqlens 16384 --dims 128 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch

import block_attn
from bench.timing import calls_lasting, sample_ms, summarize

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


def random_qkv(args, seqlen: int, dtype, dim: int, grad: bool) -> tuple[torch.Tensor, ...]:
    """q, k, v of one batch row, ``args.heads`` heads, on ``args.device``."""
    return tuple(
        torch.randn(1, args.heads, seqlen, dim, dtype=dtype, device=args.device).requires_grad_(
            grad
        )
        for _ in range(3)
    )


def shape_row(kind: str, dtype, dim: int, seqlen: int, **measured) -> dict:
    """One result row: what was run, then what was measured."""
    return dict(
        kind=kind, dtype=str(dtype).removeprefix("torch."), dim=dim, seqlen=seqlen, **measured
    )


def window_rows(args, dtype, dim) -> list[dict]:
    rows = []
    for seqlen in args.seqlens:
        q, k, v = random_qkv(args, seqlen, dtype, dim, grad=True)
        for backward in (False, True):
            steps = {"causal": make_step(q, k, v, backward, causal=True)}
            for window in args.windows:
                steps[f"window {window}"] = make_step(
                    q, k, v, backward, causal=True, window_size=(window, 0)
                )
            calls = calls_lasting(steps, args.device, args.min_sample_ms)
            times = sample_ms(steps, args.device, reps=args.reps, warmup=0, calls=calls)
            factor = 1 + (BACKWARD_FLOPS_FACTOR if backward else 0)
            for name, samples in times.items():
                window = None if name == "causal" else int(name.split()[1])
                stats = summarize(samples)
                flops = 4 * dim * allowed_pairs(seqlen, window) * args.heads * factor
                rows.append(
                    shape_row(
                        "window",
                        dtype,
                        dim,
                        seqlen,
                        window=window,
                        direction="fwd+bwd" if backward else "fwd",
                        median_ms=stats["ms"],
                        useful_gflops=flops / stats["ms"] / 1e6,
                    )
                )
    return rows


def overhead_rows(args, dtype, dim) -> list[dict]:
    seqlen = args.overhead_seqlen
    q, k, v = random_qkv(args, seqlen, dtype, dim, grad=True)
    sinks = torch.randn(args.heads, device=args.device, requires_grad=True)
    variants = {
        "plain": {},
        "softcap": dict(softcap=30.0),
        "alibi": dict(alibi_slopes=torch.rand(args.heads, device=args.device) * 0.1),
        "sinks": dict(sinks=sinks),
        "dropout 0.1": dict(dropout_p=0.1),
    }
    steps = {name: make_step(q, k, v, True, causal=True, **kw) for name, kw in variants.items()}
    calls = calls_lasting(steps, args.device, args.min_sample_ms)
    samples = sample_ms(steps, args.device, args.reps, warmup=0, calls=calls)
    times = {n: summarize(s)["ms"] for n, s in samples.items()}
    return [
        shape_row(
            "overhead",
            dtype,
            dim,
            seqlen,
            variant=name,
            median_ms=ms,
            ratio_to_plain=ms / times["plain"],
        )
        for name, ms in times.items()
    ]


def window_peer_steps(q, k, v, window: int, flex, max_dense_bytes: int) -> dict:
    """Causal sliding-window forward steps: block_attn, FlexAttention with the window's
    ``mask_mod``, and SDPA with the dense boolean mask where its float scores fit the bytes."""
    from torch.nn.attention.flex_attention import create_block_mask

    seqlen = q.shape[2]

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    block_mask = create_block_mask(sliding_window, None, None, seqlen, seqlen, device=q.device)
    steps = {
        "block_attn": make_step(q, k, v, False, causal=True, window_size=(window, 0)),
        "flex": lambda: flex(q, k, v, block_mask=block_mask),
    }
    if seqlen * seqlen * 4 <= max_dense_bytes:
        positions = torch.arange(seqlen, device=q.device)
        behind = positions[:, None] - positions[None, :]
        dense = (behind >= 0) & (behind <= window)
        steps["sdpa dense mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense
        )
    return steps


def peer_rows(args, dtype, dim) -> list[dict]:
    """Sliding window (forward) against FlexAttention and SDPA's dense mask, at each N; dropout
    0.1 (forward+backward, causal) against SDPA's at ``--overhead-seqlen``."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for seqlen in args.seqlens:
        q, k, v = random_qkv(args, seqlen, dtype, dim, grad=False)
        for window in args.windows:
            steps = window_peer_steps(q, k, v, window, flex, args.max_dense_bytes)
            samples = sample_ms(steps, args.device, args.reps)
            times = {n: summarize(x)["ms"] for n, x in samples.items()}
            for name, ms in times.items():
                rows.append(
                    shape_row(
                        "window peers",
                        dtype,
                        dim,
                        seqlen,
                        window=window,
                        impl=name,
                        median_ms=ms,
                        speedup_of_block_attn=ms / times["block_attn"],
                    )
                )
    seqlen = args.overhead_seqlen
    q, k, v = random_qkv(args, seqlen, dtype, dim, grad=True)
    grad_out = torch.randn_like(q)

    def sdpa_dropout():
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=0.1, is_causal=True
        )
        return torch.autograd.grad(out, (q, k, v), grad_out)

    steps = {
        "block_attn": make_step(q, k, v, True, causal=True, dropout_p=0.1),
        "sdpa": sdpa_dropout,
    }
    times = {n: summarize(x)["ms"] for n, x in sample_ms(steps, args.device, args.reps).items()}
    for name, ms in times.items():
        rows.append(
            shape_row(
                "dropout peers",
                dtype,
                dim,
                seqlen,
                impl=name,
                median_ms=ms,
                speedup_of_block_attn=ms / times["block_attn"],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--windows", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overhead-seqlen", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--min-sample-ms", type=float, default=50.0, help="repeat short calls within a sample"
    )
    parser.add_argument("--quick", action="store_true", help="skip the overhead rows")
    parser.add_argument("--peers", action="store_true", help="time FlexAttention and SDPA instead")
    parser.add_argument("--max-dense-bytes", type=int, default=2**31)
    parser.add_argument("--out", help="write the rows and the machine's facts as JSON")
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for dim in args.dims:
            if args.peers:
                for row in peer_rows(args, dtype, dim):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                continue
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
            device=args.device,
        )
        if args.device.startswith("cuda"):
            machine["gpu"] = torch.cuda.get_device_name(args.device)
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
