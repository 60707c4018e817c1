"""Text classification with packed documents: block_attn against padded torch attention.

The classifier most people build first with attention: token embedding, dropout, one
self-attention layer (with a residual connection), average pooling over the real tokens and a
dense head. It is trained twice, from the same initial weights, on the same batches in the same
order, with the same AdamW optimizer:

* **block_attn (packed)**: the texts of a batch are concatenated into one row with no padding,
  and ``block_attn.nn.MultiheadBlockAttention`` keeps each text to itself through the block
  offsets ``cu_seqlens``; pooling is a segment sum (``index_add_``) per text.
* **torch (padded)**: one row per text, padded to the longest of the batch, with
  ``torch.nn.MultiheadAttention(batch_first=True)`` and a ``key_padding_mask``; pooling is a
  masked mean.

Both compute the same function (checked before training: the initial held-out logits agree).
Attention dropout draws different masks in the two, so their held-out accuracies agree only
within noise. The two take turns, one training step each, so that other jobs on the machine slow
them alike; the throughput reported is real (non-padding) tokens per second of the timed steps
(forward, backward and optimizer step; each model's first step is a warm-up, not timed).

The data is labelled text that ships with Python: the module, class and function docstrings of
a few standard-library packages, each labelled by its package (``asyncio``, ``email``, ...),
read from the sources with ``ast``. Nothing is downloaded.

Run from the repository root (or with block_attn installed)::

    PYTHONPATH=. python examples/packed_text_classifier.py  # plot: docs/packed_text_classifier.png
    PYTHONPATH=. python examples/packed_text_classifier.py --small  # tiny: seconds on a CPU
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from block_attn.nn import MultiheadBlockAttention

# Standard-library packages present from Python 3.10 on, each with over 100 distinct docstrings.
PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
)
PAD, UNK = "<pad>", "<unk>"
MODES = ("block_attn", "torch")
MODE_LABELS = {"block_attn": "block_attn, packed", "torch": "torch MHA, padded"}
DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "docs" / "packed_text_classifier.png"


@dataclass
class Config:
    """Data, model and training sizes; ``small()`` is the configuration CI runs."""

    max_docs: int | None = None  # None: all, as many per class as the smallest class has
    max_tokens: int = 256
    min_tokens: int = 8
    min_count: int = 2
    held_out_fraction: float = 0.2
    embed_dim: int = 64
    num_heads: int = 4
    dropout: float = 0.1
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3

    @classmethod
    def small(cls) -> Config:
        return cls(max_docs=800, max_tokens=64, embed_dim=32, num_heads=2, epochs=6, lr=1e-2)


Example = tuple[list[str], int]  # a tokenized text and its class


@dataclass
class Dataset:
    """Token ids per text with their labels."""

    texts: list[list[int]]
    labels: list[int]


# Data -------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters or digits."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def package_docstrings(package: str) -> set[str]:
    """Module, class and function docstrings of a standard-library package, tests left out.

    The sources are parsed, not imported: no import side effects, and modules for other
    platforms (``asyncio.windows_events``) are read too.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not a package of this Python")
    docstrings = set()
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            if any("test" in part for part in path.relative_to(root).parts[:-1]):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            docstrings.update(_docstrings(tree))
    return docstrings


def _docstrings(tree: ast.Module) -> Iterator[str]:
    kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    for node in ast.walk(tree):
        if isinstance(node, kinds) and (text := ast.get_docstring(node)):
            yield text


