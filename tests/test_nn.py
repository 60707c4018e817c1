"""Tests for block_attn.nn.MultiheadBlockAttention against torch.nn.MultiheadAttention."""

from __future__ import annotations

import itertools

import pytest
import torch

import block_attn
from block_attn import reference
from block_attn.nn import MultiheadBlockAttention, alibi_slopes

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]
EMBED_DIM, NUM_HEADS = 24, 4  # head_dim 6: not a power of two


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Float32 precision, with the worst element in the message."""
    torch.testing.assert_close(
        actual, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} differs: {m}"
    )


def reference_pair(
    device: str, *, bias: bool = True, **module_kwargs
) -> tuple[torch.nn.MultiheadAttention, MultiheadBlockAttention]:
    """A torch MHA (batch_first) and a MultiheadBlockAttention holding the same weights."""
    mha = torch.nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, bias=bias, batch_first=True)
    if bias:  # MHA starts with zero biases; random ones make the comparison meaningful.
        torch.nn.init.normal_(mha.in_proj_bias)
        torch.nn.init.normal_(mha.out_proj.bias)
    mha = mha.to(device)
    module = MultiheadBlockAttention(
        EMBED_DIM, NUM_HEADS, bias=bias, device=device, **module_kwargs
    )
    with torch.no_grad():
        projections = (module.q_proj, module.k_proj, module.v_proj)
        for proj, weight in zip(projections, mha.in_proj_weight.chunk(3), strict=True):
            proj.weight.copy_(weight)
        module.out_proj.weight.copy_(mha.out_proj.weight)
        if bias:
            for proj, b in zip(projections, mha.in_proj_bias.chunk(3), strict=True):
                proj.bias.copy_(b)
            module.out_proj.bias.copy_(mha.out_proj.bias)
    return mha, module


def block_mask(offsets: list[int], causal: bool) -> torch.Tensor:
    """MHA's boolean attn_mask (True = may NOT attend) for blocks with these offsets."""
    n = offsets[-1]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for start, end in itertools.pairwise(offsets):
        allowed[start:end, start:end] = True
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    return ~allowed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_full_attention_matches_mha(device, bias):
    torch.manual_seed(0)
    mha, module = reference_pair(device, bias=bias)
    x = torch.randn(3, 11, EMBED_DIM, device=device)
    expected, expected_weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
    out, weights = module(x, need_weights=True)
    assert out.shape == (3, 11, EMBED_DIM)
    assert weights.shape == (3, NUM_HEADS, 11, 11)
    assert_close(out, expected, "output")
    assert_close(weights, expected_weights, "attention weights")


