"""Which CUDA kernels attention takes: a query for tests and benchmarks."""

from __future__ import annotations

import os

import torch

# The C++ dispatch's rule (csrc/cuda/launch.cu): below head_dim 256 the Hopper forward runs only
# over key blocks longer than this; shorter ones run the mma.sync forward, which was as fast there.
HOPPER_FORWARD_MIN_KEYS = 4096


def hopper_kernels_apply(
    device: str | torch.device,
    dtype: torch.dtype,
    head_dim: int,
    *,
    backward: bool = False,
    max_seqlen_k: int | None = None,
) -> bool:
    """Whether attention's forward (or, with ``backward=True``, its backward) on ``device`` runs
    the Hopper (wgmma) kernels for this dtype and head_dim.

    They take bfloat16 and float16 on an sm_90 GPU (H100, H200) when the extension was built with
    ``9.0a`` in ``TORCH_CUDA_ARCH_LIST`` and the environment variable
    ``BLOCK_ATTN_HOPPER_KERNELS`` is not ``"0"``, in both the default and the deterministic mode:
    the backward at head_dim 64 and 128, the forward at head_dim 256, and at head_dim 128 when the
    longest key block (``max_seqlen_k``, needed for this answer) is longer than
    ``HOPPER_FORWARD_MIN_KEYS``. They also need every row 16-byte aligned (aligned storage, and
    strides that are multiples of 8 elements, as contiguous tensors and their head-transposed
    views have), which this does not check. A forward that ``decoding_kernel_applies`` to runs
    that kernel instead. Everything else runs the mma.sync (sm_80+) or simple kernels.
    """
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if backward:
        if head_dim not in (64, 128):
            return False
    elif head_dim != 256:
        long_keys = max_seqlen_k is not None and max_seqlen_k > HOPPER_FORWARD_MIN_KEYS
        if head_dim != 128 or not long_keys:
            return False
    from block_attn import _C

    archs = _C.build_info()["cuda_archs"].replace("+PTX", "").replace(";", " ").split()
    return (
        "9.0a" in archs
        and torch.cuda.get_device_capability(device) == (9, 0)
        and os.environ.get("BLOCK_ATTN_HOPPER_KERNELS") != "0"
    )


# The C++ dispatch's limits (csrc/cuda/launch.cu): at most this many queries in every block, and
# at least two 64-key tiles in the longest key block.
DECODING_MAX_QUERIES = 16
DECODING_MIN_KEYS = 128


def decoding_kernel_applies(
    device: str | torch.device, dtype: torch.dtype, max_seqlen_q: int, max_seqlen_k: int
) -> bool:
    """Whether attention's forward on ``device`` runs the split-key decoding kernel for query
    blocks of at most ``max_seqlen_q`` rows against key blocks of at most ``max_seqlen_k``.

    It takes bfloat16 and float16 on an sm_80+ GPU when every query block has at most 16 rows
    and the longest key block at least 128 (new tokens against per-sequence caches), unless the
    environment variable ``BLOCK_ATTN_DECODE_KERNEL`` is ``"0"`` (read at every call). It puts
    the query heads that share a kv head into one tile and splits each block's keys over several
    CTAs. The backward is the same as for any other forward.
    """
    device = torch.device(device)
    return (
        device.type == "cuda"
        and dtype in (torch.bfloat16, torch.float16)
        and max_seqlen_q <= DECODING_MAX_QUERIES
        and max_seqlen_k >= DECODING_MIN_KEYS
        and torch.cuda.get_device_capability(device)[0] >= 8
        and os.environ.get("BLOCK_ATTN_DECODE_KERNEL") != "0"
    )
