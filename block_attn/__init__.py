"""block_attn: exact, memory-efficient block-diagonal and causal attention for PyTorch.

Functions take SDPA's layout: q (B, Hq, N, D), k and v (B, Hkv, N, D).
"""

from block_attn import nn, reference
from block_attn.api import attention, block_diagonal_attention, causal_attention
from block_attn.blocks import BlockLayout
from block_attn.kv_cache import padded_cache_blocks


def build_info() -> dict:
    """What the native extension was built with.

    Returns:
        dict with keys ``cuda`` (bool: CUDA kernels compiled), ``cuda_archs`` (str),
        ``torch_version`` (the torch it was built against), ``openmp`` (bool),
        ``cpu_threads`` (threads the CPU kernels use) and ``parallel_backend`` (ATen's report).
    """
    from block_attn import _C

    return dict(_C.build_info())


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
    "causal_attention",
    "nn",
    "padded_cache_blocks",
    "reference",
]
__version__ = "0.1.0"