@pytest.mark.parametrize("device", DEVICES)
def test_causal_matches_mha_outputs_weights_and_gradients(device):
    torch.manual_seed(1)
    mha, module = reference_pair(device, causal=True)
    x = torch.randn(2, 13, EMBED_DIM, device=device, requires_grad=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(13, device=device)
    expected, expected_weights = mha(
        x, x, x, attn_mask=mask, is_causal=True, need_weights=True, average_attn_weights=False
    )
    out, weights = module(x, need_weights=True)
    assert_close(out, expected, "causal output")
    assert_close(weights, expected_weights, "causal attention weights")
    grad_out = torch.randn_like(out)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert_close(grad, expected_grad, "input gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_with_different_key_length_matches_mha(device):
    torch.manual_seed(2)
    mha, module = reference_pair(device)
    query = torch.randn(2, 5, EMBED_DIM, device=device)
    key = torch.randn(2, 7, EMBED_DIM, device=device)
    value = torch.randn(2, 7, EMBED_DIM, device=device)
    expected, expected_weights = mha(query, key, value, average_attn_weights=False)
    out, weights = module(query, key, value, need_weights=True)
    assert out.shape == (2, 5, EMBED_DIM)
    assert weights.shape == (2, NUM_HEADS, 5, 7)
    assert_close(out, expected, "cross-attention output")
    assert_close(weights, expected_weights, "cross-attention weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "blocks", ["block_size", "cu_seqlens_list", "cu_seqlens_tensor", "cu_seqlens_on_device"]
)
def test_blocks_match_mha_with_block_diagonal_mask(device, causal, blocks):
    torch.manual_seed(3)
    n = 14
    if blocks == "block_size":
        offsets = [0, 4, 8, 12, 14]
        mha, module = reference_pair(device, causal=causal, block_size=4)
        call = {}
    else:
        offsets = [0, 1, 1, 6, 14, 14]  # with empty blocks
        mha, module = reference_pair(device, causal=causal)
        cu_seqlens = offsets if blocks == "cu_seqlens_list" else torch.tensor(offsets)
        call = {"cu_seqlens": cu_seqlens}
        if blocks == "cu_seqlens_on_device":
            call = {"cu_seqlens": cu_seqlens.to(device), "max_seqlen": 8}
    x = torch.randn(2, n, EMBED_DIM, device=device)
    mask = block_mask(offsets, causal).to(device)
    expected, expected_weights = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
    out, weights = module(x, need_weights=True, **call)
    assert_close(out, expected, f"{blocks} output")
    assert_close(weights, expected_weights, f"{blocks} attention weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_with_key_blocks_matches_mha(device, causal):
    """Query block j attends key block j of a longer memory (bottom-right causal per block)."""
    torch.manual_seed(5)
    off_q, off_k = [0, 4, 10], [0, 9, 14]
    mha, module = reference_pair(device, causal=causal)
    x = torch.randn(2, off_q[-1], EMBED_DIM, device=device)
    memory = torch.randn(2, off_k[-1], EMBED_DIM, device=device)
    allowed = torch.zeros(off_q[-1], off_k[-1], dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(
        itertools.pairwise(off_q), itertools.pairwise(off_k), strict=True
    ):
        block = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        allowed[q0:q1, k0:k1] = block.tril((k1 - k0) - (q1 - q0)) if causal else block
    expected, _ = mha(x, memory, memory, attn_mask=~allowed.to(device))
    out, weights = module(x, memory, cu_seqlens=off_q, cu_seqlens_k=off_k, need_weights=True)
    # Rows that see no key (Lq > Lk under the causal mask): MHA gives NaN, we give the output
    # projection of zeros; compare the others.
    has_key = allowed.any(dim=-1).to(device)
    assert not causal or not has_key.all(), "the causal case should have rows without keys"
    assert_close(out[:, has_key], expected[:, has_key], "output with key blocks")
    assert torch.all(weights[..., ~allowed.to(device)] == 0), "weight outside a block pair"
    assert torch.all(weights[:, :, ~has_key] == 0), "a row without keys has weights"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_changing_one_block_leaves_other_blocks_unchanged(device, causal):
    torch.manual_seed(4)
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, causal=causal, device=device)
    offsets = [0, 3, 9, 16]
    x = torch.randn(2, 16, EMBED_DIM, device=device)
    changed = x.clone()
    changed[:, 3:9] = torch.randn(2, 6, EMBED_DIM, device=device)
    out = module(x, cu_seqlens=offsets)
    out_changed = module(changed, cu_seqlens=offsets)
    for start, end in [(0, 3), (9, 16)]:
        assert_close(out_changed[:, start:end], out[:, start:end], f"block [{start}, {end})")
    difference = (out_changed[:, 3:9] - out[:, 3:9]).abs().max().item()
    assert difference > 1e-3, f"the changed block's output should change, max diff {difference}"


def test_cu_seqlens_overrides_block_size():
    torch.manual_seed(5)
    blocked = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, block_size=2)
    full = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS)
    full.load_state_dict(blocked.state_dict())
    x = torch.randn(2, 8, EMBED_DIM)
    assert_close(blocked(x, cu_seqlens=[0, 8]), full(x), "one-block cu_seqlens vs no blocks")
    assert_close(
        blocked(x, cu_seqlens=[0, 2, 4, 6, 8]), blocked(x), "cu_seqlens equal to block_size"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_grouped_query_attention_shapes_and_values(device, num_kv_heads):
    torch.manual_seed(6)
    head_dim = EMBED_DIM // NUM_HEADS
    gqa = MultiheadBlockAttention(
        EMBED_DIM, NUM_HEADS, num_kv_heads=num_kv_heads, causal=True, device=device
    )
    assert gqa.k_proj.weight.shape == (head_dim * num_kv_heads, EMBED_DIM)
    assert gqa.v_proj.weight.shape == (head_dim * num_kv_heads, EMBED_DIM)
    assert gqa.k_proj.bias.shape == (head_dim * num_kv_heads,)
    # The same model with every kv head repeated for its query-head group.
    mha = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, causal=True, device=device)
    groups = NUM_HEADS // num_kv_heads
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            source, target = getattr(gqa, name), getattr(mha, name)
            weight = source.weight.view(num_kv_heads, head_dim, EMBED_DIM)
            target.weight.copy_(weight.repeat_interleave(groups, 0).reshape(EMBED_DIM, EMBED_DIM))
            bias = source.bias.view(num_kv_heads, head_dim)
            target.bias.copy_(bias.repeat_interleave(groups, 0).reshape(EMBED_DIM))
    x = torch.randn(2, 10, EMBED_DIM, device=device)
    out, weights = gqa(x, need_weights=True)
    expected, expected_weights = mha(x, need_weights=True)
    assert out.shape == (2, 10, EMBED_DIM)
    assert weights.shape == (2, NUM_HEADS, 10, 10)
    assert_close(out, expected, "GQA output")
    assert_close(weights, expected_weights, "GQA attention weights")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_kv_heads", [2, 4])
def test_gradients_reach_every_parameter(device, num_kv_heads):
    torch.manual_seed(7)
    module = MultiheadBlockAttention(
        EMBED_DIM, NUM_HEADS, num_kv_heads=num_kv_heads, causal=True, device=device
    )
    x = torch.randn(2, 9, EMBED_DIM, device=device, requires_grad=True)
    module(x, cu_seqlens=[0, 4, 9]).square().sum().backward()
    for name, parameter in [("input", x), *module.named_parameters()]:
        assert parameter.grad is not None, f"{name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name} got a non-finite gradient"


def test_dropout_drops_attention_probabilities_in_training_only():
    torch.manual_seed(8)
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, dropout=0.5, causal=True)
    x = torch.randn(2, 6, EMBED_DIM)
    module.eval()
    assert torch.equal(module(x), module(x))
    plain = module(x)
    module.train()
    torch.manual_seed(3)
    dropped = module(x)
    assert not torch.equal(dropped, plain)
    # The same draw from the default generator, through the reference's mask rule.
    q = module.q_proj(x).view(2, 6, NUM_HEADS, -1).transpose(1, 2)
    k = module.k_proj(x).view(2, 6, NUM_HEADS, -1).transpose(1, 2)
    v = module.v_proj(x).view(2, 6, NUM_HEADS, -1).transpose(1, 2)
    torch.manual_seed(3)
    attended = reference.attention(q, k, v, causal=True, dropout_p=0.5)
    expected = module.out_proj(attended.transpose(1, 2).reshape(2, 6, EMBED_DIM))
    assert_close(dropped, expected, "dropped output")


