"""Benchmark result rows, shared by the CPU and GPU reports: lookups, peer/ours ratios, targets'
status, and the formatting of numbers, rows and the peer-column table.

A row is a dict with ``workload``, ``mode``, ``peer`` and ``status`` ("ok" for a timed row,
which then has ``ms``; otherwise a ``note`` says why not).
"""

from __future__ import annotations

from collections.abc import Callable

OURS = "block_attn"


def fmt(value: float | None, spec: str, width: int = 0) -> str:
    """``value`` formatted by ``spec``, or "-" for None, right-aligned in ``width``."""
    return (f"{value:{spec}}" if value is not None else "-").rjust(width)


def find_row(rows: list[dict], workload: str, mode: str, peer: str) -> dict | None:
    """The row of ``peer`` on ``workload`` in ``mode``, or None."""
    for row in rows:
        if row["workload"] == workload and row["mode"] == mode and row["peer"] == peer:
            return row
    return None


def add_ratios(rows: list[dict], workload: str | None = None) -> None:
    """``vs_ours`` = peer_ms / our_ms for each timed row (above 1: block_attn is faster), against
    block_attn's row of the same workload and mode; only ``workload``'s rows when given."""
    ours = {
        (r["workload"], r["mode"]): r["ms"]
        for r in rows
        if r["peer"] == OURS and r.get("status") == "ok"
    }
    for r in rows:
        key = (r["workload"], r["mode"])
        if workload not in (None, r["workload"]) or r.get("status") != "ok" or key not in ours:
            continue
        r["vs_ours"] = r["ms"] / ours[key]


def target_status(value: float | None, threshold: float) -> str:
    """ "met" when ``value`` reaches ``threshold``, "short" below it, "unmeasured" for None."""
    if value is None:
        return "unmeasured"
    return "met" if value >= threshold else "short"


def row_line(row: dict, workload_width: int, figures: Callable[[dict], str]) -> str:
    """One printed line: workload, mode and peer, then ``figures(row)`` for a timed row, or its
    status and note."""
    head = f"{row['workload']:<{workload_width}} {row['mode']:<6} {row['peer']:<16}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status', '?'):>8}  {row.get('note', '')}"
    return f"{head} {figures(row)}"


def peers_and_cases(rows: list[dict]) -> tuple[list[str], list[tuple[str, str]]]:
    """The peers and the (workload, mode) pairs of ``rows``, in first-seen order: the columns and
    lines of a table."""
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    cases = list(dict.fromkeys((r["workload"], r["mode"]) for r in rows))
    return peers, cases
