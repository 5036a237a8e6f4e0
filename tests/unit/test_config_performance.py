"""The performance settings (model.chunked_loss, model.loss_chunk_tokens, data.packing, length grouping) from the
composed config: defaults, what reaches the model, and one-paragraph errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from finetune.builders import loss_chunk_tokens
from finetune.config import ConfigError, ModelConfig, parse_config
from finetune.data.packing import packing_mode
from finetune.model import GPTJConfig

CONF = Path(__file__).resolve().parents[2] / "conf"


def parse(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return parse_config(compose("train", overrides=list(overrides)))


@pytest.mark.parametrize("task,mode", [("clm", "stream"), ("cls", "examples"), ("qa", "examples")])
def test_defaults(task, mode):
    run = parse(f"task={task}")
    assert packing_mode(run.data, task) == mode
    assert (run.data.group_by_length, run.data.eval_group_by_length) == (False, True)
    assert run.model.chunked_loss and run.model.loss_chunk_tokens is None
    assert loss_chunk_tokens(run.model, GPTJConfig()) == 512  # from GPT-J's 50400-token vocabulary


def test_chunk_size_and_switch_reach_the_model():
    assert loss_chunk_tokens(parse("task=clm", "model.loss_chunk_tokens=128").model, GPTJConfig()) == 128
    assert loss_chunk_tokens(parse("task=clm", "model.chunked_loss=false").model, GPTJConfig()) is None
    from finetune.builders import build_model_from_config

    model = build_model_from_config(ModelConfig(overrides={"n_layer": 1}, loss_chunk_tokens=64), task="clm")
    assert model.loss_chunk_tokens == 64


@pytest.mark.parametrize("value", ["0", "-16"])
def test_chunk_size_must_be_positive(value):
    with pytest.raises(ConfigError, match=rf"model\.loss_chunk_tokens={value} is invalid: set the tokens per chunk "
                                          r"of the causal-LM loss to a positive number"):
        parse("task=clm", f"model.loss_chunk_tokens={value}")


def test_packing_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.packing='padfree' is invalid"):
        parse("task=qa", "data.packing=padfree")
    with pytest.raises(ConfigError, match=r"data\.packing=documents .* for task=cls use data\.packing=examples"):
        parse("task=cls", "data.packing=documents")
    assert packing_mode(parse("task=clm", "data.packing=documents").data, "clm") == "documents"


def test_fused_projections_from_the_command_line():
    assert parse("task=clm").model.uses_fused_projections(parse("task=clm").lora)  # auto: full fine-tuning fuses
    run = parse("task=clm", "lora=lora")
    assert run.model.fused_projections == "auto" and not run.model.uses_fused_projections(run.lora)
    assert parse("task=clm", "model.fused_projections=false").model.fused_projections is False
    with pytest.raises(ConfigError, match=r"model\.fused_projections=true cannot be combined with LoRA.*=auto"):
        parse("task=clm", "lora=qlora", "model.fused_projections=true")
    with pytest.raises(ConfigError, match=r"model\.fused_projections='yes' is invalid: use auto"):
        parse("task=clm", "model.fused_projections=yes")
