"""block_attn: exact, memory-efficient block-diagonal and causal attention for PyTorch.

Functions take SDPA's layout: q (B, Hq, N, D), k and v (B, Hkv, N, D).
"""

import re

from block_attn import nn, reference
from block_attn.api import attention, block_diagonal_attention, causal_attention
from block_attn.blocks import BlockLayout, padded_cache_blocks


def build_info() -> dict:
    """What the native extension was built with.

    Returns:
        dict with keys ``cuda`` (bool: CUDA kernels compiled), ``cuda_archs`` (str),
        ``torch_version`` (the torch it was built against), ``openmp`` (bool),
        ``cpu_threads`` (threads the CPU kernels use), ``parallel_backend`` (ATen's report),
        ``cpu_capabilities`` (the instruction-set capabilities the CPU kernels were compiled
        for, most capable first: ``avx512_bf16``, ``avx512``, ``avx2``, ``default`` in a portable
        build, the ``-march`` value in a native-only one) and ``cpu_capability`` (the one in use:
        the best the CPU supports, or ``BLOCK_ATTN_CPU_CAPABILITY``'s).
    """
    from block_attn import _C

    return dict(_C.build_info())


def _parallel_summary(report: str) -> str:
    """One line from ATen's multi-line parallel report: backend and thread counts."""
    backend = re.search(r"ATen parallel backend: (.+)", report)
    intra = re.search(r"at::get_num_threads\(\) : (\d+)", report)
    inter = re.search(r"at::get_num_interop_threads\(\) : (\d+)", report)
    parts = [backend.group(1).strip() if backend else "unknown backend"]
    if intra and inter:
        parts.append(f"{intra.group(1)} intra-op / {inter.group(1)} inter-op threads")
    libraries = [name for name in ("MKL-DNN", "Math Kernel Library") if name in report]
    if libraries:
        parts.append(
            "with " + " and ".join("oneDNN" if n == "MKL-DNN" else "MKL" for n in libraries)
        )
    return ", ".join(parts)


def build_info_table(info: dict | None = None) -> str:
    """``build_info()`` as a short two-column table, one line per setting.

    Args:
        info: a ``build_info()`` dict; by default this build's.

    Returns:
        The table, lines joined by newlines, no trailing newline. Keys it does not know are
        listed after the known ones, each on one line.
    """
    import torch

    info = build_info() if info is None else dict(info)
    archs = info.pop("cuda_archs", "").replace(";", " ")
    rows = [
        ("block_attn", __version__),
        (
            "torch",
            f"{torch.__version__} (extension built against {info.pop('torch_version', '?')})",
        ),
        (
            "CPU kernels",
            f"{info.pop('cpu_capability', '?')} of "
            f"{' '.join(info.pop('cpu_capabilities', [])) or '?'}, "
            f"{'OpenMP' if info.pop('openmp', False) else 'no OpenMP'}, "
            f"{info.pop('cpu_threads', '?')} threads",
        ),
        (
            "CUDA kernels",
            f"yes, for {archs or 'the default archs'}" if info.pop("cuda", False) else "no",
        ),
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        rows.append(("GPU", f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"))
    rows.append(("parallel backend", _parallel_summary(info.pop("parallel_backend", ""))))
    rows += [
        (key, str(value).strip().splitlines()[0] if str(value).strip() else "")
        for key, value in info.items()
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def __getattr__(name: str):
    # block_attn.distributed is imported on first use, so `import block_attn` works on
    # builds of torch without torch.distributed.
    if name == "distributed":
        import importlib

        return importlib.import_module("block_attn.distributed")
    raise AttributeError(f"module 'block_attn' has no attribute {name!r}")


__all__ = [
    "BlockLayout",
    "attention",
    "block_diagonal_attention",
    "build_info",
    "build_info_table",
    "causal_attention",
    "nn",
    "padded_cache_blocks",
    "reference",
]
__version__ = "0.1.0"
