"""The block_attn operators: fake (meta) kernels and autograd wiring.

The schemas live in ``csrc/ops.cpp``; device kernels register in C++. This module makes the
forward op differentiable (through the ``attention_backward`` op) and traceable by
``torch.compile`` (through fake kernels that give output shapes without computing).
"""

from __future__ import annotations

import torch

from block_attn import (
    _C,  # noqa: F401  (loading the extension registers the operators)
    cpu_kernels,  # noqa: F401  (chooses the CPU kernels)
)
from block_attn.validation import with_unit_last_stride

__all__ = ["attention_backward", "attention_forward"]


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed_offset: torch.Tensor | None = None,
    query_offset: int = -1,
    key_offset: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw forward operator: ``block_attn.attention`` without its checks of the offsets' values.

    Shapes, dtypes, devices and strides are checked. The offsets' values are checked on the
    CPU; on CUDA they stay on the device unread by the host (so the call never waits for the GPU
    and can be captured in a CUDA graph), and the kernels clamp them to [0, N]: offsets that
    break the contract below give wrong rows, never accesses outside the tensors.

    Args:
        q: (B, Hq, Nq, D), unit stride in D.
        k, v: (B, Hkv, Nk, D), unit stride in D; Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: (num_blocks + 1,) int32 offsets on q's device, contiguous,
            non-decreasing from 0 to at most Nq (resp. Nk); block j pairs queries
            [cu_q[j], cu_q[j+1]) with keys [cu_k[j], cu_k[j+1]). Blocks may be empty. Rows after
            the last offset belong to no block: out 0, lse -inf, zero gradients.
        max_seqlen_q, max_seqlen_k: at least the longest query / key block.
        causal: bottom-right aligned causal mask inside each block.
        scale: multiplies q·k before the softmax.
        window_left, window_right: the sliding window (``window_size`` of
            :mod:`block_attn.variants`); -1 leaves a side unbounded.
        softcap: caps the scaled scores at ±softcap through tanh; 0 disables it.
        alibi_slopes: (Hq,) or (B, Hq) float32 ALiBi slopes on q's device, or None.
        dropout_p: probability of dropping each normalised probability.
        dropout_seed_offset: with ``dropout_p > 0``, the (seed, offset) int64 tensor on q's device
            that the mask of :mod:`block_attn.dropout_mask` is a function of.
        query_offset, key_offset: for a call on pieces of a longer sequence (context
            parallelism), the positions in it of q's and k's row 0, both or neither (-1). Given,
            query row r and key row s stand at ``query_offset + r`` and ``key_offset + s``: the
            causal mask, the window and ALiBi measure ``i' - t`` between those positions instead
            of aligning each block bottom-right, and the dropout mask is that of those rows of
            the longer sequence.

    Returns:
        out (B, Hq, Nq, D) in q's dtype and layout; lse (B, Hq, Nq), float64 for float64 q
        (so float64 gradients are exact to float64 rounding), else float32.
    """
    return torch.ops.block_attn.attention_forward.default(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        dropout_seed_offset,
        query_offset,
        key_offset,
    )


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    deterministic: bool,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed_offset: torch.Tensor | None = None,
    query_offset: int = -1,
    key_offset: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw backward operator: (grad_q, grad_k, grad_v) shaped like (q, k, v)."""
    return torch.ops.block_attn.attention_backward.default(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        grad_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        deterministic,
        window_left,
        window_right,
        softcap,
        alibi_slopes,
        dropout_p,
        dropout_seed_offset,
        query_offset,
        key_offset,
    )


@torch.library.register_fake("block_attn::attention_forward")
def _attention_forward_fake(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window_left=-1,
    window_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed_offset=None,
    query_offset=-1,
    key_offset=-1,
):
    # A call mixing meta and real tensors runs this kernel, not the C++ checks.
    torch._check_value(
        q.device == k.device == v.device,
        lambda: f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}",
    )
    out = torch.empty_like(q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=lse_dtype)
    return out, lse


@torch.library.register_fake("block_attn::attention_backward")
def _attention_backward_fake(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    grad_lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    deterministic,
    window_left=-1,
    window_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    dropout_p=0.0,
    dropout_seed_offset=None,
    query_offset=-1,
    key_offset=-1,
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# The forward's arguments after q, k, v and the offsets, with the schema's defaults.
_SETTINGS = {
    "max_seqlen_q": None,
    "max_seqlen_k": None,
    "causal": None,
    "scale": None,
    "window_left": -1,
    "window_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "dropout_p": 0.0,
    "dropout_seed_offset": None,
    "query_offset": -1,
    "key_offset": -1,
}


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, *given = inputs
    settings = dict(zip(_SETTINGS, given, strict=False)) | {
        name: default for name, default in list(_SETTINGS.items())[len(given) :]
    }
    out, lse = output
    ctx.save_for_backward(
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, settings.pop("alibi_slopes"),
        settings.pop("dropout_seed_offset"),
    )  # fmt: skip
    ctx.settings = settings
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, seed_offset = ctx.saved_tensors
    settings = ctx.settings
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
    grad_q, grad_k, grad_v = attention_backward(
        with_unit_last_stride(grad_out),
        q,
        k,
        v,
        out,
        lse,
        grad_lse,
        cu_seqlens_q,
        cu_seqlens_k,
        settings["max_seqlen_q"],
        settings["max_seqlen_k"],
        settings["causal"],
        settings["scale"],
        torch.are_deterministic_algorithms_enabled(),
        settings["window_left"],
        settings["window_right"],
        settings["softcap"],
        alibi_slopes,
        settings["dropout_p"],
        seed_offset,
        settings["query_offset"],
        settings["key_offset"],
    )
    return grad_q, grad_k, grad_v, *([None] * (2 + len(_SETTINGS)))


torch.library.register_autograd(
    "block_attn::attention_forward", _backward, setup_context=_setup_context
)

DOUBLE_BACKWARD_ADVICE = (
    "block_attn does not support double backward (a gradient of its gradients, as "
    "create_graph=True followed by a second backward computes for gradient penalties): the "
    "kernels' backward is not itself differentiable. For such losses use "
    "block_attn.reference.attention (pure PyTorch, same arguments) or PyTorch's "
    "scaled_dot_product_attention with the math backend and a dense mask"
)


def _refuse_double_backward(ctx, grad_q, grad_k, grad_v):
    raise RuntimeError(DOUBLE_BACKWARD_ADVICE)


def _setup_double_backward(ctx, inputs, output) -> None:
    pass


# Registered so that differentiating the backward raises instead of PyTorch's fallback, which
# warns and treats the backward as constant (silently wrong second derivatives).
torch.library.register_autograd(
    "block_attn::attention_backward",
    _refuse_double_backward,
    setup_context=_setup_double_backward,
)