def labelled_texts(config: Config, seed: int) -> list[Example]:
    """Balanced tokenized texts labelled by their package's index, in a seeded order.

    A docstring found in two packages is dropped; texts shorter than ``min_tokens`` are dropped
    and longer ones cut at ``max_tokens``. Every package keeps as many texts as the smallest
    has, and at most ``max_docs // len(PACKAGES)`` when ``max_docs`` is set.
    """
    per_package = {package: package_docstrings(package) for package in PACKAGES}
    seen = Counter(text for texts in per_package.values() for text in texts)
    tokenized = {}
    for package, texts in per_package.items():
        unique = [tokenize(text) for text in sorted(texts) if seen[text] == 1]
        tokenized[package] = [t[: config.max_tokens] for t in unique if len(t) >= config.min_tokens]
    keep = min(map(len, tokenized.values()))
    if config.max_docs is not None:
        keep = min(keep, config.max_docs // len(PACKAGES))
    rng = random.Random(seed)
    examples = []
    for label, package in enumerate(PACKAGES):
        examples += [(tokens, label) for tokens in rng.sample(tokenized[package], keep)]
    rng.shuffle(examples)
    return examples


def split(examples: list[Example], held_out_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, held-out), every class split in the same proportion; ``examples`` are shuffled."""
    train, held_out = [], []
    for label in sorted({label for _, label in examples}):
        members = [example for example in examples if example[1] == label]
        cut = round(len(members) * held_out_fraction)
        held_out += members[:cut]
        train += members[cut:]
    return train, held_out


def build_vocabulary(examples: Iterable[Example], min_count: int) -> dict[str, int]:
    """Words seen at least ``min_count`` times, after ``<pad>`` (0) and ``<unk>`` (1)."""
    counts = Counter(word for tokens, _ in examples for word in tokens)
    words = sorted(word for word, count in counts.items() if count >= min_count)
    return {word: index for index, word in enumerate([PAD, UNK, *words])}


def encode(examples: list[Example], vocabulary: dict[str, int]) -> Dataset:
    """Token ids, words outside ``vocabulary`` as ``<unk>``."""
    unk = vocabulary[UNK]
    texts = [[vocabulary.get(word, unk) for word in tokens] for tokens, _ in examples]
    return Dataset(texts, [label for _, label in examples])


# Batches ----------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """All texts of a batch in one row: tokens (1, T), ``cu_seqlens`` offsets, labels (D,)."""

    tokens: torch.Tensor
    cu_seqlens: list[int]
    text_index: torch.Tensor  # (T,): which text each token belongs to
    lengths: torch.Tensor  # (D,)
    labels: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return self.tokens.numel()


@dataclass
class PaddedBatch:
    """One row per text: tokens (D, L) right-padded, ``padding_mask`` (D, L) True at pads."""

    tokens: torch.Tensor
    padding_mask: torch.Tensor
    lengths: torch.Tensor  # (D,)
    labels: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def packed_batch(texts: list[list[int]], labels: list[int], device: torch.device) -> PackedBatch:
    lengths = torch.tensor([len(t) for t in texts])
    cu_seqlens = [0, *torch.cumsum(lengths, 0).tolist()]
    return PackedBatch(
        tokens=torch.tensor([token for text in texts for token in text], device=device)[None],
        cu_seqlens=cu_seqlens,  # a list: the attention call needs no device-to-host copy
        text_index=torch.repeat_interleave(torch.arange(len(texts)), lengths).to(device),
        lengths=lengths.to(device),
        labels=torch.tensor(labels, device=device),
    )


def padded_batch(texts: list[list[int]], labels: list[int], device: torch.device) -> PaddedBatch:
    lengths = torch.tensor([len(t) for t in texts])
    tokens = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)  # 0 is <pad>
    for row, text in enumerate(texts):
        tokens[row, : len(text)] = torch.tensor(text)
    padding_mask = torch.arange(tokens.shape[1]) >= lengths[:, None]
    return PaddedBatch(
        tokens=tokens.to(device),
        padding_mask=padding_mask.to(device),
        lengths=lengths.to(device),
        labels=torch.tensor(labels, device=device),
    )


def batches(
    data: Dataset, mode: str, batch_size: int, device: torch.device, order: Sequence[int]
) -> Iterator[PackedBatch | PaddedBatch]:
    """The texts in ``order``, ``batch_size`` at a time, packed or padded as ``mode`` asks."""
    make = packed_batch if mode == "block_attn" else padded_batch
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield make([data.texts[i] for i in chosen], [data.labels[i] for i in chosen], device)


# Models -----------------------------------------------------------------------------------------


class PackedClassifier(nn.Module):
    """Embedding, dropout, block-diagonal self-attention, mean pooling per text, dense head."""

    def __init__(self, vocab_size: int, num_classes: int, config: Config) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.attention = MultiheadBlockAttention(
            config.embed_dim, config.num_heads, dropout=config.dropout
        )
        self.head = nn.Linear(config.embed_dim, num_classes)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits (D, num_classes) for the D texts packed in ``batch.tokens`` (1, T)."""
        x = self.dropout(self.embedding(batch.tokens))
        # The residual keeps each token's own embedding next to what it gathered from its text.
        x = (x + self.attention(x, cu_seqlens=batch.cu_seqlens))[0]
        sums = x.new_zeros(len(batch.lengths), x.shape[-1]).index_add_(0, batch.text_index, x)
        return self.head(sums / batch.lengths[:, None])


class PaddedClassifier(nn.Module):
    """The same model on padded rows, with ``torch.nn.MultiheadAttention``."""

    def __init__(self, vocab_size: int, num_classes: int, config: Config) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.attention = nn.MultiheadAttention(
            config.embed_dim, config.num_heads, dropout=config.dropout, batch_first=True
        )
        self.head = nn.Linear(config.embed_dim, num_classes)

    def forward(self, batch: PaddedBatch) -> torch.Tensor:
        """Logits (D, num_classes) for the D rows of ``batch.tokens`` (D, L)."""
        x = self.dropout(self.embedding(batch.tokens))
        attended, _ = self.attention(
            x, x, x, key_padding_mask=batch.padding_mask, need_weights=False
        )
        x = (x + attended).masked_fill(batch.padding_mask[..., None], 0.0)
        return self.head(x.sum(1) / batch.lengths[:, None])


def padded_twin(model: PackedClassifier, config: Config) -> PaddedClassifier:
    """A ``PaddedClassifier`` with ``model``'s weights (q, k, v stacked into ``in_proj``)."""
    vocab_size, num_classes = model.embedding.num_embeddings, model.head.out_features
    twin = PaddedClassifier(vocab_size, num_classes, config)
    state = {
        name: value
        for name, value in model.state_dict().items()
        if not name.startswith("attention.")
    }
    attention = model.attention
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    state["attention.in_proj_weight"] = torch.cat([p.weight for p in projections])
    state["attention.in_proj_bias"] = torch.cat([p.bias for p in projections])
    state["attention.out_proj.weight"] = attention.out_proj.weight
    state["attention.out_proj.bias"] = attention.out_proj.bias
    twin.load_state_dict(state)
    return twin.to(model.head.weight.device)


# Training ---------------------------------------------------------------------------------------


@dataclass
class History:
    """What one training run records."""

    losses: list[float] = field(default_factory=list)  # per step
    accuracies: list[float] = field(default_factory=list)  # held-out, per epoch
    real_tokens: int = 0  # in the timed steps
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else math.nan


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, mode: str, batch_size: int, device: torch.device
) -> tuple[float, torch.Tensor]:
    """Held-out accuracy and the logits (N, num_classes), in data order."""
    model.eval()
    logits = torch.cat(
        [model(b) for b in batches(data, mode, batch_size, device, range(len(data.labels)))]
    )
    accuracy = (logits.argmax(1).cpu() == torch.tensor(data.labels)).float().mean().item()
    return accuracy, logits


