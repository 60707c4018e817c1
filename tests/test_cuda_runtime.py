"""How the ops behave on a GPU's streams: no host synchronisation, any current stream, CUDA
graph capture and replay (skipped without a GPU). Where a test relies on a kernel path, it checks
the kernels that ran (torch.profiler).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from common import assert_within_reference_error, grads, make_qkv
from conftest import requires_cuda

import block_attn
from block_attn import reference
from block_attn.cuda_kernels import decoding_kernel_applies, kernel_paths, kernels_launched

DECODING_KWARGS = {"cu_seqlens": [0, 3, 8], "cu_seqlens_k": [0, 500, 600], "causal": True}
MASK_KWARGS = [
    pytest.param({"block_size": 48}, id="block_size"),
    pytest.param({"cu_seqlens": [0, 70, 71, 200]}, id="cu_seqlens-list"),
    pytest.param({"causal": True}, id="causal"),
    pytest.param({"block_size": 64, "causal": True}, id="block_size-causal"),
    pytest.param(
        {"cu_seqlens": [0, 70, 71, 200], "cu_seqlens_k": [0, 100, 150, 200], "causal": True},
        id="key-offsets-list",
    ),
    # A few new tokens per sequence against longer key caches: the split-key decoding forward.
    pytest.param(DECODING_KWARGS, id="decoding-list"),
]


def _forward_backward(q, k, v, grad_out, kwargs):
    out = block_attn.attention(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _check_against_reference(got, q, k, v, grad_out, kwargs):
    """out, dq, dk, dv within FlashAttention's bounds of the float64 reference (2x / 3x the
    error of the reference computed in q's dtype)."""
    low = tuple(t.detach().requires_grad_() for t in (q, k, v))
    high = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    ref_low = reference.attention(*low, **kwargs)
    ref_high = reference.attention(*high, **kwargs)
    expected_low = (ref_low, *grads(ref_low, low, grad_out))
    expected_high = (ref_high, *grads(ref_high, high, grad_out.double()))
    for name, g, e_low, e_high in zip(
        ("out", "dq", "dk", "dv"), got, expected_low, expected_high, strict=True
    ):
        factor = 2 if name == "out" else 3
        assert_within_reference_error(g, e_low, e_high, factor=factor, atol=1e-3, what=name)


def _inputs(dtype=torch.bfloat16, seqlen=200, seqlen_k=None):
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    q, k, v = make_qkv(
        2, 4, 2, seqlen, seqlen_k, 64, dtype=dtype, device="cuda", requires_grad=True
    )
    return q, k, v, torch.randn_like(q)


def _inputs_for(kwargs):
    """Inputs with as many query and key rows as the kwargs' listed offsets end at (else 200)."""
    seqlen = kwargs["cu_seqlens"][-1] if "cu_seqlens" in kwargs else 200
    return _inputs(seqlen=seqlen, seqlen_k=kwargs.get("cu_seqlens_k", [seqlen])[-1])


def _decode_kernels(kernels):
    """Asserts that ``kernels`` (the names of a forward's launches) are the split-key decoding
    forward's, with its keys split over several CTAs (their partial results merged after)."""
    assert kernel_paths(kernels) == {"decode"}, f"the forward launched {kernels}"
    assert any("combine_splits_kernel" in name for name in kernels), f"no key splits: {kernels}"


@requires_cuda
def test_decoding_blocks_run_the_split_key_forward():
    """The decoding-list problem above takes the split-key forward, not the general one."""
    if not decoding_kernel_applies("cuda", torch.bfloat16, 5, 500):
        pytest.skip("the decoding forward needs an sm_80+ GPU")
    q, k, v, _ = _inputs_for(DECODING_KWARGS)
    _decode_kernels(kernels_launched(lambda: block_attn.attention(q, k, v, **DECODING_KWARGS)))


