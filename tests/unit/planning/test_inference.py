"""The after-training tools' memory check: parameter count in closed form, refusal before anything is built."""
from __future__ import annotations

import pytest
import torch

from finetune.builders import build_model_from_config
from finetune.config import ConfigError, ModelConfig
from finetune.model import GPTJConfig, build_model
from finetune.planning.estimate import GiB, ModelShape, count_parameters
from finetune.planning.inference import check_inference_memory, parameter_count
from finetune.tools.predict import memory_check

GPTJ_6B = GPTJConfig()


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_closed_form_count_equals_the_planner_and_the_model(task):
    config = GPTJConfig.preset("tiny", vocab_size=512, num_labels=5)
    shape = ModelShape(n_layer=2, n_embd=64, n_head=4, vocab_size=512, head=task, num_labels=5)
    total, _ = parameter_count(config, task=task, num_labels=5)
    model = build_model(config, task=task, device="meta")
    assert total == count_parameters(shape) == sum(p.numel() for p in model.parameters())


def test_a_head_of_millions_of_labels_is_refused_with_its_sizes():
    huge_head = GPTJConfig(num_labels=5_000_000)  # 6B backbone + 5M x 4096 head: 26.5e9 parameters
    with pytest.raises(ConfigError) as err:
        check_inference_memory(huge_head, task="cls", dtype="bf16", device="cuda", source="/models/bad",
                               capacity=40 * GiB)
    message = str(err.value)
    assert "num_labels=5,000,000: the classification head alone 20,480,000,000" in message
    assert "/models/bad cannot fit" in message and "check_memory=false" in message and "\n" not in message
    check_inference_memory(GPTJ_6B, task="cls", dtype="bf16", device="cuda", source="6B", capacity=40 * GiB)
    # ZeRO-3 evaluation: each of 8 ranks holds an eighth.
    check_inference_memory(GPTJ_6B, task="clm", dtype="fp32", device="cuda", source="6B", capacity=4 * GiB, shards=8)


def test_generate_refuses_before_building(monkeypatch):
    import finetune.builders

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(finetune.builders, "build_model", never)
    model_cfg = ModelConfig(name="tiny", overrides={"vocab_size": 10**13})
    with pytest.raises(ConfigError, match="cannot fit.*vocab_size=10,000,000,000,000"):
        build_model_from_config(model_cfg, task="clm",
                                check=memory_check(task="clm", dtype=torch.float32, device="cpu", source="model=tiny"))


def test_evaluate_checks_zero3_shards_before_building(tmp_path):
    """launch/evaluate.py's check: the whole model on one rank, or under ZeRO-3 a world-th of it per rank."""
    import json

    from launch.evaluate import refuse_if_too_big

    config = GPTJConfig.preset("tiny", vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps({**config.to_hf_dict(), "num_labels": 10**12, "id2label": None}))
    for zero3, world in ((False, 1), (True, 2)):
        split = ", split over 2 ranks" if zero3 else ""
        with pytest.raises(ConfigError, match=f"cannot fit: .* GiB in fp32{split} .*num_labels=1,000,000,000,000"):
            refuse_if_too_big(tmp_path, task="cls", dtype_name="fp32", zero3=zero3, world_size=world, source="DIR")
    refuse_if_too_big(tmp_path, task="clm", dtype_name="fp32", zero3=True, world_size=2, source="DIR")  # fits
