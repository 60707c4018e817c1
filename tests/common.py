"""Input builders, independent masks and comparisons with informative failure messages."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

LAYOUTS = ("bhnd", "bnhd")


def make_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    Nq: int,
    Nk: int,
    D: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    layout: str = "bhnd",
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D).

    ``layout="bnhd"`` gives transposed views of (B, N, H, D) tensors, the layout a
    projection ``x @ W`` reshaped per head produces. With ``requires_grad`` the underlying
    storage is a leaf; take gradients with ``torch.autograd.grad`` on the returned views.
    """

    def one(H: int, N: int) -> torch.Tensor:
        if layout == "bhnd":
            t = torch.randn(B, H, N, D, dtype=dtype, device=device)
            return t.requires_grad_(requires_grad)
        base = torch.randn(B, N, H, D, dtype=dtype, device=device).requires_grad_(requires_grad)
        return base.transpose(1, 2)

    return one(Hq, Nq), one(Hkv, Nk), one(Hkv, Nk)


def random_offsets(seqlen: int, rng: random.Random, max_blocks: int = 8) -> list[int]:
    """Ragged block offsets ``0 = c0 < ... < cm = seqlen`` with m random in [1, max_blocks]."""
    if seqlen <= 1:
        return [0, seqlen]
    num_blocks = rng.randint(1, min(seqlen, max_blocks))
    cuts = sorted(rng.sample(range(1, seqlen), num_blocks - 1))
    return [0, *cuts, seqlen]


@dataclass(frozen=True)
class MaskSpec:
    """How a test passes its blocks: ``kind`` is "full", "block_size" or "cu_seqlens".

    For "block_size", ``value`` is an int, "N" (one block) or "N+" (larger than N).
    For "cu_seqlens", ``value`` is the container: "list", "int32" or "int64", or "on-device"
    (int32 on the test's device, passed with ``max_seqlen`` so that it is never read on the host;
    ``max_seqlen`` is 3 above the longest block, as an upper bound may be), or "padded" (a list
    with empty blocks: first, after a cut, and N repeated at the end as when offsets are padded
    to a fixed count).
    """

    kind: str
    value: object = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value}"

    def resolve(self, seqlen: int, device: str, seed: int = 0) -> tuple[dict, list[int]]:
        """The keyword arguments for ``attention`` and the block offsets they describe."""
        if self.kind == "full":
            return {}, [0, seqlen]
        if self.kind == "block_size":
            size = {"N": seqlen, "N+": seqlen + 5}.get(self.value, self.value)
            return {"block_size": size}, [*range(0, seqlen, size), seqlen]
        offsets = random_offsets(seqlen, random.Random(seed))
        if self.value == "list":
            return {"cu_seqlens": offsets}, offsets
        if self.value == "padded":
            padded = [0, *offsets[:2], *offsets[1:], seqlen, seqlen]
            return {"cu_seqlens": padded}, padded
        if self.value == "on-device":
            cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
            longest = max(b - a for a, b in itertools.pairwise(offsets))
            return {"cu_seqlens": cu_seqlens, "max_seqlen": longest + 3}, offsets
        dtype = torch.int32 if self.value == "int32" else torch.int64
        return {"cu_seqlens": torch.tensor(offsets, dtype=dtype, device=device)}, offsets


MASKS = (
    MaskSpec("full"),
    MaskSpec("block_size", 1),
    MaskSpec("block_size", 3),
    MaskSpec("block_size", 64),
    MaskSpec("block_size", "N"),
    MaskSpec("block_size", "N+"),
    MaskSpec("cu_seqlens", "list"),
    MaskSpec("cu_seqlens", "padded"),
    MaskSpec("cu_seqlens", "int32"),
    MaskSpec("cu_seqlens", "int64"),
    MaskSpec("cu_seqlens", "on-device"),
)


