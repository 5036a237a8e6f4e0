"""The memory planner applied to a training run: `deepspeed=auto` picks a config; one that cannot fit is refused.

Inputs come from the typed RunConfig and the model config the runner builds (`planner_inputs`); the hardware
from the launched ranks themselves (`detect_cluster`: every rank reports its host, device memory, host RAM and
NVMe space, so every rank plans from the same figures and reaches the same decision without a broadcast).
`choose` and `refuse_unless_fits` are pure functions of those inputs, unit-tested with made-up clusters.

The CPU accelerator (tests, CI) has no device memory of its own: each rank's "device" is its share of the
host's RAM (total RAM / ranks on the host), and host-side items count against the same RAM again, so the
estimate is conservative there. `deepspeed.device_memory_gb` / `deepspeed.cpu_memory_gb` state the figures
instead of detecting them (shared or odd hardware, or to see what a run would choose elsewhere).

Torch-free at import (launch/plan.py uses `model_shape` and `run_shape`); detection imports DeepSpeed lazily.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

from finetune.config import ConfigError, DeepSpeedSection, ModelConfig, RunConfig
from finetune.planning.estimate import (
    LORA_TARGETS,
    PRESET_SHAPES,
    SPEED_ORDER,
    Cluster,
    Estimate,
    GiB,
    ModelShape,
    Option,
    Plan,
    RunShape,
    ZeroBuffers,
    estimate,
    format_table,
    parameter_tensors,
    plan,
    zero_buffers_from_ds_config,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The configs `deepspeed=auto` chooses from: its conf/deepspeed group name -> the shipped JSON. The option each
# stands for is read from the JSON itself (`option_of`), so the mapping cannot drift from the files.
AUTO_CONFIGS: dict[str, str] = {
    "none": "ds_configs/zero0.json",
    "zero2": "ds_configs/zero2.json",
    "zero3": "ds_configs/zero3.json",
    "zero3_offload": "ds_configs/zero3_offload.json",
    "zero3_nvme": "ds_configs/zero3_nvme.json",
}
# Fraction of every device `deepspeed=auto` keeps free: room for what the estimate leaves out (fragmentation
# spikes, the data loader, a longer batch than planned). The refusal of a manual config uses no margin: it only
# refuses what the estimate says cannot fit at all.
AUTO_MARGIN = 0.1
_SHAPE_FIELDS = ("n_layer", "n_embd", "n_inner", "n_head", "vocab_size")
_ESCAPE = (
    "If the estimate is wrong for your hardware, state the memory with deepspeed.device_memory_gb=<GiB per GPU> "
    "and/or deepspeed.cpu_memory_gb=<GiB per node>, or skip the check with deepspeed.check_memory=false."
)


# --- planner inputs from the run config ------------------------------------------------------------
class ModelDims(Protocol):
    """The fields of a GPTJConfig the planner needs (GPTJConfig itself, or anything shaped like it)."""

    n_layer: int
    n_embd: int
    n_inner: Optional[int]
    n_head: int
    vocab_size: int


def shape_of(dims: ModelDims | Mapping[str, Any], *, task: str, num_labels: Optional[int] = None) -> ModelShape:
    """The planner's ModelShape of a GPT-J config (a GPTJConfig or a config.json dict) with `task`'s head."""
    get = dims.get if isinstance(dims, Mapping) else lambda key, default=None: getattr(dims, key, default)
    values = {key: get(key) for key in _SHAPE_FIELDS if get(key) is not None}
    return ModelShape(**values, head=task, num_labels=num_labels or 2)


def model_shape(model: ModelConfig, *, task: str, num_labels: Optional[int] = None) -> ModelShape:
    """The shape of model.path/config.json when model.path is a local directory, else of preset model.name;
    model.overrides applied. Needs no torch and no download (launch/plan.py); the runner plans from the
    GPTJConfig it builds instead (`shape_of`), which also covers a hub id in model.path."""
    config_json = Path(model.path).expanduser() / "config.json" if model.path else None
    if config_json is not None and config_json.is_file():
        dims: dict[str, Any] = json.loads(config_json.read_text())
        for key in _SHAPE_FIELDS:  # the sizes the plan multiplies (the model itself checks every field)
            value = dims.get(key)
            if key == "n_inner" and value is None:
                continue  # GPT-J's default: 4 x n_embd
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{config_json}: {key}={value!r} is not a positive integer, so this is not a usable GPT-J "
                    f"config; fix {key} in that file, or point model.path at the checkpoint directory you meant."
                )
    elif model.name in PRESET_SHAPES:
        preset = PRESET_SHAPES[model.name]
        dims = {key: getattr(preset, key) for key in _SHAPE_FIELDS}
    else:
        raise ConfigError(
            f"model.name {model.name!r} is not a preset ({', '.join(PRESET_SHAPES)}) and model.path has no "
            "config.json; pick a preset or point model.path at a local checkpoint directory."
        )
    # Other GPTJConfig fields (rotary_dim, n_positions, ...) do not change memory.
    dims = {**dims, **{k: v for k, v in model.overrides.items() if k in _SHAPE_FIELDS}}
    return shape_of(dims, task=task, num_labels=num_labels)


def run_shape(run: RunConfig) -> RunShape:
    """What one training step of `run` processes: micro batch x max_seq_len, precision, checkpointing, LoRA."""
    targets = tuple(run.lora.target_modules)
    return RunShape(
        micro_batch_size=run.trainer.micro_batch_size,
        seq_len=run.data.max_seq_len,
        precision=run.trainer.precision,
        activation_checkpointing=run.model.gradient_checkpointing,
        lora_rank=run.lora.r if run.lora.enabled else None,
        lora_targets=LORA_TARGETS if targets in (("all-linear",), ("all",)) else targets,
        lora_dropout=run.lora.dropout,
        quantized_base=run.lora.enabled and run.lora.quantized,
        lora_train_head=run.lora.trains_head(run.task),  # a trained head is held twice under peft
        chunked_loss=run.model.chunked_loss,
        loss_chunk_tokens=run.model.loss_chunk_tokens,
        fused_projections=run.model.uses_fused_projections(run.lora),
    )


def planner_inputs(run: RunConfig, model: ModelDims) -> tuple[ModelShape, RunShape]:
    """The planner's inputs for a training run; `model` is the GPTJConfig the runner builds."""
    return shape_of(model, task=run.task, num_labels=run.data.num_labels), run_shape(run)


