"""block_attn in each floating dtype on the same shapes, side by side in one process.

Usage (repo root, extension built in place):
    python -m bench.dtype_bench                  # CPU, ~1 minute on 2 cores
    python -m bench.dtype_bench --device cuda --rounds 20

Each round calls every dtype once (interleaved, so a slow stretch of a shared machine hits them
alike); the table gives the median over the rounds after one warm-up round, in ms, and each
dtype's time divided by float32's (below 1: faster than float32).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import block_attn
from bench.timing import time_interleaved_ms

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# name: (query heads, kv heads, tokens, head_dim, keyword arguments of block_attn.attention)
WORKLOADS = {
    "causal-n4k-d64": (8, 8, 4096, 64, {"causal": True}),
    "fixed512-n16k-d128-gqa8/2": (8, 2, 16384, 128, {"block_size": 512}),
    "docs-causal-n8k-d64": (
        8,
        8,
        8192,
        64,
        {"cu_seqlens": [0, 300, 1800, 2000, 4500, 8192], "causal": True},
    ),
}


def make_call(workload: tuple, dtype: torch.dtype, device: str, backward: bool) -> Callable:
    heads_q, heads_kv, tokens, head_dim, kwargs = workload
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        x = torch.randn(1, heads, tokens, head_dim, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(backward)

    q, k, v = tensor(heads_q), tensor(heads_kv), tensor(heads_kv)
    if backward:
        return lambda: block_attn.attention(q, k, v, **kwargs).sum().backward()

    def forward() -> None:
        with torch.no_grad():
            block_attn.attention(q, k, v, **kwargs)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up")
    args = parser.parse_args()

    print("| workload | pass | " + " | ".join(f"{name} ms (/float32)" for name in DTYPES) + " |")
    print("|---|---|" + "---:|" * len(DTYPES))
    for name, workload in WORKLOADS.items():
        for backward in (False, True):
            calls = {
                d: make_call(workload, dtype, args.device, backward) for d, dtype in DTYPES.items()
            }
            timings = time_interleaved_ms(calls, args.device, args.rounds, warmup=1)
            median = {d: timing["ms"] for d, timing in timings.items()}
            cells = [f"{median[d]:.1f} ({median[d] / median['float32']:.2f})" for d in DTYPES]
            mode = "fwd+bwd" if backward else "fwd"
            print(f"| {name} | {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
