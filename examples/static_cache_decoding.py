"""Token-by-token decoding of several sequences against a static (padded) key/value cache.

Each sequence owns a fixed slot of ``--cache-size`` rows in a ``(B, L, Hkv, D)`` cache, the
layout of FlashAttention's ``flash_attn_with_kvcache``. The prompts (of different lengths) are
written into their slots; then every step writes each sequence's new key and value at its
current length and makes one ``block_attn.attention`` call for all the sequences with
``block_attn.padded_cache_blocks``: each new token attends the valid rows of its own slot, and
the unused rows are never read. On CUDA, ``--graph`` keeps the lengths in a GPU tensor and
replays one captured step, updating the lengths in place.

The script checks that every step's outputs equal one causal pass over the sequences packed
whole, prompts and generated tokens together.

    PYTHONPATH=. python examples/static_cache_decoding.py [--device cuda] [--graph] [--steps 8]
"""

from __future__ import annotations

import argparse
import itertools

import torch

import block_attn


def rows(x: torch.Tensor) -> torch.Tensor:
    """(B, n, H, D) -> (1, H, B * n, D): the sequences' rows one after another, a view."""
    return x.flatten(0, 1).unsqueeze(0).transpose(1, 2)


def decode(q, k, v, prompts: list[int], cache_size: int, steps: int, graph: bool):
    """Outputs (B, steps, Hq, D) of the last `steps` tokens of each sequence, decoded one token
    at a time against the cache. q, k, v: (B, prompt + steps, H, D) per-token projections."""
    count, _, heads_kv, dim = k.shape
    k_cache = torch.zeros(count, cache_size, heads_kv, dim, dtype=k.dtype, device=k.device)
    v_cache = torch.zeros_like(k_cache)
    for i, prompt in enumerate(prompts):  # prefill: the prompts' keys and values
        k_cache[i, :prompt] = k[i, :prompt]
        v_cache[i, :prompt] = v[i, :prompt]
    lengths = torch.tensor(prompts, device=q.device)  # valid rows per slot
    new_q = torch.empty_like(q[:, :1])  # (B, 1, Hq, D): this step's queries
    slot = torch.arange(count, device=q.device)

    def step() -> torch.Tensor:
        blocks = block_attn.padded_cache_blocks(lengths if graph else lengths.tolist(), cache_size)
        return block_attn.attention(
            rows(new_q), rows(k_cache), rows(v_cache), causal=True, **blocks
        )

    replay = None
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        replay = torch.cuda.CUDAGraph()
        with torch.cuda.graph(replay):
            captured = step()
    outputs = []
    for t in range(steps):
        position = torch.tensor(prompts, device=q.device) + t  # each sequence's new token
        new_q.copy_(q[slot, position].unsqueeze(1))
        k_cache[slot, position] = k[slot, position]  # its key and value join the cache
        v_cache[slot, position] = v[slot, position]
        lengths += 1
        if replay is not None:
            replay.replay()
            out = captured
        else:
            out = step()
        outputs.append(out[0].transpose(0, 1).clone())  # (1, Hq, B, D) -> (B, Hq, D)
    return torch.stack(outputs, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-size", type=int, default=512)
    parser.add_argument("--graph", action="store_true", help="replay a captured step (CUDA)")
    args = parser.parse_args()
    if args.graph and not args.device.startswith("cuda"):
        parser.error("--graph needs --device cuda")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    prompts = [37, 5, 300, 120]
    total = [p + args.steps for p in prompts]
    if max(total) > args.cache_size:
        parser.error(f"--cache-size must hold {max(total)} rows")
    longest = max(total)
    q = torch.randn(len(prompts), longest, 8, 64, dtype=dtype, device=args.device)
    k, v = (
        torch.randn(len(prompts), longest, 2, 64, dtype=dtype, device=args.device) for _ in "kv"
    )

    decoded = decode(q, k, v, prompts, args.cache_size, args.steps, args.graph)

    # One causal pass over every sequence's tokens, packed whole, in float64.
    def packed(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[i, :n] for i, n in enumerate(total)]).unsqueeze(0).transpose(1, 2)

    offsets = [0, *itertools.accumulate(total)]
    whole = block_attn.attention(
        packed(q).double(), packed(k).double(), packed(v).double(), cu_seqlens=offsets, causal=True
    )[0].transpose(0, 1)  # (N, Hq, D)
    expected = torch.stack([whole[end - args.steps : end] for end in offsets[1:]])
    difference = (decoded.double() - expected).abs().max().item()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    print(
        f"{len(prompts)} sequences, prompts of {prompts} tokens, {args.steps} decoding steps "
        f"against slots of {args.cache_size} rows ({args.dtype}, {args.device}"
        f"{', one captured step replayed' if args.graph else ''})"
    )
    print(f"largest difference from one causal pass over the whole sequences: {difference:.2e}")
    assert difference < tolerance, difference


if __name__ == "__main__":
    main()