@contextlib.contextmanager
def _sync_debug_mode_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@requires_cuda
@pytest.mark.parametrize("kwargs", [*MASK_KWARGS, pytest.param("on-device", id="on-device")])
def test_forward_and_backward_never_wait_for_the_gpu(kwargs):
    q, k, v, grad_out = _inputs() if kwargs == "on-device" else _inputs_for(kwargs)
    if kwargs == "on-device":
        cu_seqlens = torch.tensor([0, 70, 71, 200], dtype=torch.int32, device="cuda")
        kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": 129, "causal": True}
    _forward_backward(q, k, v, grad_out, kwargs)  # loads the kernels
    torch.cuda.synchronize()
    with _sync_debug_mode_error():
        _forward_backward(q, k, v, grad_out, kwargs)
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("kwargs", MASK_KWARGS)
def test_any_current_stream_gives_correct_results(kwargs):
    q, k, v, grad_out = _inputs_for(kwargs)
    expected = _forward_backward(q, k, v, grad_out, kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _forward_backward(q, k, v, grad_out, kwargs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _check_against_reference(got, q, k, v, grad_out, kwargs)
    _check_against_reference(expected, q, k, v, grad_out, kwargs)


def _capture(fn):
    """Warms ``fn`` up on a side stream, then captures it; returns the graph and its outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@requires_cuda
@pytest.mark.parametrize("kwargs", [p for p in MASK_KWARGS if "cu_seqlens" not in p.values[0]])
def test_cuda_graph_replays_forward_and_backward_on_new_inputs(kwargs):
    q, k, v, grad_out = _inputs()
    graph, captured = _capture(lambda: _forward_backward(q, k, v, grad_out, kwargs))
    with torch.no_grad():
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    _check_against_reference(captured, q, k, v, grad_out, kwargs)


@requires_cuda
def test_cuda_graph_with_offsets_kept_on_the_device():
    """Packed documents in a graph: new offsets copied into the captured tensor between replays
    (same number of blocks, none longer than the max_seqlen captured)."""
    q, k, v, grad_out = _inputs()
    cu_seqlens = torch.tensor([0, 70, 71, 200], dtype=torch.int32, device="cuda")

    def step():
        kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": 160, "causal": True}
        return _forward_backward(q, k, v, grad_out, kwargs)

    graph, captured = _capture(step)
    for offsets in ([0, 70, 71, 200], [0, 40, 100, 200], [0, 150, 160, 200]):
        cu_seqlens.copy_(torch.tensor(offsets, dtype=torch.int32))
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        kwargs = {"cu_seqlens": offsets, "causal": True}
        _check_against_reference(captured, q, k, v, grad_out, kwargs)


@requires_cuda
def test_cuda_graph_decoding_with_offsets_kept_on_the_device():
    """New tokens against key caches in a graph: the decoding forward's split-key scratch is
    allocated inside the capture, and the boundary between the two caches moves between
    replays (one of them empty in the last)."""
    q, k, v, grad_out = _inputs(seqlen=8, seqlen_k=1200)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
    cu_seqlens_k = torch.tensor([0, 500, 1200], dtype=torch.int32, device="cuda")

    step_kwargs = {
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_k": cu_seqlens_k,
        "max_seqlen": 5,
        "max_seqlen_k": 1200,
        "causal": True,
    }
    if decoding_kernel_applies("cuda", q.dtype, 5, 1200):
        _decode_kernels(kernels_launched(lambda: block_attn.attention(q, k, v, **step_kwargs)))
    graph, captured = _capture(lambda: _forward_backward(q, k, v, grad_out, step_kwargs))
    for offsets_k in ([0, 500, 1200], [0, 1000, 1200], [0, 0, 1200]):
        cu_seqlens_k.copy_(torch.tensor(offsets_k, dtype=torch.int32))
        with torch.no_grad():
            for t in (q, k, v):
                t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        kwargs = {"cu_seqlens": [0, 3, 8], "cu_seqlens_k": offsets_k, "causal": True}
        _check_against_reference(captured, q, k, v, grad_out, kwargs)


@requires_cuda
@pytest.mark.parametrize("container", ["list", "tensor"])
def test_capture_with_host_checked_offsets_says_what_to_do(container):
    q, k, v, _ = _inputs()
    offsets = [0, 70, 71, 200]
    cu_seqlens = offsets if container == "list" else torch.tensor(offsets, device="cuda")
    graph = torch.cuda.CUDAGraph()
    error = None
    with torch.cuda.graph(graph):
        # Caught inside: the capture must end cleanly for the next test.
        try:
            block_attn.attention(q, k, v, cu_seqlens=cu_seqlens)
        except RuntimeError as e:
            error = e
    assert error is not None, "a capture with host-checked offsets raised nothing"
    assert "max_seqlen" in str(error), str(error)
