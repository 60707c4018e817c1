"""Builds block_attn's native extension against the installed PyTorch.

CPU kernels are always built. By default the build is portable: the extension carries baseline
x86-64 kernels and loads, at run time, the best of the AVX2, AVX-512 and AVX-512-BF16 kernel
objects built beside it that the CPU supports; BLOCK_ATTN_CPU_ARCH=native builds one set of
kernels for the build machine's instruction set instead (a binary for that CPU class only).
CUDA kernels are added when torch is a CUDA build and nvcc is found (CUDA_HOME), or forced with
BLOCK_ATTN_CUDA=1; BLOCK_ATTN_CUDA=0 forces a CPU-only build.
TORCH_CUDA_ARCH_LIST picks the GPU archs (default: 8.0 8.6 8.9 9.0a). 9.0a is Hopper with its
arch-specific instructions: with it, bf16/fp16 attention on sm_90 runs the wgmma kernels in the
backward at head_dim 64 and 128, and in the forward at head_dim 256 and at head_dim 128 when the
longest key block exceeds 4096 keys (the table in csrc/cuda/hopper/hopper_shapes.h); with plain
9.0 it runs the mma.sync kernels.
Build with `pip install --no-build-isolation .` so the extension links the torch you have.
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a"


def want_cuda() -> bool:
    forced = os.environ.get("BLOCK_ATTN_CUDA")
    if forced == "0":
        return False
    available = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if forced == "1":
        if not available:
            raise RuntimeError(
                "BLOCK_ATTN_CUDA=1 but torch is not a CUDA build or nvcc was not found "
                "(set CUDA_HOME to the CUDA toolkit)"
            )
        return True
    return available


def cuda_include_dirs() -> list[str]:
    """cuBLAS/cuSPARSE headers that torch's CUDA headers include, from the nvidia pip wheels."""
    import site

    dirs = []
    for base in [*site.getsitepackages(), site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return [d for d in dirs if os.path.isdir(d)]


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The CPU kernels of a portable build: compiled once per capability, each into a shared object
# of its own that the extension loads when the running CPU supports it (csrc/cpu/cpu_capability.h).
# GCC's generic tuning vectorises loops at 256 bits even with AVX-512; the kernels' own loops want
# the full width (the bf16 backward is several percent slower without it).
KERNEL_CAPABILITY_FLAGS = {
    "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],  # AVX-512 F, BW, DQ, VL
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16", "-mprefer-vector-width=512"],
}
# -fno-wrapv undoes the -fwrapv of Python's own compiler flags, which setuptools adds: the
# kernels never overflow a signed integer, and wrapping arithmetic keeps GCC from vectorising some
# of their loops (the bf16 backward is about 5% faster without it).
OPTIMIZE = ["-O3", "-fno-wrapv", "-fopenmp"]
KERNEL_SOURCES = ("attention_fwd_cpu.cpp", "attention_bwd_cpu.cpp", "kernel_table.cpp")
# Only the kernel table is exported, so inline code compiled for one instruction set never stands
# in for another binary's.
KERNEL_OBJECT_FLAGS = [
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-DBLOCK_ATTN_CPU_KERNEL_OBJECT",
]


def cpu_arch() -> str:
    """BLOCK_ATTN_CPU_ARCH: empty (default) for a portable build, else the -march value (e.g.
    native) of a build whose kernels run only on CPUs with that instruction set."""
    return os.environ.get("BLOCK_ATTN_CPU_ARCH", "")


def portable_cpu_build() -> bool:
    return not cpu_arch() and platform.machine() in ("x86_64", "AMD64")


def cpu_arch_flags() -> list[str]:
    arch = cpu_arch()
    return [f"-march={arch}", f'-DBLOCK_ATTN_CPU_CAPABILITY_NAME="{arch}"'] if arch else []


def kernel_objects(link_flags: list[str]) -> list:
    """One shared object of CPU kernels per capability, in a portable build."""
    if not portable_cpu_build():
        return []
    return [
        cpp_extension.CppExtension(
            f"block_attn._cpu_kernels_{name}",
            [os.path.join("csrc", "cpu", source) for source in KERNEL_SOURCES],
            extra_compile_args={
                "cxx": [
                    *OPTIMIZE,
                    *flags,
                    *KERNEL_OBJECT_FLAGS,
                    f'-DBLOCK_ATTN_CPU_CAPABILITY_NAME="{name}"',
                ]
            },
            extra_link_args=link_flags,
        )
        for name, flags in KERNEL_CAPABILITY_FLAGS.items()
    ]


def loaded_libstdcxx() -> list[str]:
    """The libstdc++ this process (with torch imported) has loaded, as a link input.

    Named on the link line before the compiler driver's own -lstdc++, it supplies every C++
    runtime symbol it has, so no static copy of them enters the extension even when the driver
    links libstdc++ statically (seen with the /opt/gcc toolchain of one GPU image, where the
    extension's private copy crashed formatting numbers in error messages). Empty where
    /proc/self/maps does not exist or lists no libstdc++ (non-Linux, or libc++).
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))[:1]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, minus link flags that give the extension its own C++ runtime.

    The extension must share the libstdc++ torch loads: a private copy (static, or bound to
    itself with -Bsymbolic-functions) crashed formatting C++ error messages on one GPU image.
    """

    def build_extensions(self) -> None:
        static_runtime = {"-static-libstdc++", "-static-libgcc", "-Wl,-Bsymbolic-functions"}
        for attr in ("linker_so", "linker_so_cxx"):
            command = getattr(self.compiler, attr, None)
            if command:
                setattr(self.compiler, attr, [a for a in command if a not in static_runtime])
        super().build_extensions()

    def build_extension(self, ext) -> None:
        # Each extension compiles in a folder of its own: the kernel objects compile the same
        # sources with other flags, and shared object files would be rebuilt on every build.
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


def make_extension():
    cxx_flags = [*OPTIMIZE, *cpu_arch_flags()]
    link_flags = ["-fopenmp", *loaded_libstdcxx()]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return cpp_extension.CppExtension(
            "block_attn._C",
            srcs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    defines = ["-DBLOCK_ATTN_WITH_CUDA", f'-DBLOCK_ATTN_CUDA_ARCHS="{archs}"']
    if "9.0a" in archs.replace("+PTX", "").replace(";", " ").split():
        defines.append("-DBLOCK_ATTN_WITH_SM90A")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "block_attn._C",
        srcs + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu") + sources("csrc/cuda/*/*.cu"),
        include_dirs=cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[make_extension(), *kernel_objects(["-fopenmp", *loaded_libstdcxx()])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
