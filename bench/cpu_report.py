"""CPU benchmark figures (GFLOP/s, % of GEMM, ratios), targets, markdown table and plot."""

from __future__ import annotations

import statistics

from bench.result_rows import OURS, add_ratios, fmt, peers_and_cases, target_status
from bench.result_rows import row_line as _row_line
from bench.workloads import Workload


def workload_info(w: Workload) -> dict:
    return {
        "name": w.name,
        "kind": w.kind,
        "heads": w.heads,
        "seqlen": w.seqlen,
        "head_dim": w.head_dim,
        "dtype": str(w.dtype).replace("torch.", ""),
        "causal": w.causal,
        "block_size": w.block_size,
        "blocks": len(w.lengths),
        "mean_len": round(w.seqlen / len(w.lengths), 1),
        "max_len": w.max_len,
        "forward_gflop": round(w.forward_flops() / 1e9, 3),
    }


def add_figures(rows: list[dict], w: Workload, gemm_gflops: float) -> None:
    """Useful GFLOP/s (backward counted as 2.5× forward), % of fp32 GEMM, peer_ms / our_ms."""
    for r in rows:
        r["flops"] = w.flops(r["mode"])
        if r.get("status") == "ok":
            r["gflops"] = r["flops"] / r["ms"] / 1e6
            r["pct_fp32_gemm"] = 100.0 * r["gflops"] / gemm_gflops
    add_ratios(rows)


def gemm_rate(gemm: dict, dtype: str) -> float:
    return gemm[dtype].get("gflops_best", gemm[dtype]["gflops"])


def rescale_gemm(rows: list[dict], gemm_gflops: float) -> None:
    """Recomputes % of fp32 GEMM against the best GEMM rate of the run."""
    for r in rows:
        if "gflops" in r:
            r["pct_fp32_gemm"] = 100.0 * r["gflops"] / gemm_gflops


def _figures(r: dict) -> str:
    return (
        f"{r['ms']:9.1f} ms {r['gflops']:6.1f} GFLOP/s {r['pct_fp32_gemm']:4.0f}% GEMM"
        f"  peer/ours {fmt(r.get('vs_ours'), '.2f', 5)}  peak {fmt(r.get('peak_mib'), '.0f')} MiB"
    )


def row_line(r: dict) -> str:
    """The printed line of one CPU row."""
    return _row_line(r, 24, _figures)


# --- targets -----------------------------------------------------------------------------


def _rows(results, peer=None, mode=None, where=None):
    info = {w["name"]: w for w in results["workloads"]}
    for r in results["rows"]:
        if peer is not None and r["peer"] != peer:
            continue
        if mode is not None and r["mode"] != mode:
            continue
        w = info[r["workload"]]
        if where is None or where(w):
            yield r, w


def _ratio_items(results, peer, mode, where, threshold_of=lambda w: None, fixed=1.0):
    """(label, value, threshold, note) for each peer row: value = peer_ms / our_ms."""
    items = []
    for r, w in _rows(results, peer, mode, where):
        threshold = threshold_of(w) or fixed
        label = f"{r['workload']} {r['mode']}"
        if r.get("status") == "ok" and "vs_ours" in r:
            items.append((label, r["vs_ours"], threshold, None))
        else:
            items.append((label, None, threshold, f"{r.get('status')}: {r.get('note', '')}"))
    return items


def _gemm_items(results):
    items = []

    def where(w):
        return w["kind"] == "fixed" and w["block_size"] >= 512 and w["dtype"] == "float32"

    for r, _ in _rows(results, OURS, "fwd", where):
        value = r.get("pct_fp32_gemm")
        items.append((f"{r['workload']} fwd", value, 60.0, None if value else r.get("note")))
    return items


