"""LoRA through peft: what trains, bad targets, and adapters/merged weights that load in transformers."""
import dataclasses

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from finetune.config import ConfigError
from finetune.model import GPTJConfig, build_model
from finetune.training.lora import LoraConfig, apply_lora, merge_lora, merged_state_dict, save_adapter

TINY = dict(
    vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, num_labels=3, pad_token_id=999
)
HF_CLASSES = {
    "clm": transformers.GPTJForCausalLM,
    "cls": transformers.GPTJForSequenceClassification,
    "qa": transformers.GPTJForQuestionAnswering,
}
HEAD = {"clm": "lm_head", "cls": "score", "qa": "qa_outputs"}
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "fc_in"])


def ours_and_base_state(task):
    torch.manual_seed(0)
    model = build_model(GPTJConfig(**TINY), task=task).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def hf_model(task, state_dict=None):
    hf_config = transformers.GPTJConfig(**TINY)
    hf_config._attn_implementation = "eager"
    model = HF_CLASSES[task](hf_config).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


@torch.no_grad()
def perturb_trainable(model, seed=1):
    # Fresh LoRA has B = 0 (a no-op); random updates make adapter and head matter for the logits.
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, task, ids):
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask)
    return torch.cat([out.start_logits, out.end_logits], -1) if task == "qa" else out.logits


IDS = torch.randint(0, 999, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("task, train_head, head_trains", [
    ("clm", None, False), ("clm", True, True), ("qa", None, True), ("qa", False, False),
])
def test_only_adapters_and_the_configured_head_train(task, train_head, head_trains):
    model, _ = ours_and_base_state(task)
    cfg = GPTJConfig(**TINY)
    head_numel = sum(p.numel() for p in getattr(model, HEAD[task]).parameters())
    peft_model = apply_lora(model, dataclasses.replace(LORA, train_head=train_head))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    # Each target gets A (r x in) and B (out x r): q_proj and v_proj are n_embd -> n_embd, fc_in n_embd -> inner_dim.
    per_layer = LORA.r * (cfg.n_embd + cfg.n_embd) * 2 + LORA.r * (cfg.n_embd + cfg.inner_dim)
    assert sum(p.numel() for p in trainable.values()) == per_layer * cfg.n_layer + head_numel * head_trains
    assert all(".lora_A." in n or ".lora_B." in n or f"{HEAD[task]}.modules_to_save." in n for n in trainable)
    # Everything else, including the original head copy and the adapted layers' base weights, is frozen.
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert any("q_proj.base_layer" in n for n in frozen)
    head_weight = f"{HEAD[task]}.original_module.weight" if head_trains else f"{HEAD[task]}.weight"
    assert any(n.endswith(head_weight) for n in frozen)


def test_all_linear_adapts_every_backbone_linear():
    model, _ = ours_and_base_state("cls")
    peft_model = apply_lora(model, LoraConfig(enabled=True, target_modules=["all-linear"]))
    adapted = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}


@pytest.mark.parametrize("targets, bad", [(["q_proj", "query"], "query"), (["score"], "score")])
def test_bad_target_is_a_config_error_listing_the_valid_names(targets, bad):
    model, _ = ours_and_base_state("cls")
    with pytest.raises(ConfigError) as err:
        apply_lora(model, LoraConfig(enabled=True, target_modules=targets))
    message = str(err.value)
    assert "lora.target_modules" in message and repr(bad) in message
    assert all(name in message for name in ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"])


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_adapter_loads_with_peft_onto_transformers_gptj(task, tmp_path):
    model, base_state = ours_and_base_state(task)
    peft_model = apply_lora(model, LORA).eval()
    perturb_trainable(peft_model)
    save_adapter(peft_model, tmp_path)

    # A trained head travels in the adapter file (modules_to_save), under the base model's names; a frozen one not.
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if LORA.trains_head(task):
        trained_head = getattr(peft_model.get_base_model(), HEAD[task]).modules_to_save["default"].weight
        assert torch.equal(saved[f"base_model.model.{HEAD[task]}.weight"], trained_head)
    else:
        assert not any(HEAD[task] in key for key in saved)

    hf_peft = peft.PeftModel.from_pretrained(hf_model(task, base_state), tmp_path).eval()
    with torch.no_grad():
        ours, theirs = logits(peft_model, task, IDS), logits(hf_peft, task, IDS)
        assert not torch.allclose(ours, logits(hf_model(task, base_state), task, IDS), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_adapter_records_base_path_for_auto_peft_classes(tmp_path):
    model, base_state = ours_and_base_state("cls")
    hf_model("cls", base_state).save_pretrained(tmp_path / "base")
    peft_model = apply_lora(model, LORA).eval()
    perturb_trainable(peft_model)
    save_adapter(peft_model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, "cls", IDS), logits(peft_model, "cls", IDS), atol=1e-5, rtol=1e-5)


def test_save_from_a_gathered_state_dict_equals_save_from_the_model(tmp_path):
    model, _ = ours_and_base_state("qa")
    peft_model = apply_lora(model, LORA)
    perturb_trainable(peft_model)
    save_adapter(peft_model, tmp_path / "a")
    # What ZeRO-3 hands over: a consolidated dict (here trainable-only) instead of the model's shards.
    gathered = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    save_adapter(peft_model, tmp_path / "b", gathered_state_dict=gathered)
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", ["clm", "qa"])
def test_merged_weights_equal_base_plus_adapter_and_load_as_plain_gptj(task):
    model, base_state = ours_and_base_state(task)
    peft_model = apply_lora(model, LORA).eval()
    perturb_trainable(peft_model)
    with torch.no_grad():
        expected = logits(peft_model, task, IDS)

    merged = merged_state_dict({k: v.clone() for k, v in peft_model.state_dict().items()}, LORA)
    assert merged.keys() == base_state.keys()
    with torch.no_grad():
        torch.testing.assert_close(logits(hf_model(task, merged), task, IDS), expected, atol=1e-5, rtol=1e-5)
        plain = merge_lora(peft_model)
        assert type(plain) is type(model) and not any("lora" in n for n in plain.state_dict())
        torch.testing.assert_close(logits(plain, task, IDS), expected, atol=1e-5, rtol=1e-5)


def test_merged_state_dict_keeps_half_precision():
    model, _ = ours_and_base_state("clm")
    peft_model = apply_lora(model, LORA)
    perturb_trainable(peft_model)
    full = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict({k: v.to(torch.bfloat16) for k, v in full.items()}, LORA)
    reference = merged_state_dict(full, LORA)
    key = "transformer.h.0.attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    torch.testing.assert_close(merged[key].float(), reference[key], atol=2e-2, rtol=2e-2)
