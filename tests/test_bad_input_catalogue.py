"""A catalogue of bad calls, each run in a child process, so a crash or a hang fails that call
and not the suite.

Every entry is a snippet that must raise a clean Python exception of the type README's error
contract names (TypeError for a wrong type, a tensor's dtype included; ValueError for a bad
value or shape; RuntimeError only where the contract says so) with a message naming the
argument. One child runs a whole group, timing each call with ``signal.alarm`` (and a
watchdog thread for hangs inside native code) and printing one JSON line per call; if the
child dies, the calls it did not report are rerun one per child, so the culprit is named.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASE_SECONDS = 20  # signal.alarm per call
WATCHDOG_EXTRA_SECONDS = 10  # after the alarm, ends the child when a call hangs in native code
RESULT_PREFIX = "CATALOGUE-RESULT "


# How offset checks name the offsets: cu_seqlens / cu_seqlens_k, or the raw operators' names.
OFFSETS_NAME = r"cu_seqlens\w*(?: \(attention's cu_seqlens\))?"


@dataclass(frozen=True)
class Bad:
    """A call that must raise ``error`` with a message matching ``match`` (a regex)."""

    name: str
    code: str
    error: str
    match: str
    bug: str | None = None  # a known library bug: the case is an expected, strict failure
    seconds: int = CASE_SECONDS  # the alarm; a call known to hang gets less


# Run in every child before its calls: valid inputs and shorthands the snippets use.
PRELUDE = """
import numpy as np
import torch
import block_attn
from block_attn import BlockLayout, padded_cache_blocks
from block_attn.nn import MultiheadBlockAttention

B, H, N, D = 2, 4, 12, 8
INT32_MAX = 2**31 - 1

def qkv(**given):
    tensors = {name: torch.randn(B, H, N, D) for name in "qkv"}
    tensors.update(given)
    return tensors["q"], tensors["k"], tensors["v"]

def call(**kwargs):
    tensors = {name: kwargs.pop(name) for name in "qkv" if name in kwargs}
    return block_attn.attention(*qkv(**tensors), **kwargs)

def huge(*shape):
    # Sizes past int32 with a single element of storage: stride 0 everywhere.
    return torch.zeros(1, 1, 1, 1).expand(*shape)

def kept(offsets, dtype=torch.int32):
    return torch.tensor(offsets, dtype=dtype)

def module(**kwargs):
    return MultiheadBlockAttention(8, 2, **kwargs)

X = torch.randn(2, 6, 8)
"""

# Reads (name, code) pairs as JSON from stdin; prints one result line per call as it ends.
RUNNER = """
import faulthandler, json, signal, sys, traceback

class CaseTimeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise CaseTimeout

signal.signal(signal.SIGALRM, on_alarm)
for name, code, seconds in json.loads(sys.stdin.read()):
    faulthandler.dump_traceback_later(seconds + WATCHDOG_EXTRA_SECONDS, exit=True)
    signal.alarm(seconds)
    try:
        exec(code, dict(globals()))
        result = {"raised": None}
    except CaseTimeout:
        result = {"raised": "timeout"}
    except BaseException as error:
        result = {
            "raised": type(error).__name__,
            "bases": [c.__name__ for c in type(error).__mro__],
            "message": str(error),
            "where": traceback.format_exc(limit=-2)[-600:],
        }
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
    print(RESULT_PREFIX + json.dumps([name, result]), flush=True)
