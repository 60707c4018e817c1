"""Random problems: dtype, shape, heads, layout and blocks drawn together from a seed, forward and
backward checked against the float64 reference.

The other tests vary one thing at a time over listed values; these meet combinations nobody
listed: key blocks of their own with GQA and transposed layouts, empty blocks beside
decoding-sized ones, odd head dims under a causal mask, offsets kept on the device. On CUDA the
problems reach every kernel family: simple, tensor-core, decoding and (on sm_90) Hopper.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
import torch
from common import assert_close, assert_within_reference_error, grads, make_qkv

import block_attn
from block_attn import reference

SEEDS = range(100)
HEAD_DIMS = (8, 16, 40, 64, 80, 96, 128, 160, 192, 256)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Float32/float64 against float64: sums over up to a few hundred keys and 256 dims.
TOLERANCE = {torch.float32: 3e-5, torch.float64: 1e-11}
LOW_PRECISION_ATOL = 1e-3  # as in test_low_precision: the floor under the relative criterion


@dataclass
class Problem:
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    layout: str
    causal: bool
    blocks: dict = field(default_factory=dict)  # block_size / cu_seqlens / cu_seqlens_k lists
    offsets_on_device: bool = False

    def kwargs(self, device: str) -> dict:
        kwargs = {"causal": self.causal, **self.blocks}
        if self.offsets_on_device:
            # Tensors on the device with upper bounds on the block lengths: never read on the
            # host (CUDA) or read and checked (CPU).
            for name, bound in (("cu_seqlens", "max_seqlen"), ("cu_seqlens_k", "max_seqlen_k")):
                if name in kwargs:
                    offsets = kwargs[name]
                    longest = max(b - a for a, b in itertools.pairwise(offsets))
                    kwargs[name] = torch.tensor(offsets, dtype=torch.int32, device=device)
                    kwargs[bound] = longest + 1
        return kwargs


def cut(total: int, pieces: int, rng: random.Random, allow_empty: bool) -> list[int]:
    """Offsets 0 = c0 <= ... <= c_pieces = total (strictly increasing unless allow_empty)."""
    if not allow_empty:
        pieces = min(pieces, total)
        return [0, *sorted(rng.sample(range(1, total), pieces - 1)), total]
    return [0, *sorted(rng.randint(0, total) for _ in range(pieces - 1)), total]


def random_problem(seed: int) -> Problem:
    rng = random.Random(seed)
    heads_kv = rng.choice((1, 2, 3))
    problem = Problem(
        dtype=DTYPES[seed % len(DTYPES)],
        batch=rng.choice((1, 2)),
        heads_q=heads_kv * rng.choice((1, 2, 4, 6)),
        heads_kv=heads_kv,
        seqlen_q=rng.randint(1, 300),
        seqlen_k=0,
        head_dim=rng.choice(HEAD_DIMS),
        layout=rng.choice(("bhnd", "bnhd")),
        causal=rng.random() < 0.5,
    )
    problem.seqlen_k = problem.seqlen_q
    kind = rng.choice(("full", "block_size", "cu_seqlens", "cu_seqlens", "decoding"))
    if kind == "full":
        problem.seqlen_k = rng.randint(1, 300)  # Nq != Nk: bottom-right causal alignment
    elif kind == "block_size":
        problem.blocks = {"block_size": rng.randint(1, 160)}
    elif kind == "cu_seqlens":
        offsets = cut(problem.seqlen_q, rng.randint(1, 6), rng, allow_empty=rng.random() < 0.3)
        problem.blocks = {"cu_seqlens": offsets}
        problem.offsets_on_device = rng.random() < 0.4
    else:
        # New tokens against caches of their own: 1-16 queries per block, 0-600 keys.
        blocks = rng.randint(1, 5)
        new_tokens = [rng.randint(0 if blocks > 1 else 1, 16) for _ in range(blocks)]
        cache = [rng.randint(0, 600) for _ in range(blocks)]
        problem.seqlen_q = max(sum(new_tokens), 1)
        new_tokens[-1] += problem.seqlen_q - sum(new_tokens)
        problem.seqlen_k = max(sum(cache), 1)
        cache[-1] += problem.seqlen_k - sum(cache)
        running_q, running_k = [0], [0]
        for n, c in zip(new_tokens, cache, strict=True):
            running_q.append(running_q[-1] + n)
            running_k.append(running_k[-1] + c)
        problem.blocks = {"cu_seqlens": running_q, "cu_seqlens_k": running_k}
        problem.offsets_on_device = rng.random() < 0.4
    return problem


def forward_backward(q, k, v, grad_out, kwargs, attention):
    out, lse = attention(q, k, v, return_lse=True, **kwargs)
    return (out, lse, *grads(out, (q, k, v), grad_out))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_problem(device, seed):
    problem = random_problem(seed)
    torch.manual_seed(seed)
    q, k, v = make_qkv(
        problem.batch,
        problem.heads_q,
        problem.heads_kv,
        problem.seqlen_q,
        problem.seqlen_k,
        problem.head_dim,
        dtype=problem.dtype,
        device=device,
        layout=problem.layout,
        requires_grad=True,
    )
    grad_out = torch.randn_like(q)
    ours = forward_backward(q, k, v, grad_out, problem.kwargs(device), block_attn.attention)

    host_kwargs = problem.kwargs("cpu") if problem.offsets_on_device else problem.kwargs(device)
    exact_inputs = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    exact = forward_backward(
        *exact_inputs, grad_out.cpu().double(), host_kwargs, reference.attention
    )
    names = ("out", "lse", "grad_q", "grad_k", "grad_v")
    if problem.dtype in TOLERANCE:
        tolerance = TOLERANCE[problem.dtype]
        for name, actual, expected in zip(names, ours, exact, strict=True):
            # lse is float32 for float32 inputs, float64 for float64 ones.
            atol = 1e-4 if name == "lse" and problem.dtype == torch.float32 else tolerance
            assert_close(actual, expected, atol=atol, rtol=atol, what=f"{problem} {name}")
        return
    low_inputs = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    low = forward_backward(*low_inputs, grad_out.cpu(), host_kwargs, reference.attention)
    for name, actual, low_ref, expected in zip(names, ours, low, exact, strict=True):
        factor = 2 if name in ("out", "lse") else 3
        what = f"{problem} {name}"
        assert_within_reference_error(
            actual, low_ref, expected, factor=factor, atol=LOW_PRECISION_ATOL, what=what
        )
