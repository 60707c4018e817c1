"""Float16 / bfloat16: errors bounded relative to the reference computed in the same dtype.

FlashAttention's criterion: the kernel may be at most 2x as far from the float64 answer as the
pure-PyTorch reference run in the low precision is (3x for gradients), plus a small floor.
"""

from __future__ import annotations

import pytest
import torch
from common import LAYOUTS, assert_within_reference_error, grads, make_qkv

import block_attn
from block_attn import reference

LOW_PRECISION = [torch.float16, torch.bfloat16]
CONFIGS = [
    # (B, Hq, Hkv, N, D, kwargs)
    pytest.param(2, 4, 2, 129, 64, {"block_size": 64}, id="block64-gqa"),
    pytest.param(1, 4, 1, 257, 80, {"cu_seqlens": [0, 5, 100, 101, 257]}, id="ragged-mqa"),
    pytest.param(1, 2, 2, 200, 128, {"causal": True}, id="causal"),
    pytest.param(1, 8, 2, 300, 256, {"cu_seqlens": [0, 150, 300], "causal": True}, id="both"),
    # Padded up to 256, where two CUDA warps share each key's dK and dV columns.
    pytest.param(1, 4, 2, 170, 192, {"cu_seqlens": [0, 40, 170]}, id="dim192-gqa"),
    pytest.param(2, 2, 2, 65, 16, {"block_size": 3, "causal": True}, id="small-blocks"),
    # Odd head dims: bf16 products pair adjacent elements, so the last pair is half padding.
    pytest.param(1, 2, 1, 150, 59, {"cu_seqlens": [0, 70, 150], "causal": True}, id="odd-dim"),
    pytest.param(1, 2, 2, 97, 1, {"block_size": 32}, id="dim-1"),
    # Long enough that the CPU backward splits the block into key ranges on 2+ threads.
    pytest.param(1, 2, 1, 700, 64, {"causal": True}, id="long-causal"),
]
OUTPUT_ATOL = 1e-3
GRAD_ATOL = 1e-3


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("B", "Hq", "Hkv", "N", "D", "kwargs"), CONFIGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_forward_and_backward(device, dtype, B, Hq, Hkv, N, D, kwargs, layout):
    q, k, v = make_qkv(
        B, Hq, Hkv, N, N, D, dtype=dtype, device=device, layout=layout, requires_grad=True
    )
    grad_out = torch.randn_like(q)
    out, lse = block_attn.attention(q, k, v, return_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == torch.float32

    low = tuple(t.detach().requires_grad_() for t in (q, k, v))
    high = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref_low, lse_low = reference.attention(*low, return_lse=True, **kwargs)
    ref_high, lse_high = reference.attention(*high, return_lse=True, **kwargs)

    assert_within_reference_error(
        out, ref_low, ref_high, factor=2, atol=OUTPUT_ATOL, what=f"{dtype} out"
    )
    assert_within_reference_error(
        lse, lse_low, lse_high, factor=2, atol=OUTPUT_ATOL, what=f"{dtype} lse"
    )

    ours = grads(out, (q, k, v), grad_out)
    ref_low_grads = grads(ref_low, low, grad_out)
    ref_high_grads = grads(ref_high, high, grad_out.double())
    for name, g, g_low, g_high in zip("qkv", ours, ref_low_grads, ref_high_grads, strict=True):
        assert g.dtype == dtype
        assert_within_reference_error(
            g, g_low, g_high, factor=3, atol=GRAD_ATOL, what=f"{dtype} grad_{name}"
        )
