"""Will this run fit? Every ZeRO stage / offload option, memory per GPU and per node, and the pick.

    python launch/plan.py model=gptj-6b task=qa trainer.micro_batch_size=4 trainer.precision=bf16 \
        data.max_seq_len=2048 cluster.nodes=1 cluster.gpus_per_node=8 cluster.gpu_memory_gb=80 cluster.cpu_memory_gb=1000
    python launch/plan.py ... plan.format=json

conf/plan.yaml composes the training config, so a training command's overrides plan that run.
Runs without GPUs. Exit status 1 when no option fits, 2 on a configuration error.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from finetune.config import ConfigError
from finetune.memory import (
    LORA_TARGETS,
    PRESET_SHAPES,
    Cluster,
    ModelShape,
    RunShape,
    ZeroBuffers,
    format_table,
    plan,
    plan_to_json,
    zero_buffers_from_ds_config,
)

ROOT = Path(__file__).resolve().parents[1]
_SHAPE_FIELDS = {"n_layer", "n_embd", "n_inner", "n_head", "vocab_size"}


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    run: RunShape
    cluster: Cluster
    buffers: dict[int, ZeroBuffers]
    margin: float
    format: str


def model_shape(name: str, overrides: dict[str, Any], path: Optional[str], task: str, num_labels: int) -> ModelShape:
    """The shape of preset `name` with `overrides`, or of `path`/config.json when that is a local checkpoint."""
    config_json = Path(path) / "config.json" if path else None
    if config_json is not None and config_json.is_file():
        values = {k: v for k, v in json.loads(config_json.read_text()).items() if k in _SHAPE_FIELDS}
        shape = ModelShape(**{"n_inner": None, **values})
    elif name in PRESET_SHAPES:
        shape = PRESET_SHAPES[name]
    else:
        raise ConfigError(
            f"model.name {name!r} is not a preset ({', '.join(PRESET_SHAPES)}) and model.path has no config.json; "
            "pick a preset or point model.path at a local checkpoint directory."
        )
    # Other GPTJConfig fields (rotary_dim, n_positions, ...) do not change memory.
    shape = replace(shape, **{k: v for k, v in overrides.items() if k in _SHAPE_FIELDS})
    return replace(shape, head=task, num_labels=num_labels)


def _ds_buffers(paths: dict[int, str]) -> dict[int, ZeroBuffers]:
    buffers = {}
    for stage, path in paths.items():
        file = ROOT / path
        if file.is_file():
            buffers[int(stage)] = zero_buffers_from_ds_config(json.loads(file.read_text()))
    return buffers


def plan_inputs(cfg: DictConfig) -> PlanInputs:
    """The composed config as typed planner inputs; the one place that reads the config."""
    model, lora = cfg.model, cfg.lora
    overrides = OmegaConf.to_container(model.overrides) if model.get("overrides") is not None else {}
    shape = model_shape(model.name, overrides, model.get("path"), cfg.task.name, cfg.data.get("num_labels") or 2)
    targets = tuple(lora.get("target_modules") or ())
    run = RunShape(
        micro_batch_size=cfg.trainer.micro_batch_size,
        seq_len=cfg.data.max_seq_len,
        precision=cfg.trainer.precision,
        activation_checkpointing=bool(model.get("gradient_checkpointing", False)),
        lora_rank=lora.r if lora.enabled else None,
        lora_targets=LORA_TARGETS if targets in (("all-linear",), ("all",)) else targets,
        lora_dropout=lora.get("dropout", 0.0),
        lora_train_head=True,  # finetune.lora trains the task head in full
    )
    cluster = Cluster(**{f.name: cfg.cluster[f.name] for f in fields(Cluster)})
    if cfg.plan.format not in ("table", "json"):
        raise ConfigError(f"plan.format is {cfg.plan.format!r}; use table or json.")
    buffers = _ds_buffers(OmegaConf.to_container(cfg.plan.ds_configs))
    return PlanInputs(shape, run, cluster, buffers, float(cfg.plan.margin), cfg.plan.format)


@hydra.main(version_base="1.3", config_path="../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    try:
        inputs = plan_inputs(cfg)
        result = plan(inputs.shape, inputs.run, inputs.cluster, margin=inputs.margin, buffers=inputs.buffers)
    except ConfigError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(plan_to_json(result), indent=2) if inputs.format == "json" else format_table(result))
    if result.recommended is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
