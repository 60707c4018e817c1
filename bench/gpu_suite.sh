#!/usr/bin/env bash
# One-command GPU check of block_attn: environment, CUDA build, tests, compute-sanitizer, benchmark,
# and an Nsight Compute profile of the kernels.
#
#   OUT=/some/dir bash bench/gpu_suite.sh        # from the repo root
#
# Everything goes to $OUT, outside the tree by default (/tmp/block_attn_gpu_run): gpu_suite.log
# (the whole run), junit.xml, gpu_results.json, decode_cuda.md/.json, ncu_kernels.txt, probes/
# (the probes' build logs and outputs), and the summary as summary.txt and summary.json. To keep a
# run, copy its summary, gpu_results.json and the decoding tables into bench/results/<gpu>/.
# Each step is timed and limited; a failing step is recorded and the next one still runs. The
# summary gives two verdicts: whether the counted steps passed, and whether the benchmark's
# targets were met. The exit code follows the steps only (a missed target is a result, not a
# failure): non-zero when any counted step failed (initcheck, the kernel probes and the profile
# are advisory). When a wgmma probe fails, the later steps run with BLOCK_ATTN_HOPPER_KERNELS=0,
# and the summary says so.
# SUITE_BUDGET (seconds, default 540) bounds the whole run: later steps get what is left.
# STEPS (default "env build probes tests sanitizer bench decode variants profile") picks steps, e.g. STEPS="bench";
# they run in that order.
# SANITIZER_KERNELS (default block_attn): substring of the kernels racecheck/initcheck check.
# BENCH_ARGS adds arguments to bench.gpu_bench (e.g. "--dry-run --device cpu" for a logic check).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT="${OUT:-/tmp/block_attn_gpu_run}"
mkdir -p "$OUT/probes"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_suite.log"
SUMMARY="$OUT/summary.txt"
SUMMARY_JSON="$OUT/summary.json"
STEPS="${STEPS:-env build probes tests sanitizer bench decode variants profile}"
SUITE_BUDGET="${SUITE_BUDGET:-540}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
START=$(date +%s)
: >"$LOG"
RESULTS=()
STEP_RECORDS=() # name, status, rc, seconds, counted: tab-separated, for summary.json
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

remaining() { echo $((SUITE_BUDGET - ($(date +%s) - START))); }

wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME MAX_SECONDS RESERVE_SECONDS COUNTED COMMAND...
# Runs COMMAND with a limit of min(MAX_SECONDS, time left - RESERVE_SECONDS), output teed
# to the log. COUNTED=0 marks an advisory step: shown in the summary, not in the exit code.
run_step() {
  local name=$1 max=$2 reserve=$3 counted=$4
  shift 4
  local left limit rc t0 t1
  left=$(($(remaining) - reserve))
  limit=$((max < left ? max : left))
  if ((limit < 10)); then
    log "=== [$name] skipped: $(remaining) s of the suite budget left"
    RESULTS+=("$(printf '%-22s %-9s %6s %7s' "$name" skipped - -)")
    STEP_RECORDS+=("$(printf '%s\t%s\t\t\t%s' "$name" skipped "$counted")")
    ((counted)) && FAILED=1
    return
  fi
  log ""
  log "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s)
  local status=ok
  if ((rc == 124 || rc == 137)); then
    status=timeout
  elif ((rc != 0)); then
    status=FAILED
  fi
  ((counted)) || [[ $status == ok ]] || status="$status*"
  log "=== [$name] rc=$rc ($status) in $((t1 - t0)) s"
  RESULTS+=("$(printf '%-22s %-9s %6s %6ss' "$name" "$status" "$rc" "$((t1 - t0))")")
  STEP_RECORDS+=("$(printf '%s\t%s\t%s\t%s\t%s' "$name" "${status%\*}" "$rc" "$((t1 - t0))" "$counted")")
  if ((rc != 0 && counted)); then
    FAILED=1
  fi
}

environment() {
  local rc
  nvidia-smi
  rc=$?
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version
  python3 - <<'EOF'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton absent")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
else:
    print("torch sees no GPU")
EOF
  echo "cpus: $(nproc)"
  git log -1 --format='commit %H %s' 2>/dev/null
  # A copy of the working tree may carry an older .git than its files: this digest names the
  # sources that ran (the same command in a checkout gives the same digest).
  echo "source digest: $(source_digest)"
  return $rc
}

