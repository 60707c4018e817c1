#!/usr/bin/env bash
# Builds the CPU kernels and their C++ test against the installed torch with CMake, then runs ctest:
# once for this machine's vector ISA, once for AVX2 (x86-64-v3), so that the narrower register
# tiles and the float32 products of bfloat16 (used where AVX512-BF16 is missing) are tested too.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
archs=(native)
if [ "$(uname -m)" = x86_64 ]; then archs+=(x86-64-v3); fi
for arch in "${archs[@]}"; do
  echo "--- CPU kernels built with -march=$arch"
  cmake -S . -B "build/cmake-$arch" -DCMAKE_PREFIX_PATH="$prefix" -DBLOCK_ATTN_CPU_ARCH="$arch"
  cmake --build "build/cmake-$arch" -j2
  ctest --test-dir "build/cmake-$arch" --output-on-failure
done