def test_parameters_follow_dtype_and_output_keeps_it():
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    out = module(torch.randn(1, 5, EMBED_DIM, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_projections_are_viewed_without_copies(monkeypatch):
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2)
    seen = {}

    def spy(q, k, v, **kwargs):
        seen.update(q=q, k=k, v=v)
        return block_attn.reference.attention(q, k, v, **kwargs)

    monkeypatch.setattr(block_attn, "attention", spy)
    module(torch.randn(2, 7, EMBED_DIM))
    for name, t in seen.items():
        assert t._base is not None, f"{name} should be a view of the projection's output"
        assert t.stride(-1) == 1, f"{name} should have unit last stride, got {t.stride()}"
        assert t.stride(1) == t.shape[-1], f"{name} should be a (B, N, H, D) layout: {t.stride()}"


@pytest.mark.parametrize("blocks", [{"block_size": 4}, {"cu_seqlens": [0, 3, 10, 12]}])
def test_torch_compile_fullgraph(blocks):
    torch.manual_seed(9)
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, causal=True)
    cu_seqlens = blocks.get("cu_seqlens")
    if "block_size" in blocks:
        module.block_size = blocks["block_size"]
    x = torch.randn(2, 12, EMBED_DIM, requires_grad=True)
    expected = module(x, cu_seqlens=cu_seqlens)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, cu_seqlens=cu_seqlens)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert_close(out, expected, "compiled output")
    assert_close(grad, expected_grad, "compiled input gradient")