"""

# fmt: off
TENSORS = [
    Bad("q-list", "call(q=[[1.0]])", "TypeError", r"q must be a torch\.Tensor, got list"),
    Bad("k-none", "call(k=None)", "TypeError", r"k must be a torch\.Tensor, got NoneType"),
    Bad("v-numpy", "call(v=np.zeros((B, H, N, D), dtype=np.float32))", "TypeError",
        r"v must be a torch\.Tensor, got ndarray"),
    Bad("q-scalar-tensor", "call(q=torch.tensor(1.0))", "ValueError", r"q must be 4-D.*0-D"),
    Bad("q-rank-3", "call(q=torch.randn(H, N, D))", "ValueError", r"q must be 4-D.*3-D"),
    Bad("v-rank-5", "call(v=torch.randn(1, B, H, N, D))", "ValueError", r"v must be 4-D.*5-D"),
    Bad("batch", "call(q=torch.randn(3, H, N, D))", "ValueError", r"batch size.*q has B = 3"),
    Bad("head-dim", "call(q=torch.randn(B, H, N, 5))", "ValueError", r"head_dim.*q has D = 5"),
    Bad("k-v-lengths", "call(v=torch.randn(B, H, N + 1, D))", "ValueError",
        r"k and v must have the same shape"),
    Bad("k-v-heads", "call(v=torch.randn(B, 2, N, D))", "ValueError",
        r"k and v must have the same shape"),
    Bad("gqa-ratio", "call(q=torch.randn(B, 6, N, D))", "ValueError", r"kv heads.*Hq = 6, Hkv = 4"),
    Bad("zero-kv-heads", "call(k=torch.randn(B, 0, N, D), v=torch.randn(B, 0, N, D))",
        "ValueError", r"Hkv = 0"),
    Bad("zero-head-dim", "call(**{n: torch.randn(B, H, N, 0) for n in 'qkv'})", "ValueError",
        r"head_dim D must be at least 1"),
    Bad("empty-batch-mismatch", "call(q=torch.randn(0, H, N, D))", "ValueError",
        r"batch size.*q has B = 0"),
    Bad("int-dtype", "call(**{n: torch.ones(B, H, N, D, dtype=torch.int32) for n in 'qkv'})",
        "TypeError", r"q has unsupported dtype torch\.int32"),
    Bad("bool-k", "call(k=torch.ones(B, H, N, D, dtype=torch.bool))", "TypeError",
        r"k has unsupported dtype torch\.bool"),
    Bad("complex-dtype",
        "call(**{n: torch.randn(B, H, N, D, dtype=torch.complex64) for n in 'qkv'})", "TypeError",
        r"q has unsupported dtype torch\.complex64"),
    Bad("float8-dtype",
        "call(**{n: torch.zeros(B, H, N, D).to(torch.float8_e4m3fn) for n in 'qkv'})",
        "TypeError", r"q has unsupported dtype torch\.float8_e4m3fn"),
    Bad("mixed-dtypes", "call(v=torch.randn(B, H, N, D, dtype=torch.float64))", "TypeError",
        r"q, k and v must share a dtype"),
    Bad("mixed-half-dtypes", "call(q=torch.randn(B, H, N, D, dtype=torch.float16), "
        "k=torch.randn(B, H, N, D, dtype=torch.bfloat16))", "TypeError",
        r"q, k and v must share a dtype"),
    Bad("k-on-meta", "call(k=torch.randn(B, H, N, D, device='meta'))", "ValueError",
        r"q, k and v must be on one device.*meta"),
    Bad("q-on-meta", "call(q=torch.randn(B, H, N, D, device='meta'))", "ValueError",
        r"q, k and v must be on one device.*meta"),
    Bad("meta-qkv-cpu-kept-offsets",
        "call(**{n: torch.randn(B, H, N, D, device='meta') for n in 'qkv'}, "
        "cu_seqlens=kept([0, 4, N]), max_seqlen=8)", "ValueError",
        r"cu_seqlens with max_seqlen must be on q's device meta, got cpu"),
    Bad("reference-mixed-devices",
        "block_attn.reference.attention(*qkv(v=torch.randn(B, H, N, D, device='meta')))",
        "ValueError", r"q, k and v must be on one device"),
]

HUGE = [
    Bad("nq-past-int32", "call(q=huge(1, 1, 2**31, D), k=huge(1, 1, 4, D), v=huge(1, 1, 4, D))",
        "ValueError", r"sequence lengths must fit in int32, got Nq = 2147483648"),
    Bad("nk-past-int32",
        "call(q=huge(1, 1, 4, D), k=huge(1, 1, 2**31, D), v=huge(1, 1, 2**31, D))", "ValueError",
        r"sequence lengths must fit in int32, got Nq = 4, Nk = 2147483648"),
    Bad("nq-past-int32-blocks",
        "call(q=huge(1, 1, 2**31, D), k=huge(1, 1, 2**31, D), v=huge(1, 1, 2**31, D), "
        "block_size=2**20)",
        "ValueError", r"sequence lengths must fit in int32, got Nq = 2147483648"),
    Bad("raw-operator-nq-past-int32",
        "cu = torch.tensor([0, 4], dtype=torch.int32)\n"
        "torch.ops.block_attn.attention_forward(huge(1, 1, 2**31, D), huge(1, 1, 4, D), "
        "huge(1, 1, 4, D), cu, cu, 4, 4, False, 1.0)", "ValueError",
        r"sequence lengths must fit in int32, got Nq = 2147483648"),
    # Listing 2**29 offsets before checking N once took minutes: a short alarm keeps it cheap.
    Bad("nq-past-int32-small-blocks",
        "call(q=huge(1, 1, 2**31, D), k=huge(1, 1, 2**31, D), v=huge(1, 1, 2**31, D), "
        "block_size=4)",
        "ValueError", r"sequence lengths must fit in int32, got Nq = 2147483648", seconds=3),
    Bad("layout-fixed-past-int32", "BlockLayout.fixed(2**31, 4)", "ValueError",
        r"seqlen must be in \[0, 2147483647\] \(int32 offsets\), got 2147483648"),
    Bad("nq-past-int32-cu-seqlens",
        "call(q=huge(1, 1, 2**32, D), k=huge(1, 1, 2**32, D), v=huge(1, 1, 2**32, D), "
        "cu_seqlens=[0, 2**31, 2**32])", "ValueError", r"cu_seqlens.*int32"),
    Bad("nq-past-int32-causal-reference",
        "block_attn.reference.attention(huge(1, 1, 2**31, D), huge(1, 1, 4, D), "
        "huge(1, 1, 4, D), causal=True)", "ValueError", r"Nq = 2147483648"),
    Bad("offsets-past-int32", "call(cu_seqlens=[0, 2**31, 2**32])", "ValueError",
        r"cu_seqlens offsets must fit in int32"),
    Bad("offsets-k-past-int32", "call(cu_seqlens=[0, 4, N], cu_seqlens_k=[0, 2**33, N])",
        "ValueError", r"cu_seqlens_k"),
    Bad("kept-int64-offsets-past-int32",
        "call(cu_seqlens=kept([0, 2**32 + 4, 2**32 + N], torch.int64), max_seqlen=N)",
        "ValueError", r"cu_seqlens offsets must be in \[0, 2147483647\] to fit in int32"),
    Bad("kept-int64-key-offsets-below-zero",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, "
        "cu_seqlens_k=kept([0, 4 - 2**32, N], torch.int64), max_seqlen_k=N)", "ValueError",
        r"cu_seqlens_k offsets must be in \[0, 2147483647\]"),
    Bad("max-seqlen-past-int32", "call(cu_seqlens=kept([0, N]), max_seqlen=2**31)", "ValueError",
        r"max_seqlen must be in \[1, 2147483647\]"),
    Bad("max-seqlen-huge-int", "call(cu_seqlens=kept([0, N]), max_seqlen=2**70)", "ValueError",
        r"max_seqlen must be in \[1, 2147483647\]"),
    Bad("max-seqlen-k-past-int32",
        "call(cu_seqlens=kept([0, N]), max_seqlen=N, cu_seqlens_k=kept([0, N]), "
        "max_seqlen_k=2**31)", "ValueError", r"max_seqlen_k must be in"),
    Bad("cache-slots-past-int32",
        "padded_cache_blocks(torch.ones(1, dtype=torch.int32).expand(2**21), 2**11)",
        "ValueError", r"exceed int32 offsets"),
    Bad("cache-size-past-int32", "padded_cache_blocks([1, 2], 2**31)", "ValueError",
        r"2 slots of 2147483648 rows .* exceed int32 offsets"),
]

OFFSETS = [
    Bad("cu-not-from-0", "call(cu_seqlens=[1, 5, N])", "ValueError",
        r"cu_seqlens must start at 0, got 1"),
    Bad("cu-negative-start", "call(cu_seqlens=[-1, 5, N])", "ValueError",
        r"cu_seqlens must start at 0, got -1"),
    Bad("cu-negative-inside", "call(cu_seqlens=[0, -4, N])", "ValueError",
        r"cu_seqlens must be non-decreasing"),
    Bad("cu-beyond", "call(cu_seqlens=[0, 5, 20])", "ValueError",
        r"cu_seqlens goes beyond the sequence: last offset 20 > N = 12"),
    Bad("cu-decreasing", "call(cu_seqlens=[0, 8, 5, N])", "ValueError",
        r"cu_seqlens must be non-decreasing"),
    Bad("cu-one-offset", "call(cu_seqlens=[0])", "ValueError", r"cu_seqlens must hold at least 2"),
    Bad("cu-empty-list", "call(cu_seqlens=[])", "ValueError", r"cu_seqlens must hold at least 2"),
    Bad("cu-empty-tensor", "call(cu_seqlens=torch.tensor([], dtype=torch.int32))", "ValueError",
        r"cu_seqlens must hold at least 2"),
    Bad("cu-2d-tensor", "call(cu_seqlens=torch.tensor([[0, N]]))", "ValueError",
        r"cu_seqlens must be 1-D"),
    Bad("cu-0d-tensor", "call(cu_seqlens=torch.tensor(N))", "ValueError",
        r"cu_seqlens must be 1-D"),
    Bad("cu-float-tensor", "call(cu_seqlens=torch.tensor([0.0, 12.0]))", "TypeError",
        r"cu_seqlens must be an int32 or int64 tensor, got torch\.float32"),
    Bad("cu-int16-tensor", "call(cu_seqlens=torch.tensor([0, N], dtype=torch.int16))",
        "TypeError", r"cu_seqlens must be an int32 or int64 tensor, got torch\.int16"),
    Bad("cu-bool-tensor", "call(cu_seqlens=torch.tensor([False, True]))", "TypeError",
        r"cu_seqlens must be an int32 or int64 tensor, got torch\.bool"),
    Bad("cu-float-element", "call(cu_seqlens=[0, 6.0, N])", "TypeError",
        r"cu_seqlens must contain ints.*float"),
    Bad("cu-bool-element", "call(cu_seqlens=[0, True, N])", "TypeError",
        r"cu_seqlens must contain ints.*bool"),
    Bad("cu-none-element", "call(cu_seqlens=[0, None, N])", "TypeError",
        r"cu_seqlens must contain ints.*NoneType"),
    Bad("cu-str", "call(cu_seqlens='0,12')", "TypeError", r"cu_seqlens must be a 1-D int tensor"),
    Bad("cu-set", "call(cu_seqlens={0, N})", "TypeError", r"cu_seqlens must be a 1-D int tensor"),
    Bad("cu-generator", "call(cu_seqlens=(c for c in [0, N]))", "TypeError",
        r"cu_seqlens must be a 1-D int tensor"),
    Bad("cu-int", "call(cu_seqlens=N)", "TypeError", r"cu_seqlens must be a 1-D int tensor"),
    Bad("cu-meta", "call(cu_seqlens=torch.tensor([0, N], device='meta'))", "ValueError",
        r"cu_seqlens on the meta device"),
    Bad("cu-and-block-size", "call(block_size=4, cu_seqlens=[0, N])", "ValueError",
        r"at most one of block_size and cu_seqlens"),
    Bad("cu-nq-ne-nk", "call(q=torch.randn(B, H, 5, D), cu_seqlens=[0, 5])", "ValueError",
        r"cu_seqlens needs as many queries as keys"),
    Bad("block-size-nq-ne-nk", "call(q=torch.randn(B, H, 5, D), block_size=2)", "ValueError",
        r"block_size needs as many queries as keys"),
    Bad("cu-k-alone", "call(cu_seqlens_k=[0, N])", "ValueError",
        r"cu_seqlens_k \(key offsets\) needs cu_seqlens"),
    Bad("cu-k-block-count", "call(cu_seqlens=[0, 4, N], cu_seqlens_k=[0, N])", "ValueError",
        r"cu_seqlens and cu_seqlens_k must describe the same number of blocks"),
    Bad("cu-k-beyond", "call(cu_seqlens=[0, 4, N], cu_seqlens_k=[0, 4, 14])", "ValueError",
        r"cu_seqlens_k goes beyond"),
    Bad("cu-k-not-from-0", "call(cu_seqlens=[0, 4, N], cu_seqlens_k=[2, 4, N])", "ValueError",
        r"cu_seqlens_k must start at 0"),
    Bad("cu-k-decreasing", "call(cu_seqlens=[0, 4, N], cu_seqlens_k=[0, 13, N])", "ValueError",
        r"cu_seqlens_k"),
    Bad("cu-k-float-tensor", "call(cu_seqlens=[0, N], cu_seqlens_k=torch.tensor([0.0, 12.0]))",
        "TypeError", r"cu_seqlens_k must be an int32 or int64 tensor"),
    Bad("cu-k-str", "call(cu_seqlens=[0, N], cu_seqlens_k='0,12')", "TypeError",
        r"cu_seqlens_k must be a 1-D int tensor"),
    # Offsets kept on the device: the CPU kernels check their values.
    Bad("kept-not-from-0", "call(cu_seqlens=kept([2, 4, N]), max_seqlen=N)", "ValueError",
        OFFSETS_NAME + r" must start at 0, got 2"),
    Bad("kept-decreasing", "call(cu_seqlens=kept([0, 8, 4, N]), max_seqlen=N)", "ValueError",
        OFFSETS_NAME + r" must be non-decreasing"),
    Bad("kept-negative", "call(cu_seqlens=kept([0, -4, N]), max_seqlen=N + 4)", "ValueError",
        OFFSETS_NAME + r" must be non-decreasing"),
    Bad("kept-beyond", "call(cu_seqlens=kept([0, 4, 20]), max_seqlen=20)", "ValueError",
        OFFSETS_NAME + r" goes beyond the tensors' length 12: last offset 20"),
    Bad("kept-int64-beyond", "call(cu_seqlens=kept([0, 4, 20], torch.int64), max_seqlen=20)",
        "ValueError", OFFSETS_NAME + r" goes beyond the tensors' length 12: last offset 20"),
    Bad("kept-empty", "call(cu_seqlens=kept([]), max_seqlen=N)", "ValueError",
        r"cu_seqlens must be 1-D with at least 2 offsets"),
    Bad("kept-one-offset", "call(cu_seqlens=kept([0]), max_seqlen=N)", "ValueError",
        r"cu_seqlens must be 1-D with at least 2 offsets"),
    Bad("kept-2d", "call(cu_seqlens=kept([[0, N]]), max_seqlen=N)", "ValueError",
        r"cu_seqlens must be 1-D with at least 2 offsets"),
    Bad("kept-float", "call(cu_seqlens=torch.tensor([0.0, 12.0]), max_seqlen=N)", "TypeError",
        r"cu_seqlens must be an int32 or int64 tensor"),
    Bad("kept-meta", "call(cu_seqlens=kept([0, N]).to('meta'), max_seqlen=N)", "ValueError",
        r"cu_seqlens with max_seqlen must be on q's device cpu, got meta"),
    Bad("kept-k-not-from-0",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, cu_seqlens_k=kept([1, 4, N]), "
        "max_seqlen_k=8)", "ValueError", r"cu_seqlens_k must start at 0, got 1"),
    Bad("kept-k-beyond",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, cu_seqlens_k=kept([0, 4, 14]), "
        "max_seqlen_k=10)", "ValueError", r"cu_seqlens_k goes beyond the tensors' length 12"),
    Bad("kept-k-block-count",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, cu_seqlens_k=kept([0, N]), max_seqlen_k=N)",
        "ValueError", r"same number of blocks, got 2 and 1"),
    Bad("kept-k-list",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, cu_seqlens_k=[0, 4, N], max_seqlen_k=8)",
        "TypeError", r"max_seqlen_k goes with cu_seqlens_k given as a tensor"),
    Bad("kept-k-without-max-k",
        "call(cu_seqlens=kept([0, N]), max_seqlen=N, cu_seqlens_k=kept([0, N]))", "ValueError",
        r"cu_seqlens_k kept on the device needs max_seqlen_k"),
]

MAX_SEQLEN = [
    Bad("max-zero", "call(cu_seqlens=kept([0, N]), max_seqlen=0)", "ValueError",
        r"max_seqlen must be in \[1, 2147483647\], got 0"),
    Bad("max-negative", "call(cu_seqlens=kept([0, N]), max_seqlen=-5)", "ValueError",
        r"max_seqlen must be in \[1, 2147483647\], got -5"),
    Bad("max-too-small", "call(cu_seqlens=kept([0, 4, N]), max_seqlen=7)", "ValueError",
        OFFSETS_NAME + r": block 1 has 8 rows, more than its max_seqlen 7"),
    Bad("max-float", "call(cu_seqlens=kept([0, N]), max_seqlen=12.0)", "TypeError",
        r"max_seqlen must be an int, got float"),
    Bad("max-str", "call(cu_seqlens=kept([0, N]), max_seqlen='12')", "TypeError",
        r"max_seqlen must be an int, got str"),
    Bad("max-bool", "call(cu_seqlens=kept([0, N]), max_seqlen=True)", "TypeError",
        r"max_seqlen must be an int, got bool"),
    Bad("max-tensor", "call(cu_seqlens=kept([0, N]), max_seqlen=torch.tensor(N))", "TypeError",
        r"max_seqlen must be an int, got Tensor"),
    Bad("max-numpy-float", "call(cu_seqlens=kept([0, N]), max_seqlen=np.float64(12))",
        "TypeError", r"max_seqlen must be an int"),
    Bad("max-with-list", "call(cu_seqlens=[0, 4, N], max_seqlen=8)", "TypeError",
        r"max_seqlen goes with cu_seqlens given as a tensor"),
    Bad("max-without-cu", "call(max_seqlen=8)", "TypeError",
        r"max_seqlen goes with cu_seqlens given as a tensor"),
    Bad("max-with-block-size", "call(block_size=4, max_seqlen=8)", "ValueError",
        r"max_seqlen goes with cu_seqlens, not with block_size"),
    Bad("max-k-alone", "call(cu_seqlens=[0, N], cu_seqlens_k=[0, N], max_seqlen_k=N)",
        "ValueError", r"max_seqlen_k .*needs max_seqlen"),
    Bad("max-k-without-cu-k", "call(cu_seqlens=kept([0, N]), max_seqlen=N, max_seqlen_k=N)",
        "ValueError", r"max_seqlen_k goes with cu_seqlens_k"),
    Bad("max-k-zero",
        "call(cu_seqlens=kept([0, N]), max_seqlen=N, cu_seqlens_k=kept([0, N]), max_seqlen_k=0)",
        "ValueError", r"max_seqlen_k must be in \[1, 2147483647\], got 0"),
    Bad("max-k-float",
        "call(cu_seqlens=kept([0, N]), max_seqlen=N, cu_seqlens_k=kept([0, N]), max_seqlen_k=1.5)",
        "TypeError", r"max_seqlen_k must be an int, got float"),
    Bad("max-k-too-small",
        "call(cu_seqlens=kept([0, 4, N]), max_seqlen=8, cu_seqlens_k=kept([0, 2, N]), "
        "max_seqlen_k=6)", "ValueError", r"cu_seqlens_k: block 1 has 10 rows"),
    Bad("reference-max-too-small",
        "block_attn.reference.attention(*qkv(), cu_seqlens=kept([0, 4, N]), max_seqlen=6)",
        "ValueError", r"cu_seqlens block 1 has 8 tokens, more than max_seqlen = 6"),
]

SCALARS = [
    Bad("scale-inf", "call(scale=float('inf'))", "ValueError", r"scale must be finite, got inf"),
    Bad("scale-minus-inf", "call(scale=-float('inf'))", "ValueError",
        r"scale must be finite, got -inf"),
    Bad("scale-nan", "call(scale=float('nan'))", "ValueError", r"scale must be finite, got nan"),
    Bad("scale-numpy-nan", "call(scale=np.float32('nan'))", "ValueError",
        r"scale must be finite, got nan"),
    Bad("scale-overflowing-float", "call(scale=1e308 * 10)", "ValueError", r"scale must be finite"),
    Bad("scale-huge-int", "call(scale=10**400)", "ValueError",
        r"scale must be finite, got an int of 1329 bits"),
    Bad("scale-str", "call(scale='0.5')", "TypeError", r"scale must be a float, got str"),
    Bad("scale-complex", "call(scale=1j)", "TypeError", r"scale must be a float, got complex"),
    Bad("scale-bool", "call(scale=True)", "TypeError", r"scale must be a float, got bool"),
    Bad("scale-tensor", "call(scale=torch.tensor(0.5))", "TypeError",
        r"scale must be a float, got Tensor"),
    Bad("reference-scale-nan", "block_attn.reference.attention(*qkv(), scale=float('nan'))",
        "ValueError", r"scale must be finite"),
    Bad("causal-attention-scale-inf", "block_attn.causal_attention(*qkv(), scale=float('inf'))",
        "ValueError", r"scale must be finite"),
    Bad("causal-int", "call(causal=1)", "TypeError", r"causal must be a bool, got int"),
    Bad("causal-none", "call(causal=None)", "TypeError", r"causal must be a bool, got NoneType"),
    Bad("causal-str", "call(causal='True')", "TypeError", r"causal must be a bool, got str"),
    Bad("causal-tensor", "call(causal=torch.tensor(True))", "TypeError",
        r"causal must be a bool, got Tensor"),
    Bad("return-lse-int", "call(return_lse=0)", "TypeError", r"return_lse must be a bool, got int"),
    Bad("return-lse-none", "call(return_lse=None)", "TypeError",
        r"return_lse must be a bool, got NoneType"),
    Bad("unknown-keyword", "call(mask=torch.ones(N, N, dtype=torch.bool))", "TypeError",
        r"unexpected keyword argument 'mask'"),
    Bad("block-size-positional", "block_attn.attention(*qkv(), 4)", "TypeError",
        r"attention\(\) takes 3 positional arguments"),
    Bad("block-size-zero", "call(block_size=0)", "ValueError", r"block_size must be a positive"),
    Bad("block-size-negative", "call(block_size=-4)", "ValueError",
        r"block_size must be a positive"),
    Bad("block-size-float", "call(block_size=4.0)", "TypeError",
        r"block_size must be an int, got float"),
    Bad("block-size-str", "call(block_size='4')", "TypeError",
        r"block_size must be an int, got str"),
    Bad("block-size-bool", "call(block_size=True)", "TypeError",
        r"block_size must be an int, got bool"),
    Bad("block-size-tensor", "call(block_size=torch.tensor(4))", "TypeError",
        r"block_size must be an int, got Tensor"),
    Bad("block-size-list", "call(block_size=[4])", "TypeError",
        r"block_size must be an int, got list"),
    Bad("block-diagonal-block-size-zero",
        "block_attn.block_diagonal_attention(*qkv(), block_size=0)", "ValueError",
        r"block_size must be a positive int, got 0"),
    Bad("causal-attention-scale-str", "block_attn.causal_attention(*qkv(), scale='x')",
        "TypeError", r"scale must be a float, got str"),
    Bad("raw-operator-max-seqlen-past-int32",
        "cu = torch.tensor([0, N], dtype=torch.int32)\n"
        "torch.ops.block_attn.attention_forward(*qkv(), cu, cu, 2**40, N, False, 1.0)",
        "ValueError", r"max_seqlen_q"),
    Bad("block-diagonal-without-blocks", "block_attn.block_diagonal_attention(*qkv())",
        "ValueError", r"block_diagonal_attention needs block_size, cu_seqlens or blocks"),
    Bad("double-backward", "q, k, v = (t.requires_grad_() for t in qkv())\n"
        "out = block_attn.attention(q, k, v)\n"
        "(g,) = torch.autograd.grad(out.sum(), q, create_graph=True)\n" "g.sum().backward()",
        "RuntimeError", r"(?i)double backward|create_graph|reference"),
]

BLOCKS = [
    Bad("blocks-list", "call(blocks=[0, N])", "TypeError", r"blocks must be a BlockLayout"),
    Bad("blocks-int", "call(blocks=4)", "TypeError", r"blocks must be a BlockLayout, got int"),
    Bad("blocks-and-block-size", "call(blocks=BlockLayout.fixed(N, 4), block_size=4)",
        "ValueError", r"blocks already describes the blocks; leave out block_size"),
    Bad("blocks-and-max-seqlen", "call(blocks=BlockLayout.fixed(N, 4), max_seqlen=4)",
        "ValueError", r"leave out max_seqlen"),
    Bad("blocks-too-long", "call(blocks=BlockLayout.from_seqlens([4, 10]))", "ValueError",
        r"blocks covers 14 queries and 14 keys, more than the tensors have: Nq = 12, Nk = 12"),
    Bad("blocks-keys-beyond", "call(blocks=BlockLayout.from_seqlens([4, 8], [4, 10]))",
        "ValueError", r"blocks covers 12 queries and 14 keys"),
    Bad("layout-negative-length", "BlockLayout.from_seqlens([4, -1])", "ValueError",
        r"seqlens\[1\] must be >= 0, got -1"),
    Bad("layout-negative-key-length", "BlockLayout.from_seqlens([4, 4], [8, -8])", "ValueError",
        r"seqlens_k\[1\] must be >= 0"),
    Bad("layout-float-length", "BlockLayout.from_seqlens([4.0])", "TypeError",
        r"seqlens must contain ints"),
    Bad("layout-str-lengths", "BlockLayout.from_seqlens('44')", "TypeError",
        r"seqlens must be a 1-D int tensor or a list of ints"),
    Bad("layout-key-block-count", "BlockLayout.from_seqlens([4, 8], [12])", "ValueError",
        r"same number of blocks, got 2 and 1"),
    Bad("layout-empty-lengths", "BlockLayout.from_seqlens([])", "ValueError",
        r"cu_seqlens must hold at least 2 offsets"),
    Bad("layout-numpy-lengths", "BlockLayout.from_seqlens(np.array([4, 8]))", "TypeError",
        r"seqlens must be a 1-D int tensor or a list of ints, got ndarray"),
    Bad("reference-blocks-list", "block_attn.reference.attention(*qkv(), blocks=[0, N])",
        "TypeError", r"blocks must be a BlockLayout, got list"),
    Bad("layout-offsets-not-from-0", "BlockLayout.from_offsets([1, 4])", "ValueError",
        r"cu_seqlens must start at 0"),
    Bad("layout-offsets-decreasing", "BlockLayout.from_offsets([0, 8, 4])", "ValueError",
        r"cu_seqlens must be non-decreasing"),
    Bad("layout-offsets-float-tensor", "BlockLayout.from_offsets(torch.tensor([0.0, 4.0]))",
        "TypeError", r"cu_seqlens must be an int32 or int64 tensor"),
    Bad("layout-offsets-k-bad", "BlockLayout.from_offsets([0, 4, 8], [0, 9, 8])", "ValueError",
        r"cu_seqlens_k must be non-decreasing"),
    Bad("layout-fixed-zero", "BlockLayout.fixed(N, 0)", "ValueError",
        r"block_size must be a positive int"),
    Bad("layout-fixed-float", "BlockLayout.fixed(N, 4.0)", "TypeError",
        r"block_size must be an int, got float"),
    Bad("layout-fixed-negative-seqlen", "BlockLayout.fixed(-5, 4)", "ValueError",
        r"seqlen must be in \[0, 2147483647\].*got -5"),
    Bad("layout-fixed-str-seqlen", "BlockLayout.fixed('12', 4)", "TypeError",
        r"seqlen must be an int, got str"),
    Bad("layout-full-negative", "BlockLayout.full(-1, 4)", "ValueError",
        r"seqlen_q must be in \[0, 2147483647\].*got -1"),
    Bad("layout-full-float", "BlockLayout.full(2.5, 4)", "TypeError",
        r"seqlen_q must be an int, got float"),
    Bad("layout-built-directly-bad-offsets", "call(blocks=BlockLayout((1, N), (1, N), 11, 11))",
        "ValueError", OFFSETS_NAME + r" must start at 0, got 1"),
    Bad("layout-built-directly-short-max", "call(blocks=BlockLayout((0, 4, N), (0, 4, N), 4, 4))",
        "ValueError", r"block 1 has 8 rows, more than its max_seqlen 4"),
]

CACHE = [
    Bad("cache-lengths-str", "padded_cache_blocks('12', 16)", "TypeError",
        r"cache_lengths must be a sequence of ints or an integer tensor, got str"),
    Bad("cache-lengths-int", "padded_cache_blocks(3, 16)", "TypeError",
        r"cache_lengths must be a sequence of ints or an integer tensor, got int"),
    Bad("cache-lengths-float-element", "padded_cache_blocks([1.5], 16)", "TypeError",
        r"cache_lengths\[0\] must be an int, got float"),
    Bad("cache-lengths-bool-element", "padded_cache_blocks([True], 16)", "TypeError",
        r"cache_lengths\[0\] must be an int, got bool"),
    Bad("cache-lengths-float-tensor", "padded_cache_blocks(torch.tensor([1.0]), 16)", "TypeError",
        r"cache_lengths must be an integer tensor, got torch\.float32"),
    Bad("cache-lengths-bool-tensor", "padded_cache_blocks(torch.tensor([True]), 16)", "TypeError",
        r"cache_lengths must be an integer tensor, got torch\.bool"),
    Bad("cache-lengths-empty", "padded_cache_blocks([], 16)", "ValueError",
        r"cache_lengths is empty"),
    Bad("cache-lengths-empty-tensor",
        "padded_cache_blocks(torch.tensor([], dtype=torch.int32), 16)", "ValueError",
        r"cache_lengths must be a non-empty 1-D tensor"),
    Bad("cache-lengths-2d-tensor", "padded_cache_blocks(torch.tensor([[1, 2]]), 16)",
        "ValueError", r"cache_lengths must be a non-empty 1-D tensor"),
    Bad("cache-length-negative", "padded_cache_blocks([3, -1], 16)", "ValueError",
        r"cache_lengths\[1\] = -1 is outside \[0, cache_size = 16\]"),
    Bad("cache-length-over-size", "padded_cache_blocks([17], 16)", "ValueError",
        r"cache_lengths\[0\] = 17 is outside"),
    Bad("cache-size-negative", "padded_cache_blocks([1], -1)", "ValueError",
        r"cache_size must be an int >= 0"),
    Bad("new-tokens-zero", "padded_cache_blocks([1], 16, 0)", "ValueError",
        r"new_tokens must be an int >= 1"),
    Bad("cache-size-float", "padded_cache_blocks([1], 16.0)", "TypeError",
        r"cache_size must be an int, got float"),
    Bad("cache-size-str", "padded_cache_blocks([1], '16')", "TypeError",
        r"cache_size must be an int, got str"),
    Bad("new-tokens-bool", "padded_cache_blocks([1], 16, True)", "TypeError",
        r"new_tokens must be an int, got bool"),
    Bad("cache-tensor-lengths-float-size", "padded_cache_blocks(torch.tensor([1, 2]), 4.0)",
        "TypeError", r"cache_size must be an int, got float"),
    Bad("new-tokens-past-int32", "padded_cache_blocks([1], 4, 2**31)", "ValueError",
        r"exceed int32 offsets"),
    Bad("cache-blocks-too-long-for-call",
        "q, k, v = torch.randn(1, 2, 2, D), torch.randn(1, 2, 8, D), torch.randn(1, 2, 8, D)\n"
        "block_attn.attention(q, k, v, **padded_cache_blocks([3, 2], 5))", "ValueError",
        r"cu_seqlens_k goes beyond the sequence: last offset 10 > Nk = 8"),
]

MODULE = [
    Bad("embed-dim-zero", "MultiheadBlockAttention(0, 2)", "ValueError",
        r"embed_dim, num_heads and num_kv_heads must be positive"),
    Bad("num-heads-negative", "MultiheadBlockAttention(8, -2)", "ValueError",
        r"must be positive.*num_heads = -2"),
    Bad("embed-dim-indivisible", "MultiheadBlockAttention(10, 4)", "ValueError",
        r"embed_dim must be divisible by num_heads"),
    Bad("kv-heads-indivisible", "MultiheadBlockAttention(12, 4, num_kv_heads=3)", "ValueError",
        r"num_heads must be a multiple of num_kv_heads"),
    Bad("kv-heads-zero", "MultiheadBlockAttention(8, 2, num_kv_heads=0)", "ValueError",
        r"num_kv_heads = 0"),
    Bad("module-block-size-zero", "module(block_size=0)", "ValueError",
        r"block_size must be a positive int or None"),
    Bad("module-block-size-float", "module(block_size=2.0)", "TypeError",
        r"block_size must be an int, got float"),
    Bad("module-causal-int", "module(causal=1)", "TypeError", r"causal must be a bool, got int"),
    Bad("dropout-too-large", "module(dropout=1.5)", "ValueError", r"dropout must be in \[0, 1\)"),
    Bad("dropout-nan", "module(dropout=float('nan'))", "ValueError",
        r"dropout must be in \[0, 1\)"),
    Bad("embed-dim-str", "MultiheadBlockAttention('8', 2)", "TypeError",
        r"embed_dim must be an int, got str"),
    Bad("embed-dim-float", "MultiheadBlockAttention(8.0, 2)", "TypeError",
        r"embed_dim must be an int, got float"),
    Bad("num-heads-float", "MultiheadBlockAttention(8, 2.0)", "TypeError",
        r"num_heads must be an int, got float"),
    Bad("dropout-str", "module(dropout='0.1')", "TypeError", r"dropout must be a float, got str"),
    Bad("kv-heads-float", "MultiheadBlockAttention(8, 2, num_kv_heads=2.0)", "TypeError",
        r"num_kv_heads must be an int, got float"),
    Bad("num-heads-none", "MultiheadBlockAttention(8, None)", "TypeError",
        r"num_heads must be an int, got NoneType"),
    Bad("embed-dim-bool", "MultiheadBlockAttention(True, 1)", "TypeError",
        r"embed_dim must be an int, got bool"),
    Bad("module-block-size-bool", "module(block_size=True)", "TypeError",
        r"block_size must be an int, got bool"),
    Bad("dropout-bool", "module(dropout=True)", "TypeError", r"dropout must be a float, got bool"),
    Bad("dropout-negative", "module(dropout=-0.1)", "ValueError",
        r"dropout must be in \[0, 1\), got -0\.1"),
    Bad("bias-str", "module(bias='yes')", "TypeError", r"bias must be a bool"),
    Bad("module-int-dtype", "module(dtype=torch.int64)", "TypeError", r"dtype"),
    Bad("query-rank-2", "module()(torch.randn(6, 8))", "ValueError",
        r"query must be 3-D \(batch, seqlen, embed_dim\)"),
    Bad("query-width", "module()(torch.randn(2, 6, 4))", "ValueError",
        r"query must have embed_dim = 8 features"),
    Bad("key-width", "module()(X, torch.randn(2, 6, 4))", "ValueError",
        r"key must have embed_dim = 8 features"),
    Bad("value-rank", "module()(X, X, torch.randn(6, 8))", "ValueError", r"value must be 3-D"),
    Bad("key-batch", "module()(X, torch.randn(3, 6, 8))", "ValueError",
        r"query, key and value must share the batch size"),
    Bad("key-value-lengths", "module()(X, X, torch.randn(2, 5, 8))", "ValueError",
        r"key and value must have the same length"),
    Bad("key-float64-for-float32-module", "module()(X, X.double())", "TypeError",
        r"key must have the module's dtype torch\.float32, got torch\.float64"),
    Bad("value-float16-for-float32-module", "module()(X, X, X.half())", "TypeError",
        r"value must have the module's dtype torch\.float32, got torch\.float16"),
    Bad("key-list", "module()(X, [[0.0] * 8])", "TypeError",
        r"key must be a torch\.Tensor, got list"),
    Bad("key-on-meta", "module()(X, X.to('meta'))", "ValueError", r"key.*meta"),
    Bad("query-cpu-for-meta-module",
        "MultiheadBlockAttention(8, 2, device='meta')(X)", "ValueError", r"query.*(cpu|meta)"),
    Bad("forward-cu-beyond", "module()(X, cu_seqlens=[0, 4, 8])", "ValueError",
        r"cu_seqlens goes beyond the sequence: last offset 8 > N = 6"),
    Bad("forward-cu-nq-ne-nk", "module()(X, torch.randn(2, 4, 8), cu_seqlens=[0, 6])",
        "ValueError", r"cu_seqlens needs as many queries as keys"),
    Bad("forward-max-seqlen-with-list", "module()(X, cu_seqlens=[0, 6], max_seqlen=6)",
        "TypeError", r"max_seqlen goes with cu_seqlens given as a tensor"),
    Bad("forward-block-size-cross", "module(block_size=2)(X, torch.randn(2, 4, 8))", "ValueError",
        r"block_size needs as many queries as keys"),
    Bad("forward-need-weights-blocks", "module()(X, cu_seqlens=[0, 7], need_weights=True)",
        "ValueError", r"cu_seqlens goes beyond the sequence"),
    Bad("forward-need-weights-too-large",
        "m = module()\nm.max_weights_elements = 10\nm(X, need_weights=True)", "ValueError",
        r"need_weights=True materialises .* above max_weights_elements = 10"),
    Bad("forward-query-list", "module()([[0.0] * 8])", "TypeError",
        r"query must be a torch\.Tensor, got list"),
    Bad("forward-query-int-dtype", "module()(torch.ones(2, 6, 8, dtype=torch.int64))",
        "TypeError", r"query must have the module's dtype torch\.float32, got torch\.int64"),
    Bad("forward-query-float64-for-float32-module", "module()(X.double())", "TypeError",
        r"query must have the module's dtype torch\.float32, got torch\.float64"),
    Bad("forward-need-weights-int", "module()(X, need_weights=1)", "TypeError",
        r"need_weights must be a bool, got int"),
]
# fmt: on

GROUPS = {
    "tensors": TENSORS,
    "huge": HUGE,
    "offsets": OFFSETS,
    "max_seqlen": MAX_SEQLEN,
    "scalars": SCALARS,
    "blocks": BLOCKS,
    "cache": CACHE,
    "module": MODULE,
}


def _run_child(cases: list[Bad], timeout: float) -> tuple[dict[str, dict], str]:
    """Runs ``cases`` in one child; the results it reported, and how it ended."""
    script = "\n".join(
        [
            f"RESULT_PREFIX = {RESULT_PREFIX!r}",
            f"WATCHDOG_EXTRA_SECONDS = {WATCHDOG_EXTRA_SECONDS}",
            PRELUDE,
            RUNNER,
        ]
    )
    payload = json.dumps([[case.name, case.code, case.seconds] for case in cases])
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        stdout, ending = (
            done.stdout,
            f"exit status {done.returncode}; stderr: {done.stderr[-2000:]}",
        )
    except subprocess.TimeoutExpired as expired:
        stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        ending = f"killed after {timeout} s"
    results = {}
    for line in (stdout or "").splitlines():
        if line.startswith(RESULT_PREFIX):
            name, result = json.loads(line[len(RESULT_PREFIX) :])
            results[name] = result
    return results, ending


@functools.cache
def _group_results(group: str) -> dict[str, dict]:
    """Every case's result: from one child for the group, then one child per case it did not
    report (the one that crashed or hung it, and those after)."""
    cases = GROUPS[group]
    results, _ = _run_child(cases, timeout=60 + sum(case.seconds for case in cases) // 4)
    for case in cases:
        if case.name not in results:
            alone, alone_ending = _run_child(
                [case], timeout=case.seconds + WATCHDOG_EXTRA_SECONDS + 30
            )
            results[case.name] = alone.get(
                case.name, {"raised": "crash", "message": f"the child died: {alone_ending}"}
            )
    return results


def _params():
    for group, cases in GROUPS.items():
        for case in cases:
            marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
            yield pytest.param(group, case, id=f"{group}-{case.name}", marks=marks)


@pytest.mark.parametrize(("group", "case"), list(_params()))
def test_bad_input(group, case):
    result = _group_results(group)[case.name]
    raised = result["raised"]
    where = f"{case.name}: `{case.code}`"
    if raised in (None, "timeout", "crash"):
        got = {None: "no exception", "timeout": f"a hang (over {case.seconds} s)"}
        pytest.fail(f"{where} expected {case.error}, got {got.get(raised, result['message'])}")
    assert case.error in result["bases"], (
        f"{where} expected {case.error}, got {raised}: {result['message']}\n{result['where']}"
    )
    assert re.search(case.match, result["message"]), (
        f"{where} raised {raised} whose message does not match {case.match!r}: {result['message']}"
    )


def test_catalogue_names_are_unique():
    names = [case.name for cases in GROUPS.values() for case in cases]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
