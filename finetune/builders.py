"""Build objects from typed config sections; shared by the training runner and the launch/ scripts."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from finetune.config import ConfigError, ModelConfig
from finetune.model import GPTJConfig, GPTJPreTrainedModel, build_model, default_chunk_tokens, hf_weights

CONFIG_DTYPES = ("bf16", "fp16", "fp32")  # the names config files use (hf_weights.torch_dtype also takes HF's)


def torch_dtype(name: str, *, key: str = "model.dtype") -> torch.dtype:
    """The torch dtype of a config precision name (bf16 | fp16 | fp32); `key` names the setting in errors."""
    if name not in CONFIG_DTYPES:
        raise ConfigError(f"{key}={name!r} is not a supported dtype; set {key} to one of {', '.join(CONFIG_DTYPES)}.")
    return hf_weights.torch_dtype(name)


def build_model_from_config(
    model_cfg: ModelConfig,
    *,
    task: str,
    device: torch.device | str | None = None,
    config_overrides: Optional[dict[str, Any]] = None,
    check: Optional[Callable[[GPTJConfig], None]] = None,
) -> GPTJPreTrainedModel:
    """GPT-J with the head of `task`, in `model_cfg.dtype`, on `device` (None: CPU).

    `model_cfg.path` None: a random init of the preset `model_cfg.name`; else the checkpoint there.
    `model_cfg.overrides` and then `config_overrides` (what the task decides, e.g. num_labels) are applied
    to the GPT-J config either way. `check(config)` runs before the model is built (e.g. the memory check).
    """
    dtype = torch_dtype(model_cfg.dtype)
    overrides = {**model_cfg.overrides, **(config_overrides or {})}
    if model_cfg.path is None:
        config = GPTJConfig.preset(model_cfg.name, **overrides)
        if check is not None:
            check(config)
        # Init in fp32 on the target device, then cast: HF's init draws its random numbers in fp32.
        model = build_model(config, task=task, device=device).to(dtype)
    else:
        model = hf_weights.load_pretrained(
            model_cfg.path, task=task, dtype=dtype, config_overrides=overrides or None, device=device or "cpu",
            check=check,
        )
    model.gradient_checkpointing_enable(model_cfg.gradient_checkpointing)
    if task == "clm":
        model.loss_chunk_tokens = loss_chunk_tokens(model_cfg, model.config)
    return model


def loss_chunk_tokens(model_cfg: ModelConfig, config: GPTJConfig) -> Optional[int]:
    """Tokens per chunk of the causal-LM loss (model.loss_chunk_tokens, else chosen from the vocabulary); None when
    model.chunked_loss is off."""
    if not model_cfg.chunked_loss:
        return None
    return model_cfg.loss_chunk_tokens or default_chunk_tokens(config.vocab_size)
