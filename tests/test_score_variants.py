"""Sliding window, softcap and ALiBi in the kernels: against the reference, alone and combined,
with blocks, separate key blocks, causal, GQA, both layouts and every dtype; gradcheck, opcheck,
torch.compile; a key outside the window changes nothing; a window covering every key is the plain
path bit for bit."""

from __future__ import annotations

import pytest
import torch
from common import assert_close, assert_within_reference_error, make_qkv
from conftest import requires_cuda

import block_attn
from block_attn import ops, reference

OFFSETS_Q = [0, 5, 5, 70, 131]
OFFSETS_K = [0, 9, 12, 150, 190]  # ends before Nk = 197: the last keys are in no block

VARIANTS = {
    "window-left": dict(window_size=(19, -1)),
    "window-right": dict(window_size=(-1, 7)),
    "window-both": dict(window_size=(23, 4)),
    "window-zero": dict(window_size=(0, 0)),
    "softcap": dict(softcap=1.5),
    "alibi-heads": dict(alibi_slopes="heads"),
    "alibi-batch": dict(alibi_slopes="batch"),
    "all": dict(window_size=(40, 9), softcap=2.0, alibi_slopes="batch"),
}


def with_slopes(variant: dict, batch: int, heads: int, device) -> dict:
    """The variant's keyword arguments, with ALiBi slopes made concrete."""
    kwargs = dict(variant)
    kind = kwargs.get("alibi_slopes")
    if kind is not None:
        shape = (heads,) if kind == "heads" else (batch, heads)
        kwargs["alibi_slopes"] = torch.rand(shape, device=device) * 0.5
    return kwargs


def run(fn, leaves, grad_out, **kwargs):
    out, lse = fn(*leaves, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, lse, grads


def check_against_reference(q, k, v, kwargs, dtype):
    """Kernel output, lse and gradients against the reference in float64 and in ``dtype``."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    out, lse, grads = run(block_attn.attention, leaves, grad_out, **kwargs)

    def run_reference(precision):
        ref_leaves = [t.detach().to(precision).requires_grad_() for t in leaves]
        return run(reference.attention, ref_leaves, grad_out.to(precision), **kwargs)

    exact_out, exact_lse, exact_grads = run_reference(torch.float64)
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows without keys differ from the reference"
    assert_close(lse[seen], exact_lse[seen], atol=1e-4, rtol=1e-5, what="lse")
    names = ("out", "grad_q", "grad_k", "grad_v")
    if dtype == torch.float64:
        for name, got, want in zip(names, (out, *grads), (exact_out, *exact_grads), strict=True):
            assert_close(got, want, atol=1e-10, rtol=1e-9, what=name)
        return
    low_out, _, low_grads = run_reference(dtype)
    for name, got, low, want in zip(
        names, (out, *grads), (low_out, *low_grads), (exact_out, *exact_grads), strict=True
    ):
        factor = 2 if name == "out" else 3
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        assert_within_reference_error(got, low, want, factor=factor, atol=atol, what=name)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_blocks_match_reference(variant, dtype, causal):
    q, k, v = make_qkv(2, 4, 2, 131, 197, 40, dtype=dtype)
    kwargs = with_slopes(variant, 2, 4, "cpu")
    blocks = dict(cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K)
    check_against_reference(q, k, v, dict(causal=causal, **blocks, **kwargs), dtype)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize(("seqlen_q", "seqlen_k"), [(300, 300), (70, 333), (333, 70), (1, 600)])
def test_one_block_matches_reference(variant, layout, seqlen_q, seqlen_k):
    """Long rows (several key tiles, split across threads), Nq != Nk bottom-right aligned."""
    q, k, v = make_qkv(1, 3, 1, seqlen_q, seqlen_k, 24, dtype=torch.float64, layout=layout)
    kwargs = with_slopes(variant, 1, 3, "cpu")
    check_against_reference(q, k, v, dict(causal=seqlen_q <= seqlen_k, **kwargs), torch.float64)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_gradcheck(variant):
    q, k, v = make_qkv(1, 2, 1, 21, 25, 8, dtype=torch.float64, requires_grad=True)
    kwargs = with_slopes(variant, 1, 2, "cpu")

    def fn(q, k, v):
        return block_attn.attention(
            q, k, v, cu_seqlens=[0, 6, 21], cu_seqlens_k=[0, 11, 25], causal=True, **kwargs
        )

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_window_skips_keys_outside_it():
    """Perturbing every key and value outside a query's window leaves its output bitwise equal."""
    q, k, v = make_qkv(1, 2, 2, 700, 700, 32)
    left, right = 100, 30
    out = block_attn.attention(q, k, v, window_size=(left, right))
    query = 400
    outside = torch.ones(700, dtype=torch.bool)
    outside[query - left : query + right + 1] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, outside] = torch.randn_like(k2[:, :, outside]) * 5
    v2[:, :, outside] = torch.randn_like(v2[:, :, outside]) * 5
    out2 = block_attn.attention(q, k2, v2, window_size=(left, right))
    assert torch.equal(out[:, :, query], out2[:, :, query])
    assert not torch.equal(out[:, :, query + right + 2], out2[:, :, query + right + 2])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_unbounded_and_covering_windows_are_the_plain_path(causal):
    q, k, v = make_qkv(2, 4, 2, 600, 600, 64, requires_grad=True)
    blocks = dict(cu_seqlens=[0, 100, 420, 600])
    grad_out = torch.randn_like(q)
    plain = run(block_attn.attention, (q, k, v), grad_out, causal=causal, **blocks)
    for window in [(-1, -1), (600, 600), (10_000, -1)]:
        windowed = run(block_attn.attention, (q, k, v), grad_out, causal=causal, window_size=window,
                       **blocks)  # fmt: skip
        pairs = zip((plain[0], plain[1], *plain[2]), (windowed[0], windowed[1], *windowed[2]),
                    strict=True)  # fmt: skip
        for a, b in pairs:
            assert torch.equal(a, b), f"window_size={window} differs from the plain path"


