"""How the order in which CTAs start changes a kernel's makespan: a list-scheduling model.

The tensor-core kernels launch a grid (tiles, blocks, batch * heads) and the GPU starts CTAs in
linear order, x fastest, each on the next free slot (SM x CTAs per SM). Under a causal mask a
query tile costs as many key tiles as it attends to, so where the costliest tiles sit in that
order decides how long the last slot runs past the average. This compares, on the benchmark's
causal-d128, docs-causal-d128 and fixed128-d128 workloads (16 heads, 64 x 64 tiles), orders
named by their index from slowest to fastest (tile 0 is a block's costliest):

- head, block, tile: the order of a grid whose x is the tile;
- tile, block, head: every block and head starts tile 0 before any starts tile 1;
- block, tile, head: block by block, each block's heads start tile 0 first (what ``grid_tile``
  in ``csrc/cuda/tensor_rows.cuh`` decodes);
- LPT: all tiles sorted by cost, the classic bound.

It prints each makespan relative to the ideal (total cost / slots), with empty CTAs (tiles past a
short block) free, and the median distance in start order between CTAs that read the same
block's K and V (same block and head): CTAs much further apart than the slots do not run
together, and each then reads K and V from memory instead of L2.

    python -m bench.tile_order_model
"""

from __future__ import annotations

import heapq
import math
import statistics

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


def tile_costs(lengths: list[int], causal: bool) -> list[list[float]]:
    """Per block, the cost (key tiles) of query tile x, x = 0 the costliest; 0 past the block."""
    tiles = math.ceil(max(lengths) / TILE)
    costs = []
    for length in lengths:
        row = []
        for x in range(tiles):
            m0 = (tiles - 1 - x) * TILE
            end = min(m0 + TILE, length) if causal else length
            row.append(0.0 if m0 >= length else float(math.ceil(end / TILE)))
        costs.append(row)
    return costs


def reuse_distance(order: list[tuple[int, int, int]], costs: list[list[float]]) -> float:
    """Median distance in start order between successive non-empty CTAs of one block and head."""
    last: dict[tuple[int, int], int] = {}
    gaps = []
    for position, (head, block, tile) in enumerate(order):
        if costs[block][tile] == 0:
            continue
        if (head, block) in last:
            gaps.append(position - last[(head, block)])
        last[(head, block)] = position
    return statistics.median(gaps) if gaps else 0.0


def main() -> None:
    workloads = {
        "causal-d128": ([SEQLEN], True),
        "docs-causal-d128": (document_lengths(SEQLEN, *_doc_params(SEQLEN)), True),
        "fixed128-d128": ([128] * (SEQLEN // 128), False),
    }
    for name, (lengths, causal) in workloads.items():
        costs = tile_costs(lengths, causal)
        blocks, tiles = len(costs), len(costs[0])
        # (head, block, tile) of every CTA, in each start order.
        base = [(h, b, x) for h in range(HEADS) for b in range(blocks) for x in range(tiles)]
        orders = {
            "head,block,tile": base,
            "tile,block,head": sorted(base, key=lambda o: (o[2], o[1], o[0])),
            "block,tile,head": sorted(base, key=lambda o: (o[1], o[2], o[0])),
        }
        for per_sm in (2, 3):
            slots = 132 * per_sm
            ideal = sum(costs[b][x] for _, b, x in base) / slots
            cells = [
                f"{label} {makespan([costs[b][x] for _, b, x in order], slots) / ideal:.3f}"
                f" (reuse {reuse_distance(order, costs):g})"
                for label, order in orders.items()
            ]
            lpt = sorted((costs[b][x] for _, b, x in base), reverse=True)
            cells.append(f"LPT {makespan(lpt, slots) / ideal:.3f}")
            print(f"{name:17s} {per_sm} CTAs/SM: " + "  ".join(cells))


if __name__ == "__main__":
    main()
