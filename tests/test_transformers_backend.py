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


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"dropout": 0.1}, "dropout"),
        ({"sliding_window": 4}, "sliding_window"),
        ({"softcap": 30.0}, "softcap"),
    ],
)
def test_unsupported_arguments_are_refused(kwargs, named):
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match=f"does not support {named}"):
        hf_backend.attention_forward(Layer(), q, k, v, None, **kwargs)


def test_a_window_longer_than_the_keys_is_exact():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, weights = hf_backend.attention_forward(Layer(), q, k, v, None, sliding_window=8)
    expected, _ = hf_backend.attention_forward(Layer(), q, k, v, None)
    assert weights is None and torch.equal(out, expected)


def test_models_passing_unsupported_arguments_raise():
    torch.manual_seed(0)
    mistral = transformers.AutoModelForCausalLM.from_config(
        transformers.MistralConfig(**{**SMALL, "sliding_window": 4}), attn_implementation=NAME
    )
    with pytest.raises(NotImplementedError, match="sliding_window"):
        mistral(torch.zeros(1, 6, dtype=torch.long), use_cache=False)
    gemma2 = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma2Config(**{**SMALL, "head_dim": 16}), attn_implementation=NAME
    )
    with pytest.raises(NotImplementedError, match="softcap"):
        gemma2(torch.zeros(1, 3, dtype=torch.long), use_cache=False)


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
