"""Calls on pieces of a sequence with ``query_offset`` / ``key_offset`` (what context parallelism
makes): merged over the key pieces, they equal one call on the whole sequence for every variant,
forward and backward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from common import assert_close
from conftest import requires_cuda

from block_attn import ops

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
VARIANTS = {
    "window": dict(window_left=9, window_right=4),
    "causal window": dict(causal=True, window_left=7),
    "alibi": dict(alibi=True),
    "causal alibi, softcap": dict(causal=True, alibi=True, softcap=1.5),
    "dropout": dict(dropout_p=0.3),
    "all": dict(causal=True, window_left=11, alibi=True, softcap=2.0, dropout_p=0.2),
}
# Uneven pieces, so that their offsets and the bottom-right alignment differ.
CUTS = (0, 7, 19, 20, 33)


def _arguments(variant: dict, heads: int, device: str) -> dict:
    causal = variant.get("causal", False)
    arguments = dict(
        window_left=variant.get("window_left", -1),
        window_right=0 if causal else variant.get("window_right", -1),
        softcap=variant.get("softcap", 0.0),
        dropout_p=variant.get("dropout_p", 0.0),
    )
    if variant.get("alibi"):
        arguments["alibi_slopes"] = torch.linspace(0.05, 0.4, heads, device=device)
    if arguments["dropout_p"] > 0:
        arguments["dropout_seed_offset"] = torch.tensor([1234, 5], device=device)
    return arguments


def _offsets(length: int, device: str) -> torch.Tensor:
    return torch.tensor([0, length], dtype=torch.int32, device=device)


def _merge(out_acc, lse_acc, out, lse):
    """out_acc, lse_acc become the attention over both key sets (lse -inf: no key yet)."""
    total = torch.logaddexp(lse_acc, lse)
    keep = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
    out_acc.mul_(torch.exp(lse_acc - keep).unsqueeze(-1)).add_(
        out.to(out_acc.dtype) * torch.exp(lse - keep).unsqueeze(-1)
    )
    lse_acc.copy_(total)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pieces_with_offsets_equal_the_whole(device, name, dtype):
    variant = VARIANTS[name]
    causal = variant.get("causal", False)
    n, heads, dim = CUTS[-1], 3, 16
    generator = torch.Generator().manual_seed(11)
    q, k, v, grad_out = (
        torch.randn(2, heads, n, dim, generator=generator, dtype=dtype).to(device) for _ in range(4)
    )
    scale = 1 / math.sqrt(dim)
    arguments = _arguments(variant, heads, device)
    whole = _offsets(n, device)
    out, lse = ops.attention_forward(q, k, v, whole, whole, n, n, causal, scale, **arguments)
    grads = ops.attention_backward(
        grad_out, q, k, v, out, lse, None, whole, whole, n, n, causal, scale, False, **arguments
    )

    pieces = list(itertools.pairwise(CUTS))
    out_acc = torch.zeros_like(out, dtype=torch.float64)
    lse_acc = torch.full_like(lse, -math.inf, dtype=torch.float64)
    piece_grads = [torch.zeros_like(t) for t in (q, k, v)]
    for q0, q1 in pieces:
        for k0, k1 in pieces:
            if causal and k0 > q0:
                continue  # every key after every query
            same = (q0, q1) == (k0, k1)
            call = dict(arguments, query_offset=q0, key_offset=k0)
            shape = (_offsets(q1 - q0, device), _offsets(k1 - k0, device), q1 - q0, k1 - k0)
            qs, ks, vs = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            part, part_lse = ops.attention_forward(
                qs, ks, vs, *shape, causal and same, scale, **call
            )
            _merge(out_acc[:, :, q0:q1], lse_acc[:, :, q0:q1], part, part_lse.double())
            dq, dk, dv = ops.attention_backward(
                grad_out[:, :, q0:q1].contiguous(),
                qs,
                ks,
                vs,
                out[:, :, q0:q1].contiguous(),
                lse[:, :, q0:q1].contiguous(),
                None,
                *shape,
                causal and same,
                scale,
                False,
                **call,
            )
            piece_grads[0][:, :, q0:q1] += dq
            piece_grads[1][:, :, k0:k1] += dk
            piece_grads[2][:, :, k0:k1] += dv

    tolerance = 1e-9 if dtype == torch.float64 else 2e-5
    assert_close(out_acc.to(dtype), out, atol=tolerance, rtol=tolerance)
    assert_close(lse_acc.to(lse.dtype), lse, atol=tolerance, rtol=tolerance)
    for got, want in zip(piece_grads, grads, strict=True):
        assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_offsets_come_in_pairs():
    q = torch.randn(1, 1, 4, 8)
    offsets = _offsets(4, "cpu")
    with pytest.raises(ValueError, match="query_offset and key_offset must both be"):
        ops.attention_forward(q, q, q, offsets, offsets, 4, 4, False, 1.0, query_offset=3)
    with pytest.raises(ValueError, match="query_offset and key_offset must both be"):
        ops.attention_forward(
            q, q, q, offsets, offsets, 4, 4, False, 1.0, query_offset=-2, key_offset=-2
        )


def test_opcheck_with_offsets():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=generator) for _ in range(3))
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    slopes = torch.tensor([0.25, 0.5])
    seed_offset = torch.tensor([42, 7])
    args = (q, k, v, cu, cu, 14, 14, False, 0.25, 6, 0, 0.0, slopes, 0.2, seed_offset, 40, 21)
    torch.library.opcheck(torch.ops.block_attn.attention_forward.default, args)
    out, lse = ops.attention_forward(*args)
    backward_args = (torch.randn_like(out), q, k, v, out, lse, None, cu, cu, 14, 14, False, 0.25,
                     False, 6, 0, 0.0, slopes, 0.2, seed_offset, 40, 21)  # fmt: skip
    torch.library.opcheck(torch.ops.block_attn.attention_backward.default, backward_args)
