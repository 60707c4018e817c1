"""Benchmark workloads: block structures, their FLOP and byte counts, and their inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

DOC_SEED = 1234
DOC_SIGMA = 1.0


def document_lengths(total: int, mean: float, low: int, high: int, seed: int = DOC_SEED):
    """Lognormal document lengths (fixed seed) clipped to [low, high], summing to ``total``.

    The lognormal's mu is set so that its mean before clipping is ``mean``. The last document
    is cut short so the lengths sum to ``total`` (it keeps at least one token).
    """
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - DOC_SIGMA**2 / 2
    lengths: list[int] = []
    while sum(lengths) < total:
        length = int(np.clip(round(rng.lognormal(mu, DOC_SIGMA)), low, high))
        lengths.append(min(length, total - sum(lengths)))
    return lengths


@dataclass
class Workload:
    """One attention problem: B=1, H heads, N tokens, head dim D, blocks of ``lengths``.

    Attributes:
        name: short label for tables, e.g. ``docs-causal-d128``.
        kind: ``causal`` (one block, causal), ``docs`` (packed documents) or ``fixed``.
        lengths: block lengths, summing to ``seqlen``.
        block_size: the fixed block size for ``kind == "fixed"``, else None.
    """

    name: str
    kind: str
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    lengths: list[int]
    block_size: int | None = None
    dtype: torch.dtype = torch.bfloat16
    offsets: list[int] = field(init=False)

    def __post_init__(self):
        assert sum(self.lengths) == self.seqlen, (sum(self.lengths), self.seqlen)
        self.offsets = [0, *np.cumsum(self.lengths).tolist()]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def forward_flops(self) -> float:
        """Useful forward FLOPs: 4·H·D·Σb² without a causal mask, 2·H·D·Σb(b+1) with one."""
        if self.causal:
            return 2.0 * self.heads * self.head_dim * sum(b * (b + 1) for b in self.lengths)
        return 4.0 * self.heads * self.head_dim * sum(b * b for b in self.lengths)

    def flops(self, mode: str) -> float:
        """Forward FLOPs, or 3.5× for forward+backward (backward counted as 2.5× forward)."""
        return self.forward_flops() * (1.0 if mode == "fwd" else 3.5)

    def forward_bytes(self) -> int:
        """Least forward traffic: read q, k, v, write out and the float32 lse."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        tokens = self.heads * self.seqlen
        return 4 * tokens * self.head_dim * elem + 4 * tokens

    def make_inputs(self, device: str, seed: int = 0):
        """q, k, v (1, H, N, D) and dout, random normal, in the workload's dtype."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shape = (1, self.heads, self.seqlen, self.head_dim)
        q, k, v, dout = (
            torch.randn(shape, generator=gen, dtype=torch.float32).to(device, self.dtype)
            for _ in range(4)
        )
        return q, k, v, dout

    def ours_kwargs(self) -> dict:
        """Keyword arguments for ``block_attn.attention``."""
        if self.kind == "fixed":
            return {"block_size": self.block_size, "causal": self.causal}
        if self.kind == "docs":
            return {"cu_seqlens": self.offsets, "causal": self.causal}
        return {"causal": self.causal}

    def scaled(self, seqlen: int, heads: int) -> Workload:
        """The same structure at a smaller size (for accuracy checks against float64)."""
        if self.kind == "fixed":
            lengths = fixed_lengths(seqlen, self.block_size)
        elif self.kind == "docs":
            lengths = document_lengths(seqlen, *_doc_params(seqlen))
        else:
            lengths = [seqlen]
        return Workload(
            self.name,
            self.kind,
            heads,
            seqlen,
            self.head_dim,
            self.causal,
            lengths,
            self.block_size,
            self.dtype,
        )


def fixed_lengths(seqlen: int, block_size: int) -> list[int]:
    full, rest = divmod(seqlen, block_size)
    return [block_size] * full + ([rest] if rest else [])


def _doc_params(seqlen: int) -> tuple[float, int, int]:
    """Mean ≈ 600 clipped to [16, 4096] at full size; scaled down for tiny smoke-test sizes."""
    if seqlen >= 8192:
        return 600.0, 16, 4096
    return max(32.0, seqlen / 16), 16, max(64, seqlen // 4)


def make_workloads(
    seqlen: int, heads: int, block_sizes: list[int], small_d: bool, wide_d: bool = False
):
    """The suite: causal full attention, packed documents (causal and not), fixed blocks.

    D=128 throughout; with ``small_d`` also D=64 for causal, causal documents and the smallest
    fixed block (the cheap variants); with ``wide_d`` last causal documents at D=256 (as in
    models with 256-wide heads).
    """
    docs = document_lengths(seqlen, *_doc_params(seqlen))
    workloads = [
        Workload("causal-d128", "causal", heads, seqlen, 128, True, [seqlen]),
        Workload("docs-causal-d128", "docs", heads, seqlen, 128, True, docs),
        Workload("docs-full-d128", "docs", heads, seqlen, 128, False, docs),
    ]
    for b in block_sizes:
        blocks = fixed_lengths(seqlen, b)
        workloads.append(Workload(f"fixed{b}-d128", "fixed", heads, seqlen, 128, False, blocks, b))
    if small_d:
        b = min(block_sizes)
        blocks = fixed_lengths(seqlen, b)
        workloads += [
            Workload("causal-d64", "causal", heads, seqlen, 64, True, [seqlen]),
            Workload("docs-causal-d64", "docs", heads, seqlen, 64, True, docs),
            Workload(f"fixed{b}-d64", "fixed", heads, seqlen, 64, False, blocks, b),
        ]
    if wide_d:
        workloads.append(Workload("docs-causal-d256", "docs", heads, seqlen, 256, True, docs))
    return workloads
