"""Several sequences processed a chunk at a time against their own key/value caches.

Each step packs every unfinished sequence's next chunk of queries into one row and its keys so
far (cache plus chunk) into another, and makes one ``block_attn.attention`` call with
``cu_seqlens`` for the queries and ``cu_seqlens_k`` for the keys: query block j attends key block
j, causal aligned bottom-right, so a chunk's first query sees its whole cache. The script checks
that the chunked outputs equal one causal pass over all the sequences packed whole.

    PYTHONPATH=. python examples/chunked_prefill.py [--device cuda] [--chunk 16]
"""

from __future__ import annotations

import argparse
import itertools

import torch

import block_attn


def offsets(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def chunked(q, k, v, lengths: list[int], chunk: int) -> torch.Tensor:
    """Outputs for q, k, v (1, H, sum(lengths), D) computed chunk by chunk with caches."""
    starts = offsets(lengths)
    done = [0] * len(lengths)  # tokens of each sequence already processed (its cache)
    out = torch.empty_like(q)
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        active = [i for i, n in enumerate(lengths) if done[i] < n]
        new = [min(chunk, lengths[i] - done[i]) for i in active]
        seen = [done[i] + c for i, c in zip(active, new, strict=True)]  # cache plus the chunk
        pieces_q = zip(active, new, strict=True)
        pieces_k = zip(active, seen, strict=True)
        rows_q = torch.cat([torch.arange(c) + starts[i] + done[i] for i, c in pieces_q])
        rows_k = torch.cat([torch.arange(s) + starts[i] for i, s in pieces_k])
        out[:, :, rows_q] = block_attn.attention(
            q[:, :, rows_q],
            k[:, :, rows_k],
            v[:, :, rows_k],
            cu_seqlens=offsets(new),
            cu_seqlens_k=offsets(seen),
            causal=True,
        )
        for i, c in zip(active, new, strict=True):
            done[i] += c
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    lengths = [37, 5, 64, 20]
    q, k, v = (torch.randn(1, 4, sum(lengths), 32, device=args.device) for _ in range(3))
    whole = block_attn.attention(q, k, v, cu_seqlens=offsets(lengths), causal=True)
    by_chunks = chunked(q, k, v, lengths, args.chunk)
    difference = (by_chunks - whole).abs().max().item()
    print(f"{len(lengths)} sequences of {lengths} tokens in chunks of {args.chunk}")
    print(f"largest difference from one packed causal pass: {difference:.2e}")
    assert difference < 1e-5, difference


if __name__ == "__main__":
    main()
