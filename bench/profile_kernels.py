"""One forward+backward per named workload, for Nsight Compute to profile block_attn's kernels.

Each workload runs ``--warmup`` untimed forward+backward passes and then one more; profile the
last with ncu, skipping the warm-up launches. Each pass launches 4 block_attn kernels on
bf16/fp16 inputs (forward, delta, dK/dV, dQ), so with the default ``--warmup 1``:

    ncu --kernel-name-base mangled --kernel-name regex:block_attn --launch-skip 4 \\
        --launch-count 4 --section SpeedOfLight ... python3 -m bench.profile_kernels causal-d128

With several workloads, ncu's ``--launch-skip`` counts from the first; profile one workload per
ncu call. ``--list`` prints the workload names.
"""

from __future__ import annotations

import argparse

import torch

import block_attn
from bench.workloads import make_workloads


def run(name: str, seqlen: int, heads: int, warmup: int) -> None:
    workloads = {w.name: w for w in make_workloads(seqlen, heads, [128, 256], small_d=True)}
    if name not in workloads:
        raise SystemExit(f"unknown workload {name!r}; known: {', '.join(workloads)}")
    workload = workloads[name]
    q, k, v, dout = workload.make_inputs("cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kwargs = workload.ours_kwargs()
    for _ in range(warmup + 1):
        out = block_attn.attention(q, k, v, **kwargs)
        torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    print(f"{name}: {warmup} warm-up passes and one profiled pass done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["causal-d128"])
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print the workload names and exit")
    args = parser.parse_args()
    if args.list:
        for w in make_workloads(args.seqlen, args.heads, [128, 256], small_d=True):
            print(w.name)
        return
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA device")
    for name in args.workloads:
        run(name, args.seqlen, args.heads, args.warmup)


if __name__ == "__main__":
    main()