# --- DeepSpeed JSON <-> planner option -------------------------------------------------------------
def option_of(ds_config: Mapping[str, Any]) -> Option:
    """The ZeRO stage and offload devices of a DeepSpeed config (offloads DeepSpeed ignores at that stage dropped)."""
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))

    def device(key: str) -> str:
        return str((zero.get(key) or {}).get("device") or "none")

    return Option(
        stage=stage,
        offload_optimizer=device("offload_optimizer") if stage > 0 else "none",
        offload_params=device("offload_param") if stage == 3 else "none",
    )


def auto_candidates(root: Path = PROJECT_ROOT) -> list[tuple[str, Option, ZeroBuffers]]:
    """The shipped configs `deepspeed=auto` may pick, fastest first: (group name, option, its buffer sizes)."""
    found = []
    for name, path in AUTO_CONFIGS.items():
        ds = json.loads((root / path).read_text())
        found.append((name, option_of(ds), zero_buffers_from_ds_config(ds)))
    return sorted(found, key=lambda c: SPEED_ORDER.index(c[1]) if c[1] in SPEED_ORDER else len(SPEED_ORDER))


# --- the hardware ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankResources:
    """What one rank sees of its hardware (bytes)."""

    host: str
    device_memory: Optional[int]  # None: the CPU accelerator, no device memory of its own
    host_memory: int
    nvme_free: Optional[int]  # None: no deepspeed.nvme_path


def local_resources(*, nvme_path: Optional[str]) -> RankResources:
    """This rank's host name, accelerator memory (DeepSpeed's accelerator), total host RAM and NVMe space."""
    import psutil
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = None
    if accelerator.device_name() != "cpu":
        device = int(accelerator.total_memory(int(os.environ.get("LOCAL_RANK", 0))))
    nvme = None
    if nvme_path:
        existing = Path(nvme_path).expanduser().absolute()
        while not existing.exists():  # the swap dir may not exist yet: its disk is that of the nearest parent
            existing = existing.parent
        nvme = shutil.disk_usage(existing).free
    # Total, not available RAM: the decision must not depend on what else happens to run at launch.
    return RankResources(socket.gethostname(), device, psutil.virtual_memory().total, nvme)


