#!/usr/bin/env bash
# Compile check of the CUDA extension on a machine without a GPU (CI).
#
#   scripts/cuda_compile_check.sh [VENV]
#
# Uses VENV if given (it must hold a CUDA build of torch), otherwise creates build/cuda-check-venv
# and installs the pinned CUDA torch (pyproject.toml's torch-cuda), ninja and numpy into it. Builds
# into build/cuda-check so the in-place CPU extension is left alone, then fails if the library is
# missing or leaves block_attn symbols undefined (a missing kernel instantiation shows up as one).
# Also compiles and links the GPU probes (bench/probes/*.cu).
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0a),
# MAX_JOBS (default: number of CPUs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fail() {
  echo "cuda_compile_check: FAILED: $*" >&2
  exit 1
}

VENV="${1:-}"
if [[ -z "$VENV" ]]; then
  VENV="$ROOT/build/cuda-check-venv"
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV" || fail "could not create a venv at $VENV"
  fi
  torch_version="$(bash "$ROOT/scripts/pinned_torch.sh" torch-cuda)"
  # The CUDA torch and its libraries take about 6 GB installed; the cache would double that.
  "$VENV/bin/python" -m pip install --quiet --no-cache-dir "torch==$torch_version" ninja numpy || {
    df -h "$VENV" >&2
    fail "pip install torch==$torch_version ninja numpy (free space above)"
  }
fi
PYTHON="$VENV/bin/python"
[[ -x "$PYTHON" ]] || fail "no python at $PYTHON"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' ||
  fail "torch in $VENV is not a CUDA build"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export BLOCK_ATTN_CUDA=1
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || fail "nvcc not found under CUDA_HOME=$CUDA_HOME"

LIB_DIR="$ROOT/build/cuda-check"
TMP_DIR="$ROOT/build/cuda-check-tmp"
rm -rf "$LIB_DIR"
start=$(date +%s)
"$PYTHON" setup.py build_ext --build-lib "$LIB_DIR" --build-temp "$TMP_DIR" ||
  fail "build_ext (see the compiler output above)"
elapsed=$(($(date +%s) - start))

SO="$(find "$LIB_DIR" -name '_C*.so' | head -n 1)"
[[ -n "$SO" && -s "$SO" ]] || fail "no block_attn/_C*.so under $LIB_DIR"

# Undefined symbols of our own namespace mean a kernel or host function was declared but never
# compiled in; torch/CUDA symbols are resolved when torch is imported.
# (nm's output is captured first: grep -q closing the pipe early would fail it under pipefail.)
undefined_all="$(nm -C -u "$SO")"
undefined="$(grep 'block_attn::' <<<"$undefined_all" || true)"
if [[ -n "$undefined" ]]; then
  echo "$undefined" >&2
  fail "$SO leaves block_attn symbols undefined"
fi
defined_all="$(nm -C --defined-only "$SO")"
grep -q 'block_attn::cuda::launch_forward' <<<"$defined_all" ||
  fail "$SO has no CUDA forward (was it built without BLOCK_ATTN_CUDA?)"
grep -q 'block_attn::define_plan_functions' <<<"$defined_all" ||
  fail "$SO has no kernel plan functions for Python (_C.plan_forward / _C.plan_backward)"

# The GPU suite's probes are plain CUDA programs; they must at least compile and link.
for probe in flash_tile_variants wgmma_probe wgmma_attention_probe; do
  "$CUDA_HOME/bin/nvcc" -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas -v \
    -gencode=arch=compute_90a,code=sm_90a "bench/probes/$probe.cu" -o "$TMP_DIR/$probe" \
    >"$TMP_DIR/$probe.ptxas.log" 2>&1 || {
    cat "$TMP_DIR/$probe.ptxas.log" >&2
    fail "nvcc bench/probes/$probe.cu"
  }
done

# The attention probe instantiates the Hopper forward and backward at head_dim 128, with the
# shapes the dispatch runs. ptxas serialising their wgmma products (a missing fence or a register
# it cannot keep) would halve their speed without failing any test, so it fails here; spills are
# listed.
ptxas_log="$TMP_DIR/wgmma_attention_probe.ptxas.log"
if grep -i 'wgmma.*serializ' "$ptxas_log" >&2; then
  fail "ptxas serialises wgmma products in the Hopper kernels (see above)"
fi
"$PYTHON" - "$ptxas_log" <<'EOF'
import re
import sys

kernel, counted, spilling = None, 0, []
for line in open(sys.argv[1]):
    if m := re.search(r"Compiling entry function '(\w*wgmma_kernel\w*)'", line):
        kernel = m.group(1)
    elif kernel and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        counted += 1
        if m.group(1) != "0" or m.group(2) != "0":
            spilling.append(f"{kernel}: {m.group(1)} B spill stores, {m.group(2)} B spill loads")
        kernel = None
print(f"cuda_compile_check: {counted} Hopper kernel variants compiled, {len(spilling)} spill")
for entry in spilling:
    print(f"  {entry}")
EOF

echo "cuda_compile_check: OK: $SO built in ${elapsed}s (archs $TORCH_CUDA_ARCH_LIST)"
