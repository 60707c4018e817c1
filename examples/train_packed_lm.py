"""Train a tiny byte-level causal LM on packed documents vs padded documents.

The documents are the docstrings of Python's own standard library (read with ``ast`` from the
``*.py`` files next to ``os.py``; nothing is downloaded), one document per module, class or
function docstring, as UTF-8 bytes. Every step takes the next ``--docs-per-step`` documents and
trains the same model (same initial weights, same documents, same order) two ways:

* **padded**: one row per document, padded to the longest document in the step, with dense
  causal attention (``torch.nn.functional.scaled_dot_product_attention``). Right padding plus a
  causal mask means no real token ever attends a pad, so no key-padding mask is needed.
* **packed**: all documents concatenated into one row, with block-diagonal causal attention
  (``block_attn.nn.MultiheadBlockAttention`` with ``cu_seqlens`` = the document offsets).

Positions restart at 0 in every document and the loss is the mean next-token cross-entropy over
real tokens, never predicting across a document boundary, so both ways compute the same function:
the first step's losses are asserted equal. Each way runs in its own process so that peak memory
(RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is measured separately.

Writes ``results.json``, ``results.md`` (a table) and ``loss_curves.png`` to ``--out``.

Run from the repository root (or with block_attn installed)::

    PYTHONPATH=. python examples/train_packed_lm.py --steps 30
    PYTHONPATH=. python examples/train_packed_lm.py --small   # the tiny configuration CI runs
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from block_attn.nn import MultiheadBlockAttention

MODES = ("padded", "packed")


@dataclass
class Config:
    """Model and data sizes; ``small()`` is the configuration CI runs."""

    embed_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    max_doc_len: int = 1024
    min_doc_len: int = 16
    docs_per_step: int = 16
    lr: float = 2e-3

    @classmethod
    def small(cls) -> Config:
        return cls(embed_dim=32, num_heads=2, num_layers=1, max_doc_len=96, docs_per_step=4)


def stdlib_docstrings(min_len: int, max_len: int, count: int) -> list[bytes]:
    """Docstrings of the top-level standard-library modules, in a fixed order.

    Each module, class and function docstring is one document, as UTF-8 bytes truncated to
    ``max_len``; shorter than ``min_len`` bytes is dropped. Stops after ``count`` documents.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
            ):
                continue
            text = ast.get_docstring(node)
            if text and len(text.encode()) >= min_len:
                documents.append(text.encode()[:max_len])
                if len(documents) == count:
                    return documents
    return documents


def step_batches(config: Config, steps: int, seed: int) -> list[list[bytes]]:
    """``steps`` lists of ``docs_per_step`` documents, shuffled with ``seed``."""
    needed = steps * config.docs_per_step
    pool = stdlib_docstrings(config.min_doc_len, config.max_doc_len, count=max(4 * needed, 2000))
    if len(pool) < needed:
        raise ValueError(f"only {len(pool)} documents available, {needed} needed")
    random.Random(seed).shuffle(pool)
    k = config.docs_per_step
    return [pool[i * k : (i + 1) * k] for i in range(steps)]


def padded_batch(documents: list[bytes], device: torch.device) -> dict[str, torch.Tensor]:
    """One row per document, right-padded with 0 to the longest: tokens/positions (B, L)."""
    longest = max(len(d) for d in documents)
    tokens = torch.zeros(len(documents), longest, dtype=torch.long)
    valid = torch.zeros(len(documents), longest, dtype=torch.bool)
    for row, document in enumerate(documents):
        tokens[row, : len(document)] = torch.tensor(list(document))
        valid[row, : len(document) - 1] = True  # a prediction for the next token of this document
    targets = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(longest).expand(len(documents), longest)
    return {
        "tokens": tokens.to(device),
        "positions": positions.to(device),
        "targets": targets.to(device),
        "valid": valid.to(device),
    }


def packed_batch(documents: list[bytes], device: torch.device) -> dict:
    """All documents in one row: tokens/positions (1, T) and their offsets ``cu_seqlens``."""
    cu_seqlens = [0]
    for document in documents:
        cu_seqlens.append(cu_seqlens[-1] + len(document))
    tokens = torch.tensor([list(b"".join(documents))])
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[0, [c - 1 for c in cu_seqlens[1:]]] = False  # a document's last token predicts nothing
    return {
        "tokens": tokens.to(device),
        "positions": positions.to(device),
        "targets": torch.roll(tokens, -1, dims=1).to(device),
        "valid": valid.to(device),
        "cu_seqlens": cu_seqlens,  # a list: no device-to-host copy in the attention call
    }