def cluster_from_ranks(
    ranks: Sequence[RankResources],
    *,
    device_memory_gb: Optional[float] = None,
    cpu_memory_gb: Optional[float] = None,
) -> tuple[Cluster, str]:
    """The Cluster the ranks form, and a line saying where its figures came from.

    Ranks per node g = the gcd of the ranks per host, so nodes x g equals the world even when hosts differ;
    per-GPU memory is the smallest of any rank, RAM and NVMe per node the smallest share of g ranks of any host.
    """
    hosts: dict[str, list[RankResources]] = {}
    for r in ranks:
        hosts.setdefault(r.host, []).append(r)
    g = math.gcd(*(len(rs) for rs in hosts.values()))
    per_rank_ram = min(rs[0].host_memory / len(rs) for rs in hosts.values())
    on_cpu = any(r.device_memory is None for r in ranks)
    if device_memory_gb is not None:
        device, device_src = device_memory_gb * GiB, "deepspeed.device_memory_gb"
    elif on_cpu:
        device, device_src = per_rank_ram, "CPU accelerator: host RAM / ranks on the host"
    else:
        device, device_src = min(r.device_memory for r in ranks), "accelerator"
    cpu, cpu_src = (cpu_memory_gb * GiB, "deepspeed.cpu_memory_gb") if cpu_memory_gb is not None else (
        per_rank_ram * g, "total RAM")
    nvme_shares = [rs[0].nvme_free / len(rs) for rs in hosts.values() if rs[0].nvme_free is not None]
    nvme = min(nvme_shares) * g if len(nvme_shares) == len(hosts) else None
    cluster = Cluster(nodes=len(ranks) // g, gpus_per_node=g, gpu_memory_gb=device / GiB, cpu_memory_gb=cpu / GiB,
                      nvme_gb=None if nvme is None else nvme / GiB, accelerator="cpu" if on_cpu else "cuda")
    where = (f"{cluster.nodes} node(s) x {g} rank(s); {cluster.gpu_memory_gb:.1f} GiB per device ({device_src}), "
             f"{cluster.cpu_memory_gb:.1f} GiB CPU RAM per node ({cpu_src}), "
             + (f"{cluster.nvme_gb:.0f} GiB free NVMe per node" if cluster.nvme_gb is not None else "no NVMe"))
    return cluster, where


def detect_cluster(section: DeepSpeedSection) -> tuple[Cluster, str]:
    """The launched cluster (a collective: every rank must call it); see `cluster_from_ranks`."""
    from finetune.distributed import all_gather_objects

    ranks = all_gather_objects(local_resources(nvme_path=section.nvme_path))
    return cluster_from_ranks(ranks, device_memory_gb=section.device_memory_gb, cpu_memory_gb=section.cpu_memory_gb)


# --- choice and refusal (pure) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    name: str  # conf/deepspeed group, e.g. zero2
    config_file: str  # ds_configs/*.json
    estimate: Estimate
    plan: Plan  # the candidates `auto` chose from

    @property
    def message(self) -> str:
        e, margin = self.estimate, self.plan.margin
        text = (f"deepspeed=auto chose deepspeed={self.name} ({e.option.name}, {self.config_file}): estimated "
                f"{_need(e, 'gpu')} per GPU, {_need(e, 'cpu')} CPU RAM per node")
        if e.margin < margin:
            text += f" (less than {margin:.0%} left free: nothing keeps that much)"
        slower = self.plan.options[: self.plan.options.index(e)]
        if slower:
            text += ". Faster options that do not fit" + (f" with {margin:.0%} free" if margin else "") + ": "
            text += "; ".join(f"{o.option.name} needs {_need(o, o.limiting_device)} {o.limiting_device.upper()}"
                              for o in slower)
        return text + "."


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _need(e: Estimate, device: str) -> str:
    return f"{_gib(e.total(device))} of {_gib(e.capacity[device])} GiB"


def choose(
    shape: ModelShape,
    run: RunShape,
    cluster: Cluster,
    *,
    candidates: Optional[Sequence[tuple[str, Option, ZeroBuffers]]] = None,
    margin: float = AUTO_MARGIN,
) -> Choice:
    """The fastest candidate that keeps `margin` of every device free, else the fastest that fits at all.

    Raises ConfigError with the plan's table when none fits.
    """
    candidates = auto_candidates() if candidates is None else candidates
    options = [option for _, option, _ in candidates]
    result = plan(shape, run, cluster, margin=margin, options=options,
                  buffers={option: buffers for _, option, buffers in candidates})
    best = result.recommended or next((e for e in result.options if e.fits), None)
    if best is None:
        raise ConfigError(
            f"deepspeed=auto found no DeepSpeed config that fits: {result.reason} If the estimate is wrong for your "
            "hardware, state the memory with deepspeed.device_memory_gb=<GiB per GPU> and/or "
            "deepspeed.cpu_memory_gb=<GiB per node>, or pick a config yourself (deepspeed=zero3_offload ...) with "
            f"deepspeed.check_memory=false.\n\n{format_table(result)}"
        )
    name = candidates[result.options.index(best)][0]
    return Choice(name, AUTO_CONFIGS[name], best, result)