def reference_forward(
    module: MultiheadBlockAttention, x: torch.Tensor, **attention_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's forward pass written out with block_attn.reference, and its dense weights."""
    batch, length, _ = x.shape

    def heads(proj: torch.nn.Linear, count: int) -> torch.Tensor:
        return proj(x).view(batch, length, count, module.head_dim).transpose(1, 2)

    q, k, v = (
        heads(module.q_proj, NUM_HEADS),
        heads(module.k_proj, module.num_kv_heads),
        heads(module.v_proj, module.num_kv_heads),
    )
    out = block_attn.reference.attention(q, k, v, **attention_kwargs)
    out = module.out_proj(out.transpose(1, 2).reshape(batch, length, EMBED_DIM))
    # The weights: attention on one-hot values picks out each query's probabilities. q and k get
    # zero features up to the values' width N, which leaves every q·k as it was.
    identity = torch.eye(length, dtype=x.dtype).expand(batch, NUM_HEADS, length, length)
    k = k.repeat_interleave(NUM_HEADS // module.num_kv_heads, dim=1)
    q, k = (torch.nn.functional.pad(t, (0, length - module.head_dim)) for t in (q, k))
    scale = module.head_dim**-0.5
    weights = block_attn.reference.attention(q, k, identity, scale=scale, **attention_kwargs)
    return out, weights


VARIANTS = {
    "window": {"window_size": (3, 1)},
    "window_left_only": {"window_size": (2, -1)},
    "softcap": {"softcap": 0.5},
    "alibi": {"alibi": True},
    "all": {"window_size": (4, 2), "softcap": 1.5, "alibi": True, "sinks": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [{}, {"cu_seqlens": [0, 5, 6, 13]}])
def test_variants_match_the_reference(variant, causal, blocks):
    """CPU only: the CUDA kernels have no window, softcap or ALiBi yet."""
    torch.manual_seed(10)
    options = VARIANTS[variant]
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2, causal=causal, **options)
    if module.sinks is not None:
        with torch.no_grad():
            module.sinks.copy_(torch.linspace(-1.0, 2.0, NUM_HEADS))
    # Larger projections than the default, so the softcap bites.
    with torch.no_grad():
        module.q_proj.weight.mul_(4)
    x = torch.randn(2, 13, EMBED_DIM, requires_grad=True)
    kwargs = {
        "causal": causal,
        "window_size": options.get("window_size", (-1, -1)),
        "softcap": options.get("softcap", 0.0),
        "alibi_slopes": module.alibi_slopes,
        "sinks": module.sinks,
        **blocks,
    }
    expected, expected_weights = reference_forward(module, x, **kwargs)
    out, weights = module(x, need_weights=True, **blocks)
    assert_close(out, expected, f"{variant} output")
    assert_close(weights, expected_weights, f"{variant} attention weights")
    grad_out = torch.randn_like(out)
    parameters = [x, *module.parameters()]
    expected_grads = torch.autograd.grad(expected, parameters, grad_out)
    grads = torch.autograd.grad(out, parameters, grad_out)
    names = ["input", *(name for name, _ in module.named_parameters())]
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, f"{variant} gradient of {name}")


def test_a_window_masks_the_weights_outside_it():
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, causal=True, window_size=(2, 0))
    _, weights = module(torch.randn(1, 7, EMBED_DIM), need_weights=True)
    behind = torch.arange(7)[:, None] - torch.arange(7)[None, :]
    outside = (behind < 0) | (behind > 2)
    assert torch.all(weights[..., outside] == 0), "a weight outside the window"
    assert torch.all(weights[..., ~outside] > 0), "a weight inside the window is 0"


def test_alibi_slopes_of_a_power_of_two_head_count():
    expected = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
    assert alibi_slopes(8) == expected
    module = MultiheadBlockAttention(16, 8, alibi=True)
    assert module.alibi_slopes.dtype == torch.float32
    assert module.alibi_slopes.tolist() == expected
    assert alibi_slopes(4) == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert alibi_slopes(1) == [1 / 256]


def test_alibi_slopes_of_other_head_counts():
    """The first slopes of the power of two below, then every other slope of twice as many."""
    assert alibi_slopes(6) == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    # 12 heads: the 8 slopes 2^(-i) of 8 heads, then 2^(-0.5), 2^(-1.5), 2^(-2.5), 2^(-3.5).
    twelve = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
    twelve += [0.7071067811865476, 0.35355339059327373, 0.17677669529663687, 0.08838834764831843]
    assert alibi_slopes(12) == pytest.approx(twelve, rel=1e-15)
    assert alibi_slopes(3) == [0.0625, 0.00390625, 0.25]


