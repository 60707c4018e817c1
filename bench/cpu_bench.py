"""CPU benchmark: block_attn against PyTorch's CPU attention paths on the same inputs.

Usage (repo root, extension built in place with BLOCK_ATTN_CUDA=0):
    python -m bench.cpu_bench            # full mode (~7 minutes on 2 cores)
    python -m bench.cpu_bench --quick    # small sizes (< 2 minutes)
    python -m bench.cpu_bench --workloads fixed256,docs-causal
    python -m bench.cpu_bench --capability avx2   # as an AVX2 machine would (bench/capability.py)

Workloads (B=1, H=8): fixed blocks, packed documents (lognormal lengths, causal and not, and
all-equal lengths), causal full attention and N-scaling at b=256; float32 D=64 throughout,
float32 D=128 and bfloat16 D=64/128 on a subset. Each is timed forward and forward+backward.
Peers run interleaved (one call of each per round) so that load from other processes hits
them alike; times are medians over the rounds after a warm-up call. Writes
``cpu_results.json``, ``cpu_results.md`` and ``cpu_results.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass

import torch
from tqdm import tqdm

from bench import capability, cpu_report
from bench.cpu_peers import (
    DENSE_MASK_MAX_BYTES,
    UnsupportedError,
    dense_mask_bytes,
    layout_check,
    make_cpu_peer,
)
from bench.timing import call_seconds, median_ms, time_interleaved_ms
from bench.workloads import Workload, document_lengths, fixed_lengths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ("fwd", "fwdbwd")
DTYPE_TAG = {torch.float32: "f32", torch.bfloat16: "bf16"}
# Peers timed forward only: FlexAttention compiles a backward per shape (minutes on CPU).
FORWARD_ONLY = {"flex"}
# Peers whose first call compiles: the slow-call check uses their second call.
COMPILED = {"flex"}
# Peers timed in full even when slow: they are placed only where their cost is bounded.
ALWAYS_REPEATED = {"block_attn", "sdpa-batch", "sdpa-causal", "sdpa-loop", "sdpa-dense-mask"}


@dataclass
class Case:
    """A workload and the peers timed on it; ``fwd_only`` peers skip forward+backward."""

    workload: Workload
    peers: list[str]
    fwd_only: tuple[str, ...] = ()


def short_n(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def make_workload(kind, n, heads, dim, dtype, causal=False, block=None, lengths=None, tag=""):
    if kind == "fixed":
        lengths = fixed_lengths(n, block)
        base = f"fixed{block}"
    elif kind == "causal":
        lengths, base = [n], "causal"
    else:
        base = tag
    name = f"{base}-n{short_n(n)}-d{dim}-{DTYPE_TAG[dtype]}"
    return Workload(name, kind, heads, n, dim, causal, lengths, block, dtype)


def equal_lengths(n: int, count: int) -> list[int]:
    """``count`` lengths summing to ``n`` that differ by at most one token."""
    base, rest = divmod(n, count)
    return [base + 1] * rest + [base] * (count - rest)


def doc_cases(n, heads, dim, dtype, dense: bool, equal: bool) -> list[Case]:
    """Packed documents, causal and not (lognormal lengths), and optionally all-equal lengths."""
    docs = document_lengths(n, 600.0, 16, 4096)
    peers = ["block_attn", "sdpa-loop", "flex"]
    if dense:
        peers.append("sdpa-dense-mask")
    mk = make_workload
    cases = [
        Case(mk("docs", n, heads, dim, dtype, True, lengths=docs, tag="docs-causal"), peers),
        Case(mk("docs", n, heads, dim, dtype, False, lengths=docs, tag="docs-full"), peers),
    ]
    if equal:
        lengths = equal_lengths(n, len(docs))
        equal_peers = ["block_attn", "sdpa-loop", "flex"]
        cases.append(
            Case(
                mk("docs", n, heads, dim, dtype, False, lengths=lengths, tag="docs-equal"),
                equal_peers,
            )
        )
    return cases


def nested_case(n, heads, dim, dtype) -> Case:
    """Packed documents (not causal) with SDPA on nested jagged tensors, forward only: it
    takes PyTorch's math path on CPU (seconds a call at N=4096), and is_causal is refused."""
    docs = document_lengths(n, 600.0, 16, 4096)
    w = make_workload("docs", n, heads, dim, dtype, False, lengths=docs, tag="docs-full")
    peers = ["block_attn", "sdpa-loop", "sdpa-nested", "sdpa-dense-mask"]
    return Case(w, peers, fwd_only=("sdpa-nested",))


