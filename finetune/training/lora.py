"""LoRA fine-tuning through peft: wrap the model, save the adapter, merge it into plain GPT-J weights.

Module names equal HF GPT-J's, so an adapter saved here is a regular peft adapter for transformers'
`GPTJFor*` classes. A classification or QA head is trained in full (peft's `modules_to_save`) because a
fresh head has nothing to adapt; the causal-LM head stays frozen unless `lora.train_head=true`.

ZeRO-3: the model may be built under `deepspeed.zero.Init`. peft then creates the LoRA A/B layers as
ordinary (unpartitioned) parameters, and copies the head inside `GatheredParameters`;
`deepspeed.initialize` converts every not-yet-partitioned parameter, broadcasting it from rank 0 first,
so all ranks start from the same adapter (tests/integration/test_lora_zero.py runs this on 2 ranks).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from finetune.model.quantized import BASE_QUANTIZATION_FILE  # noqa: I001 -- before peft, which imports bitsandbytes

import peft
from finetune.config import ConfigError, LoraConfig
from finetune.model import GPTJForCausalLM, GPTJForQuestionAnswering, GPTJForSequenceClassification, GPTJPreTrainedModel

ADAPTER_NAME = "default"
# Prefix of every key in a PeftModel's state dict (also in DeepSpeed's consolidated one).
PEFT_PREFIX = "base_model.model."
# peft's task type per head, written into adapter_config.json so that `PeftModel.from_pretrained` on a
# transformers model (and AutoPeftModelFor*) builds the matching PeftModelFor* wrapper.
_TASK_TYPES = {
    GPTJForCausalLM: peft.TaskType.CAUSAL_LM,
    GPTJForSequenceClassification: peft.TaskType.SEQ_CLS,
    GPTJForQuestionAnswering: peft.TaskType.QUESTION_ANS,
}


def linear_module_suffixes(model: nn.Module) -> list[str]:
    """The valid LoRA targets: short names of the backbone's Linear layers (q_proj, v_proj, fc_in, ...)."""
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("transformer.")
    })


def _resolve_targets(model: GPTJPreTrainedModel, target_modules: list[str]) -> list[str]:
    valid = linear_module_suffixes(model)
    if list(target_modules) == ["all-linear"]:  # peft's shorthand, which it only expands for transformers models
        return valid
    if not target_modules:
        raise ConfigError(
            f"lora.target_modules is empty; list the layers to adapt, e.g. [q_proj, v_proj], from: "
            f"{', '.join(valid)} (or [all-linear])."
        )
    for target in target_modules:
        if target in model.head_names:
            raise ConfigError(
                f"lora.target_modules contains the head {target!r}; heads are not adapted with LoRA but trained in "
                f"full with lora.train_head=true. Remove it and pick backbone layers from: {', '.join(valid)}."
            )
        if target not in valid:
            raise ConfigError(
                f"lora.target_modules entry {target!r} matches no Linear layer of GPT-J; valid entries are "
                f"{', '.join(valid)} (or [all-linear] for every one of them)."
            )
    return list(target_modules)


_TASKS = {GPTJForCausalLM: "clm", GPTJForSequenceClassification: "cls", GPTJForQuestionAnswering: "qa"}


def apply_lora(model: GPTJPreTrainedModel, cfg: LoraConfig) -> peft.PeftModel:
    """Wrap `model` with LoRA adapters: the base is frozen, adapters (and the head, `cfg.trains_head`) train.

    Call before `deepspeed.initialize`; works on a model built under `deepspeed.zero.Init` too.
    """
    targets = _resolve_targets(model, cfg.target_modules)
    peft_cfg = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(model.head_names) if cfg.trains_head(_TASKS[type(model)]) else None,
        bias="none",
    )
    return peft.get_peft_model(model, peft_cfg)