def refuse_unless_fits(
    shape: ModelShape,
    run: RunShape,
    cluster: Cluster,
    ds_config: Mapping[str, Any],
    *,
    source: str,
    detail: bool = True,
) -> Estimate:
    """The estimate of `ds_config` on `cluster`; a ConfigError when it does not fit (needs more than 100%).

    The message names what does not fit, the options that would, and the escape hatch; with `detail` it ends
    with the whole plan's table.
    """
    own, shipped_configs = option_of(ds_config), auto_candidates()
    options = list(SPEED_ORDER) + ([own] if own not in SPEED_ORDER else [])
    buffers: dict[Any, ZeroBuffers] = {option: b for _, option, b in shipped_configs}
    buffers[own] = zero_buffers_from_ds_config(ds_config)
    result = plan(shape, run, cluster, margin=AUTO_MARGIN, options=options, buffers=buffers)
    mine = result.options[options.index(own)]
    if mine.fits:
        return mine
    shipped = {option: name for name, option, _ in shipped_configs}
    fitting = [f"{e.option.name}" + (f" (deepspeed={shipped[e.option]})" if e.option in shipped else "")
               for e in result.options if e.fits]
    device = mine.limiting_device
    what = {"gpu": "GPU memory per GPU", "cpu": "CPU RAM per node", "nvme": "NVMe per node"}[device]
    message = (
        f"The DeepSpeed config {source} ({own.name}) does not fit this cluster ({cluster.nodes} node(s) x "
        f"{cluster.gpus_per_node} GPU(s)): the memory planner estimates it needs {_gib(mine.total(device))} GiB of "
        f"{what}, and {_gib(mine.capacity[device])} GiB are there. "
        + (f"Options that fit: {', '.join(fitting)}; deepspeed=auto picks the fastest shipped one. "
           if fitting else "No option fits: lower trainer.micro_batch_size or data.max_seq_len, turn on "
           "model.gradient_checkpointing, use lora=lora, or add GPUs. ")
        + _ESCAPE
    )
    raise ConfigError(message + (f"\n\n{format_table(result)}" if detail else " (rank 0 prints the plan's table)"))


# --- what the runner calls -------------------------------------------------------------------------
def largest_parameter_numel(model: ModelDims, *, task: str) -> int:
    """Elements of the model's largest parameter tensor (GPT-J: the vocab x width embedding or LM head)."""
    return max(t.numel for t in parameter_tensors(shape_of(model, task=task)))


def offload_estimate(run: RunConfig, model: ModelDims, ds_config: Mapping[str, Any], *, world_size: int,
                     ranks_per_node: int) -> Estimate:
    """The planner's estimate of the filled `ds_config` for a launch of `world_size` ranks, `ranks_per_node` per
    node: its NVMe lines size the swap directory and its pinned swap buffers the locked-memory need (device
    capacities play no part here)."""
    from deepspeed.accelerator import get_accelerator

    shape, steps = planner_inputs(run, model)
    cluster = Cluster(nodes=max(1, world_size // ranks_per_node), gpus_per_node=ranks_per_node,
                      accelerator="cpu" if get_accelerator().device_name() == "cpu" else "cuda")
    return estimate(shape, steps, cluster, option_of(ds_config), buffers=zero_buffers_from_ds_config(ds_config))



def choose_config_file(run: RunConfig, model: ModelDims, *, is_main: bool, cluster: Optional[Cluster] = None) -> str:
    """`deepspeed=auto`: the shipped DeepSpeed JSON to train with; rank 0 prints which and why.

    Collective unless `cluster` is given: every rank calls it, and every rank reaches the same choice.
    """
    where = "given"
    if cluster is None:
        cluster, where = detect_cluster(run.deepspeed)
    shape, steps = planner_inputs(run, model)
    choice = choose(shape, steps, cluster)
    if is_main:
        print(f"{choice.message}\nCluster: {where}.", flush=True)
    return choice.config_file


def check_memory(run: RunConfig, model: ModelDims, ds_config: Mapping[str, Any], *, source: str, is_main: bool,
                 cluster: Optional[Cluster] = None) -> None:
    """Refuse (ConfigError) a manual DeepSpeed config whose memory estimate cannot fit the cluster.

    Collective unless `cluster` is given. NVMe offload without deepspeed.nvme_path is left to the engine's own
    error, which names the missing setting.
    """
    option = option_of(ds_config)
    if "nvme" in (option.offload_optimizer, option.offload_params) and not run.deepspeed.nvme_path:
        return
    if cluster is None:
        cluster, _ = detect_cluster(run.deepspeed)
    shape, steps = planner_inputs(run, model)
    # Every rank raises the same message, table included: the launch scripts print it once (finetune.cli).
    refuse_unless_fits(shape, steps, cluster, ds_config, source=source)

