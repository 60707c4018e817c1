"""From single-head self-attention to packed documents, one block_attn call at a time.

Each section below is a function; its docstring is the prose of ``docs/walkthrough.md`` and its
body the code shown there, followed by what it printed. Run it to see the outputs::

    PYTHONPATH=. python examples/walkthrough.py

and regenerate the document (code and outputs together) with::

    PYTHONPATH=. python examples/walkthrough.py --markdown docs/walkthrough.md
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import itertools
import math
import sys
import textwrap
from pathlib import Path

import torch

import block_attn
from block_attn.blocks import resolve_blocks
from block_attn.nn import MultiheadBlockAttention


def show_mask(
    seqlen: int,
    *,
    causal: bool = False,
    block_size=None,
    cu_seqlens=None,
    cu_seqlens_k=None,
    seqlen_k=None,
) -> None:
    """Prints which keys (columns) each query (row) may attend: █ allowed, · masked."""
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    blocks = resolve_blocks(
        seqlen,
        seqlen_k,
        torch.device("cpu"),
        block_size=block_size,
        cu_seqlens=cu_seqlens,
        cu_seqlens_k=cu_seqlens_k,
    )
    allowed = blocks.on_host().mask(causal)
    for row in allowed.tolist():
        print(" ".join("█" if a else "·" for a in row))


def single_head() -> None:
    """## 1. Single-head self-attention

    block_attn takes PyTorch SDPA's layout: q, k and v are (batch, heads, seqlen, head_dim).
    With no mask, `block_attn.attention` is plain scaled dot-product attention,
    softmax(q kᵀ / √D) v, computed exactly but without ever forming the (N, N) score matrix."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 4, 2).unbind(0)  # each (B=1, H=1, N=4, D=2)
    out = block_attn.attention(q, k, v)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(2), dim=-1) @ v
    print(out[0, 0])
    print("matches softmax(q kᵀ/√D) v:", torch.allclose(out, by_hand, atol=1e-6))


def causal() -> None:
    """## 2. Causal attention

    `causal=True` lets query i attend keys 0..i only, as in a decoder. The first token can
    only see itself, so its output is exactly its own value vector."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 4, 2).unbind(0)
    show_mask(4, causal=True)
    out = block_attn.attention(q, k, v, causal=True)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(2)).masked_fill(
        torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf")
    )
    by_hand = torch.softmax(scores, dim=-1) @ v
    print(out[0, 0])
    print("first output == first value:", torch.allclose(out[0, 0, 0], v[0, 0, 0]))
    print("matches the masked softmax:", torch.allclose(out, by_hand, atol=1e-6))


def multi_head() -> None:
    """## 3. Multi-head and grouped-query attention

    Projections produce (B, N, H·D); viewing that as (B, N, H, D) and transposing to
    (B, H, N, D) gives a strided view that block_attn reads as it is, without a copy. With
    fewer key/value heads than query heads (grouped-query attention), query head h reads
    key/value head h // (Hq / Hkv): the same as repeating each kv head for its group."""
    torch.manual_seed(0)
    batch, seqlen, head_dim = 2, 5, 8
    q = torch.randn(batch, seqlen, 4 * head_dim).view(batch, seqlen, 4, head_dim).transpose(1, 2)
    kv = torch.randn(batch, seqlen, 2, 2 * head_dim).transpose(1, 2)  # 2 kv heads
    k, v = kv.split(head_dim, dim=-1)
    print(f"q {tuple(q.shape)} strides {q.stride()} is_contiguous={q.is_contiguous()}")
    print(f"k {tuple(k.shape)} strides {k.stride()}")
    out = block_attn.attention(q, k, v, causal=True)
    repeated = block_attn.attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=True
    )
    print("out", tuple(out.shape))
    print("GQA == repeated kv heads:", torch.allclose(out, repeated, atol=1e-6))


