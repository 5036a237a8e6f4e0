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
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune.cli import hydra_app  # noqa: E402
from finetune.config import ConfigError, RunConfig, check_overrides_apply, parse_config  # noqa: E402
from finetune.planning.choice import auto_candidates, model_shape, run_shape  # noqa: E402
from finetune.planning.estimate import (  # noqa: E402
    Cluster,
    ModelShape,
    Option,
    RunShape,
    ZeroBuffers,
    format_table,
    plan,
    plan_to_json,
    zero_buffers_from_ds_config,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    run: RunShape
    cluster: Cluster
    buffers: dict[int | Option, ZeroBuffers]
    margin: float
    format: str
    run_config: RunConfig


def _ds_buffers(paths: dict[int, str]) -> dict[int, ZeroBuffers]:
    buffers = {}
    for stage, path in paths.items():
        file = ROOT / path
        if file.is_file():
            buffers[int(stage)] = zero_buffers_from_ds_config(json.loads(file.read_text()))
    return buffers


def plan_inputs(cfg: DictConfig) -> PlanInputs:
    """The composed config as typed planner inputs: the training part as the runner reads it, plus cluster/plan."""
    run = parse_config(cfg)
    shape = model_shape(run.model, task=run.task, num_labels=run.data.num_labels)
    cluster = Cluster(**{f.name: cfg.cluster[f.name] for f in fields(Cluster)})
    if cfg.plan.format not in ("table", "json"):
        raise ConfigError(f"plan.format is {cfg.plan.format!r}; use table or json.")
    # Per ZeRO stage from plan.ds_configs; the options a shipped config stands for use that config's own settings
    # (the NVMe option: ds_configs/zero3_nvme.json's swap buffers, sub-groups and max_in_cpu).
    buffers = _ds_buffers(OmegaConf.to_container(cfg.plan.ds_configs))
    buffers.update({option: settings for _, option, settings in auto_candidates()})
    return PlanInputs(shape, run_shape(run), cluster, buffers, float(cfg.plan.margin), cfg.plan.format, run)


@hydra_app("plan")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    inputs = plan_inputs(cfg)
    check_overrides_apply(inputs.run_config, HydraConfig.get().overrides.task)
    result = plan(inputs.shape, inputs.run, inputs.cluster, margin=inputs.margin, buffers=inputs.buffers)
    print(json.dumps(plan_to_json(result), indent=2) if inputs.format == "json" else format_table(result))
    if result.recommended is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
