"""GPU benchmark: block_attn against PyTorch's attention kernels on the same inputs.

Usage (repo root, extension built in place):
    python3 -m bench.gpu_bench --out bench/results/gpu_results.json
    python3 -m bench.gpu_bench --dry-run --device cpu --impl reference   # logic check, no GPU

Workloads are bf16, B=1, H=16, N=16384, D=128 (and cheap D=64 variants): causal full
attention, packed documents (lognormal lengths, causal and not) and fixed blocks. Each is
timed forward and forward+backward for every peer; a failing peer is recorded with its error
and the run goes on. Also measured: bf16 matmul TFLOP/s, copy bandwidth, and accuracy against
a float64 reference at a small size. Results go to a JSON file and a printed table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

from bench import accuracy, report
from bench.peers import PEER_NAMES, UnsupportedError, make_peer
from bench.timing import call_seconds, copy_bandwidth, matmul_tflops, time_ms
from bench.workloads import make_workloads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ("fwd", "fwdbwd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_results.json"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes and few repetitions (logic check)"
    )
    parser.add_argument(
        "--impl",
        choices=["ours", "reference"],
        default="ours",
        help="what the 'block_attn' rows run: the extension, or the pure-PyTorch reference "
        "(to check this script where the extension has no kernels yet)",
    )
    parser.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated subset")
    parser.add_argument("--workloads", default="", help="comma-separated name filter (substring)")
    parser.add_argument("--seqlen", type=int, default=None, help="default 16384 (dry run 1024)")
    parser.add_argument("--heads", type=int, default=None, help="default 16 (dry run 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls, default 20 (dry 3)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (dry run 1)")
    parser.add_argument("--no-small-d", action="store_true", help="skip the D=64 variants")
    parser.add_argument(
        "--no-wide-d", action="store_true", help="skip the D=256 workload (timed last)"
    )
    parser.add_argument("--reference-max-seqlen", type=int, default=4096)
    parser.add_argument("--accuracy-seqlen", type=int, default=None, help="default 2048 (dry 256)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=200.0,
        help="seconds for the timing loops; peers left when it runs out are recorded as skipped",
    )
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.seqlen = args.seqlen or (1024 if dry else 16384)
    args.heads = args.heads or (2 if dry else 16)
    args.reps = args.reps or (3 if dry else 20)
    args.warmup = args.warmup or (1 if dry else 3)
    args.accuracy_seqlen = args.accuracy_seqlen or (256 if dry else 2048)
    args.block_sizes = [128, 256] if dry else [128, 256, 512, 1024]
    return args


def nvidia_smi_field(field: str) -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def environment(device: str, impl_name: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device,
        "impl": impl_name,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device_name"] = props.name
        env["multiprocessors"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
        env["driver"] = nvidia_smi_field("driver_version")
        # Whether the bf16 workloads run the Hopper kernels: the backward at head_dim 64 and 128
        # alike; the forward by head_dim and key block length (hopper_kernels_apply).
        env["hopper_kernels_env"] = os.environ.get("BLOCK_ATTN_HOPPER_KERNELS")
        try:
            from block_attn.cuda_kernels import hopper_kernels_apply

            env["hopper_kernels"] = hopper_kernels_apply(device, torch.bfloat16, 128, backward=True)
        except Exception as error:
            env["hopper_kernels"] = {"error": describe(error)}
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    try:
        import block_attn

        env["build_info"] = block_attn.build_info()
    except Exception as error:
        env["build_info"] = {"error": describe(error)}
    return env


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:400]}"


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def ours_function(impl: str):
    """The function the ``block_attn`` rows time."""
    if impl == "reference":
        import block_attn.reference

        return block_attn.reference.attention
    import block_attn

    return block_attn.attention


def measure(peer, inputs, mode: str, device: str, reps: int, warmup: int) -> dict:
    """Times ``peer`` on ``inputs`` (q, k, v, dout in (1, H, N, D)) for one mode."""
    q, k, v, dout = (peer.prepare(x) for x in inputs)
    if mode == "fwd":

        def step():
            with torch.no_grad(), peer.settings():
                return peer.run(q, k, v)

    else:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

        def step():
            with peer.settings():
                out = peer.run(q, k, v)
                return torch.autograd.grad(out, (q, k, v), dout)

    first_call_s = call_seconds(step, device)
    result = time_ms(step, device, reps, warmup)
    result["first_call_s"] = round(first_call_s, 3)
    return result


def run_benchmarks(args, workloads, roofline, ours, results, save) -> None:
    peers = [p for p in args.peers.split(",") if p]
    deadline = time.perf_counter() + args.time_budget
    for workload in workloads:
        print(
            f"\n== {workload.name}: H={workload.heads} N={workload.seqlen} D={workload.head_dim} "
            f"causal={workload.causal} blocks={len(workload.lengths)} max={workload.max_len}",
            flush=True,
        )
        inputs = workload.make_inputs(args.device)
        built = {}
        for name in peers:
            try:
                built[name] = make_peer(
                    name, workload, args.device, ours, args.reference_max_seqlen
                )
            except UnsupportedError as reason:
                built[name] = ("n/a", str(reason))
            except Exception as error:
                built[name] = ("error", describe(error))
                traceback.print_exc()
        for mode in MODES:
            for name in peers:
                row = {"workload": workload.name, "mode": mode, "peer": name}
                peer = built[name]
                if isinstance(peer, tuple):
                    row["status"], row["note"] = peer
                elif time.perf_counter() > deadline:
                    row["status"], row["note"] = "skipped", "time budget spent"
                else:
                    try:
                        row.update(measure(peer, inputs, mode, args.device, args.reps, args.warmup))
                        row["status"] = "ok"
                    except Exception as error:
                        row["status"], row["note"] = "error", describe(error)
                        free_memory(args.device)
                report.add_figures(row, workload, roofline)
                results["rows"].append(row)
                print(report.row_line(row), flush=True)
        report.add_ratios(results["rows"], workload.name)
        del inputs, built
        free_memory(args.device)
        save()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    began = time.perf_counter()
    results = {"environment": environment(args.device, args.impl), "args": vars(args).copy()}
    results["rows"], results["accuracy"], results["targets"] = [], [], []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        results["elapsed_s"] = round(time.perf_counter() - began, 1)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)

    print(json.dumps(results["environment"], indent=1, default=str), flush=True)

    big = not args.dry_run and args.device == "cuda"
    roofline = {}
    try:
        roofline["matmul"] = matmul_tflops(args.device, 8192 if big else 256, 20 if big else 3, 3)
    except Exception as error:
        roofline["matmul"] = {"error": describe(error)}
    try:
        roofline["copy"] = copy_bandwidth(args.device, 2**30 if big else 2**24, 20 if big else 3, 3)
    except Exception as error:
        roofline["copy"] = {"error": describe(error)}
    results["roofline"] = roofline
    print(report.roofline_lines(roofline), flush=True)
    free_memory(args.device)

    workloads = make_workloads(
        args.seqlen, args.heads, args.block_sizes, not args.no_small_d, not args.no_wide_d
    )
    if args.workloads:
        wanted = args.workloads.split(",")
        workloads = [w for w in workloads if any(s in w.name for s in wanted)]
    try:
        ours = ours_function(args.impl)
    except Exception as error:
        print(f"block_attn unavailable ({describe(error)}); its rows will record the error")

        message = describe(error)

        def ours(*_, **__):
            raise RuntimeError(f"block_attn unavailable: {message}")

    run_benchmarks(args, workloads, roofline, ours, results, save)

    print("\n== accuracy against float64 (small size)", flush=True)
    for workload in workloads:
        small = workload.scaled(args.accuracy_seqlen, min(args.heads, 4))
        entry = accuracy.check(small, ours, args.device)
        results["accuracy"].append(entry)
        print(report.accuracy_line(entry), flush=True)
        free_memory(args.device)

    results["targets"] = report.targets(results)
    save()
    print(report.tables(results), flush=True)
    print(f"\nwrote {args.out} ({results['elapsed_s']} s)")
    # Exit non-zero when block_attn itself failed or was inaccurate; peers' failures and
    # missed speed targets are results, not errors.
    ours_failed = [
        r for r in results["rows"] if r["peer"] == "block_attn" and r["status"] == "error"
    ]
    inaccurate = [a for a in results["accuracy"] if a.get("status") != "ok" or not a["met"]]
    if ours_failed or inaccurate:
        print(
            f"block_attn: {len(ours_failed)} rows failed, {len(inaccurate)} accuracy checks not met"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
