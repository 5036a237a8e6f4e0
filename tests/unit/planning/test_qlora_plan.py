"""The planner and `deepspeed=auto` for lora=qlora: a 4-bit base's bytes, ZeRO-3 partitioning its packed bytes, and
what fits GPT-J 6B."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from finetune.config import ConfigError, parse_config
from finetune.planning.choice import choose, run_shape
from finetune.planning.estimate import (
    LORA_TARGETS,
    NF4_BYTES_PER_WEIGHT,
    PRESET_SHAPES,
    Cluster,
    GiB,
    Option,
    RunShape,
    estimate,
    parameter_tensors,
    plan,
)

ROOT = Path(__file__).resolve().parents[3]
GPTJ = PRESET_SHAPES["gptj-6b"]
QLORA = RunShape(micro_batch_size=1, seq_len=2048, precision="bf16", activation_checkpointing=True, lora_rank=16,
                 lora_targets=LORA_TARGETS, lora_train_head=False, quantized_base=True)
LORA = RunShape(**{**QLORA.__dict__, "quantized_base": False})
ONE_16GB = Cluster(gpus_per_node=1, gpu_memory_gb=16, cpu_memory_gb=32)


def item(e, name: str) -> int:
    return next(i.bytes for i in e.items if i.name.startswith(name))


def test_the_base_linears_take_about_a_quarter_of_their_bf16_bytes_and_the_rest_keeps_its_dtype():
    quantized = sum(t.numel for t in parameter_tensors(GPTJ, QLORA) if t.quantized)
    assert quantized == 28 * (4 * 4096**2 + 2 * 4096 * 16384)  # the six block linears, nothing else
    q, plain = estimate(GPTJ, QLORA, ONE_16GB, Option(stage=0)), estimate(GPTJ, LORA, ONE_16GB, Option(stage=0))
    assert item(q, "parameters (4-bit") == int(NF4_BYTES_PER_WEIGHT * quantized)
    assert item(q, "parameters (4-bit") <= 0.3 * 2 * quantized
    assert item(q, "parameters (not quantized)") + 2 * quantized == item(plain, "parameters")
    # Everything else is the same: the peak differs by the 4-bit saving less one dequantized weight (7.6 GiB for 6B).
    saved = (2 - NF4_BYTES_PER_WEIGHT) * quantized - item(q, "dequantized weight")
    assert plain.gpu_bytes - q.gpu_bytes == pytest.approx(saved, rel=1e-6) and saved > 7.5 * GiB


def test_zero3_partitions_the_packed_4bit_bytes_and_keeps_the_constants_whole():
    quantized = sum(t.numel for t in parameter_tensors(GPTJ, QLORA) if t.quantized)
    four = Cluster(gpus_per_node=4, gpu_memory_gb=16, cpu_memory_gb=64)
    zero2, zero3 = estimate(GPTJ, QLORA, four, Option(stage=2)), estimate(GPTJ, QLORA, four, Option(stage=3))
    assert item(zero3, "4-bit NF4 base linears (packed bytes)") == int(quantized / 2 / 4)
    assert item(zero3, "NF4 quantization constants") == int((NF4_BYTES_PER_WEIGHT - 0.5) * quantized)
    assert item(zero3, "parameters (not quantized)") == item(zero2, "parameters (not quantized)") // 4
    # Before deepspeed.initialize partitions it, each GPU holds the whole 4-bit model once.
    assert item(zero3, "whole 4-bit model") == item(zero2, "parameters (not quantized)") + item(
        zero2, "parameters (4-bit")
    options = plan(GPTJ, QLORA, four).options
    assert any(e.option.stage == 3 for e in options)
    assert all(e.option.offload_params != "nvme" for e in options)  # a 4-bit base on NVMe: not modelled
    with pytest.raises(ConfigError, match="lora=qlora"):
        RunShape(quantized_base=True)  # a 4-bit base without adapters trains nothing


def test_auto_puts_gptj_6b_qlora_on_one_16gb_gpu_without_offload_where_lora_needs_it():
    qlora = choose(GPTJ, QLORA, ONE_16GB)
    assert qlora.name == "none" and qlora.estimate.gpu_bytes < 10 * GiB
    lora = choose(GPTJ, LORA, ONE_16GB)
    assert lora.estimate.option.offload_params == "cpu"  # the 16-bit base alone is 11 GiB


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return parse_config(compose("train", overrides=list(overrides)))


def test_lora_qlora_config_reaches_the_planner_and_a_bad_quantize_base_is_refused():
    run = compose_train("lora=qlora")
    assert run.lora.quantized and run.lora.target_modules == ["all-linear"]
    assert run_shape(run).quantized_base and run_shape(run).lora_targets == LORA_TARGETS
    assert not run_shape(compose_train("lora=lora")).quantized_base
    with pytest.raises(ConfigError, match="lora.quantize_base"):
        compose_train("lora=qlora", "lora.quantize_base=int8")


@pytest.mark.parametrize("deepspeed, stage", [("zero3", 3), ("zero3_offload", 3), ("zero2", 2), ("none", 0)])
def test_the_runner_takes_every_zero_stage_for_qlora(deepspeed, stage):
    from finetune.runner import deepspeed_json

    run = compose_train("lora=qlora", f"deepspeed={deepspeed}", "model=tiny", "deepspeed.check_memory=false")
    assert deepspeed_json(run)[0]["zero_optimization"]["stage"] == stage