def fixed_case(n, heads, dim, dtype, block, flex=False, dense=False) -> Case:
    peers = ["block_attn", "sdpa-batch"]
    if flex:
        peers.append("flex")
    if dense:
        peers.append("sdpa-dense-mask")
    peers.append("reference")
    return Case(make_workload("fixed", n, heads, dim, dtype, block=block), peers)


def causal_case(n, heads, dim, dtype, flex=False) -> Case:
    peers = ["block_attn", "sdpa-causal"] + (["flex"] if flex else []) + ["reference"]
    return Case(make_workload("causal", n, heads, dim, dtype, True), peers)


def full_cases() -> list[Case]:
    """The full suite (~7 minutes on 2 cores).

    H=8 except packed documents (H=4) and causal N=16384 (H=2), to bound the time; float32
    D=64 throughout, float32 D=128 and bfloat16 D=64/128 on fixed b=512 and causal N=4096,
    and D=128 on causal packed documents.
    """
    f32, bf16, h = torch.float32, torch.bfloat16, 8
    cases = [fixed_case(16384, h, 64, f32, b, flex=b == 256) for b in (64, 128, 256, 512, 1024)]
    cases += doc_cases(16384, 4, 64, f32, dense=True, equal=True)
    cases.append(nested_case(4096, 4, 64, f32))
    cases += [causal_case(1024, h, 64, f32), causal_case(4096, h, 64, f32, flex=True)]
    cases.append(causal_case(16384, 2, 64, f32))
    cases += [fixed_case(4096, h, 64, f32, 256, dense=True), fixed_case(65536, h, 64, f32, 256)]
    for dim, dtype in ((128, f32), (64, bf16), (128, bf16)):
        cases += [fixed_case(16384, h, dim, dtype, 512), causal_case(4096, h, dim, dtype)]
    for dtype in (f32, bf16):
        cases.append(doc_cases(16384, 4, 128, dtype, dense=False, equal=False)[0])
    for case in cases:
        if case.workload.seqlen >= 16384:
            # The dense mask computes all N² scores: ~4 s a call at N=16384 on 2 cores.
            case.fwd_only = ("sdpa-dense-mask",)
    return cases


def quick_cases() -> list[Case]:
    """A representative subset at N=4096, H=4, float32 D=64 (< 2 minutes on 2 cores)."""
    f32, bf16, h = torch.float32, torch.bfloat16, 4
    cases = [fixed_case(4096, h, 64, f32, 128, dense=True)]
    cases += [fixed_case(n, h, 64, f32, 256) for n in (1024, 4096)]
    cases += [fixed_case(4096, h, 64, bf16, 256), fixed_case(8192, h, 64, f32, 256)]
    cases.append(fixed_case(4096, h, 64, f32, 512))
    cases += doc_cases(4096, h, 64, f32, dense=True, equal=False)
    cases[-1] = nested_case(4096, h, 64, f32)
    cases += [causal_case(1024, h, 64, f32), causal_case(4096, h, 64, f32)]
    for case in cases:
        if case.workload.kind == "docs":
            case.fwd_only += ("sdpa-dense-mask",)
    return cases


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 2 minutes")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--workloads", default="", help="comma-separated name filter (substring)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (at least 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reference-max-seqlen", type=int, default=1024)
    parser.add_argument(
        "--capability",
        choices=sorted(capability.LIMITS),
        default=None,
        help="restrict block_attn and every peer to this instruction set (results get a suffix)",
    )
    parser.add_argument(
        "--slow-call-s",
        type=float,
        default=None,
        help="a peer whose warm-up call takes longer is not timed further (default 3, quick 1)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; workloads left when it runs out are recorded as skipped "
        "(default 660, quick 110)",
    )
    args = parser.parse_args(argv)
    args.reps = max(args.reps, 5)
    if args.slow_call_s is None:
        args.slow_call_s = 1.0 if args.quick else 3.0
    if args.time_budget is None:
        args.time_budget = 110.0 if args.quick else 660.0
    return args