def dense_causal_attention(attention: MultiheadBlockAttention, x: torch.Tensor) -> torch.Tensor:
    """The baseline: ``attention``'s weights applied with PyTorch SDPA's dense causal mask."""
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    out = functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=kv_heads != heads
    )
    return attention.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.embed_dim)
        self.attention = MultiheadBlockAttention(config.embed_dim, config.num_heads, causal=True)
        self.mlp_norm = nn.LayerNorm(config.embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.embed_dim, 4 * config.embed_dim),
            nn.GELU(),
            nn.Linear(4 * config.embed_dim, config.embed_dim),
        )

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | None) -> torch.Tensor:
        h = self.attention_norm(x)
        if cu_seqlens is None:
            x = x + dense_causal_attention(self.attention, h)
        else:
            x = x + self.attention(h, cu_seqlens=cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """Byte-level causal LM with learned per-document positions."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(256, config.embed_dim)
        self.position_embedding = nn.Embedding(config.max_doc_len, config.embed_dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, 256)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cu_seqlens: list[int] | None = None
    ) -> torch.Tensor:
        """Logits (B, N, 256) for tokens (B, N); ``cu_seqlens`` given means one packed row."""
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for layer in self.layers:
            x = layer(x, cu_seqlens)
        return self.head(self.norm(x))


def loss_on(model: TinyLM, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens of the same document."""
    logits = model(batch["tokens"], batch["positions"], batch.get("cu_seqlens"))
    valid = batch["valid"]
    return functional.cross_entropy(logits[valid], batch["targets"][valid])


def reset_peak_rss() -> int:
    """Resets Linux's peak-RSS counter (VmHWM) and returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_bytes("VmRSS")


def peak_rss() -> int:
    """Peak RSS in bytes since the last ``reset_peak_rss``."""
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def train(mode: str, config: Config, steps: int, seed: int, device: torch.device) -> dict:
    """Trains from ``seed``'s initial weights; returns losses, throughput and peak memory."""
    batches = step_batches(config, steps, seed)
    make_batch = padded_batch if mode == "padded" else packed_batch
    torch.manual_seed(seed)
    model = TinyLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    progress = _progress(range(steps), desc=mode)
    losses, real_tokens, padded_tokens, timed_seconds = [], 0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline_rss = reset_peak_rss()
    for step in progress:
        batch = make_batch(batches[step], device)
        _synchronize(device)
        start = time.perf_counter()
        loss = loss_on(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # also synchronises
        if step > 0:  # step 0 is warm-up (allocator, kernel caches); it is not timed
            timed_seconds += time.perf_counter() - start
            real_tokens += sum(len(d) for d in batches[step])
            padded_tokens += batch["tokens"].numel()
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)
        memory_kind = "CUDA max_memory_allocated"
    else:
        peak_bytes = peak_rss() - baseline_rss
        memory_kind = "peak RSS growth during training"
    return {
        "mode": mode,
        "losses": losses,
        "tokens_per_second": real_tokens / timed_seconds if timed_seconds > 0 else math.nan,
        "real_tokens": real_tokens,
        "tokens_processed": padded_tokens,
        "timed_seconds": timed_seconds,
        "peak_memory_mib": peak_bytes / 2**20,
        "memory_kind": memory_kind,
    }


def _progress(iterable, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: train without a bar
        return _NoBar(iterable)
    return tqdm(iterable, desc=desc, file=sys.stderr, dynamic_ncols=True)


class _NoBar:
    def __init__(self, iterable) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **kwargs) -> None:
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_in_subprocess(mode: str, args: argparse.Namespace) -> dict:
    """Runs one mode in a fresh process so that its peak memory is its own."""
    result_path = Path(args.out) / f"{mode}.json"
    command = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--out", args.out]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--device", args.device]
    command += ["--small"] if args.small else []
    subprocess.run(command, check=True)
    return json.loads(result_path.read_text())


def write_report(results: dict, config: Config, args: argparse.Namespace) -> str:
    """Writes results.json, results.md and loss_curves.png; returns the markdown table."""
    out = Path(args.out)
    padded, packed = results["padded"], results["packed"]
    rows = [
        ("real tokens / s", "tokens_per_second", "{:,.0f}"),
        (f"peak memory, MiB ({padded['memory_kind']})", "peak_memory_mib", "{:,.1f}"),
        ("tokens processed incl. pads (timed steps)", "tokens_processed", "{:,}"),
        ("final loss", None, "{:.4f}"),
    ]
    lines = ["| | padded + dense causal (SDPA) | packed + block-diagonal causal | ratio |"]
    lines.append("|---|---:|---:|---:|")
    for label, key, fmt in rows:
        a = padded[key] if key else padded["losses"][-1]
        b = packed[key] if key else packed["losses"][-1]
        ratio = f"{b / a:.2f}×" if a else ""
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    table = "\n".join(lines)
    summary = (
        f"device {args.device}, {args.steps} steps of {config.docs_per_step} documents "
        f"(first step untimed), {packed['real_tokens']:,} real tokens timed, "
        f"embed_dim {config.embed_dim}, {config.num_layers} layers, {config.num_heads} heads, "
        f"documents up to {config.max_doc_len} bytes, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    (out / "results.md").write_text(f"{summary}\n\n{table}\n")
    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "args": vars(args), **results}, indent=2)
    )
    _plot(results, out / "loss_curves.png")
    return f"{summary}\n\n{table}"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss_curves.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in zip(MODES, ("-", "--"), strict=True):
        ax.plot(results[mode]["losses"], style, label=mode)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over real tokens)")
    ax.set_title("Same documents, same initial weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model and data (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--mode", choices=("both", *MODES), default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is not timed), got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = Config.small() if args.small else Config()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.mode != "both":
        result = train(args.mode, config, args.steps, args.seed, torch.device(args.device))
        (Path(args.out) / f"{args.mode}.json").write_text(json.dumps(result))
        return
    results = {mode: run_in_subprocess(mode, args) for mode in MODES}
    first_padded, first_packed = results["padded"]["losses"][0], results["packed"]["losses"][0]
    if not math.isclose(first_packed, first_padded, rel_tol=1e-4):
        raise AssertionError(
            f"identical first batches gave different losses: padded {first_padded:.6f}, "
            f"packed {first_packed:.6f}"
        )
    print(f"first-step loss: padded {first_padded:.6f}, packed {first_packed:.6f} (equal)")
    print(write_report(results, config, args))


if __name__ == "__main__":
    main()
