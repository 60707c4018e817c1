"""Small forward+backward cases for compute-sanitizer, each checked against the reference.

Run under ``compute-sanitizer --tool memcheck|racecheck|initcheck`` with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (so every tensor is its own allocation and an
out-of-bounds access is not hidden inside the caching allocator's pool). Exits 1 if any case
fails or is wrong, so the sanitizer's own exit code and ours can both fail the step.

Covers bf16/fp16/fp32/fp64, fixed blocks, ragged cu_seqlens, causal, GQA/MQA, and head dims 64, 128
and 80 (and 256 and 192 in bf16/fp16), at lengths just off the kernels' tile sizes; and a few tokens
per sequence against longer key blocks of their own (the split-key decoding forward, whose CTAs
merge their warps' results in shared memory). Then, on CUDA, the raw operators with offsets that
break their contract (past the end, negative, decreasing, a block longer than max_seqlen, key blocks
of a decoding call past the end or decreasing): CUDA does not check those values (that would wait
for the GPU), so what matters is that no kernel reads or writes outside the tensors, which memcheck
sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

OUTPUT_FACTOR = 2.0
GRADIENT_FACTOR = 3.0
ABSOLUTE_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


@dataclass
class Case:
    dtype: torch.dtype
    head_dim: int
    heads_q: int
    heads_kv: int
    seqlen: int
    block_size: int | None = None
    cu_seqlens: list[int] | None = None
    causal: bool = False
    batch: int = 2
    cu_seqlens_k: list[int] | None = None  # key blocks of their own (keys: its last offset)

    @property
    def seqlen_k(self) -> int:
        return self.cu_seqlens_k[-1] if self.cu_seqlens_k else self.seqlen

    @property
    def name(self) -> str:
        blocks = (
            f"b{self.block_size}"
            if self.block_size
            else f"cu{len(self.cu_seqlens) - 1}"
            if self.cu_seqlens
            else "full"
        )
        dtype = str(self.dtype).removeprefix("torch.")
        keys = f"-k{self.seqlen_k}" if self.cu_seqlens_k else ""
        return (
            f"{dtype}-d{self.head_dim}-h{self.heads_q}/{self.heads_kv}-n{self.seqlen}{keys}-"
            f"{blocks}{'-causal' if self.causal else ''}"
        )

    def kwargs(self) -> dict:
        kwargs = {"block_size": self.block_size, "cu_seqlens": self.cu_seqlens}
        if self.cu_seqlens_k:
            kwargs["cu_seqlens_k"] = self.cu_seqlens_k
        return {**kwargs, "causal": self.causal}


RAGGED = [0, 1, 17, 80, 145, 209, 211]  # a 1-token block, lengths off 64/128 tiles


def all_cases() -> list[Case]:
    """Each dtype meets every head dim; structures and head layouts rotate among them."""
    structures = [
        {"block_size": 64},
        {"cu_seqlens": RAGGED},
        {"causal": True},
        {"cu_seqlens": RAGGED, "causal": True},
        {"block_size": 48, "causal": True},
    ]
    heads = [(4, 4), (4, 2), (4, 1)]
    cases = []
    i = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for head_dim in (64, 128, 80):
            structure = structures[i % len(structures)]
            heads_q, heads_kv = heads[i % len(heads)]
            seqlen = RAGGED[-1] if "cu_seqlens" in structure else 130 + i
            cases.append(Case(dtype, head_dim, heads_q, heads_kv, seqlen, **structure))
            i += 1
    # 1-5 new tokens against caches of 300, 1 and 399 keys (one of them shorter than the query
    # block); heads 6:2 put rows across two 16-lane tiles.
    decoding = {"cu_seqlens": [0, 1, 6, 7], "cu_seqlens_k": [0, 300, 301, 700]}
    cases += [
        Case(torch.bfloat16, 128, 8, 2, 7, **decoding, causal=True),
        Case(torch.float16, 64, 6, 2, 7, **decoding),
        Case(torch.bfloat16, 80, 4, 1, 7, **decoding, causal=True),
    ]
    # Above head_dim 128 two warps share each key of the backward's dK/dV, one per column half.
    cases += [
        Case(torch.bfloat16, 256, 4, 2, RAGGED[-1], cu_seqlens=RAGGED, causal=True),
        Case(torch.float16, 192, 2, 1, 150, block_size=64),
    ]
    return cases


def forward_backward(fn, inputs, dtype, kwargs):
    q, k, v, dout = (x.to(dtype) for x in inputs)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def run_case(case: Case, attention, reference, device: str) -> list[str]:
    """Problems found (empty when the case passes)."""
    gen = torch.Generator().manual_seed(0)
    shape_q = (case.batch, case.heads_q, case.seqlen, case.head_dim)
    shape_kv = (case.batch, case.heads_kv, case.seqlen_k, case.head_dim)
    inputs = [torch.randn(s, generator=gen).to(device) for s in (shape_q, shape_kv, shape_kv)]
    inputs.append(torch.randn(shape_q, generator=gen).to(device))
    exact = forward_backward(reference, inputs, torch.float64, case.kwargs())
    low = forward_backward(reference, inputs, case.dtype, case.kwargs())
    mine = forward_backward(attention, inputs, case.dtype, case.kwargs())
    if device == "cuda":
        torch.cuda.synchronize()
    problems = []
    floor = ABSOLUTE_FLOOR[case.dtype]
    for name, truth in exact.items():
        got = mine[name]
        if got.shape != truth.shape or got.dtype != low[name].dtype:
            problems.append(f"{name}: got {tuple(got.shape)} {got.dtype}")
            continue
        finite = torch.isfinite(truth)
        err = (got.double() - truth).abs().where(finite, 0.0)
        ref_err = (low[name].double() - truth).abs().where(finite, 0.0)
        factor = OUTPUT_FACTOR if name in ("out", "lse") else GRADIENT_FACTOR
        limit = factor * ref_err.max().item() + floor
        if not torch.equal(torch.isfinite(got), finite):
            problems.append(f"{name}: non-finite values where the reference has none")
        elif err.max().item() > limit:
            worst = divmod(int(err.argmax()), truth.shape[-1]) if truth.dim() else (0, 0)
            problems.append(
                f"{name}: max error {err.max().item():.3e} > {limit:.3e} "
                f"({factor}x reference error + {floor}), worst at flat row/col {worst}, "
                f"{int((err > limit).sum())} elements over"
            )
    return problems


# (name, offsets over 130 rows, max_seqlen[, key offsets, their max_seqlen]): none of them keeps
# the raw operators' contract. The last two take the decoding forward (short query blocks).
UNCHECKED_OFFSETS = [
    ("past-the-end", [0, 40, 230], 190),
    ("negative", [-5, 40, 130], 135),
    ("decreasing", [0, 90, 40, 130], 130),
    ("longer-than-max", [0, 130], 16),
    ("decoding-keys-past-the-end", [0, 1, 2, 3], 1, [0, 100, 200, 300], 200),
    ("decoding-keys-decreasing", [0, 1, 2, 3], 1, [-20, 110, 60, 130], 130),
]


def run_unchecked_offsets(device: str) -> list[tuple[str, list[str]]]:
    """The raw forward and both backward modes on offsets outside the contract, per kernel
    family (Hopper or mma.sync bf16 at head_dim 64 and 128, the simple float32 kernels)."""
    results = []
    seqlen = 130
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 64)):
        gen = torch.Generator().manual_seed(1)
        q, k, v, dout = (
            torch.randn(1, 2, seqlen, head_dim, generator=gen).to(device, dtype) for _ in range(4)
        )
        for name, offsets, max_len, *keys in UNCHECKED_OFFSETS:
            offsets_k, max_len_k = keys if keys else (offsets, max_len)
            label = f"unchecked-offsets-{str(dtype).removeprefix('torch.')}-d{head_dim}-{name}"
            cu = torch.tensor(offsets, dtype=torch.int32, device=device)
            cu_k = torch.tensor(offsets_k, dtype=torch.int32, device=device)
            problems = []
            try:
                out, lse = torch.ops.block_attn.attention_forward(
                    q, k, v, cu, cu_k, max_len, max_len_k, True, head_dim**-0.5
                )
                for deterministic in (False, True):
                    torch.ops.block_attn.attention_backward(
                        dout, q, k, v, out, lse, None, cu, cu_k, max_len, max_len_k, True,
                        head_dim**-0.5, deterministic,
                    )  # fmt: skip
                torch.cuda.synchronize()
            except Exception as error:
                problems.append(f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
            results.append((label, problems))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", choices=["ours", "reference"], default="ours")
    parser.add_argument("--max-cases", type=int, default=0, help="run only the first N cases")
    parser.add_argument(
        "--no-unchecked-offsets",
        action="store_true",
        help="skip the raw ops on out-of-contract offsets (run by default on CUDA)",
    )
    args = parser.parse_args(argv)

    import block_attn.reference

    reference = block_attn.reference.attention
    if args.impl == "reference":
        attention = reference
    else:
        import block_attn

        attention = block_attn.attention
    cases = all_cases()
    if args.max_cases:
        cases = cases[: args.max_cases]
    failed = 0
    for case in cases:
        start = time.perf_counter()
        try:
            problems = run_case(case, attention, reference, args.device)
        except Exception as error:
            lines = str(error).strip().splitlines()
            problems = [f"{type(error).__name__}: {lines[0][:300] if lines else ''}"]
        seconds = time.perf_counter() - start
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {case.name:<44} {seconds:6.2f} s", flush=True)
        for problem in problems:
            print(f"     {problem}", flush=True)
        failed += bool(problems)
    total = len(cases)
    unchecked = not (args.no_unchecked_offsets or args.max_cases)
    if args.device == "cuda" and args.impl == "ours" and unchecked:
        for label, problems in run_unchecked_offsets(args.device):
            print(f"{'ok  ' if not problems else 'FAIL'} {label}", flush=True)
            for problem in problems:
                print(f"     {problem}", flush=True)
            failed += bool(problems)
            total += 1
    print(f"{total - failed}/{total} cases passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