def hand_mask(
    offsets: list[int], seqlen_q: int, seqlen_k: int, causal: bool, device: str = "cpu"
) -> torch.Tensor:
    """The (Nq, Nk) boolean mask built from first principles, not from ``BlockLayout``.

    Blocks need Nq == Nk; with one block ``[0, N]`` and Nq != Nk, causal is bottom-right
    aligned: query i sees key j iff j <= i + Nk - Nq.
    """
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    if len(offsets) == 2:
        allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
        return allowed & (j <= i + seqlen_k - seqlen_q) if causal else allowed
    bounds = torch.tensor(offsets[1:-1], device=device)
    block_q = torch.bucketize(i, bounds, right=True)
    block_k = torch.bucketize(j, bounds, right=True)
    allowed = block_q == block_k
    return allowed & (j <= i) if causal else allowed


def masked_scores(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Float64 scaled scores (B, Hq, Nq, Nk) with disallowed entries at -inf (GQA expanded)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.double(), k.transpose(-2, -1)) * scale
    return scores.masked_fill(~allowed, float("-inf"))


def sdpa_with_mask(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """PyTorch SDPA in float64 with an explicit boolean mask (GQA through enable_gqa)."""
    return torch.nn.functional.scaled_dot_product_attention(
        q.double(),
        k.double(),
        v.double(),
        attn_mask=allowed,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _describe_worst(
    what: str,
    failing: torch.Tensor,
    excess: torch.Tensor,
    actual: torch.Tensor,
    expected: torch.Tensor,
    criterion: str,
) -> str:
    num_failing = int(failing.sum())
    worst_flat = int(torch.argmax(torch.where(failing, excess, -torch.inf)).item())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst_flat), actual.shape))
    return (
        f"{what}: {num_failing} of {actual.numel()} elements fail {criterion}; worst at index "
        f"{index}: actual {actual[index].item()!r}, expected {expected[index].item()!r}, "
        f"|diff| {(actual[index] - expected[index]).abs().item():.3e}"
    )


def _failing_elements(
    actual: torch.Tensor, expected: torch.Tensor, allowed_error: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elements outside ``allowed_error``; equal infinities pass, any NaN mismatch fails."""
    same = (actual == expected) | (actual.isnan() & expected.isnan())
    diff = (actual - expected).abs()
    failing = ~same & ~(diff <= allowed_error)  # NaN diff counts as failing
    excess = torch.where(diff.isnan(), torch.inf, diff - allowed_error)
    return failing, excess


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    what: str = "output",
) -> None:
    """Elementwise |actual - expected| <= atol + rtol·|expected|, compared in float64."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if actual.numel() == 0:
        return
    allowed_error = atol + rtol * expected.abs()
    failing, excess = _failing_elements(actual, expected, allowed_error)
    assert not failing.any(), _describe_worst(
        what, failing, excess, actual, expected, f"atol={atol:g}, rtol={rtol:g}"
    )


def assert_within_reference_error(
    actual: torch.Tensor,
    low_precision_reference: torch.Tensor,
    high_precision_reference: torch.Tensor,
    *,
    factor: float,
    atol: float,
    what: str = "output",
) -> None:
    """FlashAttention's criterion: at most ``factor`` times the low-precision reference's error.

    Every element must satisfy |actual - ref64| <= factor · max|ref_low - ref64| + atol, where
    ref_low computes the same math in the dtype under test.
    """
    actual = actual.detach().double().cpu()
    expected = high_precision_reference.detach().double().cpu()
    baseline = (low_precision_reference.detach().double().cpu() - expected).abs()
    baseline_error = float(baseline.nan_to_num(0.0).max()) if baseline.numel() else 0.0
    bound = factor * baseline_error + atol
    failing, excess = _failing_elements(actual, expected, torch.tensor(bound))
    assert not failing.any(), _describe_worst(
        what,
        failing,
        excess,
        actual,
        expected,
        f"|err| <= {factor:g} x reference error {baseline_error:.3e} + {atol:g} = {bound:.3e}",
    )


def grads(
    output: torch.Tensor | tuple[torch.Tensor, ...],
    inputs: tuple[torch.Tensor, ...],
    grad_output: torch.Tensor | tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """d(output · grad_output)/d(inputs); unused inputs give zeros."""
    return torch.autograd.grad(
        output, inputs, grad_output, allow_unused=True, materialize_grads=True
    )
