"""Derived figures (TFLOP/s, bandwidth, ratios), targets, and the printed tables."""

from __future__ import annotations

from bench.result_rows import OURS, add_ratios, find_row, fmt, peers_and_cases, target_status
from bench.result_rows import row_line as _row_line
from bench.workloads import Workload

__all__ = [
    "TARGETS",
    "accuracy_line",
    "add_figures",
    "add_ratios",
    "roofline_lines",
    "row_line",
    "tables",
    "targets",
]

# (label, workload, mode, peer or None, threshold); a peer target compares peer_ms / our_ms.
TARGETS = [
    ("causal forward >= 0.9x SDPA flash", "causal-d128", "fwd", "sdpa-flash", 0.9),
    ("causal fwd+bwd >= 0.8x SDPA flash", "causal-d128", "fwdbwd", "sdpa-flash", 0.8),
    ("packed docs causal fwd+bwd >= 1.2x flex", "docs-causal-d128", "fwdbwd", "flex", 1.2),
    ("packed docs full fwd+bwd >= 1.2x flex", "docs-full-d128", "fwdbwd", "flex", 1.2),
    ("fixed b=128 forward >= 50% of copy bandwidth", "fixed128-d128", "fwd", None, 0.5),
]


def add_figures(row: dict, workload: Workload, roofline: dict) -> None:
    """TFLOP/s for every timed row; % of copy bandwidth for fixed-block forward rows."""
    row["flops"] = workload.flops(row["mode"])
    if row.get("status") != "ok":
        return
    row["tflops"] = row["flops"] / row["ms"] / 1e9
    if workload.kind == "fixed" and row["mode"] == "fwd":
        nbytes = workload.forward_bytes()
        row["bytes"] = nbytes
        row["gb_per_s"] = nbytes / row["ms"] / 1e6
        copy = roofline.get("copy", {}).get("gb_per_s")
        if copy:
            row["pct_copy_bw"] = 100.0 * row["gb_per_s"] / copy


def targets(results: dict) -> list[dict]:
    """Each target's measured value and met / short / unmeasured (with the reason)."""
    rows = results["rows"]
    out = []
    for label, workload, mode, peer, threshold in TARGETS:
        entry = {"target": label, "workload": workload, "mode": mode, "threshold": threshold}
        ours = find_row(rows, workload, mode, OURS)
        value, why = None, None
        if ours is None or ours.get("status") != "ok":
            why = f"block_attn: {ours.get('note', ours.get('status')) if ours else 'not run'}"
        elif peer is None:
            value = ours.get("pct_copy_bw", 0.0) / 100.0 if "pct_copy_bw" in ours else None
            why = None if value is not None else "no copy bandwidth measured"
        else:
            other = find_row(rows, workload, mode, peer)
            if other is None or other.get("status") != "ok":
                why = f"{peer}: {other.get('note', other.get('status')) if other else 'not run'}"
            else:
                value = other["ms"] / ours["ms"]
        entry["value"] = value
        entry["status"] = target_status(value, threshold)
        if why:
            entry["note"] = why
        out.append(entry)
    checked = [a for a in results.get("accuracy", []) if a.get("status") == "ok"]
    failed = [a["workload"] for a in checked if not a["met"]]
    out.append(
        {
            "target": "accuracy: error <= 2x bf16 reference (3x for gradients)",
            "value": len(checked) - len(failed),
            "threshold": len(results.get("accuracy", [])),
            "status": "unmeasured" if not checked else "short" if failed else "met",
            **({"note": "short on " + ", ".join(failed)} if failed else {}),
        }
    )
    return out


def _figures(row: dict) -> str:
    return (
        f"{fmt(row['ms'], '.3f', 9)} ms {fmt(row.get('tflops'), '.1f', 7)} TFLOP/s"
        f" {fmt(row.get('vs_ours'), '.2f', 6)}x"
        f" {fmt(row.get('pct_copy_bw'), '.0f', 4)}{'% copy' if 'pct_copy_bw' in row else ''}"
        f"  (first call {row['first_call_s']:.1f} s)"
    )


def row_line(row: dict) -> str:
    """The printed line of one GPU row."""
    return _row_line(row, 18, _figures)


def roofline_lines(roofline: dict) -> str:
    mm, cp = roofline.get("matmul", {}), roofline.get("copy", {})
    return "\n".join(
        [
            f"matmul {mm.get('size')}^3 {mm.get('dtype')}: "
            + (f"{mm['tflops']:.0f} TFLOP/s" if "tflops" in mm else mm.get("error", "?")),
            "copy (read+write): "
            + (f"{cp['gb_per_s']:.0f} GB/s" if "gb_per_s" in cp else cp.get("error", "?")),
        ]
    )


def accuracy_line(entry: dict) -> str:
    if entry.get("status") != "ok":
        return f"{entry['workload']:<18} error  {entry.get('note', '')}"
    parts = [
        f"{name} {entry[name]['ours_max']:.2e}/{entry[name]['ref_bf16_max']:.2e}"
        f"={entry[name]['ratio']:.2f}x"
        for name in ("out", "dq", "dk", "dv")
    ]
    return f"{entry['workload']:<18} {'met  ' if entry['met'] else 'SHORT'} " + "  ".join(parts)


def tables(results: dict) -> str:
    """The readable summary: one line per workload/mode, peers as columns (ms and ratio)."""
    rows = results["rows"]
    peers, keys = peers_and_cases(rows)
    lines = [
        "",
        "== times in ms (peer_ms / block_attn_ms in brackets; above 1: block_attn faster)",
        f"{'workload':<18} {'mode':<6} {'TFLOP':>6} " + " ".join(f"{p[:15]:>15}" for p in peers),
    ]
    for workload, mode in keys:
        cells = []
        flops = None
        for peer in peers:
            r = find_row(rows, workload, mode, peer)
            flops = r["flops"] if r else flops
            if r is None or r.get("status") != "ok":
                cells.append((r or {}).get("status", "-")[:15].rjust(15))
            elif "vs_ours" in r and peer != OURS:
                cells.append(f"{r['ms']:.2f} ({r['vs_ours']:.2f})".rjust(15))
            else:
                cells.append(f"{r['ms']:.3f}".rjust(15))
        lines.append(f"{workload:<18} {mode:<6} {flops / 1e12:6.2f} " + " ".join(cells))
    lines += ["", "== block_attn throughput"]
    for r in rows:
        if r["peer"] == OURS and r.get("status") == "ok":
            extra = f"  {r['pct_copy_bw']:.0f}% of copy bw" if "pct_copy_bw" in r else ""
            lines.append(f"{r['workload']:<18} {r['mode']:<6} {r['tflops']:7.1f} TFLOP/s{extra}")
    lines += ["", "== targets"]
    for t in results["targets"]:
        value = t.get("value")
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        note = f"  ({t['note']})" if t.get("note") else ""
        lines.append(f"{t['status']:<10} {t['target']:<46} {shown:>6} / {t['threshold']}{note}")
    return "\n".join(lines)
