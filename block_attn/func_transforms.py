"""``torch.func`` support: ``grad``, ``vjp``, ``jacrev`` and ``vmap`` over the attention op.

The operator's own autograd (``ops.py``) is what eager mode and ``torch.compile`` use. Its
wrapper has no ``setup_context`` that functorch can call, so under a ``torch.func`` transform
the API routes the same kernels through the autograd.Function here, whose ``vmap`` rule folds
the mapped dimension into the batch dimension (one kernel launch for the whole map).
"""

from __future__ import annotations

import torch

from block_attn import ops
from block_attn.validation import with_unit_last_stride

__all__ = ["attention_forward"]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.attention_forward``, differentiable under ``torch.func`` transforms as well."""
    args = (
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
    )
    # Dynamo refuses an autograd.Function given one tensor twice (q is k, shared offsets), so
    # compiled graphs keep the operator.
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return _Attention.apply(*args)
    return ops.attention_forward(*args)


def _fold_into_batch(t: torch.Tensor, mapped_dim: int | None, map_size: int) -> torch.Tensor:
    """(map, B, ...) -> (map*B, ...), the map dim moved first or broadcast when unmapped."""
    t = t.movedim(mapped_dim, 0) if mapped_dim is not None else t.expand(map_size, *t.shape)
    return t.reshape(map_size * t.shape[1], *t.shape[2:])


def _unfold_batch(t: torch.Tensor, map_size: int) -> torch.Tensor:
    return t.view(map_size, t.shape[0] // map_size, *t.shape[1:])


def _refuse_mapped_offsets(offset_dims: tuple) -> None:
    if any(d is not None for d in offset_dims):
        raise ValueError(
            "vmap over block offsets is not supported: every mapped call must share "
            "cu_seqlens; map over q, k and v (or put the problems in the batch dimension)"
        )


def _refuse_mapped_slopes(slope_dims: tuple) -> None:
    if any(d is not None for d in slope_dims):
        raise ValueError(
            "vmap over alibi_slopes is not supported: every mapped call must share its slopes"
        )


def _slopes_for_folded_batch(settings: tuple, index: int, map_size: int) -> tuple:
    """The settings with (B, Hq) ALiBi slopes (``settings[index]``, if given) repeated for the
    folded batch."""
    slopes = settings[index] if len(settings) > index else None
    if isinstance(slopes, torch.Tensor) and slopes.dim() == 2:
        return (*settings[:index], slopes.repeat(map_size, 1), *settings[index + 1 :])
    return settings


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *settings):
        return ops.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *settings)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, cu_seqlens_q, cu_seqlens_k, *settings = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.settings = settings
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_lse = None if grad_lse is None else grad_lse.to(lse.dtype).contiguous()
        grads = _AttentionBackward.apply(
            with_unit_last_stride(grad_out),
            q,
            k,
            v,
            out,
            lse,
            grad_lse,
            cu_seqlens_q,
            cu_seqlens_k,
            *ctx.settings[:4],
            torch.are_deterministic_algorithms_enabled(),
            *ctx.settings[4:],
        )
        return (*grads, *([None] * (2 + len(ctx.settings))))

    @staticmethod
    def vmap(info, in_dims, q, k, v, cu_seqlens_q, cu_seqlens_k, *settings):
        _refuse_mapped_offsets(in_dims[3:5])
        _refuse_mapped_slopes(in_dims[12:13])
        n = info.batch_size
        q, k, v = (
            with_unit_last_stride(_fold_into_batch(t, d, n))
            for t, d in zip((q, k, v), in_dims[:3], strict=True)
        )
        settings = _slopes_for_folded_batch(settings, 7, n)
        out, lse = ops.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *settings)
        return (_unfold_batch(out, n), _unfold_batch(lse, n)), (0, 0)


class _AttentionBackward(torch.autograd.Function):
    """The backward op as a function of its inputs; differentiating it again raises."""

    @staticmethod
    def forward(grad_out, q, k, v, out, lse, grad_lse, *offsets_and_settings):
        return ops.attention_backward(grad_out, q, k, v, out, lse, grad_lse, *offsets_and_settings)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ops.DOUBLE_BACKWARD_ADVICE)

    @staticmethod
    def vmap(info, in_dims, *args):
        _refuse_mapped_offsets(in_dims[7:9])
        _refuse_mapped_slopes(in_dims[17:18])
        n = info.batch_size
        tensors = [
            None if t is None else _fold_into_batch(t, d, n)
            for t, d in zip(args[:7], in_dims[:7], strict=True)
        ]
        # grad_out, q, k, v, out need a unit last stride; lse and grad_lse must be contiguous.
        tensors = [with_unit_last_stride(t) for t in tensors[:5]] + [
            None if t is None else t.contiguous() for t in tensors[5:]
        ]
        grads = ops.attention_backward(*tensors, *_slopes_for_folded_batch(args[7:], 10, n))
        return tuple(_unfold_batch(g, n) for g in grads), (0, 0, 0)
