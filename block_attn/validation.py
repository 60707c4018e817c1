"""The Python side of input validation.

The operators' C++ checks (``csrc/attention_host.cpp``) are the one authority on the tensors:
dtypes, devices, shapes, strides and offsets, each with one message. Python checks only what it
must read before calling them (q, k and v are tensors with four dimensions) and what C++ cannot
see (Python types, lists, keyword combinations). Code that computes without the operators (the
dense reference, context parallelism before it communicates) runs the same C++ checks through
:func:`check_tensors`.
"""

from __future__ import annotations

import math
import numbers

import torch

try:
    import numpy
except ImportError:  # numpy is optional for torch
    numpy = None

# NumPy scalars of the right kind are accepted, as PyTorch accepts them.
_BOOL_TYPES = (bool,) if numpy is None else (bool, numpy.bool_)

# What the kernels compute in; the C++ checks refuse every other dtype.
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) are tensors with four dimensions (the rest is
    checked by the operators)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            # The same message as the operators' check, which raw-operator callers meet.
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seqlen, head_dim), got {t.dim()}-D shape "
                f"{list(t.shape)}"
            )


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """Every check the operators make on q, k, v and the scale, without calling them (after
    :func:`check_qkv`, which reads nothing but their types and ranks)."""
    from block_attn import _C

    _C.check_inputs(q, k, v, scale)


def as_bool(value: object, name: str) -> bool:
    """``value`` as a Python bool; a bool or a NumPy bool, else TypeError."""
    if not isinstance(value, _BOOL_TYPES):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def as_int(value: object, name: str) -> int:
    """``value`` as a Python int; an int or a NumPy integer (not a bool or a tensor), else
    TypeError."""
    if isinstance(value, (*_BOOL_TYPES, torch.Tensor)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def as_float(value: object, name: str) -> float:
    """``value`` as a Python float; a real number, NumPy's included (not a bool or a tensor),
    else TypeError; an int too large for a float is a ValueError."""
    if isinstance(value, (*_BOOL_TYPES, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name} must be finite, got an int of {value.bit_length()} bits"
        ) from None


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """``scale`` or the default 1/sqrt(head_dim), as a Python float (finiteness is checked by
    the operators)."""
    if scale is None:
        return 1.0 / math.sqrt(max(head_dim, 1))
    return as_float(scale, "scale")


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Keeps any layout whose last dim has unit stride (no copy); copies the others."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