# --- memory: resident-set high-water mark, reset through /proc/self/clear_refs ---------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Resets VmHWM to the current RSS; returns the RSS in KiB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def peak_growth_mib(rss_before_kib: int) -> float:
    return round(max(0, _status_kib("VmHWM") - rss_before_kib) / 1024, 1)


# --- measuring -------------------------------------------------------------------------------


def gemm_rate(dtype: torch.dtype, size: int = 4096, reps: int = 5, max_call_s: float = 3.0) -> dict:
    """torch.mm's rate on size³ products. Where one such call would take longer than max_call_s
    (bf16 without native instructions runs a scalar loop: minutes at 4096), the size is halved
    until it would not, down to 512, so that the benchmark never stalls here."""
    probe = 512
    a, b = torch.randn(probe, probe, dtype=dtype), torch.randn(probe, probe, dtype=dtype)
    probe_s = median_ms(lambda: torch.mm(a, b), 1) / 1e3
    while size > probe and probe_s * (size / probe) ** 3 > max_call_s:
        size //= 2
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), reps)
    return {"size": size, "dtype": str(dtype), "ms": ms, "gflops": 2 * size**3 / ms / 1e6}


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = next((line for line in lines if line.strip()), "")
    return f"{type(error).__name__}: {first[:300]}"


def make_step(peer, inputs, mode):
    """The timed call: forward under no_grad, or forward and gradients of q, k, v."""
    q, k, v, dout = inputs
    if mode == "fwd":
        q, k, v = (peer.prepare(x) for x in (q, k, v))

        def forward():
            with torch.no_grad():
                return peer.run(q, k, v)

        return forward
    # Layout changes happen once, outside the timed call; gradients are taken with respect
    # to the peer's own layout.
    leaves = [peer.prepare(x.detach().requires_grad_()) for x in (q, k, v)]
    grad_out = peer.prepare(dout)

    def forward_backward():
        return torch.autograd.grad(peer.run(*leaves), leaves, grad_out)

    return forward_backward


def skip_reason(name: str, case: Case, mode: str) -> str | None:
    workload = case.workload
    if mode == "fwdbwd" and (name in FORWARD_ONLY or name in case.fwd_only):
        if name in FORWARD_ONLY:
            return "forward only (its backward compiles for minutes per shape on CPU)"
        if name == "sdpa-nested":
            return "forward only (math path on CPU: seconds a call)"
        return "forward only here (all N² scores: seconds a call)"
    if name == "sdpa-dense-mask" and mode == "fwdbwd":
        need = dense_mask_bytes(workload, mode)
        if need > DENSE_MASK_MAX_BYTES:
            return f"backward would hold ~{need / 2**30:.0f} GB of N² tensors"
    return None


def measure_case(case: Case, mode: str, peers: dict, inputs, args, deadline: float) -> list[dict]:
    """Warm-up call of each peer (its peak memory), then ``reps`` interleaved rounds."""
    rows, steps = {}, {}
    for name, peer in peers.items():
        row = {"workload": case.workload.name, "mode": mode, "peer": name}
        rows[name] = row
        if isinstance(peer, tuple):
            row["status"], row["note"] = peer
            continue
        reason = skip_reason(name, case, mode)
        if reason:
            row["status"], row["note"] = "skipped", reason
            continue
        if time.perf_counter() > deadline:
            row["status"], row["note"] = "skipped", "time budget spent"
            continue
        try:
            rss = reset_peak()
            step = make_step(peer, inputs, mode)
            first = call_seconds(step, "cpu")
            row["peak_mib"] = peak_growth_mib(rss)
            row["first_call_s"] = round(first, 3)
            if name in COMPILED:
                first = call_seconds(step, "cpu")
            if first > args.slow_call_s and name not in ALWAYS_REPEATED:
                row["status"] = "skipped"
                row["note"] = f"one call took {first:.1f} s > {args.slow_call_s:g} s: not repeated"
                row["single_call_ms"] = round(first * 1e3, 1)
                continue
            for _ in range(args.warmup - 1):
                step()
            steps[name] = step
        except Exception as error:
            row["status"], row["note"] = "error", describe(error)
        gc.collect()
    # The warm-up calls were made above, one peer at a time.
    for name, timing in time_interleaved_ms(steps, "cpu", args.reps, warmup=0).items():
        rows[name].update(status="ok", **timing)
    return list(rows.values())


