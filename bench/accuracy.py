"""Accuracy of block_attn against a float64 reference, relative to the bf16 reference's error.

As in FlashAttention's tests: the kernel may be at most 2× as far from the float64 answer as
the low-precision reference is (3× for gradients), plus a small absolute floor.
"""

from __future__ import annotations

import torch

from bench.workloads import Workload

OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
ABSOLUTE_FLOOR = 1e-5


def forward_backward(fn, inputs, dtype, kwargs):
    q, k, v, dout = (x.to(dtype) for x in inputs)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def check(workload: Workload, ours, device: str) -> dict:
    """Max/mean abs error of ours and of the bf16 reference against float64, and their ratio."""
    entry = {
        "workload": workload.name,
        "seqlen": workload.seqlen,
        "heads": workload.heads,
        "head_dim": workload.head_dim,
    }
    try:
        import block_attn.reference

        reference = block_attn.reference.attention
        inputs = workload.make_inputs(device, seed=1)
        kwargs = workload.ours_kwargs()
        exact = forward_backward(reference, inputs, torch.float64, kwargs)
        low = forward_backward(reference, inputs, workload.dtype, kwargs)
        mine = forward_backward(ours, inputs, workload.dtype, kwargs)
    except Exception as error:
        lines = str(error).strip().splitlines()
        entry["status"] = "error"
        entry["note"] = f"{type(error).__name__}: {lines[0][:400] if lines else ''}"
        return entry
    entry["status"] = "ok"
    entry["met"] = True
    for name, truth in exact.items():
        ours_err = (mine[name].double() - truth).abs()
        ref_err = (low[name].double() - truth).abs()
        factor = OUTPUT_FACTOR if name == "out" else GRADIENT_FACTOR
        ratio = ours_err.max().item() / max(ref_err.max().item(), ABSOLUTE_FLOOR)
        entry[name] = {
            "ours_max": ours_err.max().item(),
            "ours_mean": ours_err.mean().item(),
            "ref_bf16_max": ref_err.max().item(),
            "ref_bf16_mean": ref_err.mean().item(),
            "ratio": ratio,
            "limit": factor,
            "met": ratio <= factor,
        }
        entry["met"] = entry["met"] and ratio <= factor
    return entry
