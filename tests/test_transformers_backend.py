"""attn_implementation="block_attn" in Hugging Face transformers against "eager", same weights.

Tiny random models from configs (nothing downloaded), float32: eager's softmax runs in float32
whatever the model's dtype, so that is the precision both are compared at.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import block_attn.reference  # noqa: E402
import block_attn.transformers as hf_backend  # noqa: E402

NAME = hf_backend.register()
TOLERANCE = {"atol": 2e-5, "rtol": 2e-4}
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
FAMILIES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "mistral": transformers.MistralConfig,
}


def model_pair(
    family: str = "llama", device: str = "cpu", **overrides
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An eager model and a block_attn copy with the same random weights."""
    torch.manual_seed(0)
    config = FAMILIES[family](**{**SMALL, **overrides})
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    eager = eager.to(device)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    assert ours.config._attn_implementation == NAME
    assert eager.config._attn_implementation == "eager"
    return eager, ours


def logits_and_grads(model: torch.nn.Module, valid: torch.Tensor, **inputs):
    """Logits on valid tokens and the gradients of a loss over them, for every parameter."""
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits[valid]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    weights = weights.to(logits.device)
    (logits * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def assert_matches_eager(eager, ours, valid, **inputs):
    expected, expected_grads = logits_and_grads(eager, valid, **inputs)
    got, got_grads = logits_and_grads(ours, valid, **inputs)
    torch.testing.assert_close(got, expected, **TOLERANCE, msg=lambda m: f"logits: {m}")
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            got_grads[name], grad, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )


def packed_batch(lengths=(5, 1, 9, 3), device: str = "cpu") -> dict[str, torch.Tensor]:
    total = sum(lengths)
    ids = torch.randint(
        0, SMALL["vocab_size"], (1, total), generator=torch.Generator().manual_seed(2)
    )
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "input_ids": ids.to(device),
        "position_ids": positions.to(device),
        "offsets": offsets.to(device),
        "longest": max(lengths),
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("form", ["position_ids", "flash_kwargs"])
def test_packed_documents_match_eager(family, form, device):
    eager, ours = model_pair(family, device)
    batch = packed_batch(device=device)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    expected, expected_grads = logits_and_grads(eager, slice(None), **inputs)
    if form == "flash_kwargs":
        offsets, longest = batch["offsets"], batch["longest"]
        inputs.update(
            cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest
        )
    got, got_grads = logits_and_grads(ours, slice(None), **inputs)
    torch.testing.assert_close(got, expected, **TOLERANCE)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            got_grads[name], grad, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_packed_documents_do_not_attend_across():
    """The kwargs alone (no position_ids resets) separate the documents too."""
    _, ours = model_pair()
    batch = packed_batch((4, 6))
    ids, offsets = batch["input_ids"], batch["offsets"]
    kwargs = {
        "cu_seq_lens_q": offsets,
        "cu_seq_lens_k": offsets,
        "max_length_q": 6,
        "max_length_k": 6,
    }
    packed = ours(ids, use_cache=False, **kwargs).logits
    alone = torch.cat(
        [ours(ids[:, :4], use_cache=False).logits, ours(ids[:, 4:], use_cache=False).logits], 1
    )
    torch.testing.assert_close(packed, alone, **TOLERANCE)


