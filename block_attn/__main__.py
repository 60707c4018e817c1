"""Demonstration: ``python -m block_attn``.

Prints how the extension was built, checks block_attn against the dense reference on a
packed-documents batch, then times it against PyTorch SDPA with a dense block-diagonal causal
mask on the same inputs. ``--info`` prints only the build table, ``--json`` only build_info() as
JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

import block_attn
from block_attn.blocks import BlockLayout


def document_offsets(total: int, mean_length: float, generator: torch.Generator) -> list[int]:
    """Offsets of documents with long-tailed (lognormal) lengths that fill ``total`` tokens."""
    offsets = [0]
    while offsets[-1] < total:
        length = torch.empty(1).log_normal_(mean=0.0, std=0.8, generator=generator).item()
        length = max(16, int(length * mean_length / 1.377))  # E[lognormal(0, 0.8)] = 1.377
        offsets.append(min(total, offsets[-1] + length))
    return offsets


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn`` after one warm-up call (the package cannot import bench/)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m block_attn", description=__doc__.split("\n\n")[1].replace("\n", " ")
    )
    parser.add_argument(
        "--info", action="store_true", help="print how the extension was built, then exit"
    )
    parser.add_argument("--json", action="store_true", help="print build_info() as JSON, then exit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="packed sequence length N")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    info = block_attn.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(block_attn.build_info_table(info))
    if args.info:
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not info["cuda"]:
        raise SystemExit("this build of block_attn has no CUDA kernels; use --device cpu")
    print(f"kernels used: {'CUDA' if device.type == 'cuda' else 'CPU'} on {device}")

    generator = torch.Generator().manual_seed(0)
    offsets = document_offsets(args.tokens, 600.0, generator)
    lengths = [b - a for a, b in itertools.pairwise(offsets)]
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, generator=generator).to(device) for _ in range(3))
    print(f"packed batch: {len(lengths)} documents, N = {args.tokens}, lengths {lengths}")

    out = block_attn.attention(q, k, v, cu_seqlens=offsets, causal=True)
    expected = block_attn.reference.attention(
        q.double(), k.double(), v.double(), cu_seqlens=offsets, causal=True
    )
    error = (out.double() - expected).abs().max().item()
    print(f"max |block_attn - float64 reference| = {error:.2e}")
    if not error < 1e-4:
        raise SystemExit(f"mismatch against the reference: {error:.2e}")

    mask = BlockLayout.from_offsets(offsets).mask(causal=True, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ours_s = median_seconds(lambda: block_attn.attention(q, k, v, cu_seqlens=offsets, causal=True))
    dense_s = median_seconds(lambda: sdpa(q, k, v, attn_mask=mask))
    mean_len = statistics.mean(lengths)
    print(
        f"forward: block_attn {ours_s * 1e3:.1f} ms, SDPA + dense mask {dense_s * 1e3:.1f} ms "
        f"-> speed-up {dense_s / ours_s:.1f}x (N / mean document length = "
        f"{args.tokens / mean_len:.1f})"
    )


if __name__ == "__main__":
    main()
