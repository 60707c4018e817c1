"""One training step of a small Llama-style transformers model on packed rows of 4k-32k tokens.

The model of ``examples/hf_packed_training.py`` (random init from a ``LlamaConfig``), on the same
documents (lognormal lengths, random tokens: the time does not depend on them) three ways:

* ``block_attn``: one packed row, ``attn_implementation="block_attn"`` with the flash-attention
  kwargs ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives;
* ``sdpa-packed``: the same row with ``position_ids`` only and ``attn_implementation="sdpa"``, for
  which transformers builds a dense (N, N) block-diagonal causal mask (skipped where SDPA's float
  scores, heads × N² × 4 bytes, would pass ``--max-dense-bytes``);
* ``sdpa-padded``: one row per document, right-padded, with a 2-D attention mask;
* ``flex`` (CUDA only): ``attn_implementation="flex_attention"`` on the packed row.

Each step is forward + backward of the loss; steps are interleaved across the implementations and
the median of ``--reps`` after a warm-up is reported with real (non-padding) tokens per second and
the ratio to block_attn.

    python -m bench.hf_step_bench --out bench/results/hf_step_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.timing import sample_ms, summarize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from hf_packed_training import model_config


def document_lengths(total: int, seed: int) -> list[int]:
    """Lognormal lengths (median about 400 tokens, clipped to [16, 4096]) filling ``total``."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(min(max(rng.lognormvariate(math.log(400), 0.9), 16), 4096)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def packed_inputs(lengths: list[int], device: str, flash_kwargs: bool) -> dict:
    total = sum(lengths)
    ids = torch.randint(1, 257, (1, total), device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
    inputs = {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}
    if flash_kwargs:
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
        offsets = offsets.to(torch.int32)
        inputs |= {
            "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }
    return inputs


def padded_inputs(lengths: list[int], device: str) -> dict:
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 257, (n,), device=device)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def training_step(model, inputs: dict) -> Callable[[], object]:
    def step():
        model.zero_grad(set_to_none=True)
        model(**inputs, use_cache=False).loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-dense-bytes", type=int, default=6 * 2**30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the rows and the machine's facts as JSON")
    args = parser.parse_args()

    import transformers

    import block_attn
    import block_attn.transformers

    block_attn.transformers.register()
    config = model_config(small=False)
    config.max_position_embeddings = max(args.tokens)
    implementations = {"block_attn": "block_attn", "sdpa-packed": "sdpa", "sdpa-padded": "sdpa"}
    if args.device.startswith("cuda"):
        implementations["flex"] = "flex_attention"
    models = {}
    for name, implementation in implementations.items():
        transformers.set_seed(args.seed)
        # A config of its own: the model keeps reading its attention implementation from it.
        models[name] = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=implementation
        ).to(args.device)
        assert models[name].config._attn_implementation == implementation
    rows = []
    for total in args.tokens:
        lengths = document_lengths(total, args.seed + total)
        packed = packed_inputs(lengths, args.device, False)
        steps = {
            "block_attn": training_step(
                models["block_attn"], packed_inputs(lengths, args.device, True)
            ),
            "sdpa-padded": training_step(
                models["sdpa-padded"], padded_inputs(lengths, args.device)
            ),
        }
        # SDPA's float scores: the packed row's dense mask, and the padded batch's rows.
        heads = config.num_attention_heads
        if heads * total * total * 4 <= args.max_dense_bytes:
            steps["sdpa-packed"] = training_step(models["sdpa-packed"], packed)
        if len(lengths) * heads * max(lengths) ** 2 * 4 > args.max_dense_bytes:
            del steps["sdpa-padded"]
        if "flex" in models:
            steps["flex"] = training_step(models["flex"], packed)
        times = {n: summarize(s)["ms"] for n, s in sample_ms(steps, args.device, args.reps).items()}
        assert all(m.config._attn_implementation == implementations[n] for n, m in models.items())
        for name, ms in times.items():
            row = dict(
                tokens_per_row=total,
                documents=len(lengths),
                longest=max(lengths),
                impl=name,
                step_ms=ms,
                tokens_per_second=total / ms * 1e3,
                block_attn_speedup=ms / times["block_attn"],
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        for name in implementations:
            if name not in times:
                reason = "scores over --max-dense-bytes"
                skipped = dict(tokens_per_row=total, impl=name, skipped=reason)
                rows.append(skipped)
                print(json.dumps(skipped))
        if args.out:
            write_results(args, config, rows)


def write_results(args: argparse.Namespace, config, rows: list[dict]) -> None:
    """The rows so far and the machine's facts, as JSON at ``args.out``."""
    import transformers

    import block_attn

    machine = dict(
        processor=platform.processor() or platform.machine(),
        device=args.device,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu_capability=block_attn.build_info()["cpu_capability"],
        model=dict(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
        ),
    )
    with open(args.out, "w") as f:
        json.dump(dict(machine=machine, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
