"""Queries against their own cached keys: block_attn with ``cu_seqlens_k`` against what a user
would otherwise write, on the same inputs in one process.

Usage (repo root, extension built in place):
    python -m bench.decode_bench                 # CPU, ~1 minute on 2 cores
    python -m bench.decode_bench --device cuda

Workloads: several sequences each add 1 token (decoding) or a chunk of 16 (chunked prefill)
against its own key/value cache, causal aligned bottom-right, B=1, GQA 32/8 or 64/8 heads,
16/16, or MQA 32/1 (one sequence: a single tile, whose keys the CPU forward splits over its
threads). The CUDA list is in bfloat16 (where the split-key decoding kernel runs) and adds a batch
of 64 sequences.
Peers:
- ``sdpa-loop``: one ``scaled_dot_product_attention`` call per sequence (``enable_gqa``; an
  explicit bottom-right mask for chunks), outputs concatenated;
- ``sdpa-dense-mask``: one SDPA call over all sequences with the (Nq, Nk) block mask;
- for a padded cache (``padded-cache-*``: a (B, L, Hkv, D) cache whose slots are filled to
  different lengths, read through ``padded_cache_blocks``), ``sdpa-padding-mask``: one SDPA
  call on the cache with a (B, 1, 1, L) mask of the valid rows, instead of the dense mask;
- on CUDA, ``block_attn-no-split``: block_attn with ``BLOCK_ATTN_DECODE_KERNEL=0``, the
  general forward (one query head per tile, no key split), to measure what the decoding kernel
  gains.
Peers run interleaved, one call each per round (on CUDA, ``--calls`` calls between two
synchronisations, so short calls are not timed by their launch latency); times are medians over
the rounds after a warm-up. ``KV GB/s`` counts the (valid) key and value bytes read once. Writes
``decode_<device>.json`` and ``decode_<device>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

import block_attn
from bench.timing import time_interleaved_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class DecodeWorkload:
    name: str
    sequences: int
    new_tokens: int  # queries per sequence
    cached_keys: int  # keys per sequence, the new tokens' own included
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str
    # A padded (static) cache: each sequence has a slot of cached_keys rows, of which a seeded
    # random 1/4 to all are valid (one new token each).
    padded: bool = False


WORKLOADS = [
    DecodeWorkload("decode-gqa-d128-f32", 8, 1, 2048, 32, 8, 128, "float32"),
    DecodeWorkload("decode-gqa-d128-bf16", 8, 1, 2048, 32, 8, 128, "bfloat16"),
    DecodeWorkload("decode-gqa8-d128-bf16", 8, 1, 2048, 64, 8, 128, "bfloat16"),
    DecodeWorkload("decode-mha-d64-f32", 8, 1, 512, 16, 16, 64, "float32"),
    DecodeWorkload("decode-long-gqa-d128-f32", 1, 1, 16384, 32, 8, 128, "float32"),
    DecodeWorkload("decode-long-mqa-d128-f32", 1, 1, 16384, 32, 1, 128, "float32"),
    DecodeWorkload("chunk16-gqa-d128-f32", 4, 16, 4096, 32, 8, 128, "float32"),
    DecodeWorkload("padded-cache-gqa-d128-f32", 8, 1, 4096, 32, 8, 128, "float32", padded=True),
]
# Most telling first: the results are written after every workload, so a run cut short keeps them.
CUDA_WORKLOADS = [
    DecodeWorkload("decode-gqa-d128-bf16", 8, 1, 2048, 32, 8, 128, "bfloat16"),
    DecodeWorkload("decode-long-gqa-d128-bf16", 1, 1, 16384, 32, 8, 128, "bfloat16"),
    DecodeWorkload("decode-batch64-gqa-d128-bf16", 64, 1, 4096, 32, 8, 128, "bfloat16"),
    DecodeWorkload("chunk16-gqa-d128-bf16", 4, 16, 4096, 32, 8, 128, "bfloat16"),
    DecodeWorkload("decode-gqa8-d128-bf16", 8, 1, 2048, 64, 8, 128, "bfloat16"),
    DecodeWorkload("decode-mha-d64-bf16", 8, 1, 512, 16, 16, 64, "bfloat16"),
    DecodeWorkload("padded-cache-gqa-d128-bf16", 16, 1, 4096, 32, 8, 128, "bfloat16", True),
]


def make_inputs(w: DecodeWorkload, device: str):
    dtype = getattr(torch, w.dtype)
    q = torch.randn(
        1, w.heads_q, w.sequences * w.new_tokens, w.head_dim, dtype=dtype, device=device
    )
    k = torch.randn(
        1, w.heads_kv, w.sequences * w.cached_keys, w.head_dim, dtype=dtype, device=device
    )
    v = torch.randn_like(k)
    offsets_q = list(range(0, w.sequences * w.new_tokens + 1, w.new_tokens))
    offsets_k = list(range(0, w.sequences * w.cached_keys + 1, w.cached_keys))
    return q, k, v, offsets_q, offsets_k


def make_peers(w: DecodeWorkload, q, k, v, offsets_q, offsets_k) -> dict[str, Callable]:
    # Query i of a sequence sees its cache up to its own position (bottom-right alignment).
    local = torch.ones(w.new_tokens, w.cached_keys, dtype=torch.bool, device=q.device)
    local = local.tril(w.cached_keys - w.new_tokens)
    spans = list(itertools.pairwise(zip(offsets_q, offsets_k, strict=True)))
    dense = torch.block_diag(*[local] * w.sequences)

    def ours():
        return block_attn.attention(
            q, k, v, cu_seqlens=offsets_q, cu_seqlens_k=offsets_k, causal=True
        )

    def loop():
        outs = []
        for (q0, k0), (q1, k1) in spans:
            mask = None if w.new_tokens == 1 else local
            outs.append(
                sdpa(
                    q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, enable_gqa=True
                )
            )
        return torch.cat(outs, dim=2)

    def dense_mask():
        return sdpa(q, k, v, attn_mask=dense, enable_gqa=True)

    peers = {"block_attn": ours, "sdpa-loop": loop, "sdpa-dense-mask": dense_mask}
    if q.is_cuda:
        peers["block_attn-no-split"] = with_decode_kernel_off(ours)
    return peers


def with_decode_kernel_off(fn: Callable) -> Callable:
    """fn with BLOCK_ATTN_DECODE_KERNEL=0 (the general CUDA forward), read by every call."""

    def run():
        os.environ["BLOCK_ATTN_DECODE_KERNEL"] = "0"
        try:
            return fn()
        finally:
            del os.environ["BLOCK_ATTN_DECODE_KERNEL"]

    return run


def padded_cache_peers(w: DecodeWorkload, device: str) -> tuple[dict[str, Callable], int]:
    """Peers on a (B, L, Hkv, D) cache with per-sequence valid lengths, each returning
    (B, Hq, 1, D); and the bytes of the valid key and value rows."""
    dtype = getattr(torch, w.dtype)
    lengths = torch.randint(
        w.cached_keys // 4,
        w.cached_keys + 1,
        (w.sequences,),
        generator=torch.Generator().manual_seed(1),
    ).tolist()
    shape_q = (w.sequences, 1, w.heads_q, w.head_dim)
    q = torch.randn(shape_q, dtype=dtype, device=device)
    k = torch.randn(w.sequences, w.cached_keys, w.heads_kv, w.head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    blocks = block_attn.padded_cache_blocks(lengths, w.cached_keys)
    slots = torch.arange(w.cached_keys, device=device)
    valid = slots < torch.tensor(lengths, device=device)[:, None]  # (B, L)

    def rows(x):  # (B, n, H, D) -> (1, H, B * n, D), a view
        return x.flatten(0, 1).unsqueeze(0).transpose(1, 2)

    def ours():
        out = block_attn.attention(rows(q), rows(k), rows(v), causal=True, **blocks)
        return out[0].transpose(0, 1).unsqueeze(2)  # (1, Hq, B, D) -> (B, Hq, 1, D)

    def padding_mask():
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return sdpa(qt, kt, vt, attn_mask=valid[:, None, None, :], enable_gqa=True)

    def loop():
        outs = []
        for i, length in enumerate(lengths):
            qi, ki, vi = (
                x[i : i + 1, :n].transpose(1, 2) for x, n in ((q, 1), (k, length), (v, length))
            )
            outs.append(sdpa(qi, ki, vi, enable_gqa=True))
        return torch.cat(outs)

    peers = {"block_attn": ours, "sdpa-loop": loop, "sdpa-padding-mask": padding_mask}
    if device == "cuda":
        peers["block_attn-no-split"] = with_decode_kernel_off(ours)
    kv_bytes = 2 * sum(lengths) * w.heads_kv * w.head_dim * k.element_size()
    return peers, kv_bytes


def measure(w: DecodeWorkload, device: str, rounds: int, calls: int) -> list[dict]:
    """calls: calls per timed round on CUDA (one on CPU)."""
    if w.padded:
        peers, kv_bytes = padded_cache_peers(w, device)
    else:
        q, k, v, offsets_q, offsets_k = make_inputs(w, device)
        peers = make_peers(w, q, k, v, offsets_q, offsets_k)
        kv_bytes = 2 * k.numel() * k.element_size()
    expected = peers["sdpa-loop"]().double()
    errors = {name: float((fn().double() - expected).abs().max()) for name, fn in peers.items()}
    calls = calls if device == "cuda" else 1
    # The error check above was each peer's warm-up call.
    timings = time_interleaved_ms(peers, device, rounds, warmup=0, calls=calls)
    ours_ms = timings["block_attn"]["ms"]
    rows = []
    for name in peers:
        ms = timings[name]["ms"]
        rows.append(
            {
                "workload": w.name,
                "peer": name,
                "ms": ms,
                "min_ms": timings[name]["min_ms"],
                "kv_gb_per_s": kv_bytes / ms / 1e6,
                "peer_over_ours": ms / ours_ms,
                "max_abs_diff_vs_sdpa_loop": errors[name],
            }
        )
    return rows


def environment(device: str) -> dict:
    """The CPU or GPU benchmark's environment record (imported lazily: each needs its own
    dependencies)."""
    if device == "cuda":
        from bench.gpu_bench import environment as gpu_environment

        return gpu_environment("cuda", "ours")
    from bench.cpu_bench import environment as cpu_environment

    return {**cpu_environment(), "device": "cpu"}


def markdown(env: dict, rows: list[dict]) -> str:
    machine = env.get("device_name") or f"{env['cpu_model']} · {env['torch_threads']} threads"
    lines = [
        f"# block_attn decoding benchmark ({env['device']})",
        "",
        f"{env['date']} · {machine} · torch {env['torch']}",
        "",
        "Medians of interleaved rounds after a warm-up; `peer/ours` above 1 means block_attn is "
        "faster. KV GB/s: key and value bytes read once per call.",
        "",
        "| workload | peer | ms | KV GB/s | peer/ours | max diff vs sdpa-loop |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['peer']} | {r['ms']:.2f} | {r['kv_gb_per_s']:.1f} | "
            f"{r['peer_over_ours']:.2f} | {r['max_abs_diff_vs_sdpa_loop']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed round on CUDA")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    workloads = CUDA_WORKLOADS if args.device == "cuda" else WORKLOADS
    env = {**environment(args.device), "workloads": [asdict(w) for w in workloads]}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"decode_{args.device}")
    rows = []
    for w in workloads:
        measured = measure(w, args.device, args.rounds, args.calls)
        rows += measured
        for r in measured:
            print(
                f"{r['workload']:28s} {r['peer']:19s} {r['ms']:8.3f} ms  "
                f"{r['kv_gb_per_s']:7.1f} GB/s  x{r['peer_over_ours']:.2f}",
                flush=True,
            )
        with open(stem + ".json", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
