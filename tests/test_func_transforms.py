"""torch.func transforms (grad, vmap, jacrev, vjp) over block_attn.attention.

The expected values come from the same transform applied to ``block_attn.reference`` (pure
PyTorch, which functorch differentiates and maps natively), in float64.
"""

from __future__ import annotations

import pytest
import torch

import block_attn
from block_attn import reference

DT = torch.float64
BLOCKS = dict(cu_seqlens=[0, 3, 3, 9], cu_seqlens_k=[0, 4, 5, 11])


def qkv(B=2, Hq=4, Hkv=2, Nq=9, Nk=11, D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(B, H, N, D, dtype=DT, generator=gen)
        for H, N in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))
    )


def ours(q, k, v, **kw):
    return block_attn.attention(q, k, v, causal=True, scale=0.3, **BLOCKS, **kw)


def theirs(q, k, v, **kw):
    return reference.attention(q, k, v, causal=True, scale=0.3, **BLOCKS, **kw)


def loss_of(attn):
    """A loss that reaches every output and, through lse, the lse gradient path too."""

    def loss(q, k, v):
        out, lse = attn(q, k, v, return_lse=True)
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out.square() * torch.linspace(0.5, 1.5, out.shape[-1], dtype=DT)).sum() + (
            finite.sin().sum()
        )

    return loss


def assert_all_close(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_grad_matches_reference():
    q, k, v = qkv()
    grads = torch.func.grad(loss_of(ours), argnums=(0, 1, 2))(q, k, v)
    expected = torch.func.grad(loss_of(theirs), argnums=(0, 1, 2))(q, k, v)
    assert_all_close(grads, expected)


def test_vjp_matches_reference():
    q, k, v = qkv(seed=1)
    out, pullback = torch.func.vjp(ours, q, k, v)
    expected_out, expected_pullback = torch.func.vjp(theirs, q, k, v)
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(out, expected_out)
    assert_all_close(pullback(cotangent), expected_pullback(cotangent))


@pytest.mark.parametrize("mapped_dim", [0, 2])
def test_vmap_forward_over_queries(mapped_dim):
    q, k, v = qkv(seed=2)
    queries = torch.stack([q, q.flip(-1), 2 * q], dim=mapped_dim)
    mapped = torch.func.vmap(ours, in_dims=(mapped_dim, None, None))(queries, k, v)
    expected = torch.stack([theirs(x, k, v) for x in queries.unbind(mapped_dim)])
    torch.testing.assert_close(mapped, expected, rtol=1e-12, atol=1e-12)


def test_vmap_of_grad_gives_per_sample_gradients():
    q, k, v = qkv(B=1, seed=3)
    queries = torch.randn(5, *q.shape, dtype=DT)
    values = torch.randn(5, *v.shape, dtype=DT)
    per_sample = torch.func.vmap(
        torch.func.grad(loss_of(ours), argnums=(0, 1, 2)), in_dims=(0, None, 0)
    )(queries, k, values)
    for i in range(5):
        expected = torch.func.grad(loss_of(theirs), argnums=(0, 1, 2))(queries[i], k, values[i])
        assert_all_close([g[i] for g in per_sample], expected)


def test_jacrev_matches_reference():
    q, k, v = qkv(B=1, Hq=2, Hkv=1, seed=4)
    jacobians = torch.func.jacrev(ours, argnums=(0, 1, 2))(q, k, v)
    expected = torch.func.jacrev(theirs, argnums=(0, 1, 2))(q, k, v)
    assert_all_close(jacobians, expected)


def test_vmap_over_offsets_is_refused():
    q, k, v = qkv(B=1, Nq=6, Nk=6)
    offsets = torch.tensor([[0, 2, 6], [0, 3, 6]], dtype=torch.int32)

    def call(cu):
        return block_attn.attention(q, k, v, cu_seqlens=cu, max_seqlen=6)

    with pytest.raises(ValueError, match="vmap over block offsets"):
        torch.func.vmap(call)(offsets)


def test_second_derivative_through_func_raises():
    q, k, v = qkv(seed=5)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda q: torch.func.grad(loss_of(ours))(q, k, v).sum())(q)


def test_eager_autograd_still_uses_the_operator():
    q, k, v = (t.requires_grad_() for t in qkv(seed=6))
    out = ours(q, k, v)
    assert "GeneratedBackwardFor_block_attn_attention_forward" in type(out.grad_fn).__name__
