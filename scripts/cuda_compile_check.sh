#!/usr/bin/env bash
# Compile check of the CUDA extension on a machine without a GPU (CI).
#
#   scripts/cuda_compile_check.sh [VENV]
#
# Uses VENV if given (it must hold a CUDA build of torch), otherwise creates build/cuda-check-venv
# and installs torch==2.14.1, ninja and numpy into it. Builds into build/cuda-check so the in-place
# CPU extension is left alone, then fails if the library is missing or leaves block_attn symbols
# undefined (a missing kernel instantiation shows up as one). Also compiles and links the Hopper
# probes (csrc/tests/wgmma_*probe.cu).
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
  "$VENV/bin/python" -m pip install --quiet torch==2.14.1 ninja numpy ||
    fail "pip install torch==2.14.1 ninja numpy"
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

# The GPU suite's probes are plain CUDA programs; they must at least compile and link.
for probe in flash_tile_variants wgmma_probe wgmma_attention_probe; do
  "$CUDA_HOME/bin/nvcc" -std=c++17 -O3 --expt-relaxed-constexpr \
    -gencode=arch=compute_90a,code=sm_90a "csrc/tests/$probe.cu" -o "$TMP_DIR/$probe" ||
    fail "nvcc csrc/tests/$probe.cu"
done

echo "cuda_compile_check: OK: $SO built in ${elapsed}s (archs $TORCH_CUDA_ARCH_LIST)"
