#!/usr/bin/env bash
# Builds the C++ tests with CMake and runs ctest: the CPU kernels against the installed torch, once
# for this machine's vector ISA and once for AVX2 (x86-64-v3), so that the narrower register tiles
# and the float32 products of bfloat16 (used where AVX512-BF16 is missing) are tested too; and,
# with the first build, the CUDA kernels on the host emulator (no GPU needed) and the emulator's
# own test (tests/cuda_emulator/test_emulator.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
archs=(native)
if [ "$(uname -m)" = x86_64 ]; then archs+=(x86-64-v3); fi
emulated_cuda=ON
for arch in "${archs[@]}"; do
  echo "--- CPU kernels built with -march=$arch (emulated CUDA kernel test: $emulated_cuda)"
  cmake -S . -B "build/cmake-$arch" -DCMAKE_PREFIX_PATH="$prefix" -DBLOCK_ATTN_CPU_ARCH="$arch" \
    -DBLOCK_ATTN_EMULATED_CUDA_TEST="$emulated_cuda"
  cmake --build "build/cmake-$arch" -j2
  ctest --test-dir "build/cmake-$arch" --output-on-failure
  emulated_cuda=OFF
done