def _scaling_items(results):
    items = []
    for mode in ("fwd", "fwdbwd"):
        rows = [
            r
            for r, w in _rows(
                results,
                OURS,
                mode,
                lambda w: (
                    w["kind"] == "fixed"
                    and w["block_size"] == 256
                    and w["head_dim"] == 64
                    and w["dtype"] == "float32"
                ),
            )
            if r.get("status") == "ok"
        ]
        if len(rows) < 2:
            items.append((f"b=256 {mode}", None, 0.25, "fewer than two sizes measured"))
            continue
        rates = {r["workload"]: r["gflops"] for r in rows}
        mid = statistics.median(rates.values())
        worst = max(abs(g / mid - 1) for g in rates.values())
        detail = ", ".join(f"{k.split('-')[1]} {v:.1f}" for k, v in rates.items())
        # value: 0.25 - worst deviation, so that >= 0 means within ±25% of the median.
        items.append((f"b=256 {mode} GFLOP/s ({detail})", 0.25 - worst, 0.0, None))
    return items


def _bf16_items(results):
    items = []
    ours = {(r["workload"], r["mode"]): r for r, _ in _rows(results, OURS)}
    for (name, mode), r in ours.items():
        if not name.endswith("-bf16"):
            continue
        twin = ours.get((name[: -len("bf16")] + "f32", mode))
        if twin is None:
            continue
        if r.get("status") == "ok" and twin.get("status") == "ok":
            items.append((f"{name[:-5]} {mode} fp32_ms/bf16_ms", twin["ms"] / r["ms"], 1.0, None))
    return items


def targets(results: dict) -> list[dict]:
    """Each target: its items (value vs threshold), the worst one, and met / short / unmeasured."""

    def fixed_small(w):
        return w["kind"] == "fixed" and w["block_size"] <= 512

    def docs_causal(w):
        return w["kind"] == "docs" and w["causal"]

    def causal_big(w):
        return w["kind"] == "causal" and w["seqlen"] >= 4096

    def dense_needed(w):
        return 0.5 * w["seqlen"] / w["mean_len"]

    specs = [
        ("fixed b<=512 forward >= 1.0x SDPA batch",
         _ratio_items(results, "sdpa-batch", "fwd", fixed_small)),
        ("fixed b<=512 fwd+bwd >= 1.0x SDPA batch",
         _ratio_items(results, "sdpa-batch", "fwdbwd", fixed_small)),
        ("packed causal fwd+bwd >= 2x per-document SDPA loop",
         _ratio_items(results, "sdpa-loop", "fwdbwd", docs_causal, fixed=2.0)),
        ("packed causal forward >= 1.5x compiled FlexAttention",
         _ratio_items(results, "flex", "fwd", docs_causal, fixed=1.5)),
        ("speed-up vs SDPA dense mask >= 0.5*N/mean block length",
         _ratio_items(results, "sdpa-dense-mask", None, None, dense_needed)),
        ("causal N>=4096 forward >= 1.0x SDPA is_causal",
         _ratio_items(results, "sdpa-causal", "fwd", causal_big)),
        ("causal N>=4096 fwd+bwd >= 1.0x SDPA is_causal",
         _ratio_items(results, "sdpa-causal", "fwdbwd", causal_big)),
        ("fixed b>=512 forward >= 60% of fp32 GEMM rate (fp32 rows)", _gemm_items(results)),
        ("b=256 GFLOP/s within +-25% of their median across N (value: 0.25 - worst deviation)",
         _scaling_items(results)),
        ("bf16 not slower than fp32 at the same shape (fp32_ms / bf16_ms >= 1)",
         _bf16_items(results)),
    ]  # fmt: skip
    out = []
    for label, items in specs:
        measured = [(lab, v, t) for lab, v, t, _ in items if v is not None]
        entry = {
            "target": label,
            "items": [
                {"case": lab, "value": v, "threshold": t, **({"note": n} if n else {})}
                for lab, v, t, n in items
            ],
        }
        if not measured:
            entry["status"] = "unmeasured"
        else:
            short = [m for m in measured if target_status(m[1], m[2]) == "short"]
            entry["status"] = "short" if short else "met"
            entry["met_count"] = f"{len(measured) - len(short)}/{len(measured)}"
            worst = min(measured, key=lambda m: m[1] / m[2] if m[2] else m[1])
            entry["worst"] = {"case": worst[0], "value": worst[1], "threshold": worst[2]}
        out.append(entry)
    return out


