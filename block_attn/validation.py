"""Checks on the public API's tensor arguments, with messages that name the problem."""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validates q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) against each other."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seqlen, head_dim), got {t.dim()}-D shape "
                f"{tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; supported: {allowed}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(
            f"batch size mismatch: q has B = {q.shape[0]}, k and v have B = {k.shape[0]}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"head_dim mismatch: q has D = {q.shape[3]}, k and v have D = {k.shape[3]}"
        )
    if q.shape[3] == 0:
        raise ValueError("head_dim D must be at least 1, got 0")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of kv heads "
            f"(Hq % Hkv == 0), got Hq = {hq}, Hkv = {hkv}"
        )


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """``scale`` or the default 1/sqrt(head_dim); rejects non-finite values."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Keeps any layout whose last dim has unit stride (no copy); copies the others."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
