"""Attention sinks (``sinks=``): each row's normaliser gains exp(sinks[h]); against the reference,
with gradients of the sinks themselves."""

from __future__ import annotations

import pytest
import torch
from common import assert_close, assert_within_reference_error, make_qkv

import block_attn
from block_attn import reference

OFFSETS_Q = [0, 5, 5, 17, 30]
OFFSETS_K = [0, 9, 12, 20, 26]  # ends before Nk = 29: the last keys are in no block


def problem(device, dtype, layout="bhnd", seed=0):
    torch.manual_seed(seed)
    q, k, v = make_qkv(2, 4, 2, 33, 29, 24, dtype=dtype, device=device, layout=layout)
    sinks_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sinks = torch.randn(4, device=device, dtype=sinks_dtype) * 2
    return q, k, v, sinks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("kept", [False, True], ids=["listed", "kept"])
def test_forward_and_backward_match_reference(device, dtype, layout, kept):
    q, k, v, sinks = problem(device, dtype, layout)
    blocks = dict(cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K)
    if kept:
        blocks = dict(
            cu_seqlens=torch.tensor(OFFSETS_Q, dtype=torch.int32, device=device),
            cu_seqlens_k=torch.tensor(OFFSETS_K, dtype=torch.int32, device=device),
            max_seqlen=13,
            max_seqlen_k=9,
        )
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = block_attn.attention(
        *leaves[:3], causal=True, sinks=leaves[3], return_lse=True, **blocks
    )
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))

    def run_reference(precision):
        ref_leaves = [t.detach().to(precision).requires_grad_() for t in leaves]
        ref_out, ref_lse = reference.attention(
            *ref_leaves[:3], cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True,
            sinks=ref_leaves[3], return_lse=True,
        )  # fmt: skip
        ref_grads = torch.autograd.grad(
            (ref_out, ref_lse), ref_leaves, (grad_out.to(precision), grad_lse.to(ref_lse.dtype))
        )
        return ref_out, ref_lse, ref_grads

    exact_out, exact_lse, exact_grads = run_reference(torch.float64)
    assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5, what="lse")
    names = ("out", "grad_q", "grad_k", "grad_v", "grad_sinks")
    if dtype == torch.float64:
        for name, got, want in zip(names, (out, *grads), (exact_out, *exact_grads), strict=True):
            assert_close(got, want, atol=1e-10, rtol=1e-10, what=name)
        return
    low_out, _, low_grads = run_reference(dtype)
    low_grads = (*low_grads[:3], low_grads[3])
    for name, got, low, want in zip(
        names, (out, *grads), (low_out, *low_grads), (exact_out, *exact_grads), strict=True
    ):
        assert_within_reference_error(got, low, want, factor=3.0, atol=1e-4, what=name)


def test_rows_without_keys_output_zero_with_the_sink_as_lse():
    q, k, v, sinks = problem("cpu", torch.float32)
    out, lse = block_attn.attention(
        q, k, v, cu_seqlens=[0, 4, 33], cu_seqlens_k=[0, 0, 29], sinks=sinks, return_lse=True
    )
    assert (out[:, :, :4] == 0).all()
    assert torch.equal(lse[:, :, :4], sinks.view(1, 4, 1).expand(2, 4, 4))
    # Rows after the last offset stay outside every block: no sink there either.
    tail, tail_lse = block_attn.attention(
        q, k, v, cu_seqlens=[0, 30], cu_seqlens_k=[0, 29], sinks=sinks, return_lse=True
    )
    assert (tail[:, :, 30:] == 0).all()
    assert torch.equal(tail_lse[:, :, 30:], sinks.view(1, 4, 1).expand(2, 4, 3))


def test_long_key_range_split_over_threads():
    """One query against many keys: the CPU splits the keys over threads and merges them."""
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 6000, 16, dtype=torch.float64)
    sinks = torch.tensor([0.5, 3.0], dtype=torch.float64)
    out = block_attn.attention(q, k, v, sinks=sinks)
    assert_close(out, reference.attention(q, k, v, sinks=sinks), atol=1e-12, rtol=1e-10)


def test_gradcheck_with_sinks():
    q, k, v = make_qkv(1, 2, 1, 6, 7, 4, dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, sinks):
        return block_attn.attention(
            q, k, v, cu_seqlens=[0, 2, 6], cu_seqlens_k=[0, 4, 7], causal=True, sinks=sinks,
            return_lse=True,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_sinks_under_compile_and_func_grad():
    q, k, v, sinks = problem("cpu", torch.float32)
    kwargs = dict(cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K, causal=True)
    eager = block_attn.attention(q, k, v, sinks=sinks, **kwargs)
    compiled = torch.compile(
        lambda q, k, v, s: block_attn.attention(q, k, v, sinks=s, **kwargs), fullgraph=True
    )
    assert_close(compiled(q, k, v, sinks), eager, atol=1e-6, rtol=1e-6)
    grad = torch.func.grad(
        lambda s: block_attn.attention(q, k, v, sinks=s, **kwargs).square().sum()
    )(sinks)
    expected = torch.func.grad(
        lambda s: reference.attention(q, k, v, sinks=s, **kwargs).square().sum()
    )(sinks)
    assert_close(grad, expected, atol=1e-4, rtol=1e-4, what="grad_sinks")


@pytest.mark.parametrize(
    ("sinks", "error", "match"),
    [
        ([0.0] * 4, TypeError, r"sinks must be a torch.Tensor"),
        (torch.zeros(3), ValueError, r"sinks must have shape \(Hq,\)"),
        (torch.zeros(4, dtype=torch.int32), TypeError, r"sinks must be a floating-point"),
        (torch.zeros(4, device="meta"), ValueError, r"sinks must be on q's device"),
    ],
)
def test_bad_sinks(sinks, error, match):
    q, k, v, _ = problem("cpu", torch.float32)
    with pytest.raises(error, match=match):
        block_attn.attention(q, k, v, sinks=sinks)


def test_module_learns_its_sinks():
    torch.manual_seed(2)
    module = block_attn.nn.MultiheadBlockAttention(
        32, 4, num_kv_heads=2, causal=True, sinks=True, dtype=torch.float64
    )
    assert module.sinks.shape == (4,) and (module.sinks == 0).all()
    with torch.no_grad():
        module.sinks.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    out, weights = module(x, cu_seqlens=[0, 4, 10], need_weights=True)
    out.square().sum().backward()
    assert module.sinks.grad is not None and module.sinks.grad.abs().sum() > 0
    # The weights sum to what the sink leaves of each row.
    q = module.q_proj(x).view(2, 10, 4, 8).transpose(1, 2)
    k = module.k_proj(x).view(2, 10, 2, 8).transpose(1, 2)
    v = module.v_proj(x).view(2, 10, 2, 8).transpose(1, 2)
    _, lse = reference.attention(
        q, k, v, cu_seqlens=[0, 4, 10], causal=True, sinks=module.sinks, return_lse=True
    )
    left = 1 - torch.exp(module.sinks.view(1, 4, 1) - lse)
    assert_close(weights.sum(-1), left, atol=1e-12, rtol=1e-12, what="row sums")
    assert "sinks=True" in repr(module)
