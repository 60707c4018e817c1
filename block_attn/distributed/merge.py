"""Exact merging of partial attention results through their log-sum-exp."""

from __future__ import annotations

import torch

__all__ = ["merge_into"]


def merge_into(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> None:
    """Folds one partial result into a running one, in place.

    With ``L = logaddexp(lse_acc, lse)``: ``out_acc = exp(lse_acc - L) out_acc + exp(lse - L) out``
    and ``lse_acc = L``. A row whose ``lse`` is -inf (it saw no key) contributes nothing; a
    row that has seen no key in either stays 0 with lse -inf.

    Args:
        out_acc: (B, H, n, D) float32 or float64 running output, updated in place.
        lse_acc: (B, H, n) running log-sum-exp (float64 for float64 inputs), updated in place.
        out: (B, H, n, D) partial output (any floating dtype).
        lse: (B, H, n) partial log-sum-exp, lse_acc's dtype.
    """
    new_lse = torch.logaddexp(lse_acc, lse)
    # Where both are -inf, subtracting -inf would give NaN; shift by 0 instead.
    shift = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    weight_acc = torch.exp(lse_acc - shift).unsqueeze(-1).to(out_acc.dtype)
    weight_new = torch.exp(lse - shift).unsqueeze(-1).to(out_acc.dtype)
    out_acc.mul_(weight_acc).add_(weight_new * out.to(out_acc.dtype))
    lse_acc.copy_(new_lse)
