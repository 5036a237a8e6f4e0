"""DeepSpeed config assembly: "auto" filled from the Hydra config, contradictions refused, JSON accepted by DeepSpeed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from finetune.config import ConfigError, OptimConfig, SchedulerConfig, TrainerConfig
from finetune.model import GPTJConfig, build_model
from finetune.training.engine import (
    build_ds_config,
    load_ds_json,
    offload_devices,
    param_groups,
    warmup_steps,
    zero_stage,
)
from finetune.training.nvme import nvme_swap_dirs

DS_CONFIGS = sorted((Path(__file__).resolve().parents[3] / "ds_configs").glob("*.json"))


GPTJ_EMBEDDING = 50400 * 4096  # GPT-J's largest parameter (wte, lm_head)


def build(base: dict, *, world_size: int = 2, total_steps: int = 100, nvme_path=None, accelerator="cuda",
          swap_subdir=None, largest_param_numel=GPTJ_EMBEDDING, **sections):
    return build_ds_config(
        base,
        source="test.json",
        trainer=sections.get("trainer", TrainerConfig(micro_batch_size=4, grad_accum_steps=3, grad_clip=0.5)),
        optim=sections.get("optim", OptimConfig(lr=3e-4, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.1)),
        scheduler=sections.get("scheduler", SchedulerConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.2)),
        world_size=world_size,
        total_steps=total_steps,
        nvme_path=nvme_path,
        swap_subdir=swap_subdir,
        largest_param_numel=largest_param_numel,
        accelerator=accelerator,
    )


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_fill_completely_and_deepspeed_accepts_them(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    base, _ = load_ds_json(str(path))
    ds = build(base, world_size=1, nvme_path="/tmp/nvme")
    assert "auto" not in json.dumps(ds)
    config = DeepSpeedConfig(ds)  # world size 1 outside a process group
    assert config.train_batch_size == 4 * 3 * 1
    assert config.gradient_accumulation_steps == 3
    assert config.gradient_clipping == 0.5
    assert config.zero_optimization_stage == zero_stage(ds)


def test_shipped_configs_cover_the_documented_stages():
    stages = {p.stem: zero_stage(load_ds_json(str(p))[0]) for p in DS_CONFIGS}
    assert {k: stages[k] for k in ("zero2", "zero3", "zero3_offload", "zero3_nvme")} == {
        "zero2": 2, "zero3": 3, "zero3_offload": 3, "zero3_nvme": 3}
    assert offload_devices(load_ds_json("ds_configs/zero3_offload.json")[0]) == {"cpu"}
    assert offload_devices(load_ds_json("ds_configs/zero3_nvme.json")[0]) == {"nvme"}
    for name in ("zero3", "zero3_offload", "zero3_nvme"):  # final/ export gathers 16-bit weights
        assert load_ds_json(f"ds_configs/{name}.json")[0]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_autos_are_filled_from_the_hydra_config():
    ds = build(load_ds_json("ds_configs/zero3.json")[0])
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.1}
    assert ds["scheduler"] == {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": 100, "warmup_min_ratio": 0.0, "warmup_num_steps": 10, "cos_min_ratio": 0.2,
                   "warmup_type": "linear"},
    }
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision_flags_follow_trainer_precision(precision):
    ds = build(load_ds_json("ds_configs/zero2.json")[0], trainer=TrainerConfig(precision=precision))
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")


def test_linear_and_constant_schedules():
    base = load_ds_json("ds_configs/zero2.json")[0]
    linear = build(base, scheduler=SchedulerConfig(name="linear", warmup_steps=None, warmup_ratio=0.1), total_steps=50)
    assert linear["scheduler"]["type"] == "WarmupDecayLR"
    assert linear["scheduler"]["params"]["warmup_num_steps"] == 5
    assert linear["scheduler"]["params"]["warmup_max_lr"] == 3e-4
    constant = build(base, scheduler=SchedulerConfig(name="constant", warmup_steps=0))
    assert constant["scheduler"]["type"] == "WarmupLR"
    assert constant["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed needs >= 1


def test_warmup_is_clamped_to_the_run():
    assert warmup_steps(SchedulerConfig(warmup_steps=500), total_steps=20) == 20
    assert warmup_steps(SchedulerConfig(warmup_steps=None, warmup_ratio=0.25), total_steps=20) == 5


def test_missing_sections_are_added():
    ds = build({"zero_optimization": {"stage": 2}})
    assert ds["train_batch_size"] == 24 and ds["optimizer"]["type"] == "AdamW"
    assert ds["scheduler"]["type"] == "WarmupCosineLR"


def test_explicit_values_that_agree_are_kept():
    ds = build({"train_batch_size": 24, "gradient_accumulation_steps": 3, "optimizer": {"type": "Adam", "params": {"lr": 3e-4}}})
    assert ds["train_batch_size"] == 24 and ds["optimizer"]["type"] == "Adam"


@pytest.mark.parametrize(
    ("base", "field", "fix"),
    [
        ({"train_batch_size": 64}, "train_batch_size", "trainer.micro_batch_size"),
        ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu", "trainer.micro_batch_size"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps", "trainer.grad_accum_steps"),
        ({"gradient_clipping": 1.0}, "gradient_clipping", "trainer.grad_clip"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "trainer.precision"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "optimizer.params.lr", "optim.lr"),
        ({"scheduler": {"type": "WarmupDecayLR"}}, "scheduler.type", "scheduler="),
        ({"scheduler": {"type": "auto", "params": {"total_num_steps": 7}}}, "scheduler.params.total_num_steps", "auto"),
    ],
)
def test_contradicting_json_values_are_refused(base, field, fix):
    with pytest.raises(ConfigError) as err:
        build(base)
    message = str(err.value)
    assert f'"{field}"' in message and fix in message and "test.json" in message


def test_batch_size_error_explains_the_arithmetic():
    with pytest.raises(ConfigError, match=r"\"train_batch_size\" is 64 but the Hydra config gives 24.*4 \* 3 \* 2"):
        build({"train_batch_size": 64})


def test_fp16_and_bf16_both_enabled_is_refused():
    with pytest.raises(ConfigError, match="both fp16 and bf16"):
        build({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, trainer=TrainerConfig(precision="bf16"))


def test_nvme_offload_needs_a_path():
    base = load_ds_json("ds_configs/zero3_nvme.json")[0]
    with pytest.raises(ConfigError, match=r"deepspeed\.nvme_path"):
        build(base)
    ds = build(base, nvme_path="/local/nvme")
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == "/local/nvme"


def test_nvme_offload_swaps_into_the_runs_own_directory():
    base = load_ds_json("ds_configs/zero3_nvme.json")[0]
    ds = build(base, nvme_path="/local/nvme", swap_subdir="finetune-swap-run1-0123456789")
    assert nvme_swap_dirs(ds) == {"offload_param": Path("/local/nvme/finetune-swap-run1-0123456789"),
                                  "offload_optimizer": Path("/local/nvme/finetune-swap-run1-0123456789")}
    # A path written in the JSON itself (instead of deepspeed.nvme_path) gets the run's directory too.
    explicit = json.loads(json.dumps(base).replace('"nvme_path": "auto"', '"nvme_path": "/disk"'))
    assert set(nvme_swap_dirs(build(explicit, swap_subdir="s")).values()) == {Path("/disk/s")}
    assert nvme_swap_dirs(build(load_ds_json("ds_configs/zero3_offload.json")[0], swap_subdir="s")) == {}


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_parameter_swap_buffers_hold_the_largest_partition(world_size):
    """DeepSpeed asserts a partition fits one swap buffer; the 206M-element GPT-J embedding over 1 or 2 ranks does
    not fit DeepSpeed's default of 100M elements, so "auto" sizes the buffers from the model."""
    base = load_ds_json("ds_configs/zero3_nvme.json")[0]
    ds = build(base, world_size=world_size, nvme_path="/nvme")
    assert ds["zero_optimization"]["offload_param"]["buffer_size"] == -(-GPTJ_EMBEDDING // world_size)
    too_small = json.loads(json.dumps(base))
    too_small["zero_optimization"]["offload_param"]["buffer_size"] = 100_000_000
    if world_size <= 2:
        with pytest.raises(ConfigError, match=r"offload_param\.buffer_size is 100,000,000 elements.*\"auto\""):
            build(too_small, world_size=world_size, nvme_path="/nvme")
    else:
        assert build(too_small, world_size=world_size, nvme_path="/nvme")["zero_optimization"]["offload_param"][
            "buffer_size"] == 100_000_000
    with pytest.raises(ConfigError, match="largest parameter is unknown"):
        build(base, nvme_path="/nvme", largest_param_numel=None)
    # Without NVMe there are no parameter swap buffers: an "auto" size is dropped, not an error.
    cpu = json.loads(json.dumps(base).replace('"device": "nvme"', '"device": "cpu"'))
    assert "buffer_size" not in build(cpu, largest_param_numel=None)["zero_optimization"]["offload_param"]


def test_unsupported_optimizer_and_unknown_auto_are_refused():
    with pytest.raises(ConfigError, match="optimizer.type='SGD'"):
        build({"optimizer": {"type": "SGD"}})
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size"):
        build({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})


def test_torch_adam_on_cpu_without_offload_only():
    base = load_ds_json("ds_configs/zero2.json")[0]
    assert build(base, accelerator="cpu")["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in build(base, accelerator="cuda")["optimizer"]["params"]
    # under offload DeepSpeed must pick its CPU Adam, which torch_adam would override
    offload = load_ds_json("ds_configs/zero3_offload.json")[0]
    assert "torch_adam" not in build(offload, accelerator="cpu")["optimizer"]["params"]


def test_bad_json_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_ds_json(str(broken))
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_json(str(tmp_path / "absent.json"))


def test_relative_paths_resolve_against_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, path = load_ds_json("ds_configs/zero2.json")
    assert Path(path).is_file() and Path(path).name == "zero2.json"


def test_param_groups_exclude_biases_and_layernorm_from_weight_decay():
    model = build_model(GPTJConfig.preset("tiny", vocab_size=128), task="qa")
    groups = param_groups(model, weight_decay=0.1)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)  # every trainable parameter exactly once
    for name, param in names.items():
        no_decay = name.endswith(".bias") or ".ln_" in name
        assert by_id[id(param)] == (0.0 if no_decay else 0.1), name
    assert by_id[id(names["transformer.h.0.attn.q_proj.weight"])] == 0.1
    assert by_id[id(names["transformer.ln_f.weight"])] == 0.0


def test_param_groups_skip_frozen_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == 3
    assert all(p is not model[0].weight for g in groups for p in g["params"])


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_rises_from_the_first_step_and_the_last_step_still_learns(name):
    from finetune.training.engine import lr_factor

    total, warmup = 20, 4
    ds = build(load_ds_json("ds_configs/zero2.json")[0], total_steps=total,
               scheduler=SchedulerConfig(name=name, warmup_steps=warmup, min_lr_ratio=0.1))
    factor = lr_factor(ds["scheduler"])
    rates = [factor(done) for done in range(total)]  # rates[k]: the multiplier of optimizer step k + 1
    assert rates[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = rates[warmup:]
    if name == "constant":
        assert after == [1.0] * len(after)
    else:  # decays monotonically, never to a useless 0
        assert all(a >= b for a, b in zip(after, after[1:])) and after[0] < 1.0 and after[-1] > 0
        assert after[-1] == pytest.approx(0.1 if name == "cosine" else 1 / (total - warmup + 1))


# A real one-process DeepSpeed engine in a subprocess (no process group outlives the test): the rate each step's
# update uses, read before engine.step(), follows lr_factor from step 1 on.
SCHEDULE_SCRIPT = """
import json, torch
from finetune import distributed
from finetune.config import OptimConfig, SchedulerConfig, TrainerConfig
from finetune.training.engine import build_ds_config, initialize, load_ds_json

distributed.init_distributed()
base, source = load_ds_json("ds_configs/zero2.json")
ds = build_ds_config(base, source=source, trainer=TrainerConfig(micro_batch_size=2), optim=OptimConfig(lr=0.1),
                     scheduler=SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), world_size=1,
                     total_steps=4, accelerator="cpu")
engine = initialize(torch.nn.Linear(4, 1), ds, weight_decay=0.0)
rates = []
for _ in range(4):
    rates.append(engine.get_lr()[0])
    engine.backward(engine(torch.ones(2, 4)).pow(2).mean())
    engine.step()
print(json.dumps(rates))
"""


def test_deepspeed_applies_the_schedule_from_the_first_step():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", SCHEDULE_SCRIPT], cwd=Path(__file__).resolve().parents[3],
                          env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = json.loads(proc.stdout.strip().splitlines()[-1])
    # warmup 0.05, 0.1; then cosine from step 3 (progress 1/2) to the floor at step 4
    assert rates == pytest.approx([0.05, 0.1, 0.1 * (0.1 + 0.9 * 0.5), 0.01])
