"""Attention dropout in the kernels: the mask is the rule of block_attn.dropout_mask bit for bit,
whatever the thread count; kernel and reference agree given equal generator states; gradients,
opcheck, torch.compile; the keep rate is 1 - p."""

from __future__ import annotations

import pytest
import torch
from common import assert_close, assert_within_reference_error, make_qkv
from conftest import requires_cuda

import block_attn
from block_attn import ops, reference
from block_attn.dropout_mask import keep_mask


def kernel_mask(p: float, offsets: list[int], seed: int, threads: int = 0) -> torch.Tensor:
    """The kernel's keep decisions (B, Hq, N, N) over blocks ``offsets``, read off its output.

    With q = 0 every allowed key has probability 1/L (L its block's length), and with v the
    identity over keys out[i, j] = keep(i, j) / (L (1 - p)).
    """
    n = offsets[-1]
    q = torch.zeros(2, 3, n, n, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).expand(2, 3, n, n)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        out = block_attn.attention(q, q, v, cu_seqlens=offsets, dropout_p=p, generator=generator)
    finally:
        torch.set_num_threads(before)
    return out != 0


def rule_mask(p: float, offsets: list[int], seed: int) -> torch.Tensor:
    n = offsets[-1]
    generator = torch.Generator().manual_seed(seed)
    seed_offset = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)
    rows = torch.arange(n)
    keep = keep_mask(seed_offset, p, 2, 3, rows, rows)
    block = torch.bucketize(rows, torch.tensor(offsets[1:-1]), right=True)
    return keep & (block[:, None] == block[None, :])


@pytest.mark.parametrize("threads", [1, 2])
def test_mask_is_the_rule_bit_for_bit(threads):
    offsets = [0, 70, 75, 333]  # keys tiles of several sizes, quads cut by block starts
    got = kernel_mask(0.3, offsets, seed=11, threads=threads)
    want = rule_mask(0.3, offsets, seed=11)
    assert torch.equal(got, want), f"{int((got != want).sum())} decisions differ from the rule"


def test_keep_rate_and_seeds():
    offsets = [0, 600]
    p = 0.25
    first = kernel_mask(p, offsets, seed=1)
    kept = first.double().mean().item()
    count = first.numel()
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs(kept - (1 - p)) < 4 * sigma, f"keep rate {kept:.5f}, expected {1 - p} ± {4 * sigma}"
    assert not torch.equal(first, kernel_mask(p, offsets, seed=2)), "two seeds gave one mask"


VARIANTS = {
    "plain": {},
    "window": dict(window_size=(30, 3)),
    "softcap-alibi": dict(softcap=2.0, alibi_slopes="heads"),
    "sinks": dict(sinks=True),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_matches_reference_with_equal_generators(variant, dtype, layout):
    q, k, v = make_qkv(2, 4, 2, 131, 197, 40, dtype=dtype, layout=layout)
    kwargs = dict(variant, cu_seqlens=[0, 5, 70, 131], cu_seqlens_k=[0, 9, 150, 190], causal=True)
    if kwargs.get("alibi_slopes") == "heads":
        kwargs["alibi_slopes"] = torch.rand(4) * 0.5
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.randn(4, dtype=torch.float64 if dtype == torch.float64 else None)
    grad_out = torch.randn_like(q)

    def run(fn, precision):
        leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
        call = dict(kwargs)
        if "sinks" in call:
            call["sinks"] = call["sinks"].to(precision if precision == torch.float64 else None)
        generator = torch.Generator().manual_seed(7)
        out = fn(*leaves, dropout_p=0.2, generator=generator, **call)
        return (out, *torch.autograd.grad(out, leaves, grad_out.to(precision)))

    ours = run(block_attn.attention, dtype)
    exact = run(reference.attention, torch.float64)
    names = ("out", "grad_q", "grad_k", "grad_v")
    if dtype == torch.float64:
        for name, got, want in zip(names, ours, exact, strict=True):
            assert_close(got, want, atol=1e-10, rtol=1e-9, what=name)
        return
    low = run(reference.attention, dtype)
    for name, got, lo, want in zip(names, ours, low, exact, strict=True):
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        factor = 2 if name == "out" else 3
        assert_within_reference_error(got, lo, want, factor=factor, atol=atol, what=name)


def test_gradcheck():
    q, k, v = make_qkv(1, 2, 1, 19, 19, 8, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        generator = torch.Generator().manual_seed(3)
        return block_attn.attention(
            q, k, v, cu_seqlens=[0, 7, 19], causal=True, dropout_p=0.3, generator=generator
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    seed_offset = torch.tensor([123456789, -5], dtype=torch.int64)
    args = (q, k, v, cu, cu, 27, 27, True, 0.25, -1, -1, 0.0, None, 0.4, seed_offset)
    torch.library.opcheck(torch.ops.block_attn.attention_forward.default, args)
    out, lse = ops.attention_forward(*args)
    backward_args = (torch.randn_like(out), q, k, v, out, lse, None, cu, cu, 27, 27, True, 0.25,
                     False, -1, -1, 0.0, None, 0.4, seed_offset)  # fmt: skip
    torch.library.opcheck(torch.ops.block_attn.attention_backward.default, backward_args)


def test_compile_fullgraph_draws_like_eager():
    q, k, v = make_qkv(1, 2, 1, 50, 50, 16)

    def fn(q, k, v):
        return block_attn.attention(q, k, v, causal=True, dropout_p=0.5)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(q, k, v)
    torch.manual_seed(5)
    assert_close(got, fn(q, k, v), atol=1e-6, rtol=1e-6, what="compiled")


def test_no_grad_still_drops_and_default_generator_reproduces():
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    with torch.no_grad():
        torch.manual_seed(9)
        dropped = block_attn.attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(9)
        again = block_attn.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, block_attn.attention(q, k, v))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=0.1, generator=5), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8)
    with pytest.raises(error, match=match):
        block_attn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    ("seed_offset", "match"),
    [
        (None, "dropout_p > 0 needs dropout_seed_offset"),
        (torch.zeros(3, dtype=torch.int64), "must be a contiguous int64 tensor of shape"),
        (torch.zeros(2, dtype=torch.int32), "must be a contiguous int64 tensor of shape"),
    ],
)
def test_operator_checks_seed_offset(seed_offset, match):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        torch.ops.block_attn.attention_forward(
            q, k, v, cu, cu, 8, 8, False, 1.0, -1, -1, 0.0, None, 0.5, seed_offset
        )


@requires_cuda
def test_cuda_mask_is_the_cpu_mask():
    """The same seed and offset give bitwise the same mask on CPU and CUDA."""
    n = 300
    offsets = [0, 70, 75, n]
    seed_offset = torch.tensor([-8_123_456_789_012_345_678, 42], dtype=torch.int64)
    masks = []
    for device in ("cpu", "cuda"):
        q = torch.zeros(2, 3, n, n, dtype=torch.float64, device=device)
        v = torch.eye(n, dtype=torch.float64, device=device).expand(2, 3, n, n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        settings = (225, 225, False, 1.0, -1, -1, 0.0, None, 0.3, seed_offset.to(device))
        out, _ = ops.attention_forward(q, q, v, cu, cu, *settings)
        masks.append(out.cpu() != 0)
    assert torch.equal(masks[0], masks[1]), f"{int((masks[0] != masks[1]).sum())} decisions differ"
