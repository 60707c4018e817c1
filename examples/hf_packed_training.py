"""Train a small Llama-style model with Hugging Face's Trainer: block_attn on packed rows vs SDPA.

The model is built from a ``LlamaConfig`` (random initial weights, nothing downloaded) and reads
bytes; the documents are the docstrings of Python's standard library (as in
``train_packed_lm.py``). The same documents, in the same order, from the same initial weights,
are trained three ways, each in its own process so that peak memory is its own:

* ``block_attn``: ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` packs each batch
  into one row and ``attn_implementation="block_attn"`` attends inside each document only;
* ``sdpa-packed``: the same packed rows (``position_ids`` only), ``attn_implementation="sdpa"``,
  for which transformers builds a dense block-diagonal causal mask;
* ``sdpa-padded``: one row per document, right-padded, ``attn_implementation="sdpa"``.

All three compute the same function (the first step's losses are asserted equal) and report
real tokens per second, peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) and
the loss curves. Writes ``results.json``, ``results.md`` and ``loss_curves.png`` to ``--out``.

Run from the repository root (needs ``pip install block_attn[transformers]``)::

    PYTHONPATH=. python examples/hf_packed_training.py --steps 30
    PYTHONPATH=. python examples/hf_packed_training.py --small   # the tiny configuration CI runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_packed_lm import peak_rss, reset_peak_rss, stdlib_docstrings

MODES = ("block_attn", "sdpa-packed", "sdpa-padded")
PAD = 0  # token ids are bytes + 1, so 0 is free for padding


def model_config(small: bool):
    from transformers import LlamaConfig

    sizes = (64, 2, 4, 2) if small else (256, 4, 8, 4)
    hidden, layers, heads, kv_heads = sizes
    return LlamaConfig(
        vocab_size=257,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        use_cache=False,
    )


def documents(small: bool, steps: int, per_step: int, seed: int) -> list[dict[str, list[int]]]:
    """``steps * per_step`` byte-token documents, shuffled with ``seed``."""
    max_len = 128 if small else 1024
    pool = stdlib_docstrings(16, max_len, count=max(4 * steps * per_step, 2000))
    random.Random(seed).shuffle(pool)
    chosen = [[byte + 1 for byte in text] for text in pool[: steps * per_step]]
    return [{"input_ids": ids, "labels": list(ids)} for ids in chosen]


def pad_collator(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """One row per document, right-padded; padding is masked and never predicted."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        mask[row, : len(feature["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(mode: str, args: argparse.Namespace) -> dict:
    import transformers

    import block_attn.transformers

    block_attn.transformers.register()
    transformers.set_seed(args.seed)
    implementation = "block_attn" if mode == "block_attn" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(
        model_config(args.small), attn_implementation=implementation
    )
    data = documents(args.small, args.steps, args.docs_per_step, args.seed)
    if mode == "sdpa-padded":
        collator = pad_collator
    else:
        collator = transformers.DataCollatorWithFlattening(
            return_flash_attn_kwargs=mode == "block_attn"
        )
    training = transformers.TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.docs_per_step,
        max_steps=args.steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=args.device == "cpu",
        dataloader_drop_last=True,
    )
    trainer = transformers.Trainer(
        model=model, args=training, train_dataset=data, data_collator=collator
    )
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    real_tokens = sum(len(d["input_ids"]) for d in data)
    return {
        "losses": losses,
        "real_tokens": real_tokens,
        "seconds": seconds,
        "tokens_per_second": real_tokens / seconds,
        "peak_memory_mib": memory / 2**20,
        "memory_kind": "max allocated" if device.type == "cuda" else "peak RSS",
    }


def run_in_subprocess(mode: str, args: argparse.Namespace) -> dict:
    """Runs one mode in a fresh process so that its peak memory is its own."""
    result_path = Path(args.out) / f"{mode}.json"
    command = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--out", args.out]
    command += ["--steps", str(args.steps), "--seed", str(args.seed), "--device", args.device]
    command += ["--docs-per-step", str(args.docs_per_step)] + (["--small"] if args.small else [])
    subprocess.run(command, check=True)
    return json.loads(result_path.read_text())


def write_report(results: dict, args: argparse.Namespace) -> str:
    """Writes results.json, results.md and loss_curves.png; returns the markdown table."""
    out = Path(args.out)
    lines = [
        "| | " + " | ".join(MODES) + " |",
        "|---|" + "---:|" * len(MODES),
        "| real tokens / s | "
        + " | ".join(f"{results[m]['tokens_per_second']:,.0f}" for m in MODES)
        + " |",
        f"| peak memory, MiB ({results[MODES[0]]['memory_kind']}) | "
        + " | ".join(f"{results[m]['peak_memory_mib']:,.1f}" for m in MODES)
        + " |",
        "| final loss | " + " | ".join(f"{results[m]['losses'][-1]:.4f}" for m in MODES) + " |",
    ]
    table = "\n".join(lines)
    summary = (
        f"device {args.device}, {args.steps} steps of {args.docs_per_step} documents, "
        f"{results[MODES[0]]['real_tokens']:,} real tokens, {'small' if args.small else 'default'} "
        f"model, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    (out / "results.md").write_text(f"{summary}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), **results}, indent=2))
    plot_losses(results, out / "loss_curves.png")
    return f"{summary}\n\n{table}"


def plot_losses(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss_curves.png", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in zip(MODES, ("-", "--", ":"), strict=True):
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
    parser.add_argument("--docs-per-step", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny model and data (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "hf_packed_training")
    )
    parser.add_argument("--mode", choices=("all", *MODES), default="all", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.mode != "all":
        result = train(args.mode, args)
        (Path(args.out) / f"{args.mode}.json").write_text(json.dumps(result))
        return
    results = {mode: run_in_subprocess(mode, args) for mode in MODES}
    first = {mode: results[mode]["losses"][0] for mode in MODES}
    if not all(math.isclose(loss, first["block_attn"], rel_tol=1e-4) for loss in first.values()):
        raise AssertionError(f"identical first batches gave different losses: {first}")
    print("first-step losses: " + ", ".join(f"{m} {v:.6f}" for m, v in first.items()) + " (equal)")
    print(write_report(results, args))


if __name__ == "__main__":
    main()