def train_side_by_side(
    models: dict[str, nn.Module],
    train_data: Dataset,
    held_out: Dataset,
    config: Config,
    seed: int,
    device: torch.device,
) -> dict[str, History]:
    """Trains every model with its own AdamW on the same batches in the same order.

    The models take turns, one step each, so that a change in the machine's load (other jobs on
    a shared CPU) slows them alike and their throughputs stay comparable.
    """
    optimizers = {
        mode: torch.optim.AdamW(model.parameters(), lr=config.lr) for mode, model in models.items()
    }
    histories = {mode: History() for mode in models}
    steps_per_epoch = math.ceil(len(train_data.labels) / config.batch_size)
    progress = Progress(config.epochs * steps_per_epoch, "training")
    for epoch in range(config.epochs):
        order = list(range(len(train_data.labels)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for model in models.values():
            model.train()
        streams = [batches(train_data, mode, config.batch_size, device, order) for mode in models]
        for step_batches in zip(*streams, strict=True):
            for (mode, model), batch in zip(models.items(), step_batches, strict=True):
                history = histories[mode]
                seconds = timed_step(model, optimizers[mode], batch, history.losses)
                if len(history.losses) > 1:  # the first step is a warm-up (allocator, caches)
                    history.seconds += seconds
                    history.real_tokens += batch.real_tokens
            losses = ", ".join(f"{mode} {h.losses[-1]:.3f}" for mode, h in histories.items())
            progress.update(f"epoch {epoch + 1}/{config.epochs}, loss {losses}")
        for mode, model in models.items():
            accuracy, _ = evaluate(model, held_out, mode, 4 * config.batch_size, device)
            histories[mode].accuracies.append(accuracy)
    progress.close()
    return histories


def timed_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: PackedBatch | PaddedBatch,
    losses: list[float],
) -> float:
    """One optimizer step; appends its loss and returns its wall-clock seconds."""
    _synchronize(batch.labels.device)
    start = time.perf_counter()
    loss = functional.cross_entropy(model(batch), batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())  # also waits for the device
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else a one-line carriage-return counter."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description, self.done, self.width = total, description, 0, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True)

    def update(self, status: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update()
        else:
            line = f"{self.description}: {self.done}/{self.total} steps, {status}"
            # Padded to the previous line's length so that none of it is left showing.
            print(f"\r{line:<{self.width}}", end="", file=sys.stderr, flush=True)
            self.width = len(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


# Report -----------------------------------------------------------------------------------------


def report(histories: dict[str, History], num_classes: int, initial_difference: float) -> str:
    """A markdown table of held-out accuracy, throughput and final loss."""
    first, second = (histories[mode] for mode in MODES)
    rows = [
        ("held-out accuracy", first.accuracies[-1], second.accuracies[-1], "{:.4f}"),
        ("real tokens / s, training", first.tokens_per_second, second.tokens_per_second, "{:,.0f}"),
        ("final training loss", first.losses[-1], second.losses[-1], "{:.4f}"),
    ]
    lines = [f"| | {MODE_LABELS[MODES[0]]} | {MODE_LABELS[MODES[1]]} |", "|---|---:|---:|"]
    lines += [f"| {name} | {fmt.format(a)} | {fmt.format(b)} |" for name, a, b, fmt in rows]
    notes = (
        f"chance accuracy {1 / num_classes:.4f}; largest difference of the initial held-out "
        f"logits {initial_difference:.2e}"
    )
    return "\n".join([*lines, "", notes])


def plot(histories: dict[str, History], path: Path) -> None:
    """Training loss per step and held-out accuracy per epoch, both modes on each panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in zip(MODES, ("-", "--"), strict=True):
        history = histories[mode]
        loss_axes.plot(history.losses, style, label=MODE_LABELS[mode], alpha=0.8)
        epochs = range(1, len(history.accuracies) + 1)
        accuracy_axes.plot(epochs, history.accuracies, style, marker="o", label=MODE_LABELS[mode])
    loss_axes.set(xlabel="step", ylabel="training loss (cross-entropy)")
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
    fig.suptitle("Same texts, same initial weights: packed block_attn vs padded torch attention")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")


# Command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny data and model (CI)")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--embed-dim", type=int, help="embedding and attention width")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--max-docs", type=int, help="texts in all, train and held-out")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--plot",
        type=Path,
        help=f"where to save the loss/accuracy plot; default {DEFAULT_PLOT.name} in docs/ "
        "without --small, none with it",
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> Config:
    config = Config.small() if args.small else Config()
    for name in ("epochs", "embed_dim", "max_docs"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.heads is not None:
        config.num_heads = args.heads
    return config


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = config_from(args)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_examples, held_out_examples = split(
        labelled_texts(config, args.seed), config.held_out_fraction
    )
    vocabulary = build_vocabulary(train_examples, config.min_count)
    train_data = encode(train_examples, vocabulary)
    held_out = encode(held_out_examples, vocabulary)
    print(
        f"{len(PACKAGES)} classes ({', '.join(PACKAGES)}): {len(train_data.labels)} training and "
        f"{len(held_out.labels)} held-out texts, vocabulary {len(vocabulary):,}, up to "
        f"{config.max_tokens} tokens a text; embed_dim {config.embed_dim}, {config.num_heads} "
        f"heads, {config.epochs} epochs of batches of {config.batch_size}, device {device}"
    )

    torch.manual_seed(args.seed)
    packed = PackedClassifier(len(vocabulary), len(PACKAGES), config).to(device)
    models: dict[str, nn.Module] = {"block_attn": packed, "torch": padded_twin(packed, config)}
    batch_size = 4 * config.batch_size
    _, packed_logits = evaluate(models["block_attn"], held_out, "block_attn", batch_size, device)
    _, padded_logits = evaluate(models["torch"], held_out, "torch", batch_size, device)
    initial_difference = (packed_logits - padded_logits).abs().max().item()
    if initial_difference > 1e-4:
        raise AssertionError(
            f"the two models differ before training: largest logit difference "
            f"{initial_difference:.3e}"
        )

    torch.manual_seed(args.seed)
    histories = train_side_by_side(models, train_data, held_out, config, args.seed, device)
    print(report(histories, len(PACKAGES), initial_difference))
    plot_path = args.plot if args.plot is not None else None if args.small else DEFAULT_PLOT
    if plot_path is not None:
        plot(histories, plot_path)


if __name__ == "__main__":
    main()