def padded_batch(side: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [12, 7, 1, 10]
    ids = torch.randint(
        0, SMALL["vocab_size"], (len(lengths), 12), generator=torch.Generator().manual_seed(3)
    )
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    mask = mask if side == "right" else mask.flip(1)
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_eager_on_valid_tokens(family, side, device):
    eager, ours = model_pair(family, device)
    ids, mask = padded_batch(side, device)
    assert_matches_eager(eager, ours, mask.bool(), input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_matches_eager(cache, device):
    eager, ours = model_pair(device=device)
    ids, mask = padded_batch("left", device)
    ids = ids.masked_fill(mask == 0, 0)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    if cache == "static":
        options["cache_implementation"] = "static"
    for model in (eager, ours):
        model.eval()
    expected = eager.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
    got = ours.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


def test_register_twice_and_from_config():
    assert hf_backend.register() == NAME
    assert hf_backend.register() == NAME
    config = transformers.LlamaConfig(**SMALL)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, SMALL["vocab_size"])


def test_import_of_block_attn_alone_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, block_attn; print('transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_a_too_old_transformers_is_named(monkeypatch):
    monkeypatch.setattr(hf_backend.importlib.metadata, "version", lambda name: "4.0.0")
    with pytest.raises(
        ImportError, match=rf"transformers >= {hf_backend.MIN_TRANSFORMERS_VERSION}"
    ):
        hf_backend.register()


def test_a_missing_transformers_is_named(monkeypatch):
    def not_installed(name):
        raise hf_backend.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(hf_backend.importlib.metadata, "version", not_installed)
    with pytest.raises(ImportError, match=r"transformers >= .* not installed: pip install"):
        hf_backend.register()


class Layer(torch.nn.Module):
    is_causal = True


def test_dropout_is_the_kernels_attention_dropout():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    torch.manual_seed(4)
    out, _ = hf_backend.attention_forward(Layer(), q, k, v, None, dropout=0.3)
    torch.manual_seed(4)
    expected = block_attn.reference.attention(q, k, v, causal=True, dropout_p=0.3)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)
    assert not torch.allclose(out, hf_backend.attention_forward(Layer(), q, k, v, None)[0])


def test_a_window_longer_than_the_keys_is_exact():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, weights = hf_backend.attention_forward(Layer(), q, k, v, None, sliding_window=8)
    expected, _ = hf_backend.attention_forward(Layer(), q, k, v, None)
    assert weights is None and torch.equal(out, expected)


@pytest.mark.parametrize("keys", [9, 13])
def test_sliding_window_and_softcap_follow_transformers_masks(keys):
    """The window is transformers' sliding_window_overlay (kv > q - window) on the causal mask,
    bottom-right aligned when cached keys come before the queries; softcap as Gemma 2's eager."""
    window, softcap, scaling = 3, 2.0, 0.7
    q = torch.randn(2, 4, 9, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, keys, 16, dtype=torch.float64), torch.randn(2, 2, keys, 16)
    v = v.double()
    out, _ = hf_backend.attention_forward(
        Layer(), q, k, v, None, scaling=scaling, sliding_window=window, softcap=softcap
    )
    positions_q = torch.arange(9)[:, None] + keys - 9
    positions_k = torch.arange(keys)[None, :]
    allowed = (positions_k <= positions_q) & (positions_k > positions_q - window)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = softcap * torch.tanh(q @ k.transpose(-2, -1) * scaling / softcap)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-12, rtol=1e-10)


def test_an_invalid_sliding_window_is_refused():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="sliding_window must be a positive int or None, got 0"):
        hf_backend.attention_forward(Layer(), q, k, v, None, sliding_window=0)


# Larger weights than the default initialisation, so that attention is far from uniform and a
# window or a softcap changes the logits by far more than the tolerance.
WINDOWED = {
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=4, initializer_range=0.2),
    "qwen2": lambda: transformers.Qwen2Config(
        **SMALL,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        initializer_range=0.2,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **SMALL,
        head_dim=16,
        sliding_window=4,
        attn_logit_softcapping=1.0,
        initializer_range=0.2,
    ),
}


