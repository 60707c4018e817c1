"""Kernels on rows far longer than any tile: a block at the int32 edge, and float32 sums
over more terms than float32's 24-bit significand can count.

K and V are stride-0 expansions of one row, so that blocks of up to 2^31 - 1 keys need no
memory; with all scores equal and V = 1 every output is 1 and lse is score + log(keys).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_cuda

import block_attn

# More keys than a float32 accumulator can count one by one (2^24).
LONG = 2**25


@pytest.fixture
def threads(request):
    """Pins the CPU thread count to the test's ``threads`` parameter."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def constant_keys(keys: int, dtype: torch.dtype, key: float = 0.5):
    """One query row, and ``keys`` stride-0 key and value rows (K = ``key``, V = 1).

    Returns:
        q (1, 1, 1, 1), k and v (1, 1, keys, 1).
    """
    q = torch.ones(1, 1, 1, 1, dtype=dtype)
    k = torch.full((1, 1, 1, 1), key, dtype=dtype).expand(1, 1, keys, 1)
    v = torch.ones(1, 1, 1, 1, dtype=dtype).expand(1, 1, keys, 1)
    return q, k, v


@pytest.mark.slow
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_block_of_int32_max_keys_returns(threads):
    # Causal, one query: it sees every key; two threads split the keys into ranges.
    keys = 2**31 - 1
    out, lse = block_attn.attention(
        *constant_keys(keys, torch.float32), causal=True, return_lse=True
    )
    want_lse = 0.5 + math.log(keys)
    assert out.item() == pytest.approx(1.0, abs=1e-6), f"out {out.item()} for V = 1"
    assert lse.item() == pytest.approx(want_lse, rel=1e-6), f"lse {lse.item()}, want {want_lse}"


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        pytest.param(torch.float32, 1e-6, id="float32"),
        pytest.param(torch.bfloat16, 0.0, id="bfloat16"),
        pytest.param(torch.float16, 0.0, id="float16"),
    ],
)
def test_long_row_output_counts_every_key(threads, dtype, tolerance):
    out, lse = block_attn.attention(*constant_keys(LONG, dtype), return_lse=True)
    want_lse = 0.5 + math.log(LONG)
    assert out.double().item() == pytest.approx(1.0, abs=tolerance), (
        f"out {out.item()} for V = 1 over {LONG} keys ({dtype}, {threads} threads)"
    )
    assert lse.item() == pytest.approx(want_lse, rel=1e-6), f"lse {lse.item()}, want {want_lse}"


@pytest.mark.parametrize("threads", [1], indirect=True)
def test_long_column_value_grad_counts_every_query(threads):
    # dV of the one key sums P · dO = 1 over every query.
    q = torch.ones(1, 1, 1, 1).expand(1, 1, LONG, 1).requires_grad_()
    k = torch.ones(1, 1, 1, 1, requires_grad=True)
    v = torch.ones(1, 1, 1, 1, requires_grad=True)
    out = block_attn.attention(q, k, v)
    out.backward(torch.ones(1, 1, 1, 1).expand(1, 1, LONG, 1))
    assert v.grad.item() == pytest.approx(LONG, rel=1e-6), f"dV {v.grad.item()}, want {LONG}"
    assert k.grad.item() == 0.0, f"dK {k.grad.item()}, want 0 (dS = P · (dP - Delta) = 0)"


@pytest.mark.parametrize("threads", [1], indirect=True)
def test_rows_longer_than_a_partial_sum_match_reference(threads):
    # 4500 keys and queries: past the 4096 keys (and queries) a thread sums before adding the
    # partial sum to its compensated total. Scores grow along the keys, so the running maxima
    # keep rescaling the totals after they are first added to.
    n, dim = 4500, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(1, 1, n, dim, generator=gen) + 0.5
    ramp = torch.linspace(0, 3, n).view(1, 1, n, 1)
    k = ramp + 0.1 * torch.randn(1, 1, n, dim, generator=gen)
    v = torch.randn(1, 1, n, dim, generator=gen)
    grad_out = torch.randn(1, 1, n, dim, generator=gen)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    out = block_attn.attention(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*wide)
    want_grads = torch.autograd.grad(want, wide, grad_out.double())
    names = ("out", "dq", "dk", "dv")
    for name, got, ref in zip(names, (out, *grads), (want, *want_grads), strict=True):
        error = (got.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert error <= 1e-5 * scale, f"{name}: max error {error:.3g} against max {scale:.3g}"


def constant_rows_cuda(queries: int, keys: int, dtype: torch.dtype):
    """q (1, 2, queries, 64) of ones/8, k (1, 2, keys, 64) = 1/8 and v = 1, as stride-0 rows."""
    q = torch.full((1, 2, 1, 64), 0.125, dtype=dtype, device="cuda").expand(1, 2, queries, 64)
    k = torch.full((1, 2, 1, 64), 0.125, dtype=dtype, device="cuda").expand(1, 2, keys, 64)
    v = torch.ones(1, 2, 1, 64, dtype=dtype, device="cuda").expand(1, 2, keys, 64)
    return q, k, v


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("queries", [1, 200], ids=["decoding", "tile"])
def test_cuda_long_row_output_counts_every_key(dtype, queries):
    """Past 2^24 keys per row: every kernel family the plan picks (decoding, tensor-core,
    Hopper, simple for float32) must still count every key."""
    out, lse = block_attn.attention(*constant_rows_cuda(queries, LONG, dtype), return_lse=True)
    torch.cuda.synchronize()
    assert (out.float() - 1).abs().max().item() <= 1e-3, f"out {out.float().min().item()}"
    want_lse = 0.125 * 0.125 * 64 / 8 + math.log(LONG)  # scale 1/sqrt(64)
    assert (lse - want_lse).abs().max().item() <= 1e-3 * want_lse


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # float16 overflows 2^25
def test_cuda_long_column_value_grad_counts_every_query(dtype):
    q = torch.ones(1, 1, 1, 64, dtype=dtype, device="cuda").expand(1, 1, LONG, 64)
    q = q.requires_grad_()
    k = torch.ones(1, 1, 1, 64, dtype=dtype, device="cuda", requires_grad=True)
    v = torch.ones(1, 1, 1, 64, dtype=dtype, device="cuda", requires_grad=True)
    out = block_attn.attention(q, k, v)
    out.backward(torch.ones(1, 1, 1, 64, dtype=dtype, device="cuda").expand(1, 1, LONG, 64))
    got = v.grad.float().max().item()
    assert got == pytest.approx(LONG, rel=1e-2), f"dV {got}, want {LONG}"
