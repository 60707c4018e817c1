#!/usr/bin/env bash
# Cross-builds the CPU kernels' C++ test (tests/cpp/test_cpu_kernels.cpp) for aarch64 Linux, where
# at::vec compiles to NEON, and runs it under qemu-user: no ARM machine needed.
#
#   scripts/aarch64_check.sh
#
# Installs what is missing: Debian's aarch64 cross compiler and qemu-user (apt), and the pinned
# torch-cpu version's aarch64 wheel from the package index (its headers and libraries; nothing is
# installed into Python). Rerunning reuses the downloads and rebuilds. Everything it writes is under
# build/aarch64, apart from the apt packages.
# Environment: AARCH64_MARCH (-march, default armv8-a: plain NEON), QEMU_CPU (the emulated CPU,
# default neoverse-n1: NEON without SVE), JOBS (parallel compiles, default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/build/aarch64"
MARCH="${AARCH64_MARCH:-armv8-a}"
export QEMU_CPU="${QEMU_CPU:-neoverse-n1}"
JOBS="${JOBS:-2}"
TARGET=aarch64-linux-gnu
# pip's --platform takes the listed tags only, not the older manylinux tags a real aarch64 pip
# would also accept; the CUDA runtime wheels carry older ones.
PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_25_aarch64 manylinux_2_17_aarch64
  manylinux2014_aarch64)

fail() {
  echo "aarch64_check: FAILED: $*" >&2
  exit 1
}
# Exit status 3: a tool or download could not be had (no network), so nothing was checked.
unavailable() {
  echo "aarch64_check: UNAVAILABLE: $*" >&2
  exit 3
}
timing=()
phase_start=$SECONDS
phase_done() {
  timing+=("$1 $((SECONDS - phase_start)) s")
  phase_start=$SECONDS
}
pip_download() {
  python3 -m pip download --quiet --only-binary=:all: "${PLATFORMS[@]/#/--platform=}" "$@"
}

# --- Tools
missing=()
command -v "$TARGET-g++" >/dev/null || missing+=("g++-$TARGET")
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
  sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq || unavailable "apt-get update"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" ||
    unavailable "apt-get install ${missing[*]}"
fi
# The cross toolchain's C library tree: qemu's dynamic loader and libc for the test.
SYSROOT="/usr/$TARGET"
[[ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ]] || fail "no aarch64 C library under $SYSROOT"
phase_done tools

# --- torch for aarch64: headers and libraries from the wheel
torch_version="$(bash "$ROOT/scripts/pinned_torch.sh" torch-cpu)"
TORCH="$OUT/torch-$torch_version"
mkdir -p "$OUT/downloads"
if [[ ! -e "$TORCH/.unpacked" ]]; then
  wheel="$(find "$OUT/downloads" -name "torch-$torch_version-*aarch64.whl" | head -n 1)"
  if [[ -z "$wheel" ]]; then
    pip_download --dest "$OUT/downloads" --no-deps "torch==$torch_version" ||
      unavailable "pip download torch==$torch_version"
    wheel="$(find "$OUT/downloads" -name "torch-$torch_version-*aarch64.whl" | head -n 1)"
  fi
  [[ -n "$wheel" ]] || fail "no torch $torch_version aarch64 wheel in $OUT/downloads"
  rm -rf "$TORCH"
  # The CUDA and Python libraries are large and not needed by the CPU kernels.
  unzip -q -o "$wheel" 'torch/include/*' 'torch/lib/*.so*' 'torch-*.dist-info/METADATA' \
    -x 'torch/lib/libtorch_cuda*' 'torch/lib/libc10_cuda.so' 'torch/lib/libcaffe2_nvrtc.so' \
    'torch/lib/libtorch_nvshmem.so' 'torch/lib/libtorch_python.so' -d "$TORCH"

  # The index's aarch64 wheel is a CUDA build: libtorch_cpu.so itself needs the CUDA runtime and
  # CUPTI libraries to load, though the CPU kernels never call them. Fetch the versions the wheel
  # pins (through cuda-toolkit), as installing it would.
  pin='s/^Requires-Dist: \(cuda-toolkit\)\[[^]]*\]\(==[^;]*\);.*/\1[cudart,cupti]\2/p'
  cuda_toolkit="$(sed -n "$pin" "$TORCH"/torch-*.dist-info/METADATA)"
  if [[ -n "$cuda_toolkit" ]]; then
    cuda_downloads="$OUT/downloads/cuda-for-torch-$torch_version"
    pip_download --dest "$cuda_downloads" "$cuda_toolkit" ||
      unavailable "pip download $cuda_toolkit"
    unzip -q -o -j "$cuda_downloads"/nvidia_cuda_runtime-*.whl '*/lib/libcudart.so.*' \
      -d "$TORCH/cuda-lib"
    unzip -q -o -j "$cuda_downloads"/nvidia_cuda_cupti-*.whl '*/lib/libcupti.so.*' \
      -d "$TORCH/cuda-lib"
  fi
  touch "$TORCH/.unpacked"
