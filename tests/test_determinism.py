"""Determinism and block isolation, both bitwise; the CUDA backward's two dQ paths; NaN handling.

On CUDA the float16/bfloat16 backward sums dQ with atomics unless
``torch.use_deterministic_algorithms(True)`` is on, so the bitwise tests turn it on.
"""

from __future__ import annotations

import pytest
import torch
from common import make_qkv

import block_attn

CASES = [
    pytest.param({"cu_seqlens": [0, 30, 31, 150, 257]}, id="ragged"),
    pytest.param({"block_size": 64, "causal": True}, id="fixed-causal"),
    pytest.param({"causal": True}, id="causal"),
]


def forward_backward(q, k, v, grad_out, grad_lse, kwargs):
    out, lse = block_attn.attention(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
    return (out, lse, *grads)


def assert_bitwise_equal(first, second, names, context):
    for name, a, b in zip(names, first, second, strict=True):
        differing = int((a != b).sum()) if a.shape == b.shape else -1
        assert torch.equal(a, b), f"{context}: {name} differs in {differing} elements"


@pytest.mark.parametrize("kwargs", CASES)
def test_repeated_runs_are_bitwise_identical(device, deterministic_algorithms, kwargs):
    q, k, v = make_qkv(2, 8, 2, 257, 257, 64, device=device, requires_grad=True)
    grad_out, grad_lse = torch.randn_like(q), torch.randn(2, 8, 257, device=device)
    first = forward_backward(q, k, v, grad_out, grad_lse, kwargs)
    for run in range(1, 4):
        again = forward_backward(q, k, v, grad_out, grad_lse, kwargs)
        names = ("out", "lse", "grad_q", "grad_k", "grad_v")
        assert_bitwise_equal(again, first, names, f"run {run} vs run 0")


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_changing_one_block_leaves_others_bitwise_unchanged(
    device, deterministic_algorithms, causal
):
    offsets = [0, 40, 41, 140, 200]
    q, k, v = make_qkv(1, 4, 2, 200, 200, 32, device=device)
    grad_out, grad_lse = torch.randn_like(q), torch.randn(1, 4, 200, device=device)
    kwargs = {"cu_seqlens": offsets, "causal": causal}
    before = forward_backward(*(t.requires_grad_() for t in (q, k, v)), grad_out, grad_lse, kwargs)

    changed = 2  # tokens [41, 140)
    start, end = offsets[changed], offsets[changed + 1]
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, start:end] = torch.randn_like(t[:, :, start:end]) * 3
    after = forward_backward(
        *(t.requires_grad_() for t in (q2, k2, v2)), grad_out, grad_lse, kwargs
    )

    keep = torch.ones(200, dtype=torch.bool, device=device)
    keep[start:end] = False
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    other_blocks = [t[:, :, keep] for t in before], [t[:, :, keep] for t in after]
    assert_bitwise_equal(*other_blocks, names, f"blocks other than [{start}, {end})")
    assert not torch.equal(before[0][:, :, start:end], after[0][:, :, start:end])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 128, 256])
def test_deterministic_and_default_backward_agree(device, dtype, D):
    """The deterministic mode changes only how dQ is summed: dK and dV agree bitwise, dQ to
    rounding (on CUDA the default sums it with atomics in float32)."""
    if device == "cpu":
        pytest.skip("the CPU backward has one path: the deterministic mode does not change it")
    q, k, v = make_qkv(2, 4, 2, 300, 300, D, dtype=dtype, device=device, requires_grad=True)
    grad_out = torch.randn_like(q)
    kwargs = {"cu_seqlens": [0, 100, 101, 300], "causal": True}

    def gradients():
        out = block_attn.attention(q, k, v, **kwargs)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    default = gradients()
    was_enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = gradients()
    finally:
        torch.use_deterministic_algorithms(was_enabled)
    assert_bitwise_equal(default[1:], deterministic[1:], ("grad_k", "grad_v"), "default vs det.")
    # Each path rounds float32 sums to dtype once; they may land one unit of dtype apart.
    unit = torch.finfo(dtype).eps
    largest = deterministic[0].abs().max().item()
    diff = (default[0].float() - deterministic[0].float()).abs().max().item()
    assert diff <= 2 * unit * largest, f"grad_q differs by {diff} (largest value {largest})"


def test_nan_propagates_only_to_rows_that_see_it(device):
    """Documented: NaN in k reaches the rows that attend it; other blocks are unaffected."""
    offsets = [0, 16, 40, 64]
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, device=device)
    clean = block_attn.attention(q, k, v, cu_seqlens=offsets, causal=True)
    k_nan = k.clone()
    k_nan[:, :, 25, 3] = float("nan")  # key 25, inside block [16, 40)
    out = block_attn.attention(q, k_nan, v, cu_seqlens=offsets, causal=True)

    sees_nan = out[:, :, 25:40].isnan().any(dim=-1)
    assert sees_nan.all(), "every query in [25, 40) attends key 25 and must be NaN"
    outside = torch.cat([out[:, :, :16], out[:, :, 40:]], dim=2)
    clean_outside = torch.cat([clean[:, :, :16], clean[:, :, 40:]], dim=2)
    assert torch.equal(outside, clean_outside), "other blocks must be bitwise unchanged"
    before_key = out[:, :, 16:25]
    assert torch.isfinite(before_key).all(), "causal queries before the NaN key never see it"
    torch.testing.assert_close(before_key, clean[:, :, 16:25])


@pytest.mark.parametrize(
    ("dtype", "head_dim"),
    [(torch.float32, 8), (torch.bfloat16, 8), (torch.bfloat16, 64), (torch.float16, 128)],
)
def test_nan_query_stays_in_its_row(device, dtype, head_dim):
    """A NaN query makes its own row NaN (all its scores are NaN), not zero; other rows keep."""
    q, k, v = make_qkv(1, 1, 1, 32, 32, head_dim, dtype=dtype, device=device)
    clean = block_attn.attention(q, k, v, block_size=8)
    q_nan = q.clone()
    q_nan[0, 0, 10, 0] = float("nan")
    out = block_attn.attention(q_nan, k, v, block_size=8)
    assert out[0, 0, 10].isnan().all(), f"row 10 should be NaN, got {out[0, 0, 10]}"
    others = torch.ones(32, dtype=torch.bool, device=device)
    others[10] = False
    assert torch.equal(out[:, :, others], clean[:, :, others])


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_deterministic_mode_is_independent_of_the_thread_count(
    deterministic_algorithms, restore_threads
):
    """Long key ranges split over threads are planned for a fixed count in deterministic mode, so
    the forward and the backward give the same bits on 1, 2 and 3 threads (CPU)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 64, generator=gen)
    k, v = (torch.randn(1, 2, 200_000, 64, generator=gen) for _ in range(2))
    lengths = [700, 5, 40]
    x = [torch.randn(1, 4, sum(lengths), 24, generator=gen) for _ in range(3)]
    grad_out = torch.randn(1, 4, sum(lengths), 24, generator=gen)
    offsets = [0, 700, 705, 745]

    def run():
        out = block_attn.attention(q, k, v)
        inputs = [t.clone().requires_grad_() for t in x]
        long_out = block_attn.attention(*inputs, cu_seqlens=offsets, causal=True)
        return (out, *torch.autograd.grad(long_out, inputs, grad_out))

    results = {}
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results[threads] = run()
    names = ("out", "grad_q", "grad_k", "grad_v")
    for threads in (2, 3):
        assert_bitwise_equal(results[threads], results[1], names, f"{threads} threads vs 1")
