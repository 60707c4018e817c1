"""Which CUDA kernels attention takes, and which it launched: queries for tests and benchmarks.

The choice is made in one place, the extension's C++ plans (``plan_forward`` / ``plan_backward``
in csrc/cuda/launch.cu, tile shapes in csrc/cuda/hopper/hopper_shapes.h). The functions here ask
those plans through ``_C.plan_forward`` / ``_C.plan_backward`` and restate none of their rules.
``kernels_launched`` observes the kernels a call actually ran, for tests that claim a path ran.

Kernel paths: ``"simple"`` (one thread per query row, any dtype), ``"tensor_core"`` (mma.sync,
sm_80+), ``"hopper"`` (wgmma, sm_90 with a build for ``9.0a``), ``"decode"`` (forward only: the
split-key kernel for blocks of few queries); ``"cpu"`` for tensors that are not on a CUDA device or
an extension built without CUDA kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

# Key block length of the problems ``hopper_kernels_apply`` asks about when given none: one short
# block (the forward rule looks at the longest key block; the backward rule does not).
_SHORT_BLOCK = 128
# Head dim of the problems ``decoding_kernel_applies`` asks about (its rule takes every head dim).
_DECODING_HEAD_DIM = 64


def _plans_available(device: torch.device) -> bool:
    """Whether the C++ plans answer for ``device``: a CUDA device, a GPU and a CUDA build."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    from block_attn import _C

    return bool(_C.build_info()["cuda"])


def forward_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
) -> dict:
    """The plan ``torch.ops.block_attn.attention_forward`` makes for these arguments.

    Args:
        q: ``(batch, heads_q, seqlen_q, head_dim)``.
        k, v: ``(batch, heads_kv, seqlen_k, head_dim)``.
        cu_seqlens_q, cu_seqlens_k: ``(num_blocks + 1,)`` int32 offsets on q's device.
        max_seqlen_q, max_seqlen_k: longest query and key block.
        causal: bottom-right aligned causal mask in every block.

    Returns:
        ``{"path": ...}`` with, on a CUDA device, ``decode_splits`` and
        ``split_partials_elements`` (the decoding kernel's key splits and their scratch).
    """
    if not _plans_available(q.device):
        return {"path": "cpu"}
    from block_attn import _C

    return _C.plan_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


def backward_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    deterministic: bool = False,
) -> dict:
    """The plan ``torch.ops.block_attn.attention_backward`` makes for these arguments (``out``
    and ``grad_out`` laid out like q), as ``forward_plan``.

    Returns:
        ``{"path": ...}`` with, on a CUDA device, ``max_shared_bytes`` and
        ``dq_accumulator_elements`` (the float32 scratch of dQ by atomics; 0 when deterministic).
    """
    if not _plans_available(q.device):
        return {"path": "cpu"}
    from block_attn import _C

    return _C.plan_backward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, deterministic
    )


def _one_block_plan(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    queries: int,
    keys: int,
    backward: bool,
) -> str:
    """The path planned for one block of ``queries`` x ``keys`` (one head, contiguous rows), or
    ``"rejected"`` where the op refuses such inputs (a head_dim it does not support)."""
    q = torch.empty(1, 1, queries, head_dim, dtype=dtype, device=device)
    k = torch.empty(1, 1, keys, head_dim, dtype=dtype, device=device)
    cu_q = torch.tensor([0, queries], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, keys], dtype=torch.int32, device=device)
    plan = backward_plan if backward else forward_plan
    try:
        return plan(q, k, k, cu_q, cu_k, queries, keys)["path"]
    except (RuntimeError, TypeError, ValueError):  # the op's checks raise these
        return "rejected"


def hopper_kernels_apply(
    device: str | torch.device,
    dtype: torch.dtype,
    head_dim: int,
    *,
    backward: bool = False,
    max_seqlen_k: int | None = None,
) -> bool:
    """Whether attention's forward (or, with ``backward=True``, its backward) on ``device`` runs
    the Hopper (wgmma) kernels for this dtype and head_dim, as the C++ plan decides.

    They need an sm_90 GPU (H100, H200), an extension built with ``9.0a`` in
    ``TORCH_CUDA_ARCH_LIST``, bfloat16 or float16, 16-byte aligned rows, and the environment
    variable ``BLOCK_ATTN_HOPPER_KERNELS`` not ``"0"``; the forward takes some head dims only
    over long key blocks, so this asks about one block of ``max_seqlen_k`` keys (as many
    queries; default: a short block). Asked about contiguous inputs; a forward with few queries
    may run the decoding kernel instead (``decoding_kernel_applies``).
    """
    device = torch.device(device)
    if not _plans_available(device):
        return False
    keys = _SHORT_BLOCK if max_seqlen_k is None else max_seqlen_k
    return _one_block_plan(device, dtype, head_dim, keys, keys, backward) == "hopper"


def decoding_kernel_applies(
    device: str | torch.device, dtype: torch.dtype, max_seqlen_q: int, max_seqlen_k: int
) -> bool:
    """Whether attention's forward on ``device`` runs the split-key decoding kernel for query
    blocks of at most ``max_seqlen_q`` rows against key blocks of at most ``max_seqlen_k``, as
    the C++ plan decides.

    It takes bfloat16 and float16 blocks of few queries against long key blocks (new tokens
    against per-sequence caches) on an sm_80+ GPU, unless the environment variable
    ``BLOCK_ATTN_DECODE_KERNEL`` is ``"0"`` (read at every call). The backward is the same as for
    any other forward.
    """
    device = torch.device(device)
    if not _plans_available(device):
        return False
    path = _one_block_plan(
        device, dtype, _DECODING_HEAD_DIM, max_seqlen_q, max_seqlen_k, backward=False
    )
    return path == "decode"


# block_attn's kernels are named <direction>_<family>_kernel (fwd_flash_kernel,
# dkdv_wgmma_kernel, ...), demangled or not; the family names the path. delta_kernel,
# dq_convert_kernel and combine_splits_kernel serve several paths and name none.
_KERNEL_NAME = re.compile(r"(?<![A-Za-z_])(?:fwd|dkdv|dq)_(simple|flash|wgmma|decode)_kernel")
_FAMILY_PATHS = {"simple": "simple", "flash": "tensor_core", "wgmma": "hopper", "decode": "decode"}


def kernel_paths(kernel_names: Iterable[str]) -> set[str]:
    """The kernel paths (``"simple"``, ``"tensor_core"``, ``"hopper"``, ``"decode"``) that
    launched kernels of these names (as ``kernels_launched`` lists them) belong to."""
    paths = set()
    for name in kernel_names:
        if "block_attn" in name and (match := _KERNEL_NAME.search(name)):
            paths.add(_FAMILY_PATHS[match.group(1)])
    return paths


def kernels_launched(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels that ``fn()`` launched, in launch order, as torch.profiler
    records them (demangled: ``void block_attn::cuda::fwd_flash_kernel<...>(...)``)."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in sorted(kernels, key=lambda e: e.time_range.start)]
