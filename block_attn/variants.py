"""The attention variants: sliding window, logit softcap, ALiBi, sinks and dropout.

What each argument means, and its checks, in one place. FlashAttention's conventions are
followed where it has the argument. Within block j, local query i stands at ``i' = i + Lk - Lq``
(aligned bottom-right to its key block, so ``i' = i`` when the lengths match) and local key t is
``i' - t`` positions behind it:

- ``window_size=(left, right)``: query i may attend key t iff ``-right <= i' - t <= left``;
  ``-1`` leaves that side unbounded. With ``causal=True`` the right side is 0.
- ``softcap > 0``: each scaled score s becomes ``softcap · tanh(s / softcap)``.
- ``alibi_slopes`` (Hq,) or (B, Hq), float32: adds ``-slope · |i' - t|`` to the score, after
  the softcap. Not differentiable.
- ``sinks`` (Hq,), any floating dtype, differentiable: each row's softmax normaliser gains
  ``exp(sink_h)``, a virtual key whose value is zero. The lse returned is the log of that
  normaliser, sink included; a row with no allowed key outputs 0 and its lse is ``sink_h``.
- ``dropout_p``: each normalised probability is kept with probability ``1 - p`` and scaled by
  ``1 / (1 - p)``, by the rule of :mod:`block_attn.dropout_mask` (seed and offset drawn from
  ``generator``, default the default generator of q's device). The lse is before dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from block_attn.validation import as_float, as_int

__all__ = ["Variants", "add_sinks", "check_sinks", "resolve_variants"]


@dataclass(frozen=True)
class Variants:
    """One call's variants, checked. A side of the window of -1 is unbounded."""

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    dropout_p: float = 0.0
    generator: torch.Generator | None = None


def resolve_variants(
    q: torch.Tensor,
    *,
    causal: bool,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Variants:
    """The variants of a call with queries ``q`` (B, Hq, Nq, D), checked.

    Raises:
        TypeError: an argument of the wrong kind or dtype. ValueError: a bad value or shape.
    """
    left, right = _window(window_size)
    if causal:
        right = 0
    softcap = as_float(softcap, "softcap")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap}")
    dropout_p = as_float(dropout_p, "dropout_p")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    batch, heads = q.shape[0], q.shape[1]
    if alibi_slopes is not None:
        shapes = ((heads,), (batch, heads))
        _check_tensor(alibi_slopes, "alibi_slopes", q, shapes, "(Hq,) or (B, Hq)")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if sinks is not None:
        check_sinks(sinks, q)
    return Variants(left, right, softcap, alibi_slopes, sinks, dropout_p, generator)


def check_sinks(sinks: object, q: torch.Tensor) -> None:
    """``sinks`` is a floating (Hq,) tensor on q's device."""
    _check_tensor(sinks, "sinks", q, ((q.shape[1],),), "(Hq,)")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {sinks.dtype}")


def add_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention whose normalisers also hold ``exp(sinks[h])``, from plain attention's ``out``
    (B, Hq, N, D) and ``lse`` (B, Hq, N): exact and differentiable (the sinks included).

    Each row keeps ``exp(lse - lse')`` of its weight, ``lse' = log(exp(lse) + exp(sink))``: an
    O(N·D) pass, beside the kernels' O(N·L·D).
    """
    total = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    # A row with no key and a sink of -inf keeps nothing (not exp(-inf + inf)).
    empty = torch.isneginf(total)
    kept = torch.exp(torch.where(empty, torch.zeros_like(lse), lse - total))
    kept = torch.where(empty, torch.zeros_like(kept), kept)
    return (out * kept.unsqueeze(-1)).to(out.dtype), total


def _window(window_size: object) -> tuple[int, int]:
    if isinstance(window_size, (str, bytes, torch.Tensor)) or not isinstance(window_size, Sequence):
        raise TypeError(
            f"window_size must be a pair of ints (left, right), got {type(window_size).__name__}"
        )
    if len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {list(window_size)}")
    left, right = (as_int(side, "window_size") for side in window_size)
    if left < -1 or right < -1:
        raise ValueError(
            f"window_size sides must be >= 0, or -1 for unbounded, got ({left}, {right})"
        )
    return left, right


def _check_tensor(
    t: object, name: str, q: torch.Tensor, shapes: tuple[tuple[int, ...], ...], described: str
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) not in shapes:
        raise ValueError(
            f"{name} must have shape {described} = {list(shapes)}, got {list(t.shape)}"
        )
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
