"""How the order in which CTAs start changes a kernel's makespan: a list-scheduling model.

The tensor-core kernels launch a grid (tiles, blocks, batch * heads) and the GPU starts CTAs in
linear order, x fastest, each on the next free slot (SM x CTAs per SM). Under a causal mask a
query tile costs as many key tiles as it attends to, so where the costliest tiles sit in that
order decides how long the last slot runs past the average. This compares, on the benchmark's
causal-d128 and docs-causal-d128 workloads (16 heads, 64 x 64 tiles):

- block-major: x = tile (costliest first within a block), then block, then head;
- tile-major: tile slowest, so every block and head starts its costliest tile first (what
  ``grid_tile`` in ``csrc/cuda/tensor_rows.cuh`` decodes);
- LPT: all tiles sorted by cost, the classic bound.

Makespans are printed relative to the ideal (total cost / slots); empty CTAs (tiles past a short
block) cost nothing here, so the model understates block-major's loss.

    python bench/tile_order_model.py
"""

from __future__ import annotations

import heapq
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workloads import _doc_params, document_lengths

HEADS = 16
TILE = 64
SEQLEN = 16384


def makespan(costs: list[float], slots: int) -> float:
    """Greedy list scheduling: each CTA starts, in order, on the slot that frees first."""
    free_at = [0.0] * slots
    for cost in costs:
        heapq.heapreplace(free_at, free_at[0] + cost)
    return max(free_at)


def tile_costs(lengths: list[int]) -> list[list[float]]:
    """Per block, the causal cost (key tiles) of query tile x, x = 0 the costliest; 0 past it."""
    tiles = math.ceil(max(lengths) / TILE)
    costs = []
    for length in lengths:
        row = []
        for x in range(tiles):
            m0 = (tiles - 1 - x) * TILE
            row.append(0.0 if m0 >= length else float(math.ceil(min(m0 + TILE, length) / TILE)))
        costs.append(row)
    return costs


def main() -> None:
    workloads = {
        "causal-d128": [SEQLEN],
        "docs-causal-d128": document_lengths(SEQLEN, *_doc_params(SEQLEN)),
    }
    for name, lengths in workloads.items():
        costs = tile_costs(lengths)
        blocks, tiles = len(costs), len(costs[0])
        order = [(h, b, x) for h in range(HEADS) for b in range(blocks) for x in range(tiles)]
        block_major = [costs[b][x] for _, b, x in order]
        tile_major = [costs[b][x] for _, b, x in sorted(order, key=lambda o: (o[2], o[1], o[0]))]
        lpt = sorted(block_major, reverse=True)
        for per_sm in (2, 3):
            slots = 132 * per_sm
            ideal = sum(block_major) / slots
            print(
                f"{name:17s} {per_sm} CTAs/SM:"
                f" block-major {makespan(block_major, slots) / ideal:.3f}"
                f"  tile-major {makespan(tile_major, slots) / ideal:.3f}"
                f"  LPT {makespan(lpt, slots) / ideal:.3f}  (x ideal; {len(block_major)} CTAs, "
                f"{sum(c == 0 for c in block_major)} empty)"
            )


if __name__ == "__main__":
    main()