def test_opcheck():
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, requires_grad=True)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    slopes = torch.rand(4)
    args = (q, k, v, cu, cu, 27, 27, True, 0.25, 9, 0, 3.0, slopes)
    torch.library.opcheck(torch.ops.block_attn.attention_forward.default, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = ops.attention_forward(q, k, v, *args[3:])
    backward_args = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), cu, cu, 27,
                     27, True, 0.25, False, 9, 0, 3.0, slopes)  # fmt: skip
    torch.library.opcheck(torch.ops.block_attn.attention_backward.default, backward_args)


def test_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 1, 50, 50, 16)
    slopes = torch.rand(2)

    def fn(q, k, v):
        return block_attn.attention(
            q, k, v, causal=True, window_size=(12, 0), softcap=5.0, alibi_slopes=slopes
        )

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, k, v), fn(q, k, v), atol=1e-6, rtol=1e-6, what="compiled")


def test_vmap_with_batched_slopes():
    q, k, v = make_qkv(2, 3, 3, 30, 30, 8, dtype=torch.float64)
    slopes = torch.rand(2, 3)
    stacked = [t.unsqueeze(0).expand(4, *t.shape).clone() for t in (q, k, v)]

    def fn(q, k, v):
        return block_attn.attention(q, k, v, window_size=(5, 5), alibi_slopes=slopes)

    mapped = torch.func.vmap(fn)(*stacked)
    assert_close(mapped[2], fn(q, k, v), atol=1e-12, rtol=1e-12, what="vmapped")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(window_size=(-2, 0)), ValueError, "window_size sides must be >= 0"),
        (dict(window_size=(3,)), ValueError, "window_size must be a pair"),
        (dict(window_size=5), TypeError, "window_size must be a pair of ints"),
        (dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be a finite float >= 0"),
        (dict(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, "must be float32"),
        (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape"),
        (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes must be a torch.Tensor"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 8)
    with pytest.raises(error, match=match):
        block_attn.attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (9, -3, "window_size sides must be in"),
        (11, -0.5, "softcap must be a finite float >= 0"),
        (12, torch.rand(2, 2), "alibi_slopes must have shape"),
        (12, torch.rand(8)[::2], "alibi_slopes must have unit stride"),
    ],
)
def test_operator_checks_variants(index, value, match):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 8)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    args = [q, k, v, cu, cu, 8, 8, False, 1.0, -1, -1, 0.0, None]
    args[index] = value
    with pytest.raises(ValueError, match=match):
        torch.ops.block_attn.attention_forward(*args)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(variant, dtype):
    q, k, v = make_qkv(2, 4, 2, 131, 197, 40, dtype=dtype, device="cuda")
    kwargs = with_slopes(variant, 2, 4, "cuda")
    blocks = dict(cu_seqlens=OFFSETS_Q, cu_seqlens_k=OFFSETS_K)
    check_against_reference(q, k, v, dict(causal=True, **blocks, **kwargs), dtype)


def test_plain_causal_call_reaches_the_kernels_without_a_window(monkeypatch):
    """Causal alone is no window: it keeps to the plain kernels (on CUDA, the fast ones)."""
    seen = {}
    forward = block_attn.func_transforms.attention_forward

    def spy(*args):
        seen["window"] = args[9:11]
        return forward(*args)

    monkeypatch.setattr(block_attn.func_transforms, "attention_forward", spy)
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8)
    block_attn.attention(q, k, v, causal=True)
    assert seen["window"] == (-1, -1)


@pytest.mark.parametrize("threads", [1, 2])
def test_long_windowed_rows_match_a_chunked_reference(threads):
    """Blocks of 9000 keys: more query tiles per key range than one dK/dV sum takes, with a
    window, so the sums move into their totals only where the window touched them."""
    n, window = 9000, 2100
    q, k, v = make_qkv(1, 2, 1, n, n, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(q)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run(block_attn.attention, (q, k, v), grad_out, causal=True, window_size=(window, 0))
    finally:
        torch.set_num_threads(before)
    # Queries [a, b) see keys [a - window, b) only: the reference on that slice, aligned
    # bottom-right, is the same attention.
    pieces = []
    for a in range(0, n, 500):
        b, first = min(a + 500, n), max(a - window, 0)
        pieces.append(
            reference.attention(
                q[:, :, a:b], k[:, :, first:b], v[:, :, first:b], causal=True,
                window_size=(window, 0),
            )
        )  # fmt: skip
    expected_out = torch.cat(pieces, dim=2)
    expected = (expected_out, *torch.autograd.grad(expected_out, (q, k, v), grad_out))
    for name, got, want in zip(("out", "grad_q", "grad_k", "grad_v"), (ours[0], *ours[2]),
                               expected, strict=True):  # fmt: skip
        assert_close(got, want, atol=1e-10, rtol=1e-9, what=f"{name} with {threads} threads")