def environment() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": model,
        # The widest vector ISA torch found on this CPU (AVX512, AVX2, ...): an AVX2-only machine
        # runs MKL's GEMMs at their full rate, so the peer ratios differ from an AVX-512 one.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import block_attn

        env["build_info"] = block_attn.build_info()
    except Exception as error:
        env["build_info"] = {"error": describe(error)}
    try:
        with open("/proc/loadavg") as f:
            env["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.capability:
        capability.reexec_limited(
            args.capability, sys.argv[1:] if argv is None else list(argv), "bench.cpu_bench"
        )
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    results = {
        "mode": "quick" if args.quick else "full",
        "environment": environment(),
        "args": vars(args).copy(),
        "rows": [],
        "workloads": [],
    }
    suffix = f"_{args.capability}" if args.capability else ""
    json_path = os.path.join(args.out, f"cpu_results{suffix}.json")

    def save():
        results["elapsed_s"] = round(time.perf_counter() - began, 1)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1, default=str)

    if args.capability:
        results["environment"]["capability_limits"] = {
            "requested": args.capability,
            "environment": capability.LIMITS[args.capability],
            "read_back": capability.verify(args.capability),
        }
    print(json.dumps(results["environment"], indent=1, default=str), flush=True)
    results["gemm"] = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    gemm = results["gemm"]["fp32"]["gflops"]
    print(
        f"GEMM 4096³: fp32 {gemm:.0f} GFLOP/s, bf16 {results['gemm']['bf16']['gflops']:.0f}",
        flush=True,
    )
    n_check = 4096 if args.quick else 16384
    results["sdpa_layout_check"] = {
        "shape": f"H=8 N={n_check} D=64 b=256 float32 forward, ms",
        "ms": layout_check(8, n_check, 64, 256, args.reps),
    }
    print("SDPA batch layouts:", results["sdpa_layout_check"]["ms"], flush=True)

    cases = quick_cases() if args.quick else full_cases()
    if args.workloads:
        wanted = args.workloads.split(",")
        cases = [c for c in cases if any(s in c.workload.name for s in wanted)]
    import block_attn

    deadline = began + args.time_budget
    bar = tqdm(cases, unit="workload", dynamic_ncols=True)
    for case in bar:
        w = case.workload
        bar.set_description(w.name)
        results["workloads"].append(cpu_report.workload_info(w))
        inputs = w.make_inputs("cpu")
        peers = {}
        for name in case.peers:
            try:
                peers[name] = make_cpu_peer(
                    name, w, block_attn.attention, args.reference_max_seqlen
                )
            except UnsupportedError as reason:
                peers[name] = ("n/a", str(reason))
            except Exception as error:
                peers[name] = ("error", describe(error))
                traceback.print_exc()
        for mode in MODES:
            rows = measure_case(case, mode, peers, inputs, args, deadline)
            cpu_report.add_figures(rows, w, gemm)
            results["rows"] += rows
            for row in rows:
                bar.write(cpu_report.row_line(row))
        del inputs, peers
        gc.collect()
        save()
    bar.close()

    # The GEMM rate again at the end: other load at the start would understate it.
    results["gemm_end"] = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    for dtype in ("fp32", "bf16"):
        best = max(results["gemm"][dtype]["gflops"], results["gemm_end"][dtype]["gflops"])
        results["gemm"][dtype]["gflops_best"] = best
    cpu_report.rescale_gemm(results["rows"], results["gemm"]["fp32"]["gflops_best"])
    results["targets"] = cpu_report.targets(results)
    save()
    cpu_report.write_markdown(results, os.path.join(args.out, f"cpu_results{suffix}.md"))
    try:
        cpu_report.plot(results, os.path.join(args.out, f"cpu_results{suffix}.png"))
    except Exception as error:
        print(f"plot failed: {describe(error)}")
    print(cpu_report.targets_text(results["targets"]))
    print(f"\nwrote {json_path} and .md/.png ({results['elapsed_s']} s)")
    failed = [r for r in results["rows"] if r["peer"] == "block_attn" and r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