def fixed_blocks() -> None:
    """## 4. Block-diagonal attention with fixed blocks

    `block_size=b` splits the sequence into blocks [0, b), [b, 2b), ... (the last may be
    shorter); a query attends only keys of its own block. The work grows with the sum of the
    squared block lengths instead of N². It equals running each block on its own."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 7, 4).unbind(0)  # (B=1, H=2, N=7, D=4)
    show_mask(7, block_size=3)
    out = block_attn.attention(q, k, v, block_size=3)
    blocks = [slice(0, 3), slice(3, 6), slice(6, 7)]
    separately = [block_attn.attention(q[:, :, b], k[:, :, b], v[:, :, b]) for b in blocks]
    separately = torch.cat(separately, dim=2)
    print("== each block on its own:", torch.allclose(out, separately, atol=1e-6))


def packed_documents() -> None:
    """## 5. Packed documents: variable-length blocks, causal

    Documents of different lengths are concatenated into one row instead of being padded to
    the longest; `cu_seqlens` gives their offsets 0 = c₀ < c₁ < … < c_m = N (shared by every
    batch row). With `causal=True` each token attends the earlier tokens of its own document
    only: the same result as running each document separately, with no padding at all."""
    torch.manual_seed(0)
    lengths = [2, 5, 3]
    cu_seqlens = [0, 2, 7, 10]
    q, k, v = torch.randn(3, 1, 2, sum(lengths), 4).unbind(0)
    show_mask(10, cu_seqlens=cu_seqlens, causal=True)
    out = block_attn.attention(q, k, v, cu_seqlens=cu_seqlens, causal=True)
    for start, end in itertools.pairwise(cu_seqlens):
        alone = block_attn.attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], causal=True
        )
        same = torch.allclose(out[:, :, start:end], alone, atol=1e-6)
        print(f"document [{start}, {end}) == on its own: {same}")


def module() -> None:
    """## 6. The multi-head module

    `block_attn.nn.MultiheadBlockAttention` wraps the projections around these calls, batch
    first like `torch.nn.MultiheadAttention(batch_first=True)`. The block structure is fixed
    at construction (`block_size`) or given per call (`cu_seqlens`); `need_weights=True` also
    returns the per-head attention probabilities through a dense O(N²) path, for inspection."""
    torch.manual_seed(0)
    attention = MultiheadBlockAttention(embed_dim=16, num_heads=4, num_kv_heads=2, causal=True)
    print(attention)
    x = torch.randn(1, 5, 16)  # two documents packed into one row: tokens [0, 2) and [2, 5)
    out, weights = attention(x, cu_seqlens=[0, 2, 5], need_weights=True)
    print("out", tuple(out.shape), "weights", tuple(weights.shape))
    print("head 0 probabilities:")
    print(weights[0, 0].detach())
    alone = torch.cat([attention(x[:, :2]), attention(x[:, 2:])], dim=1)
    print("packed == documents one by one:", torch.allclose(out, alone, atol=1e-6))


def cached_keys() -> None:
    """## 7. Queries against their own cached keys

    When several sequences are extended at once (a prompt processed in chunks, or decoding),
    each sequence's new queries must attend that sequence's keys so far: its cache plus the
    new tokens. `cu_seqlens` then gives the queries' blocks and `cu_seqlens_k` the keys'
    blocks (as many, ending at Nk); query block j attends key block j. With `causal=True`
    each block is aligned bottom-right, so the last query sees every key of its sequence and
    the first new query sees the whole cache."""
    torch.manual_seed(0)
    cu_seqlens, cu_seqlens_k = [0, 2, 3], [0, 4, 7]  # 2 and 1 new tokens; 4 and 3 keys
    q = torch.randn(1, 2, 3, 4)
    k, v = torch.randn(2, 1, 2, 7, 4).unbind(0)
    show_mask(3, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k, seqlen_k=7, causal=True)
    blocks = {"cu_seqlens": cu_seqlens, "cu_seqlens_k": cu_seqlens_k}
    out = block_attn.attention(q, k, v, causal=True, **blocks)
    pairs = zip(itertools.pairwise(cu_seqlens), itertools.pairwise(cu_seqlens_k), strict=True)
    for (q0, q1), (k0, k1) in pairs:
        alone = block_attn.attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal=True)
        same = torch.allclose(out[:, :, q0:q1], alone, atol=1e-6)
        print(f"queries [{q0}, {q1}) with keys [{k0}, {k1}) == on their own: {same}")


SECTIONS = [
    single_head,
    causal,
    multi_head,
    fixed_blocks,
    packed_documents,
    module,
    cached_keys,
]

INTRO = """# Walk-through: from single-head attention to packed documents

Generated by `examples/walkthrough.py --markdown docs/walkthrough.md`: every code block is a
section of that script and every output block is what it printed ({where}).
Each snippet starts from

```python
import itertools
import math

import torch

import block_attn
from block_attn.blocks import resolve_blocks
from block_attn.nn import MultiheadBlockAttention

torch.set_printoptions(precision=3, sci_mode=False)


{show_mask}```
"""


def run_section(section) -> str:
    """Runs one section and returns what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        section()
    return buffer.getvalue()


def markdown() -> str:
    """The whole walk-through as markdown: prose, code and printed output per section."""
    where = f"torch {torch.__version__}, CPU"
    parts = [INTRO.format(where=where, show_mask=inspect.getsource(show_mask)).rstrip()]
    for section in SECTIONS:
        source = inspect.getsource(section)
        doc = inspect.getdoc(section)
        body = source.split('"""', 2)[2].lstrip("\n")
        parts.append(doc)
        parts.append(f"```python\n{textwrap.dedent(body).rstrip()}\n```")
        parts.append(f"Output:\n\n```\n{run_section(section).rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", metavar="PATH", help="write the walk-through document")
    args = parser.parse_args(argv)
    torch.set_printoptions(precision=3, sci_mode=False)
    if args.markdown:
        Path(args.markdown).write_text(markdown())
        return
    for section in SECTIONS:
        print(inspect.getdoc(section).splitlines()[0])
        sys.stdout.write(run_section(section))
        print()


if __name__ == "__main__":
    main()
