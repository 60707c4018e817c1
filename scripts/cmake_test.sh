#!/usr/bin/env bash
# Builds the CPU kernels and their C++ test against the installed torch with CMake, then runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$(python -c 'import torch;print(torch.utils.cmake_prefix_path)')"
cmake --build build/cmake -j2
ctest --test-dir build/cmake --output-on-failure
