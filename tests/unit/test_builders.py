"""finetune.builders: dtype names and models built from the typed model config."""
import pytest
import torch

from finetune.builders import build_model_from_config, torch_dtype
from finetune.config import ConfigError, ModelConfig
from finetune.model import GPTJForSequenceClassification, ModelConfigError


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_torch_dtype_names(name, dtype):
    assert torch_dtype(name) is dtype


def test_unknown_dtype_names_the_key():
    with pytest.raises(ConfigError, match=r"model.dtype='float32'.*bf16, fp16, fp32"):
        torch_dtype("float32")


def test_random_init_from_preset_with_overrides_dtype_and_task_overrides():
    cfg = ModelConfig(name="tiny", dtype="bf16", overrides={"n_layer": 1}, gradient_checkpointing=True)
    model = build_model_from_config(cfg, task="cls", config_overrides={"num_labels": 5})
    assert isinstance(model, GPTJForSequenceClassification)
    assert len(model.transformer.h) == 1 and model.config.num_labels == 5 and model.score.out_features == 5
    assert model.config.n_embd == 64  # the rest comes from the tiny preset
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.transformer.gradient_checkpointing


def test_bad_preset_override_is_a_model_config_error():
    with pytest.raises(ModelConfigError, match="unknown GPT-J config keys"):
        build_model_from_config(ModelConfig(name="tiny", overrides={"n_layers": 1}), task="clm")
