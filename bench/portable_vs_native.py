"""The portable build's CPU kernels against a ``-march=native`` build of the same sources.

Builds the kernels once more with ``-march=native`` (into ``build/native-kernels``, as a kernel
object like the portable build's own), then times both on the same inputs in one process,
switching between them before every call (``_C.select_cpu_kernels``): medians of interleaved
rounds, reported as portable / native time.

Usage (repo root, extension built in place): ``python -m bench.portable_vs_native [--reps 15]``
"""

from __future__ import annotations

import argparse
import ast
import os

import torch
from torch.utils import cpp_extension

import block_attn
from bench.timing import time_interleaved_ms
from block_attn import _C
from block_attn.cpu_kernels import kernel_objects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = (
    ("fixed256 f32 D64 N8192", torch.float32, 64, 8192, {"block_size": 256}),
    ("causal f32 D64 N4096", torch.float32, 64, 4096, {"causal": True}),
    ("docs-causal bf16 D128 N8192", torch.bfloat16, 128, 8192,
     {"cu_seqlens": [0, 700, 2300, 2400, 5000, 8192], "causal": True}),
    ("fixed256 bf16 D64 N8192", torch.bfloat16, 64, 8192, {"block_size": 256}),
)  # fmt: skip


def setup_constant(name: str):
    """A constant of setup.py, read without running it, so the native build matches the
    portable one's flags."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError(f"setup.py defines no {name}")


def build_native_object() -> str:
    """Path of the kernels built with -march=native (the same flags as the portable objects')."""
    flags = setup_constant("OPTIMIZE") + setup_constant("KERNEL_OBJECT_FLAGS")
    return cpp_extension.load(
        name="native_kernels",
        sources=[
            os.path.join(ROOT, "csrc", "cpu", source) for source in setup_constant("KERNEL_SOURCES")
        ],
        extra_cflags=[*flags, "-march=native", '-DBLOCK_ATTN_CPU_CAPABILITY_NAME=\\"native\\"'],
        extra_ldflags=["-fopenmp"],
        build_directory=_build_directory(),
        is_python_module=False,
    )


def _build_directory() -> str:
    path = os.path.join(ROOT, "build", "native-kernels")
    os.makedirs(path, exist_ok=True)
    return path


def compare(name, dtype, dim, length, kwargs, use, reps) -> None:
    """Prints portable / native time of one workload's forward and forward+backward."""
    q, k, v = (torch.randn(1, 8, length, dim, dtype=dtype, requires_grad=True) for _ in "qkv")
    grad = torch.randn(1, 8, length, dim, dtype=dtype)

    def forward(which: str):
        def step() -> None:
            use(which)
            with torch.no_grad():
                block_attn.attention(q, k, v, **kwargs)

        return step

    def training(which: str):
        def step() -> None:
            use(which)
            block_attn.attention(q, k, v, **kwargs).backward(grad)

        return step

    steps = {f"{w} {mode}": make(w) for w in ("native", "portable")
             for mode, make in (("fwd", forward), ("fwd+bwd", training))}  # fmt: skip
    ms = {key: value["ms"] for key, value in time_interleaved_ms(steps, "cpu", reps).items()}
    print(
        f"{name}: portable/native fwd {ms['portable fwd'] / ms['native fwd']:.3f}, "
        f"fwd+bwd {ms['portable fwd+bwd'] / ms['native fwd+bwd']:.3f} "
        f"(native {ms['native fwd']:.1f} / {ms['native fwd+bwd']:.1f} ms)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    portable = block_attn.build_info()["cpu_capability"]
    objects = kernel_objects()
    if portable not in objects:
        raise SystemExit(f"not a portable build with kernel objects: {block_attn.build_info()}")
    native = build_native_object()

    def use(which: str) -> None:
        # The native object is offered under the portable capability's name and forced.
        os.environ["BLOCK_ATTN_CPU_CAPABILITY"] = portable
        _C.select_cpu_kernels(objects if which == "portable" else {portable: native})

    print(f"portable kernels: {portable}; native: {native}")
    for workload in WORKLOADS:
        compare(*workload, use, args.reps)
    os.environ.pop("BLOCK_ATTN_CPU_CAPABILITY", None)


if __name__ == "__main__":
    main()