def targets_text(entries: list[dict]) -> str:
    lines = ["", "== targets"]
    for e in entries:
        lines.append(f"[{e['status'].upper():>10}] {e['target']}  ({e.get('met_count', '-')})")
        for item in e["items"]:
            value = fmt(item["value"], ".2f")
            note = f"  {item['note']}" if "note" in item else ""
            lines.append(f"{'':13}{item['case']}: {value} (need {item['threshold']:.2f}){note}")
    return "\n".join(lines)


# --- markdown and plot -------------------------------------------------------------------


def target_bullets(entries: list[dict]) -> list[str]:
    """A markdown bullet per target: its status, how many cases met it, and the worst case."""
    lines = []
    for e in entries:
        worst = e.get("worst")
        detail = (
            f"worst: {worst['case']} {worst['value']:.2f} (need {worst['threshold']:.2f})"
            if worst
            else "not measured"
        )
        lines.append(
            f"- **{e['status']}** — {e['target']}: {e.get('met_count', '-')} cases met; {detail}"
        )
    return lines


def write_markdown(results: dict, path: str) -> None:
    env = results["environment"]
    gemm = results["gemm"]
    lines = [
        f"# block_attn CPU benchmark ({results['mode']} mode)",
        "",
        f"{env['date']} · {env['cpu_model']} ({env.get('cpu_capability', '?')}) · "
        f"{env['cores']} cores · torch {env['torch']} · "
        f"fp32 GEMM {gemm_rate(gemm, 'fp32'):.0f} GFLOP/s, bf16 {gemm_rate(gemm, 'bf16'):.0f} · "
        f"{results.get('elapsed_s', '?')} s",
        "",
        "Times are medians of interleaved rounds after a warm-up call; `peer/ours` above 1 "
        "means block_attn is faster. Peak = growth of the resident-set high-water mark during "
        "one call. GFLOP/s count useful work only (backward = 2.5× forward).",
        "",
        "| workload | mode | peer | ms | GFLOP/s | % fp32 GEMM | peer/ours | peak MiB | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        ok = r.get("status") == "ok"
        note = "" if ok else f"{r.get('status')}: {r.get('note', '')}".replace("|", "/")
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['peer']} | "
            f"{fmt(r.get('ms'), '.1f') if ok else '-'} | {fmt(r.get('gflops'), '.1f')} | "
            f"{fmt(r.get('pct_fp32_gemm'), '.0f')} | {fmt(r.get('vs_ours'), '.2f')} | "
            f"{fmt(r.get('peak_mib'), '.0f')} | {note[:120]} |"
        )
    lines += ["", "## Targets", "", *target_bullets(results.get("targets", []))]
    check = results.get("sdpa_layout_check")
    if check:
        lines += ["", f"SDPA batch layouts ({check['shape']}):", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in check["ms"].items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    info = {w["name"]: w for w in results["workloads"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})

    peers, keys = peers_and_cases([r for r in rows if r["peer"] != OURS])
    width = 0.8 / max(len(peers), 1)
    for i, peer in enumerate(peers):
        by_key = {(r["workload"], r["mode"]): r.get("vs_ours") for r in rows if r["peer"] == peer}
        xs = [j + i * width for j, key in enumerate(keys) if by_key.get(key)]
        ys = [by_key[key] for key in keys if by_key.get(key)]
        ax1.bar(xs, ys, width, label=peer)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_yscale("log")
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
    ax1.set_xticklabels([f"{w} {m}" for w, m in keys], rotation=90, fontsize=6)
    ax1.set_ylabel("peer time / block_attn time (above 1: block_attn faster)")
    ax1.set_title("Ratio to block_attn per workload")
    ax1.legend(fontsize=7)

    gemm = gemm_rate(results["gemm"], "fp32")
    fixed_ns = [w["seqlen"] for w in info.values() if w["kind"] == "fixed"]
    fixed_n = max(set(fixed_ns), key=fixed_ns.count) if fixed_ns else None
    for peer, style in ((OURS, "-o"), ("sdpa-batch", "--s")):
        for mode in ("fwd", "fwdbwd"):
            pts = sorted(
                (info[r["workload"]]["block_size"], r["gflops"])
                for r in rows
                if r["peer"] == peer
                and r["mode"] == mode
                and info[r["workload"]]["kind"] == "fixed"
                and info[r["workload"]]["seqlen"] == fixed_n
                and info[r["workload"]]["head_dim"] == 64
                and info[r["workload"]]["dtype"] == "float32"
            )
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, label=f"{peer} {mode}")
    ax2.axhline(gemm, color="gray", linestyle=":", label=f"fp32 GEMM {gemm:.0f}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel(f"block size b (fixed blocks, fp32, D=64, N={fixed_n})")
    ax2.set_ylabel("useful GFLOP/s")
    ax2.set_title("GFLOP/s vs block size")
    ax2.legend(fontsize=7)
    env = results["environment"]
    fig.suptitle(
        f"block_attn CPU ({results['mode']}): {env['cpu_model']}, {env['cores']} cores, "
        f"torch {env['torch']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme_section(results: dict, plot_path: str = "results/cpu_results.png") -> str:
    """A README section: environment, a compact table (block_attn and peer/ours ratios per
    workload and mode), the plot, and each target with its worst case."""
    env, gemm = results["environment"], results["gemm"]
    rows = results["rows"]
    peers, keys = peers_and_cases(rows)
    peers = [p for p in peers if p != OURS]
    by_key = {(r["workload"], r["mode"], r["peer"]): r for r in rows}
    lines = [
        f"## CPU results ({results['mode']} mode)",
        "",
        f"{env['cpu_model']} ({env.get('cpu_capability', '?')}), {env['cores']} cores, "
        f"torch {env['torch']}, {env['date'][:10]}; "
        f"fp32 GEMM ({gemm['fp32'].get('size', 4096)}³ `torch.mm`, best of start and end) "
        f"{gemm_rate(gemm, 'fp32'):.0f} GFLOP/s, bf16 ({gemm['bf16'].get('size', 4096)}³) "
        f"{gemm_rate(gemm, 'bf16'):.0f}. "
        "Run: `python -m bench.cpu_bench` "
        f"({results.get('elapsed_s', '?')} s). Peer columns are peer_ms / block_attn_ms (above "
        "1: block_attn faster); `-` not run (see `cpu_results.md` for why).",
        "",
        "| workload | mode | block_attn ms | GFLOP/s | % fp32 GEMM | " + " | ".join(peers) + " |",
        "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in peers) + " |",
    ]
    for workload, mode in keys:
        ours = by_key.get((workload, mode, OURS), {})
        ok = ours.get("status") == "ok"
        cells = []
        for p in peers:
            r = by_key.get((workload, mode, p))
            cells.append(fmt(r.get("vs_ours"), ".2f") if r else "-")
        lines.append(
            f"| {workload} | {mode} | {fmt(ours.get('ms') if ok else None, '.1f')} | "
            f"{fmt(ours.get('gflops'), '.1f')} | {fmt(ours.get('pct_fp32_gemm'), '.0f')} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", f"![CPU benchmark]({plot_path})", "", "### Targets", ""]
    lines += target_bullets(results.get("targets", []))
    return "\n".join(lines) + "\n"