def windowed_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An eager model with sliding-window layers (and Gemma 2's softcap) and a block_attn copy."""
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(
        WINDOWED[family](), attn_implementation="eager"
    )
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    return eager, ours


@pytest.mark.parametrize("family", sorted(WINDOWED))
@pytest.mark.parametrize("form", ["right", "left", "position_ids", "flash_kwargs"])
def test_sliding_window_and_softcap_match_eager(family, form):
    """CPU only: the CUDA kernels have no window or softcap yet."""
    eager, ours = windowed_pair(family)
    if form in ("right", "left"):
        ids, mask = padded_batch(form)
        inputs, valid = {"input_ids": ids, "attention_mask": mask}, mask.bool()
    else:
        batch = packed_batch((5, 1, 9, 7))
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        valid = slice(None)
    expected, expected_grads = logits_and_grads(eager, valid, **inputs)
    if form == "flash_kwargs":
        offsets, longest = batch["offsets"], batch["longest"]
        inputs.update(
            cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest
        )
    got, got_grads = logits_and_grads(ours, valid, **inputs)
    torch.testing.assert_close(got, expected, **TOLERANCE, msg=lambda m: f"logits: {m}")
    for name, grad in expected_grads.items():
        # The larger weights give gradients up to ~50: float32 rounding grows with them.
        atol = TOLERANCE["atol"] * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(
            got_grads[name],
            grad,
            atol=atol,
            rtol=TOLERANCE["rtol"],
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_window_and_softcap_change_the_logits(family):
    """The comparisons above would hold trivially if the window or softcap did nothing."""
    _, ours = windowed_pair(family)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        windowed = ours(ids, use_cache=False).logits
        # A window longer than the sequence masks nothing.
        ours.config.sliding_window = 100
        for layer in ours.model.layers:
            if getattr(layer.self_attn, "sliding_window", None) is not None:
                layer.self_attn.sliding_window = 100
            if hasattr(layer.self_attn, "attn_logit_softcapping"):
                layer.self_attn.attn_logit_softcapping = None
        plain = ours(ids, use_cache=False).logits
    difference = (windowed - plain).abs().max().item()
    assert difference > 1e-2, f"the window and softcap change the logits by only {difference}"


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_generation_matches_eager(family, cache):
    """Sliding-window caches keep only the last keys: the window stays aligned to the queries."""
    eager, ours = windowed_pair(family)
    ids, mask = padded_batch("left")
    ids = ids.masked_fill(mask == 0, 0)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": mask}
    if cache == "static":
        options["cache_implementation"] = "static"
    for model in (eager, ours):
        model.eval()
    expected = eager.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
    got = ours.generate(ids, output_logits=True, return_dict_in_generate=True, **options)
    assert torch.equal(got.sequences, expected.sequences), (got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("form", ["padded", "packed"])
def test_gpt_oss_sinks_match_eager(form):
    """GPT-OSS's learned sinks (s_aux) go to block_attn's sinks."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        **{**SMALL, "intermediate_size": 64, "head_dim": 16},
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
    )
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4))
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    if form == "packed":
        # Against eager on each document alone (eager itself may attend across documents).
        batch = packed_batch()
        ids, offsets = batch["input_ids"], batch["offsets"].tolist()
        packed = ours(ids, position_ids=batch["position_ids"], use_cache=False).logits
        pieces = [ids[:, a:b] for a, b in itertools.pairwise(offsets)]
        alone = torch.cat([eager(piece, use_cache=False).logits for piece in pieces], 1)
        torch.testing.assert_close(packed, alone, **TOLERANCE)
        return
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    assert_matches_eager(eager, ours, mask.bool(), input_ids=ids, attention_mask=mask)


def test_a_dense_4d_mask_is_refused():
    _, ours = model_pair()
    dense = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="dense custom masks"):
        ours(torch.zeros(1, 3, dtype=torch.long), attention_mask=dense, use_cache=False)


def test_a_mask_with_a_hole_is_refused():
    _, ours = model_pair()
    mask = torch.tensor([[1, 1, 0, 1]])
    with pytest.raises(RuntimeError, match="one run of ones"):
        ours(torch.zeros(1, 4, dtype=torch.long), attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("form", ["padded", "position_ids", "flash_kwargs"])
def test_compiled_model_has_no_graph_break(form):
    eager, ours = model_pair()
    if form == "padded":
        ids, mask = padded_batch("left")
        inputs = {"input_ids": ids, "attention_mask": mask}
        valid = mask.bool()
    else:
        batch = packed_batch()
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        valid = slice(None)
    if form == "flash_kwargs":
        offsets, longest = batch["offsets"], batch["longest"]
        inputs.update(
            cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest
        )
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(**inputs, use_cache=False).logits[valid]
        expected = eager(**inputs, use_cache=False).logits[valid]
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_trainer_with_flattening_collator(tmp_path):
    _, ours = model_pair()
    generator = torch.Generator().manual_seed(4)
    examples = [
        {"input_ids": torch.randint(0, 128, (int(n),), generator=generator).tolist()}
        for n in torch.randint(3, 20, (8,), generator=generator)
    ]
    for example in examples:
        example["labels"] = list(example["input_ids"])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    trainer = transformers.Trainer(
        model=ours, args=args, train_dataset=examples, data_collator=collator
    )
    result = trainer.train()
    assert result.global_step == 2
    assert 0 < result.training_loss < 10, result.training_loss


@pytest.mark.parametrize("form", ["packed", "padded"])
def test_bfloat16_error_is_at_most_twice_eagers(form, device):
    """bfloat16 logits are as close to float32 eager as bfloat16 eager's, within 2× (+ a floor)."""
    eager, ours = model_pair(device=device)
    if form == "packed":
        batch = packed_batch(device=device)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        valid = slice(None)
    else:
        ids, mask = padded_batch("left", device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        valid = mask.bool()
    with torch.no_grad():
        exact = eager(**inputs, use_cache=False).logits[valid]
        eager_bf16 = eager.to(torch.bfloat16)(**inputs, use_cache=False).logits[valid].float()
        ours_bf16 = ours.to(torch.bfloat16)(**inputs, use_cache=False).logits[valid].float()
    eager_error = (eager_bf16 - exact).abs().max().item()
    our_error = (ours_bf16 - exact).abs().max().item()
    assert our_error <= 2 * eager_error + 1e-3, f"block_attn {our_error}, eager {eager_error}"