fi
TORCH_LIBS="$TORCH/torch/lib:$TORCH/cuda-lib"
phase_done "torch $torch_version wheel"

# --- Build: the sources of CMakeLists.txt's block_attn_cpu library and test_cpu_kernels
SOURCES=(csrc/attention_host.cpp csrc/cpu/attention_fwd_cpu.cpp csrc/cpu/attention_bwd_cpu.cpp
  csrc/cpu/cpu_capability.cpp csrc/cpu/kernel_table.cpp csrc/cpu/register_cpu.cpp)
# -Wno-psabi: GCC's note on a C++17 ABI change of std::pair arguments, from torch's headers.
CXXFLAGS=(-std=gnu++20 -O3 -DNDEBUG -march="$MARCH" -fopenmp -fPIC -Wno-psabi -Icsrc
  -isystem "$TORCH/torch/include" -isystem "$TORCH/torch/include/torch/csrc/api/include")
# The torch libraries' own dependencies (CUDA runtime, NVPL) are resolved at link time here.
LDFLAGS=(-fopenmp -L"$TORCH/torch/lib" -ltorch_cpu -lc10 -Wl,-rpath-link,"$TORCH_LIBS")
rm -rf "$OUT/obj" "$OUT/bin"
mkdir -p "$OUT/obj" "$OUT/bin"
pids=()
for source in "${SOURCES[@]}" tests/cpp/test_cpu_kernels.cpp; do
  while (($(jobs -pr | wc -l) >= JOBS)); do wait -n || true; done # at most JOBS compilers
  "$TARGET-g++" "${CXXFLAGS[@]}" -c "$source" -o "$OUT/obj/$(basename "$source" .cpp).o" &
  pids+=($!)
done
# wait PID returns each compiler's status, also of those wait -n already collected.
for pid in "${pids[@]}"; do wait "$pid" || fail "compiling for $TARGET (-march=$MARCH)"; done
objects=()
for source in "${SOURCES[@]}"; do objects+=("$OUT/obj/$(basename "$source" .cpp).o"); done
"$TARGET-g++" -shared -o "$OUT/bin/libblock_attn_cpu.so" "${objects[@]}" "${LDFLAGS[@]}" ||
  fail "linking libblock_attn_cpu.so"
"$TARGET-g++" -o "$OUT/bin/test_cpu_kernels" "$OUT/obj/test_cpu_kernels.o" \
  -L"$OUT/bin" -lblock_attn_cpu "${LDFLAGS[@]}" || fail "linking test_cpu_kernels"
"$TARGET-gcc" -O2 -shared -fPIC scripts/qemu_arm_cpuinfo.c -o "$OUT/bin/qemu_arm_cpuinfo.so" -ldl ||
  fail "compiling scripts/qemu_arm_cpuinfo.c"
phase_done "build (-march=$MARCH, -j$JOBS)"

# --- Run under qemu-user, showing the program an ARM /proc/cpuinfo (scripts/qemu_arm_cpuinfo.c):
# a Neoverse N1 (implementer 0x41, part 0xd0c) for every CPU the host configures.
features='fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc'
features+=' dcpop asimddp'
for ((cpu = 0; cpu < $(getconf _NPROCESSORS_CONF); cpu++)); do
  printf '%s\t: %s\n' processor "$cpu" BogoMIPS 50.00 Features "$features" \
    'CPU implementer' 0x41 'CPU architecture' 8 'CPU variant' 0x3 'CPU part' 0xd0c 'CPU revision' 1
  echo
done >"$OUT/bin/cpuinfo"
echo 0x00000000413fd0c1 >"$OUT/bin/midr_el1"
echo "--- test_cpu_kernels under qemu-aarch64 -cpu $QEMU_CPU (built with -march=$MARCH)"
status=0
QEMU_LD_PREFIX="$SYSROOT" qemu-aarch64 \
  -E LD_LIBRARY_PATH="$OUT/bin:$TORCH_LIBS" \
  -E LD_PRELOAD="$OUT/bin/qemu_arm_cpuinfo.so" \
  -E QEMU_ARM_CPUINFO="$OUT/bin/cpuinfo" -E QEMU_ARM_MIDR="$OUT/bin/midr_el1" \
  "$OUT/bin/test_cpu_kernels" || status=$?
phase_done "test under qemu"

echo "--- times: ${timing[*]/%/;}"
((status == 0)) || fail "test_cpu_kernels exited with $status"
echo "aarch64_check: PASSED"