source_digest() {
  find csrc block_attn tests bench setup.py -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' \
    -o -name '*.h' -o -name '*.cpp' -o -name '*.sh' \) -not -path 'bench/results/*' |
    LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

build() {
  local rc
  # Link with the compiler whose libstdc++ torch loads. The H100 image's Python was built with
  # /opt/gcc, and extensions linked by that g++ carried their own copy of libstdc++ (ldd showed
  # none), which crashed in the first C++ error message that formats a number.
  if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
    export LDSHARED="/usr/bin/gcc -shared" LDCXXSHARED="/usr/bin/g++ -shared"
  fi
  echo "compilers: CC=${CC:-default} CXX=${CXX:-default}"
  BLOCK_ATTN_CUDA=1 MAX_JOBS=16 python3 setup.py build_ext --inplace
  rc=$?
  if ((rc != 0)) && [[ " ${TORCH_CUDA_ARCH_LIST//;/ } " == *" 9.0a "* ]]; then
    # The Hopper kernels need sm_90a; without them the rest of the suite can still run.
    echo "build with $TORCH_CUDA_ARCH_LIST failed (rc=$rc); building for 9.0 without the Hopper kernels" |
      tee "$OUT/build_fallback.txt"
    TORCH_CUDA_ARCH_LIST=9.0 BLOCK_ATTN_CUDA=1 MAX_JOBS=16 python3 setup.py build_ext --inplace
    rc=$?
  fi
  ((rc == 0)) || return $rc
  local so
  so=$(ls block_attn/_C*.so)
  ldd "$so" | grep -E 'libstdc|libgomp'
  readelf -p .comment "$so" | grep -E 'GCC|clang' | sort -u
  echo "std:: symbols defined in the extension: $(nm -C --defined-only "$so" | grep -c ' std::')"
  python3 -c 'import block_attn; print(block_attn.build_info())' || return 1
  # An error message that formats numbers: this crashed when the extension carried its own
  # libstdc++. In a child process, so a crash is reported instead of ending the step.
  python3 - <<'EOF'
import torch
import block_attn  # noqa: F401

for device in ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]:
    q = torch.randn(1, 1, 8, 16, device=device)
    cu = torch.tensor([[0, 8]], dtype=torch.int32, device=device)
    try:
        torch.ops.block_attn.attention_forward(q, q, q, cu, cu, 8, 8, False, 1.0)
    except RuntimeError as e:
        print(f"error message on {device}: ok ({str(e).splitlines()[0][:80]})")
    else:
        raise SystemExit(f"a 2-D cu_seqlens on {device} raised no error")
EOF
}

tests() {
  # pytest-xdist, where installed, runs the tests in 4 processes and replaces one that crashes,
  # so a crash costs one test, not the rest of the run. Not --dist loadfile: xdist 3.8 then runs
  # the crashing test again in each replacement and never the rest of its file.
  # Each of the 4 processes gets a quarter of the cores for the CPU tests' OpenMP threads, rather
  # than all of them each.
  local parallel=()
  if python3 -c 'import xdist' 2>/dev/null; then
    parallel=(-n 4 --dist load --max-worker-restart 8)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(($(nproc) / 4 > 0 ? $(nproc) / 4 : 1))}"
  fi
  # pytest-timeout, where installed, ends a test that hangs (a kernel that never finishes) by
  # ending its process, which xdist then replaces: one failed test instead of a step timeout.
  local limit=()
  if python3 -c 'import pytest_timeout' 2>/dev/null; then
    limit=(--timeout 150 --timeout-method thread)
  fi
  python3 -m pytest tests -q -rfEs "${parallel[@]}" "${limit[@]}" --junitxml="$OUT/junit.xml" \
    -p no:cacheprovider
}

sanitizer() {
  local tool=$1 case_args=()
  shift
  # The out-of-contract offset cases are about stray accesses, which only memcheck sees.
  [[ $tool == memcheck ]] || case_args=(--no-unchecked-offsets)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
    --print-limit 50 "$@" python3 -m bench.sanitizer_cases "${case_args[@]}"
}

# Plain CUDA programs (bench/probes/), compiled in parallel: the tile variants of the tensor-core
# kernels timed side by side (and checked to agree bitwise); on sm_90, the Hopper warpgroup-product
# building blocks and the forward and backward built on them against host references, both timed
# beside the mma.sync kernels. Build logs, binaries and outputs go to $OUT/probes/.
kernel_probes() {
  local major arch rc=0 probe probes=(flash_tile_variants) nvcc dir="$OUT/probes"
  nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
  major=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | cut -d. -f1)
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  if [[ "$major" == 9 ]]; then
    arch=90a
    probes+=(wgmma_probe wgmma_attention_probe)
  else
    echo "compute capability $major: no wgmma to check"
  fi
  for probe in "${probes[@]}"; do
    rm -f "$dir/$probe"
    "$nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -gencode="arch=compute_$arch,code=sm_$arch" \
      "bench/probes/$probe.cu" -o "$dir/$probe" >"$dir/$probe.build.log" 2>&1 &
  done
  wait
  local probe_rc
  for probe in "${probes[@]}"; do
    echo "--- $probe"
    cat "$dir/$probe.build.log"
    if [[ ! -x "$dir/$probe" ]]; then
      rc=1
      continue
    fi
    # Each probe gets its own limit, so a hanging kernel is reported as this probe's failure.
    timeout --kill-after=5 45 "$dir/$probe" 2>&1 | tee "$dir/$probe.txt"
    probe_rc=${PIPESTATUS[0]}
    if ((probe_rc != 0)); then
      rc=1
      [[ $probe == wgmma_* ]] && echo "$probe exited with $probe_rc" >>"$HOPPER_PROBE_FAILURES"
    fi
  done
  return $rc
}

# Nsight Compute on one forward+backward of each workload: throughput against the SM's limits,
# shared-memory and tensor-pipe use, and warp stall reasons of block_attn's four kernels.
profile() {
  local workload
  for workload in causal-d128 docs-causal-d128; do
    echo "--- ncu: $workload"
    ncu --clock-control none --kernel-name-base mangled --kernel-name regex:block_attn \
      --launch-skip 4 --launch-count 4 --section SpeedOfLight \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --section Occupancy --section LaunchStats \
      python3 -m bench.profile_kernels "$workload" || return 1
  done
}

# A wgmma probe that ran and failed (wrong result, crash or hang) lists itself here; the steps after
# it then run the mma.sync kernels, so one run still tests and times the rest.
HOPPER_PROBE_FAILURES="$OUT/hopper_probe_failures.txt"
rm -f "$HOPPER_PROBE_FAILURES" "$OUT/build_fallback.txt" "$OUT"/probes/*.txt "$SUMMARY_JSON"
export OUT HOPPER_PROBE_FAILURES
export -f source_digest environment build tests sanitizer kernel_probes profile
log "block_attn GPU suite: steps '$STEPS', budget ${SUITE_BUDGET}s, writing to $OUT"
if wanted env; then run_step environment 60 0 1 environment; fi
# Reserves keep time for the later counted steps: tests, memcheck, racecheck and the benchmark
# (about 150 s with its peers). Advisory steps take what is left.
if wanted build; then run_step build 300 300 1 build; fi
# The probes run before the tests: they check, each in its own process, what the Hopper kernels
# assume of the hardware (descriptor layouts, transposed operands), so a failure there is named
# before the tests see its effects.
if wanted probes; then run_step kernel-probes 120 300 0 kernel_probes; fi
if [[ -s "$HOPPER_PROBE_FAILURES" ]]; then
  export BLOCK_ATTN_HOPPER_KERNELS=0
  log "!!! the Hopper kernels are off for the rest of this run (BLOCK_ATTN_HOPPER_KERNELS=0):"
  log "$(cat "$HOPPER_PROBE_FAILURES")"
fi
if wanted tests; then run_step tests 240 200 1 tests; fi
# racecheck and initcheck report hazards inside cuDNN's and PyTorch's own kernels (seen on H100
# with torch 2.11), so they check only kernels whose mangled name holds this string.
kernels="kns=${SANITIZER_KERNELS:-block_attn}"
if wanted sanitizer; then
  run_step memcheck 60 160 1 sanitizer memcheck
  run_step racecheck 60 160 1 sanitizer racecheck --racecheck-report hazard --kernel-name "$kernels"
fi
if wanted bench; then
  # Timing loops get the step's limit less ~50 s for roofline, accuracy check and tables; the
  # decode step after it keeps at least 30 s and the profile 45 s.
  reserve=0
  if wanted decode; then reserve=30; fi
  if wanted profile; then reserve=$((reserve + 45)); fi
  left=$(($(remaining) - reserve))
  left=$((left < 300 ? left : 300))
  run_step benchmark 300 "$reserve" 1 python3 -m bench.gpu_bench --out "$OUT/gpu_results.json" \
    --time-budget $((left - 50 > 200 ? 200 : (left - 50 > 30 ? left - 50 : 30))) ${BENCH_ARGS:-}
fi

# Advisory: new tokens against per-sequence caches (decode_cuda.md), the decoding kernel's
# only timing; the profile after it keeps at least 45 s.
if wanted decode; then
  reserve=0
  if wanted profile; then reserve=45; fi
  run_step decode 40 "$reserve" 0 python3 -m bench.decode_bench --device cuda --rounds 10 \
    --out "$OUT"
fi

# Advisory: the attention variants against plain causal attention, FlexAttention and SDPA
# (variants_cuda.json, variants_peers_cuda.json).
if wanted variants; then
  reserve=0
  if wanted profile; then reserve=45; fi
  run_step variants 60 "$reserve" 0 bash -c 'python3 -m bench.variants_bench --device cuda \
    --seqlens 16384 --dims 128 --dtypes bfloat16 --heads 16 --out "$OUT/variants_cuda.json" &&
    python3 -m bench.variants_bench --device cuda --peers --seqlens 16384 --dims 128 \
    --dtypes bfloat16 --heads 16 --out "$OUT/variants_peers_cuda.json"'
fi

if wanted profile; then
  run_step profile 120 0 0 bash -c 'profile >"$OUT/ncu_kernels.txt" 2>&1; rc=$?; tail -40 "$OUT/ncu_kernels.txt"; exit $rc'
fi
# initcheck: advisory, and it ran out of time on the first H100 run.
if wanted sanitizer; then
  run_step initcheck 30 0 0 sanitizer initcheck --kernel-name "$kernels"
fi

{
  echo ""
  echo "=== summary ($(($(date +%s) - START)) s; * = advisory, not counted)"
  printf '%-22s %-9s %6s %7s\n' step status rc time
  printf '%s\n' "${RESULTS[@]}"
  if [[ -s "$HOPPER_PROBE_FAILURES" ]]; then
    echo "Hopper kernels OFF after failed probes: $(tr '\n' ';' <"$HOPPER_PROBE_FAILURES")"
  fi
  if [[ -s "$OUT/build_fallback.txt" ]]; then echo "BUILD FALLBACK: $(cat "$OUT/build_fallback.txt")"; fi
  # The probes' verdicts and timings: what the kernel choices in launch.cu are made from.
  for probe_output in "$OUT"/probes/*.txt; do
    [[ -f $probe_output ]] || continue
    echo "--- probe $(basename "$probe_output" .txt)"
    grep -E 'TFLOP/s|PASS|FAIL|MISMATCH|DIFFER' "$probe_output" | head -40
  done
  if [[ -f "$OUT/junit.xml" ]]; then
    python3 - "$OUT/junit.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("tests: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
EOF
  fi
  # Steps and targets are verdicts of their own: a run whose steps all passed but whose benchmark
  # fell short of a target (or measured none) does not read as a pass of both.
  python3 - "$OUT/gpu_results.json" "$SUMMARY_JSON" "${STEP_RECORDS[@]}" <<'EOF'
import json
import os
import sys

results_path, summary_path = sys.argv[1], sys.argv[2]
steps = []
for record in sys.argv[3:]:
    name, status, rc, seconds, counted = record.split("\t")
    steps.append(
        {
            "step": name,
            "status": status,
            "rc": int(rc) if rc else None,
            "seconds": int(seconds) if seconds else None,
            "counted": counted == "1",
        }
    )
failed = [s["step"] for s in steps if s["counted"] and s["status"] != "ok"]
targets = json.load(open(results_path)).get("targets", []) if os.path.exists(results_path) else []
for t in targets:
    value = t.get("value")
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    print(f"target {t['status']:<10} {t['target']} ({shown} / {t['threshold']})")
met = sum(t.get("status") == "met" for t in targets)
counted = sum(s["counted"] for s in steps)
print(f"steps: FAIL ({', '.join(failed)})" if failed else f"steps: PASS ({counted} counted, all ok)")
if not targets:
    verdict, detail = "NOT MEASURED", "no benchmark targets in this run"
elif met == len(targets):
    verdict, detail = "MET", f"all {len(targets)}"
else:
    verdict, detail = "NOT MET", f"{met} of {len(targets)} met"
print(f"targets: {verdict} ({detail})")
summary = {
    "steps_passed": not failed,
    "failed_steps": failed,
    "targets": verdict,
    "targets_met": met,
    "targets_total": len(targets),
    "steps": steps,
}
with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
EOF
} 2>&1 | tee -a "$LOG" >"$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
