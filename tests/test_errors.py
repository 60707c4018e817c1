"""Bad input: every check raises the right exception with a message naming the problem."""

from __future__ import annotations

import pytest
import torch

import block_attn

B, H, N, D = 2, 4, 12, 8


def qkv(**shapes):
    """Valid float32 inputs, with any of q, k, v replaced by the given tensor."""
    tensors = {name: torch.randn(B, H, N, D) for name in "qkv"}
    tensors.update(shapes)
    return tensors["q"], tensors["k"], tensors["v"]


def call(**kwargs):
    """Calls ``block_attn.attention`` with valid inputs and the given overrides."""
    q, k, v = qkv(**{name: kwargs.pop(name) for name in "qkv" if name in kwargs})
    return block_attn.attention(q, k, v, **kwargs)


BAD_INPUTS = [
    # Tensors and shapes.
    ("q-not-tensor", lambda: call(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list"),
    ("v-not-tensor", lambda: call(v=None), TypeError, r"v must be a torch\.Tensor"),
    ("q-rank-3", lambda: call(q=torch.randn(H, N, D)), ValueError, r"q must be 4-D.*3-D"),
    ("k-rank-5", lambda: call(k=torch.randn(1, B, H, N, D)), ValueError, r"k must be 4-D.*5-D"),
    ("batch", lambda: call(q=torch.randn(3, H, N, D)), ValueError, r"batch size mismatch.*3"),
    ("head-dim", lambda: call(q=torch.randn(B, H, N, 16)), ValueError, r"head_dim mismatch.*16"),
    ("k-v-shape", lambda: call(v=torch.randn(B, H, N + 1, D)), ValueError, r"k and v .*shape"),
    ("k-v-dim", lambda: call(v=torch.randn(B, H, N, 4)), ValueError, r"k and v .*shape"),
    ("gqa", lambda: call(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D)), ValueError,
     r"multiple of the number of kv heads.*Hq = 4, Hkv = 3"),
    ("zero-kv-heads", lambda: call(k=torch.randn(B, 0, N, D), v=torch.randn(B, 0, N, D)),
     ValueError, r"Hkv = 0"),
    ("zero-head-dim", lambda: call(**{n: torch.randn(B, H, N, 0) for n in "qkv"}), ValueError,
     r"head_dim D must be at least 1"),
    # Dtypes and devices.
    ("mixed-dtypes", lambda: call(k=torch.randn(B, H, N, D, dtype=torch.float64)), TypeError,
     r"share a dtype.*float32.*float64"),
    ("int-dtype", lambda: call(**{n: torch.ones(B, H, N, D, dtype=torch.int32) for n in "qkv"}),
     TypeError, r"q has unsupported dtype torch\.int32"),
    ("int64-v", lambda: call(v=torch.ones(B, H, N, D, dtype=torch.int64)), TypeError,
     r"v has unsupported dtype torch\.int64"),
    ("bool-dtype", lambda: call(q=torch.ones(B, H, N, D, dtype=torch.bool)), TypeError,
     r"unsupported dtype torch\.bool"),
    ("mixed-devices", lambda: call(k=torch.randn(B, H, N, D, device="meta")), ValueError,
     r"one device.*cpu.*meta"),
    # block_size.
    ("block-size-zero", lambda: call(block_size=0), ValueError,
     r"block_size must be a positive.*0"),
    ("block-size-negative", lambda: call(block_size=-3), ValueError, r"block_size.*-3"),
    ("block-size-float", lambda: call(block_size=4.0), TypeError,
     r"block_size must be an int.*float"),
    ("block-size-bool", lambda: call(block_size=True), TypeError,
     r"block_size must be an int.*bool"),
    ("block-size-tensor", lambda: call(block_size=torch.tensor(4)), TypeError,
     r"block_size must be an int.*Tensor"),
    # cu_seqlens.
    ("cu-not-from-0", lambda: call(cu_seqlens=[1, 5, N]), ValueError,
     r"cu_seqlens must start at 0"),
    ("cu-beyond-N", lambda: call(cu_seqlens=[0, 5, 14]), ValueError,
     r"cu_seqlens goes beyond the sequence: last offset 14 > N = 12"),
    ("cu-beyond-N", lambda: call(cu_seqlens=[0, 5, 20]), ValueError, r"beyond the sequence.*20"),
    ("cu-decreasing", lambda: call(cu_seqlens=[0, 8, 5, N]), ValueError,
     r"cu_seqlens must be non-decreasing.*\(5\) < .*\(8\)"),
    ("cu-single-offset", lambda: call(cu_seqlens=[0]), ValueError, r"at least 2 offsets"),
    ("cu-float-tensor", lambda: call(cu_seqlens=torch.tensor([0.0, 12.0])), TypeError,
     r"cu_seqlens must be an int32 or int64 tensor, got torch\.float32"),
    ("cu-float-list", lambda: call(cu_seqlens=[0, 6.0, 12]), TypeError,
     r"cu_seqlens must contain ints.*float"),
    ("cu-2d", lambda: call(cu_seqlens=torch.tensor([[0, 12]])), ValueError,
     r"cu_seqlens must be 1-D, got 2-D"),
    ("cu-too-large", lambda: call(cu_seqlens=torch.tensor([0, 2**31, 2**32])), ValueError,
     r"fit in int32.*2147483648"),
    ("cu-meta", lambda: call(cu_seqlens=torch.tensor([0, N], device="meta")), ValueError,
     r"cu_seqlens on the meta device has no values to read"),
    ("cu-not-sequence", lambda: call(cu_seqlens="0,12"), TypeError,
     r"cu_seqlens must be a 1-D int tensor or a list of ints, got str"),
    ("both-block-args", lambda: call(block_size=4, cu_seqlens=[0, N]), ValueError,
     r"at most one of block_size and cu_seqlens"),
    ("blocks-nq-ne-nk", lambda: call(q=torch.randn(B, H, 5, D), block_size=4), ValueError,
     r"block_size needs as many queries as keys.*Nq = 5, Nk = 12"),
    ("cu-nq-ne-nk", lambda: call(q=torch.randn(B, H, 5, D), cu_seqlens=[0, 5]), ValueError,
     r"cu_seqlens needs as many queries as keys"),
    # max_seqlen (cu_seqlens kept on the device).
    ("max-seqlen-with-list", lambda: call(cu_seqlens=[0, 4, N], max_seqlen=8), TypeError,
     r"max_seqlen goes with cu_seqlens given as a tensor.*got cu_seqlens of type list"),
    ("max-seqlen-without-blocks", lambda: call(max_seqlen=8), TypeError,
     r"max_seqlen goes with cu_seqlens given as a tensor.*NoneType"),
    ("max-seqlen-with-block-size", lambda: call(block_size=4, max_seqlen=8), ValueError,
     r"max_seqlen goes with cu_seqlens, not with block_size"),
    ("max-seqlen-zero", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=0), ValueError,
     r"max_seqlen must be in \[1, 2147483647\], got 0"),
    ("max-seqlen-bool", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=True),
     TypeError, r"max_seqlen must be an int, got bool"),
    ("max-seqlen-cu-float", lambda: call(cu_seqlens=torch.tensor([0.0, 12.0]), max_seqlen=12),
     TypeError, r"cu_seqlens must be an int32 or int64 tensor, got torch\.float32"),
    ("max-seqlen-cu-2d", lambda: call(cu_seqlens=torch.tensor([[0, N]]), max_seqlen=12),
     ValueError, r"cu_seqlens must be 1-D with at least 2 offsets, got shape \(1, 2\)"),
    ("max-seqlen-cu-device", lambda: call(cu_seqlens=torch.tensor([0, N], device="meta"),
                                          max_seqlen=12),
     ValueError, r"cu_seqlens with max_seqlen must be on q's device cpu, got meta"),
    ("max-seqlen-nq-ne-nk", lambda: call(q=torch.randn(B, H, 5, D),
                                         cu_seqlens=torch.tensor([0, 5]), max_seqlen=5),
     ValueError, r"cu_seqlens needs as many queries as keys.*Nq = 5, Nk = 12"),
    # The CPU kernels check the offsets' values that CUDA leaves unread.
    ("max-seqlen-too-small", lambda: call(cu_seqlens=torch.tensor([0, 4, N]), max_seqlen=6),
     ValueError,
     r"cu_seqlens_q \(attention's cu_seqlens\): block 1 has 8 rows, more than its max_seqlen 6"),
    ("max-seqlen-cu-beyond", lambda: call(cu_seqlens=torch.tensor([0, 4, 14]), max_seqlen=10),
     ValueError,
     r"cu_seqlens_q \(attention's cu_seqlens\) goes beyond the tensors' length 12: last offset 14"),
    ("max-seqlen-int64-beyond-int32",
     lambda: call(cu_seqlens=torch.tensor([0, 2**32 + 4, 2**32 + 8]), max_seqlen=8), ValueError,
     r"cu_seqlens offsets must be in \[0, 2147483647\] to fit in int32, got 4294967300"),
    ("max-seqlen-int64-wraps-to-zero",
     lambda: call(cu_seqlens=torch.tensor([0, 2**32, N]), max_seqlen=12), ValueError,
     r"cu_seqlens offsets must be in .* got 4294967296"),
    ("max-seqlen-k-int64-negative",
     lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=12,
                  cu_seqlens_k=torch.tensor([0, -2**32 + N]), max_seqlen_k=12), ValueError,
     r"cu_seqlens_k offsets must be in .* got -4294967284"),
    # cu_seqlens_k (the keys' own offsets).
    ("cu-k-without-cu", lambda: call(cu_seqlens_k=[0, N]), ValueError,
     r"cu_seqlens_k \(key offsets\) needs cu_seqlens \(query offsets\)"),
    ("cu-k-with-block-size", lambda: call(block_size=4, cu_seqlens_k=[0, N]), ValueError,
     r"cu_seqlens_k \(key offsets\) needs cu_seqlens"),
    ("cu-k-block-count", lambda: call(cu_seqlens=[0, 4, N], cu_seqlens_k=[0, N]), ValueError,
     r"cu_seqlens and cu_seqlens_k must describe the same number of blocks, got 2 and 1"),
    ("cu-k-short", lambda: call(q=torch.randn(B, H, 5, D), cu_seqlens=[0, 2, 5],
                                cu_seqlens_k=[0, 4, 13]),
     ValueError, r"cu_seqlens_k goes beyond the sequence: last offset 13 > Nk = 12"),
    ("cu-q-beyond", lambda: call(q=torch.randn(B, H, 5, D), cu_seqlens=[0, 2, 6],
                                 cu_seqlens_k=[0, 4, N]),
     ValueError, r"cu_seqlens goes beyond the sequence: last offset 6 > Nq = 5"),
    ("cu-k-decreasing", lambda: call(cu_seqlens=[0, 4, 8, N], cu_seqlens_k=[0, 9, 8, N]),
     ValueError, r"cu_seqlens_k must be non-decreasing.*offset 2 \(8\) < offset 1 \(9\)"),
    ("cu-k-float", lambda: call(cu_seqlens=[0, N], cu_seqlens_k=torch.tensor([0.0, 12.0])),
     TypeError, r"cu_seqlens_k must be an int32 or int64 tensor"),
    ("max-seqlen-k-alone", lambda: call(cu_seqlens=[0, N], cu_seqlens_k=[0, N], max_seqlen_k=12),
     ValueError, r"max_seqlen_k \(the longest key block\) needs max_seqlen as well"),
    ("max-seqlen-k-without-cu-k", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=12,
                                               max_seqlen_k=12),
     ValueError, r"max_seqlen_k goes with cu_seqlens_k"),
    ("cu-k-kept-without-max-k", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=12,
                                             cu_seqlens_k=torch.tensor([0, N])),
     ValueError, r"cu_seqlens_k kept on the device needs max_seqlen_k"),
    ("cu-k-kept-block-count", lambda: call(cu_seqlens=torch.tensor([0, 4, N]), max_seqlen=8,
                                           cu_seqlens_k=torch.tensor([0, N]), max_seqlen_k=12),
     ValueError, r"same number of blocks, got 2 and 1"),
    ("max-seqlen-k-zero", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=12,
                                       cu_seqlens_k=torch.tensor([0, N]), max_seqlen_k=0),
     ValueError, r"max_seqlen_k must be in \[1, 2147483647\], got 0"),
    ("max-seqlen-k-too-small", lambda: call(cu_seqlens=torch.tensor([0, 4, N]), max_seqlen=8,
                                            cu_seqlens_k=torch.tensor([0, 2, N]), max_seqlen_k=6),
     ValueError, r"cu_seqlens_k: block 1 has 10 rows, more than its max_seqlen 6"),
    # blocks (a BlockLayout).
    ("blocks-not-layout", lambda: call(blocks=[0, N]), TypeError,
     r"blocks must be a BlockLayout, got list"),
    ("blocks-and-cu", lambda: call(blocks=block_attn.BlockLayout.fixed(N, 4), cu_seqlens=[0, N]),
     ValueError, r"blocks already describes the blocks; leave out cu_seqlens"),
    ("blocks-too-long", lambda: call(blocks=block_attn.BlockLayout.from_seqlens([4, 10])),
     ValueError, r"blocks covers 14 queries and 14 keys, more than the tensors have: Nq = 12"),
    ("layout-negative-length", lambda: block_attn.BlockLayout.from_seqlens([4, -1]), ValueError,
     r"seqlens\[1\] must be >= 0, got -1"),
    ("layout-key-count", lambda: block_attn.BlockLayout.from_seqlens([4, 8], [12]), ValueError,
     r"same number of blocks, got 2 and 1"),
    # Scalars.
    ("scale-inf", lambda: call(scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    ("scale-nan", lambda: call(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    ("scale-str", lambda: call(scale="0.5"), TypeError, r"scale must be a float, got str"),
    ("causal-int", lambda: call(causal=1), TypeError, r"causal must be a bool, got int"),
    ("causal-tensor", lambda: call(causal=torch.tensor(True)), TypeError,
     r"causal must be a bool, got Tensor"),
    ("return-lse-str", lambda: call(return_lse="no"), TypeError,
     r"return_lse must be a bool, got str"),
    ("scale-tensor", lambda: call(scale=torch.tensor(0.5)), TypeError,
     r"scale must be a float, got Tensor"),
    ("max-seqlen-float", lambda: call(cu_seqlens=torch.tensor([0, N]), max_seqlen=12.0),
     TypeError, r"max_seqlen must be an int, got float"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "exception", "match"),
    [pytest.param(fn, exc, match, id=name) for name, fn, exc, match in BAD_INPUTS],
)
def test_bad_input_raises(fn, exception, match):
    with pytest.raises(exception, match=match):
        fn()


def test_block_diagonal_attention_needs_blocks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="needs block_size, cu_seqlens or blocks, got none"):
        block_attn.block_diagonal_attention(q, k, v)


def test_reference_validates_like_the_kernel_path():
    q, k, v = qkv(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D))
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        block_attn.reference.attention(q, k, v)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        block_attn.reference.attention(*qkv(), cu_seqlens=[2, N])


@pytest.mark.parametrize(
    ("offsets", "max_seqlen", "match"),
    [
        ([0, 4, N], 6, r"cu_seqlens block 1 has 8 tokens, more than max_seqlen = 6"),
        ([0, 8, 4, N], 12, r"cu_seqlens must be non-decreasing"),
        ([1, 4, N], 12, r"cu_seqlens must start at 0, got 1"),
        ([0, 4, 13], 12, r"cu_seqlens goes beyond the sequence: last offset 13 > N = 12"),
    ],
)
def test_reference_checks_offsets_kept_on_the_device(offsets, max_seqlen, match):
    """The reference reads offsets given with max_seqlen and checks the contract the CUDA
    kernels assume without checking."""
    with pytest.raises(ValueError, match=match):
        block_attn.reference.attention(
            *qkv(), cu_seqlens=torch.tensor(offsets), max_seqlen=max_seqlen
        )


# The raw operators check what they rely on, independently of the Python layer.
forward_op = torch.ops.block_attn.attention_forward.default
backward_op = torch.ops.block_attn.attention_backward.default


def raw_forward(device="cpu", **overrides):
    q, k, v = (torch.randn(B, H, N, D, device=device) for _ in range(3))
    cu = torch.tensor([0, 4, N], dtype=torch.int32, device=device)
    args = {
        "q": q,
        "k": k,
        "v": v,
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
        "max_seqlen_q": 8,
        "max_seqlen_k": 8,
        "causal": False,
        "scale": 0.5,
    }
    args.update(overrides)
    return forward_op(*args.values())


RAW_FORWARD_ERRORS = [
    ("cu-int64", TypeError, {"cu_seqlens_q": torch.tensor([0, 4, N])},
     r"cu_seqlens_q must be int32, got torch\.int64"),
    ("cu-k-float", TypeError, {"cu_seqlens_k": torch.tensor([0.0, 12.0])},
     r"cu_seqlens_k must be int32, got torch\.(float32|int64)"),
    ("cu-2d", ValueError, {"cu_seqlens_q": torch.tensor([[0, N]], dtype=torch.int32)},
     r"cu_seqlens_q must be 1-D with at least 2 offsets"),
    ("cu-one-offset", ValueError, {"cu_seqlens_k": torch.tensor([0], dtype=torch.int32)},
     r"cu_seqlens_k must be 1-D with at least 2 offsets"),
    ("cu-noncontiguous", ValueError,
     {"cu_seqlens_q": torch.tensor([0, 9, 4, 9, N, 9], dtype=torch.int32)[::2]},
     r"cu_seqlens_q must be contiguous"),
    ("cu-block-counts", ValueError, {"cu_seqlens_k": torch.tensor([0, N], dtype=torch.int32)},
     r"same number of blocks, got 2 and 1"),
    ("cu-start", ValueError, {"cu_seqlens_q": torch.tensor([1, 4, N], dtype=torch.int32)},
     r"cu_seqlens_q \(attention's cu_seqlens\) must start at 0, got 1"),
    ("cu-decreasing", ValueError, {"cu_seqlens_k": torch.tensor([0, 8, 4], dtype=torch.int32)},
     r"cu_seqlens_k must be non-decreasing, got offset 2 = 4 after 8"),
    ("cu-beyond-k", ValueError, {"cu_seqlens_k": torch.tensor([0, 4, N + 1], dtype=torch.int32),
                   "max_seqlen_k": 20},
     r"cu_seqlens_k goes beyond the tensors' length 12: last offset 13"),
    ("cu-beyond", ValueError, {"cu_seqlens_q": torch.tensor([0, 4, N + 5], dtype=torch.int32),
                   "max_seqlen_q": 20},
     r"cu_seqlens_q \(attention's cu_seqlens\) goes beyond the tensors' length 12: last offset 17"),
    ("cu-longer-than-max", ValueError, {"max_seqlen_k": 7},
     r"cu_seqlens_k: block 1 has 8 rows, more than its max_seqlen 7"),
    ("q-rank", ValueError, {"q": torch.randn(H, N, D)}, r"q must be 4-D"),
    ("k-last-stride", ValueError, {"k": torch.randn(B, H, D, N).transpose(-1, -2)},
     r"k must have unit stride in its last \(head_dim\) dimension"),
    ("dtypes", TypeError, {"v": torch.randn(B, H, N, D, dtype=torch.float64)},
     r"q, k and v must share a dtype"),
    ("k-v-shape", ValueError, {"v": torch.randn(B, H, N + 1, D)},
     r"k and v must have the same shape"),
    ("batch", ValueError, {"q": torch.randn(1, H, N, D)},
     r"batch size mismatch: q has B = 1, k and v have B = 2"),
    ("head-dim", ValueError, {"q": torch.randn(B, H, N, 4)},
     r"head_dim mismatch: q has D = 4, k and v have D = 8"),
    ("gqa", ValueError, {"q": torch.randn(B, 3, N, D)},
     r"multiple of the number of kv heads \(Hq % Hkv == 0\), got Hq = 3, Hkv = 4"),
    ("max-seqlen", ValueError, {"max_seqlen_q": -1},
     r"max_seqlen_q and max_seqlen_k must be in \[0, 2147483647\], got -1"),
    ("scale-inf", ValueError, {"scale": float("inf")}, r"scale must be finite, got inf"),
    ("scale-nan", ValueError, {"scale": float("nan")}, r"scale must be finite, got nan"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exception", "overrides", "match"),
    [pytest.param(*case, id=name) for name, *case in RAW_FORWARD_ERRORS],
)
def test_raw_forward_checks(exception, overrides, match):
    """The operators' checks are the only ones on their tensors: ValueError or TypeError."""
    with pytest.raises(exception, match=match):
        raw_forward(**overrides)


def raw_backward(**overrides):
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    cu = torch.tensor([0, 4, N], dtype=torch.int32)
    out, lse = forward_op(q, k, v, cu, cu, 8, 8, False, 0.5)
    args = {
        "grad_out": torch.randn_like(out),
        "q": q,
        "k": k,
        "v": v,
        "out": out,
        "lse": lse,
        "grad_lse": None,
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
        "max_seqlen_q": 8,
        "max_seqlen_k": 8,
        "causal": False,
        "scale": 0.5,
        "deterministic": False,
    }
    args.update(overrides)
    return backward_op(*args.values())


RAW_BACKWARD_ERRORS = [
    ("lse-dtype", ValueError, {"lse": torch.zeros(B, H, N, dtype=torch.float64)},
     r"lse must be a contiguous float32"),
    ("lse-shape", ValueError, {"lse": torch.zeros(B, H, N + 1)},
     r"lse must be .*shape \(batch, heads_q, seqlen_q\)"),
    ("grad-lse-shape", ValueError, {"grad_lse": torch.zeros(B, H)},
     r"grad_lse must be a contiguous float32 tensor with lse's shape"),
    ("grad-lse-dtype", ValueError, {"grad_lse": torch.zeros(B, H, N, dtype=torch.float64)},
     r"grad_lse must be a contiguous float32"),
    ("grad-out-shape", ValueError, {"grad_out": torch.randn(B, H, N - 1, D)},
     r"grad_out and out must have q's shape"),
    ("grad-out-dtype", TypeError, {"grad_out": torch.randn(B, H, N, D, dtype=torch.float64)},
     r"grad_out and out must have q's dtype"),
    ("grad-out-rank", ValueError, {"grad_out": torch.randn(H, N, D)}, r"grad_out must be 4-D"),
    ("cu-int64", TypeError, {"cu_seqlens_k": torch.tensor([0, 4, N])},
     r"cu_seqlens_k must be int32, got torch\.(float32|int64)"),
    ("cu-decreasing", ValueError, {"cu_seqlens_q": torch.tensor([0, 6, 4], dtype=torch.int32)},
     r"cu_seqlens_q \(attention's cu_seqlens\) must be non-decreasing, got offset 2 = 4 after 6"),
    ("cu-longer-than-max", ValueError, {"max_seqlen_q": 4},
     r"cu_seqlens_q \(attention's cu_seqlens\): block 1 has 8 rows, more than its max_seqlen 4"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("exception", "overrides", "match"),
    [pytest.param(*case, id=name) for name, *case in RAW_BACKWARD_ERRORS],
)
def test_raw_backward_checks(exception, overrides, match):
    with pytest.raises(exception, match=match):
        raw_backward(**overrides)


def test_numpy_scalars_of_the_right_kind_are_accepted():
    """As PyTorch accepts them: NumPy bools, integers and floats where a bool, an int or a float
    goes."""
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    expected = block_attn.attention(q, k, v, block_size=4, causal=True, scale=0.5)
    got = block_attn.attention(
        q, k, v, block_size=np.int64(4), causal=np.bool_(True), scale=np.float32(0.5)
    )
    assert torch.equal(got, expected)
    listed = block_attn.attention(q, k, v, cu_seqlens=[0, np.int64(4), N])
    assert torch.equal(listed, block_attn.attention(q, k, v, cu_seqlens=[0, 4, N]))
    cu = torch.tensor([0, 4, N])
    expected = block_attn.attention(q, k, v, cu_seqlens=cu, max_seqlen=8)
    assert torch.equal(
        block_attn.attention(q, k, v, cu_seqlens=cu, max_seqlen=np.int32(8)), expected
    )


def test_reference_refuses_int64_offsets_beyond_int32():
    """The reference reads offsets kept on the device as the kernels would: never narrowed."""
    with pytest.raises(ValueError, match=r"cu_seqlens offsets must be in \[0, 2147483647\]"):
        block_attn.reference.attention(
            *qkv(), cu_seqlens=torch.tensor([0, 2**32 + 4, 2**32 + 12]), max_seqlen=8
        )