def save_adapter(
    model: peft.PeftModel,
    out_dir: str | Path,
    *,
    gathered_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    base_model_name_or_path: Optional[str] = None,
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (peft's format) into `out_dir`.

    Under ZeRO-3 the model's own tensors are shards: pass `gathered_state_dict`, the engine's
    `_zero3_consolidated_16bit_state_dict()` (a full or `exclude_frozen_parameters=True` one), and call
    this on rank 0 only. `base_model_name_or_path` is recorded so that `AutoPeftModelFor*` finds the base.
    """
    out_dir = Path(out_dir)
    peft_cfg = model.peft_config[ADAPTER_NAME]
    saved = (peft_cfg.task_type, peft_cfg.base_model_name_or_path)
    # Set only for the file: PeftModelFor* wrappers pass transformers-only kwargs our forward() does not take.
    peft_cfg.task_type = _TASK_TYPES.get(type(model.get_base_model()))
    peft_cfg.base_model_name_or_path = base_model_name_or_path
    try:
        # peft keeps only the adapter's tensors (LoRA A/B, head copy) of whichever state dict it gets.
        model.save_pretrained(
            str(out_dir),
            state_dict=None if gathered_state_dict is None else dict(gathered_state_dict),
            safe_serialization=True,
            save_embedding_layers=False,
        )
    finally:
        peft_cfg.task_type, peft_cfg.base_model_name_or_path = saved
    record = base_quantization(model)
    if record is not None:
        (out_dir / BASE_QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def base_quantization(model: nn.Module) -> Optional[dict]:
    """A 4-bit base's settings as transformers' BitsAndBytesConfig keyword arguments (None: a 16-bit base)."""
    from finetune.model.quantized import is_quantized_linear

    layer = next((m for m in model.modules() if is_quantized_linear(m)), None)
    if layer is None:
        return None
    return {"load_in_4bit": True, "bnb_4bit_quant_type": layer.weight.quant_type,
            "bnb_4bit_use_double_quant": bool(layer.weight.compress_statistics),
            "bnb_4bit_compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}


def merge_lora(model: peft.PeftModel) -> GPTJPreTrainedModel:
    """Fold the adapters into the base weights in place and return the plain model (peft's merge_and_unload).

    Needs unpartitioned weights (no ZeRO-3); with ZeRO-3 use `merged_state_dict` on the gathered state dict.
    """
    return model.merge_and_unload()


def merged_state_dict(state_dict: dict[str, torch.Tensor], lora_cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """Turn a PeftModel state dict (with LoRA A/B and the head copy) into a plain HF GPT-J state dict.

    W = W0 + (alpha / r) * B @ A for each adapted layer (computed in fp32, stored in W0's dtype), the head
    taken from its trained copy. The input dict is emptied as it is read, so beyond the unchanged tensors (shared,
    not copied) only the merged layers are new: the caller holding no other reference to a gathered ZeRO-3
    dict frees each original as its merged copy is made.
    """
    scale = lora_cfg.alpha / lora_cfg.r
    plain = {k.removeprefix(PEFT_PREFIX): v for k, v in state_dict.items()}
    state_dict.clear()
    merged: dict[str, torch.Tensor] = {}
    head_copy_tag = f".modules_to_save.{ADAPTER_NAME}."
    for key in list(plain):
        if key not in plain:  # popped together with its layer
            continue
        if ".lora_A." in key:
            layer = key.split(".lora_A.")[0]
            a = plain.pop(key)
            b = plain.pop(f"{layer}.lora_B.{ADAPTER_NAME}.weight")
            base_key = f"{layer}.base_layer.weight"
            weight = plain.pop(base_key) if base_key in plain else merged[f"{layer}.weight"]
            # Out of place: the tensors may be a live model's parameters (ZeRO-2 / single process state_dict()).
            delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in)
            merged[f"{layer}.weight"] = (weight.float() + delta).to(weight.dtype)
        elif ".lora_B." in key:
            continue  # handled with its lora_A
        elif ".original_module." in key:
            plain.pop(key)  # the frozen head before training; the trained copy replaces it
        elif head_copy_tag in key:
            merged[key.replace(head_copy_tag, ".")] = plain.pop(key)
        else:
            merged[key.replace(".base_layer.", ".")] = plain.pop(key)
    return merged



# --- QLoRA (lora=qlora): a 4-bit base ---------------------------------------------------------------------
def merged_quantized_state_dict(trained: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                                lora_cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """QLoRA: a plain GPT-J state dict with the adapter merged into the base's ORIGINAL 16-bit weights.

    `trained` is the PeftModel's state dict (its base linears 4-bit: only its adapter and head copy are used),
    `original` the plain state dict of the 16-bit base the run quantized (model.path's weights or the seeded
    init). Merging into the dequantized 4-bit weights instead would bake NF4's rounding error into every
    weight of a model that no longer needs to be 4-bit. Both inputs are emptied as read.
    """
    adapter = {k: v for k, v in trained.items() if ".lora_" in k or ".modules_to_save." in k}
    trained.clear()
    heads_trained = {k.split(".modules_to_save.")[0].removeprefix(PEFT_PREFIX) for k in adapter
                     if ".modules_to_save." in k}
    state: dict[str, torch.Tensor] = {}
    for key in list(original):
        module, _, leaf = key.rpartition(".")
        value = original.pop(key)
        if module in heads_trained:
            continue  # replaced by its trained copy
        if f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER_NAME}.weight" in adapter:
            state[f"{PEFT_PREFIX}{module}.base_layer.{leaf}"] = value
        else:
            state[PEFT_PREFIX + key] = value
    state.update(adapter)
    return merged_state_dict(state, lora_cfg)
