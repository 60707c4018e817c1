"""The raw operators: torch.library.opcheck and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from common import assert_close, make_qkv

import block_attn

forward_op = torch.ops.block_attn.attention_forward.default
backward_op = torch.ops.block_attn.attention_backward.default


def offsets(values: list[int], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def forward_samples(device: str) -> list[tuple]:
    """(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) argument tuples."""
    samples = []
    q, k, v = make_qkv(2, 4, 2, 9, 9, 16, device=device, requires_grad=True)
    samples.append((q, k, v, offsets([0, 4, 9], device), offsets([0, 4, 9], device), 5, 5))
    samples[-1] += (True, 0.25)
    q, k, v = make_qkv(1, 2, 2, 5, 12, 8, device=device, layout="bnhd")
    samples.append((q, k, v, offsets([0, 5], device), offsets([0, 12], device), 5, 12, True, 0.3))
    q, k, v = make_qkv(1, 3, 1, 10, 10, 32, dtype=torch.float64, device=device, requires_grad=True)
    cu = offsets([0, 1, 2, 10], device)
    samples.append((q, k, v, cu, cu, 8, 8, False, 0.1))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_forward(device, sample):
    torch.library.opcheck(forward_op, forward_samples(device)[sample])


@pytest.mark.parametrize("with_grad_lse", [False, True], ids=["no-grad_lse", "grad_lse"])
@pytest.mark.parametrize("sample", range(3))
def test_opcheck_backward(device, sample, with_grad_lse):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = forward_samples(device)[sample]
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = forward_op(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    args = (grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, max_q, max_k, causal, scale, False)
    torch.library.opcheck(backward_op, args)


def test_fake_kernel_keeps_layout():
    """Meta (fake) outputs have the shapes, dtypes and layout of the real ones."""
    q = torch.empty(2, 5, 3, 8, device="meta").transpose(1, 2)
    k = v = torch.empty(2, 3, 5, 8, device="meta")
    cu = torch.tensor([0, 5], dtype=torch.int32, device="meta")
    out, lse = forward_op(q, k, v, cu, cu, 5, 5, False, 0.5)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32


COMPILE_CASES = [
    pytest.param({"block_size": 5, "causal": True}, id="block_size"),
    pytest.param({"cu_seqlens": [0, 3, 11, 24]}, id="cu_seqlens-list"),
    pytest.param(
        {"cu_seqlens": [0, 3, 11, 24], "cu_seqlens_k": [0, 9, 10, 24], "causal": True},
        id="key-offsets",
    ),
    pytest.param("on-device", id="offsets-on-device"),
]


@pytest.mark.parametrize("kwargs", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(device, kwargs):
    torch._dynamo.reset()
    if kwargs == "on-device":
        offsets_q = torch.tensor([0, 3, 11, 24], dtype=torch.int32, device=device)
        offsets_k = torch.tensor([0, 9, 10, 24], device=device)  # int64: converted in the graph
        kwargs = {"cu_seqlens": offsets_q, "max_seqlen": 13, "cu_seqlens_k": offsets_k}
        kwargs.update(max_seqlen_k=14, causal=True)

    def loss_terms(q, k, v):
        out, lse = block_attn.attention(q, k, v, return_lse=True, **kwargs)
        return out, lse

    q, k, v = make_qkv(2, 4, 2, 24, 24, 16, device=device, requires_grad=True)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn(2, 4, 24, device=device)

    def run(fn):
        out, lse = fn(q, k, v)
        grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse))
        return (out, lse, *grads)

    eager = run(loss_terms)
    compiled = run(torch.compile(loss_terms, fullgraph=True))
    for name, a, b in zip(
        ("out", "lse", "grad_q", "grad_k", "grad_v"), compiled, eager, strict=True
    ):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what=f"compiled {name} vs eager")


def test_compiled_tensor_offsets_without_max_seqlen_say_what_to_pass():
    """Offsets read on the host cannot be traced: the error says how to pass them instead."""
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    offsets = torch.tensor([0, 5, 16])
    compiled = torch.compile(
        lambda q, k, v: block_attn.attention(q, k, v, cu_seqlens=offsets), fullgraph=True
    )
    with pytest.raises(Exception, match=r"pass it as a list, or .* together with\s+max_seqlen"):
        compiled(q, k, v)