def test_alibi_slopes_stay_float32_and_out_of_the_state_dict():
    module = MultiheadBlockAttention(EMBED_DIM, 6, alibi=True)
    assert "alibi_slopes" not in module.state_dict()
    assert "alibi_slopes" in dict(module.named_buffers())
    for converted in (module.double(), module.to(torch.bfloat16), module.to_empty(device="cpu")):
        assert converted.alibi_slopes.dtype == torch.float32
        assert converted.alibi_slopes.tolist() == alibi_slopes(6)
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, alibi=True, dtype=torch.float64)
    out = module(torch.randn(1, 5, EMBED_DIM, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_alibi_slopes_follow_the_module_to_cuda():
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, alibi=True).cuda()
    assert module.alibi_slopes.device.type == "cuda"
    assert module.alibi_slopes.dtype == torch.float32


def test_extra_repr_shows_the_variants_set():
    plain = repr(MultiheadBlockAttention(EMBED_DIM, NUM_HEADS))
    assert "window_size" not in plain and "softcap" not in plain and "alibi" not in plain
    text = repr(
        MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, window_size=(8, 0), softcap=30, alibi=True)
    )
    assert "window_size=(8, 0), softcap=30.0, alibi=True" in text, text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"window_size": 4}, TypeError, r"window_size must be a pair of ints \(left, right\)"),
        ({"window_size": (1, 2, 3)}, ValueError, r"window_size must be a pair \(left, right\)"),
        ({"window_size": (-2, 0)}, ValueError, r"sides must be >= 0, or -1 for unbounded"),
        ({"window_size": (1.5, 0)}, TypeError, "window_size must be an int, got float"),
        ({"softcap": -1.0}, ValueError, r"softcap must be a finite float >= 0"),
        ({"softcap": float("inf")}, ValueError, r"softcap must be a finite float >= 0"),
        ({"softcap": "30"}, TypeError, "softcap must be a float, got str"),
        ({"alibi": 1}, TypeError, "alibi must be a bool, got int"),
    ],
)
def test_variant_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, **kwargs)


def test_alibi_slopes_errors():
    with pytest.raises(ValueError, match="num_heads must be positive, got 0"):
        alibi_slopes(0)
    with pytest.raises(TypeError, match="num_heads must be an int, got float"):
        alibi_slopes(4.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 10, "num_heads": 4}, "embed_dim must be divisible by num_heads"),
        ({"embed_dim": 24, "num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"embed_dim": 24, "num_heads": 0}, "must be positive"),
        ({"embed_dim": 24, "num_heads": 4, "block_size": 0}, "block_size must be a positive"),
        ({"embed_dim": 24, "num_heads": 4, "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiheadBlockAttention(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"causal": "yes"}, "causal must be a bool, got str"),
        ({"block_size": 4.0}, "block_size must be an int, got float"),
    ],
)
def test_constructor_type_errors(kwargs, match):
    """Wrong types fail at construction, not at the first forward."""
    with pytest.raises(TypeError, match=match):
        MultiheadBlockAttention(24, 4, **kwargs)


def test_forward_errors():
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS)
    x = torch.randn(2, 6, EMBED_DIM)
    with pytest.raises(ValueError, match=r"query must be 3-D \(batch, seqlen, embed_dim\)"):
        module(x[0])
    with pytest.raises(ValueError, match="key must be 3-D"):
        module(x, x.unsqueeze(0))
    with pytest.raises(ValueError, match="query must have embed_dim = 24 features"):
        module(torch.randn(2, 6, EMBED_DIM + 1))
    with pytest.raises(ValueError, match="value must have embed_dim = 24"):
        module(x, x, torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="must share the batch size"):
        module(x, torch.randn(3, 6, EMBED_DIM))
    with pytest.raises(ValueError, match="key and value must have the same length"):
        module(x, x, torch.randn(2, 5, EMBED_DIM))
    with pytest.raises(ValueError, match=r"cu_seqlens needs as many queries as keys"):
        module(x, torch.randn(2, 7, EMBED_DIM), cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="cu_seqlens goes beyond the sequence: last offset 7"):
        module(x, cu_seqlens=[0, 3, 7])


def test_need_weights_is_refused_above_the_size_limit(monkeypatch):
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS)
    monkeypatch.setattr(MultiheadBlockAttention, "max_weights_elements", 2 * NUM_HEADS * 6 * 6 - 1)
    x = torch.randn(2, 6, EMBED_DIM)
    with pytest.raises(ValueError, match=r"B\*H\*Nq\*Nk = 2\*4\*6\*6 = 288 elements"):
        module(x, need_weights=True)
    assert module(x).shape == x.shape  # the output alone has no limit
    monkeypatch.setattr(MultiheadBlockAttention, "max_weights_elements", 2 * NUM_HEADS * 6 * 6)
    assert module(x, need_weights=True)[1].shape == (2, NUM_HEADS, 6, 6)


def test_float64_module_weights_are_float64_exact():
    """need_weights computes in the module's dtype: float64 rows sum to 1 to float64 rounding."""
    torch.manual_seed(5)
    module = MultiheadBlockAttention(EMBED_DIM, NUM_HEADS, block_size=4, dtype=torch.float64)
    x = torch.randn(2, 10, EMBED_DIM, dtype=torch.float64)
    _, weights = module(x, need_weights=True)
    assert weights.dtype == torch.float64
    error = (weights.sum(dim=-1) - 1).abs().max().item()
    assert error < 1e-13, f"float64 weight rows sum to 1 within {error:.2e}"
