"""The training config: every file under conf/ composes, and parse_config refuses bad values with the key named."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from finetune.config import (
    DATA_KEYS_BY_TASK,
    TASKS,
    ConfigError,
    DataConfig,
    DeepSpeedSection,
    GenerationConfig,
    LoggerConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SchedulerConfig,
    TrainerConfig,
    check_overrides_apply,
    parse_config,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("task", "model", "deepspeed", "optim", "scheduler", "lora", "logger", "trainer")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_defaults_are_the_documented_product():
    run = parse_config(compose_train())
    assert isinstance(run, RunConfig)
    assert (run.task, run.model.name, run.lora.enabled, run.logger.backend) == ("qa", "tiny", False, "none")
    assert run.deepspeed.config_file.endswith("zero3.json")
    assert run.data.doc_stride > 0  # the QA data config came with task=qa


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_parses(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        if group == "deepspeed" and option == "zero3_nvme":
            assert cfg.deepspeed.nvme_path is None  # required at run time (engine check), not at compose time
        run = parse_config(cfg)
        assert run.raw[group] == OmegaConf.to_container(cfg[group], resolve=True)
        if group == "task":
            assert run.task == option


SCHEMAS = {"model": ModelConfig, "deepspeed": DeepSpeedSection, "optim": OptimConfig, "scheduler": SchedulerConfig,
           "lora": LoraConfig, "logger": LoggerConfig, "trainer": TrainerConfig}


def field_names(schema) -> set[str]:
    return {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("group", sorted(SCHEMAS))
def test_every_option_of_a_group_has_every_key_its_typed_config_reads(group):
    """So that `group.key=value` works for every key without Hydra's `+`, whichever option is chosen."""
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        assert set(cfg[group].keys()) == field_names(SCHEMAS[group]), f"conf/{group}/{option}.yaml"


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_each_task_data_config_has_the_keys_that_task_reads(task):
    assert set(DATA_KEYS_BY_TASK) == set(TASKS)
    assert set().union(*map(set, DATA_KEYS_BY_TASK.values())) == field_names(DataConfig)  # every key has a task
    cfg = compose_train(f"task={task}")
    assert sorted(cfg.data.keys()) == sorted(DATA_KEYS_BY_TASK[task])


@pytest.mark.parametrize("config_name", ["generate", "predict"])
def test_tool_configs_have_every_generation_key(config_name):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name)
    assert set(cfg.generation.keys()) == field_names(GenerationConfig)
    if config_name == "generate":
        assert set(cfg.model.keys()) == field_names(ModelConfig)


@pytest.mark.parametrize(("overrides", "key"), [
    (["lora.r=16"], "lora.r"),
    (["logger.project=mine"], "logger.project"),
    (["lora=lora", "lora.r=16", "logger=wandb", "logger.project=mine"], None),
])
def test_settings_of_a_switched_off_section_are_refused(overrides, key):
    run = parse_config(compose_train(*overrides))
    if key is None:
        check_overrides_apply(run, overrides)
        return
    with pytest.raises(ConfigError, match=rf"^{re.escape(overrides[0])} has no effect: .* or drop {key}\."):
        check_overrides_apply(run, overrides)


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("false", False)])
def test_version_2_with_negative_is_auto_true_or_false(value, expected):
    assert parse_config(compose_train(f"data.version_2_with_negative={value}")).data.version_2_with_negative == expected
    with pytest.raises(ConfigError, match=r"^data\.version_2_with_negative='maybe' is invalid"):
        parse_config(compose_train("data.version_2_with_negative=maybe"))


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_task_selects_its_data_config(task):
    cfg = compose_train(f"task={task}")
    expected = OmegaConf.load(CONF / "data" / f"{task}.yaml")
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(expected)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert "launch/train.py" in text and f"experiment={experiment}" in text  # the header gives the command
    run = parse_config(compose_train(f"experiment={experiment}"))
    assert run.trainer.micro_batch_size >= 1


def test_gptj6b_preset_is_the_8gpu_bf16_zero3_recipe():
    run = parse_config(compose_train("experiment=gptj6b_squad_8gpu"))
    assert (run.model.name, run.trainer.precision, run.task) == ("gptj-6b", "bf16", "qa")
    assert run.deepspeed.config_file.endswith("zero3.json")
    assert run.model.gradient_checkpointing


def test_default_learning_rate_follows_the_model_preset():
    assert parse_config(compose_train("model=tiny")).optim.lr == 1e-2
    assert parse_config(compose_train("model=gptj-6b")).optim.lr == 1e-5
    assert parse_config(compose_train("model=gptj-6b", "optim.lr=3e-4")).optim.lr == 3e-4
    assert set(options("lr_for_model")) == set(options("model"))  # every preset has its rate


def test_mandatory_value_left_unset_is_named():
    cfg = OmegaConf.create({"data": {"train_file": "???"}})
    with pytest.raises(ConfigError, match=r"^data\.train_file must be set"):
        parse_config(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps"),
        ("trainer.eval_every=-1", "trainer.eval_every"),
        ("trainer.save_every=-5", "trainer.save_every"),
        ("trainer.keep_last=0", "trainer.keep_last"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.stop_after_steps=0", "trainer.stop_after_steps"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model.dtype=int8", "model.dtype"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("scheduler.name=exponential", "scheduler.name"),
        ("scheduler.warmup_ratio=1.5", "scheduler.warmup_ratio"),
        ("logger=wandb logger.mode=loud", "logger.mode"),
        ("lora=lora", None),  # valid: control case
        ("lora=lora lora.r=0", "lora.r"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(override, key):
    cfg = compose_train(*override.split())
    if key is None:
        parse_config(cfg)
        return
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    message = str(err.value)
    assert message.startswith(key), message
    assert "\n" not in message  # one paragraph


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch"):
        parse_config(compose_train("+trainer.micro_batch=4"))
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_size"):
        parse_config(compose_train("trainer.micro_batch_size=many"))


def test_raw_config_is_plain_and_resolved():
    run = parse_config(compose_train("optim.lr=0.01"))
    assert run.raw["optim"]["lr"] == 0.01
    assert isinstance(run.raw, dict)
