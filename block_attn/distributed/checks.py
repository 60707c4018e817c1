"""Input validation for context-parallel attention, local and across ranks."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from block_attn.distributed.layout import LAYOUTS, check_divisible, check_layout
from block_attn.validation import SUPPORTED_DTYPES, check_tensors
from block_attn.variants import Variants

__all__ = ["check_local_inputs", "check_same_on_all_ranks"]

SCHEDULES = ("block", "ring")

# Fields compared across ranks, in the order they are gathered.
_FIELDS = (
    "batch",
    "query heads",
    "kv heads",
    "local sequence length",
    "head_dim",
    "dtype",
    "causal",
    "layout",
    "schedule",
    "scale (bits)",
    "softcap (bits)",
    "window left",
    "window right",
    "alibi_slopes given",
    "dropout_p (bits)",
    "number of block offsets",
    "block offsets (crc32)",
)


def check_local_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    world_size: int,
    layout: str,
    schedule: str,
) -> None:
    """Checks this rank's shards and that the global length splits into equal chunks.

    Args:
        q: (B, Hq, N / W, D) this rank's queries.
        k: (B, Hkv, N / W, D) this rank's keys.
        v: (B, Hkv, N / W, D) this rank's values.
        scale: the resolved softmax scale.
        world_size: W.
        layout: one of :data:`LAYOUTS`.
        schedule: ``"block"`` or ``"ring"``.
    """
    check_layout(layout)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_tensors(q, k, v, scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must hold the same positions of the sequence, got local lengths "
            f"{q.shape[2]} and {k.shape[2]}"
        )
    check_divisible(q.shape[2] * world_size, world_size, layout)


def check_same_on_all_ranks(
    q: torch.Tensor,
    k: torch.Tensor,
    offsets: tuple[int, ...],
    causal: bool,
    scale: float,
    layout: str,
    schedule: str,
    group: dist.ProcessGroup | None,
    local_error: Exception | None = None,
    variants: Variants | None = None,
) -> None:
    """Raises on every rank if any rank's inputs are invalid or the ranks disagree.

    One all_gather of a dozen integers; every rank sees every rank's values, so all of them
    raise together instead of some hanging in a later transfer.

    Args:
        q, k: this rank's query and key shards.
        offsets: the global block offsets this rank derived.
        causal, scale, layout, schedule, variants: this rank's options (of the variants, the
            window, softcap, whether ALiBi slopes are given, and dropout_p are compared).
        group: the process group.
        local_error: the error this rank's own checks raised, if any: re-raised here after
            the exchange, and every other rank raises ValueError naming this rank.
    """
    if local_error is None:
        variants = variants if variants is not None else Variants()
        values = [0, *_summary(q, k, offsets, causal, scale, layout, schedule, variants)]
    else:
        values = [1] + [0] * len(_FIELDS)
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    world_size = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world_size) if table[r, 0] != 0]
    if failed:
        raise ValueError(
            f"context-parallel inputs are invalid on rank(s) {failed} of the group; "
            f"see the error raised there"
        )
    table = table[:, 1:]
    differing = [
        name for i, name in enumerate(_FIELDS) if not bool((table[:, i] == table[0, i]).all())
    ]
    if differing:
        per_rank = {
            name: table[:, _FIELDS.index(name)].tolist()
            for name in differing
            if not name.endswith(("(bits)", "(crc32)"))
        }
        raise ValueError(
            f"context-parallel inputs differ between ranks in: {', '.join(differing)}; "
            f"every rank must pass same-shaped shards and the same global cu_seqlens / "
            f"block_size, causal, scale, variants, layout and schedule (per-rank values: "
            f"{per_rank})"
        )


def _summary(
    q: torch.Tensor,
    k: torch.Tensor,
    offsets: tuple[int, ...],
    causal: bool,
    scale: float,
    layout: str,
    schedule: str,
    variants: Variants,
) -> list[int]:
    """The integers compared across ranks, one per entry of ``_FIELDS``."""
    scale_bits, softcap_bits, dropout_bits = torch.tensor(
        [scale, variants.softcap, variants.dropout_p], dtype=torch.float64
    ).view(torch.int64)
    offsets_crc = zlib.crc32(torch.tensor(offsets, dtype=torch.int64).numpy().tobytes())
    return [
        q.shape[0],
        q.shape[1],
        k.shape[1],
        q.shape[2],
        q.shape[3],
        SUPPORTED_DTYPES.index(q.dtype),
        int(causal),
        LAYOUTS.index(layout),
        SCHEDULES.index(schedule),
        int(scale_bits),
        int(softcap_bits),
        variants.window_left,
        variants.window_right,
        int(variants.alibi_slopes is not None),
        int(dropout_bits),
        len(offsets),
        offsets_crc,
    ]
