"""DeepSpeed config assembly and engine creation.

The DeepSpeed JSON (ds_configs/*.json or the user's own) holds ZeRO, offload and precision details; batch sizes,
optimizer and schedule values have one source, the Hydra config. `build_ds_config` writes those into the JSON's
"auto" fields and refuses explicit JSON values that contradict them, so a run never trains with numbers the user
did not ask for. It is a pure function of its inputs (no distributed state), unit-tested without launching.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from finetune.config import ConfigError, OptimConfig, SchedulerConfig, TrainerConfig

AUTO = "auto"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Hydra scheduler name -> DeepSpeed scheduler type.
DS_SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


def resolve_config_path(config_file: str) -> Path:
    """`deepspeed.config_file` as an existing path: absolute, else relative to the working directory or the project."""
    path = Path(config_file).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"deepspeed.config_file={config_file!r} does not exist (looked in: {', '.join(map(str, candidates))}); "
        "pick a shipped one with deepspeed=zero2|zero3|zero3_offload|zero3_nvme|none, or give the path of your JSON."
    )


def load_ds_json(config_file: str) -> tuple[dict[str, Any], str]:
    """Read a DeepSpeed JSON; returns (dict, resolved path) for error messages."""
    path = resolve_config_path(config_file)
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"The DeepSpeed config {path} is not valid JSON ({err}); fix the file.") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"The DeepSpeed config {path} must hold a JSON object ({{...}}); fix the file.")
    return loaded, str(path)


def warmup_steps(scheduler: SchedulerConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps; at least 1 because DeepSpeed's schedulers require a positive count."""
    steps = scheduler.warmup_steps
    if steps is None:
        steps = round(scheduler.warmup_ratio * total_steps)
    return max(1, min(steps, total_steps))


def scheduler_section(scheduler: SchedulerConfig, *, lr: float, total_steps: int) -> dict[str, Any]:
    """DeepSpeed's "scheduler" section for the Hydra scheduler config; stepped once per optimizer step."""
    warmup = warmup_steps(scheduler, total_steps)
    if scheduler.name == "cosine":  # peaks at the optimizer's lr
        params = {"total_num_steps": total_steps, "warmup_min_ratio": 0.0, "warmup_num_steps": warmup,
                  "cos_min_ratio": scheduler.min_lr_ratio, "warmup_type": "linear"}
    elif scheduler.name == "linear":
        params = {"total_num_steps": total_steps, "warmup_min_lr": 0.0, "warmup_max_lr": lr,
                  "warmup_num_steps": warmup, "warmup_type": "linear"}
    else:
        params = {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    return {"type": DS_SCHEDULERS[scheduler.name], "params": params}


def offload_devices(ds_config: dict[str, Any]) -> set[str]:
    """Devices ZeRO offloads to ("cpu", "nvme"); empty when nothing is offloaded."""
    zero = ds_config.get("zero_optimization") or {}
    devices = {(zero.get(key) or {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
    return devices - {"none", None}


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def build_ds_config(
    base: dict[str, Any],
    *,
    source: str,
    trainer: TrainerConfig,
    optim: OptimConfig,
    scheduler: SchedulerConfig,
    world_size: int,
    total_steps: int,
    nvme_path: Optional[str] = None,
    swap_subdir: Optional[str] = None,
    largest_param_numel: Optional[int] = None,
    accelerator: str = "cuda",
) -> dict[str, Any]:
    """The DeepSpeed config dict to train with: `base` (read from `source`) with every "auto" filled.

    Raises ConfigError for an explicit JSON value that contradicts the Hydra config (e.g. train_batch_size 64
    while micro_batch * grad_accum * world_size = 16), fp16 and bf16 both on, NVMe offload without
    `deepspeed.nvme_path`, or an "auto" this function does not know how to fill.
    NVMe offload swaps into `<nvme_path>/<swap_subdir>` (the run's own directory, see finetune.training.nvme);
    its parameter swap buffers ("buffer_size": "auto") hold the largest parameter partition, ceil(
    `largest_param_numel` / world_size) elements, which DeepSpeed requires of them.
    `accelerator` is DeepSpeed's accelerator name: on "cpu" without offload, torch's AdamW replaces FusedAdam.
    """
    ds = copy.deepcopy(base)
    filler = _Filler(ds, source)
    precision = trainer.precision
    if _enabled(ds.get("fp16")) is True and _enabled(ds.get("bf16")) is True:
        raise ConfigError(
            f"{source} enables both fp16 and bf16; set both \"enabled\" fields to \"auto\" and choose one with "
            "trainer.precision=bf16|fp16|fp32."
        )
    batch = trainer.micro_batch_size * trainer.grad_accum_steps * world_size
    filler.fill(("train_batch_size",), batch,
                f"set it to \"auto\", or make trainer.micro_batch_size * trainer.grad_accum_steps * world size "
                f"({trainer.micro_batch_size} * {trainer.grad_accum_steps} * {world_size}) equal it")
    filler.fill(("train_micro_batch_size_per_gpu",), trainer.micro_batch_size,
                "set it to \"auto\" or set trainer.micro_batch_size to it")
    filler.fill(("gradient_accumulation_steps",), trainer.grad_accum_steps,
                "set it to \"auto\" or set trainer.grad_accum_steps to it")
    filler.fill(("gradient_clipping",), trainer.grad_clip, "set it to \"auto\" or set trainer.grad_clip to it")
    for name in ("bf16", "fp16"):
        filler.fill((name, "enabled"), precision == name,
                    f"set it to \"auto\" and choose the precision with trainer.precision (now {precision})")

    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        raise ConfigError(
            f"{source}: optimizer.type={optimizer.get('type')!r} is not supported; use \"AdamW\" (DeepSpeed picks "
            "CPU Adam under offload and FusedAdam on GPU), with its params set from optim.* in the Hydra config."
        )
    optimizer.setdefault("params", {})
    for key, value in (("lr", optim.lr), ("betas", list(optim.betas)), ("eps", optim.eps),
                       ("weight_decay", optim.weight_decay)):
        filler.fill(("optimizer", "params", key), value, f"set it to \"auto\" or set optim.{key} to it")
    if accelerator == "cpu" and not offload_devices(ds):
        optimizer["params"].setdefault("torch_adam", True)  # FusedAdam would compile a CPU kernel for nothing

    wanted = scheduler_section(scheduler, lr=optim.lr, total_steps=total_steps)
    section = ds.setdefault("scheduler", {"type": AUTO, "params": AUTO})
    filler.fill(("scheduler", "type"), wanted["type"],
                "set it to \"auto\" and choose the schedule with scheduler=cosine|linear|constant")
    if section.get("params", AUTO) == AUTO:
        section["params"] = {}
    for key, value in wanted["params"].items():
        filler.fill(("scheduler", "params", key), value,
                    "set it to \"auto\"; the schedule comes from scheduler.* and trainer.max_steps")

    zero = ds.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key) or {}
        if offload.get("device") == "nvme":
            if not nvme_path and offload.get("nvme_path") in (None, AUTO):
                raise ConfigError(
                    f"{source} offloads zero_optimization.{key} to NVMe but deepspeed.nvme_path is not set; pass "
                    "deepspeed.nvme_path=/path/on/a/fast/local/disk (one directory per node, with room for the "
                    "parameters and optimizer states)."
                )
            filler.fill(("zero_optimization", key, "nvme_path"), nvme_path or offload["nvme_path"],
                        "set it to \"auto\" and give the directory with deepspeed.nvme_path")
            if swap_subdir:
                offload["nvme_path"] = str(Path(offload["nvme_path"]) / swap_subdir)
        elif offload.get("nvme_path") == AUTO:
            del offload["nvme_path"]  # a copy of zero3_nvme.json switched to "cpu": no directory to fill
    _fill_param_swap_buffer(zero.get("offload_param") or {}, source=source, world_size=world_size,
                            largest_param_numel=largest_param_numel)
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(
            f"{source} has \"auto\" at {leftover}, which the Hydra config does not decide; replace it with a value."
        )
    return ds


def _fill_param_swap_buffer(offload: dict[str, Any], *, source: str, world_size: int,
                            largest_param_numel: Optional[int]) -> None:
    """offload_param.buffer_size: "auto" becomes the largest parameter partition; an explicit size must hold it
    (DeepSpeed asserts it deep inside the first forward otherwise: GPT-J 6B's 206M-element embedding needs
    buffers of 206M elements on one GPU, 103M on two)."""
    if offload.get("device") != "nvme":
        if offload.get("buffer_size") == AUTO:
            del offload["buffer_size"]  # only NVMe swapping has these buffers
        return
    size = offload.get("buffer_size")
    needed = math.ceil(largest_param_numel / world_size) if largest_param_numel else None
    if size == AUTO:
        if needed is None:
            raise ConfigError(
                f"{source}: zero_optimization.offload_param.buffer_size is \"auto\" but the model's largest "
                "parameter is unknown here; give a number of elements (at least the largest parameter / ranks)."
            )
        offload["buffer_size"] = needed
    elif needed is not None and size is not None and int(size) < needed:
        raise ConfigError(
            f"{source}: zero_optimization.offload_param.buffer_size is {int(size):,} elements, but the largest "
            f"parameter partition is {needed:,} ({largest_param_numel:,} elements over {world_size} ranks) and "
            "DeepSpeed swaps each partition through one buffer; set it to \"auto\" or to at least that."
        )


class _Filler:
    """Writes Hydra values into a DeepSpeed dict: "auto" or absent is filled; explicit values must agree."""

    def __init__(self, ds: dict[str, Any], source: str):
        self.ds, self.source = ds, source

    def fill(self, path: tuple[str, ...], value: Any, fix: str) -> None:
        node = self.ds
        for key in path[:-1]:
            if node.get(key) is None or node.get(key) == AUTO:
                node[key] = {}
            node = node[key]
        current = node.get(path[-1], AUTO)
        if current != AUTO and not _same(current, value):
            raise ConfigError(
                f"{self.source}: \"{'.'.join(path)}\" is {json.dumps(current)} but the Hydra config gives "
                f"{json.dumps(value)}; {fix}."
            )
        node[path[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # 1 == True in Python, not in a JSON flag
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _enabled(section: Any) -> Any:
    return section.get("enabled") if isinstance(section, dict) else None


def _find_auto(node: Any, path: str = "") -> Optional[str]:
    if node == AUTO:
        return path or "<root>"
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups: weight decay for weight matrices and embeddings, none for
    biases and LayerNorm weights (decaying a norm's gain toward 0 only hurts). Names work under peft and ZeRO-3,
    where partitioned parameters no longer show their shape."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if name == "bias" or isinstance(module, nn.LayerNorm) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_factor(section: dict[str, Any]) -> Callable[[int], float]:
    """The filled "scheduler" section as a multiplier of the optimizer's lr after `done` optimizer steps.

    Same shapes as DeepSpeed's WarmupCosineLR / WarmupDecayLR / WarmupLR, but DeepSpeed's own classes set the
    first step's rate from iteration -1 and then step after each update, so step k runs at iteration k-2's
    rate: the first two steps share one rate (0 with the default cosine) and the peak comes a step late. Here
    step s = done + 1 runs at warmup s/W, so W steps of rising lr starting above 0, then the decay to the last
    step, which keeps a non-zero rate (cosine: cos_min_ratio; linear: 1/(T-W+1) of the peak).
    """
    kind, params = section["type"], section["params"]
    warmup = params["warmup_num_steps"]
    total = params.get("total_num_steps", warmup)
    floor = params.get("warmup_min_ratio", 0.0)

    def factor(done: int) -> float:
        step = done + 1
        if step <= warmup:
            return floor + (1.0 - floor) * step / warmup
        if kind == "WarmupLR" or total <= warmup:
            return 1.0
        if kind == "WarmupCosineLR":
            progress = min(1.0, (step - warmup) / (total - warmup))
            low = params["cos_min_ratio"]
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, (total - step + 1) / (total - warmup + 1))  # WarmupDecayLR

    return factor


def initialize(model: nn.Module, ds_config: dict[str, Any], *, weight_decay: float, compile: bool = False):
    """`deepspeed.initialize` with the AdamW param groups; returns the engine (optimizer and schedule inside).
    `compile`: torch.compile the model's blocks in place (trainer.compile, see finetune.training.compile), after
    DeepSpeed has installed its hooks, so that ZeRO-3 partitions the same modules either way.

    The "scheduler" section becomes a torch LambdaLR (see `lr_factor`) that DeepSpeed steps once per applied
    optimizer step and saves in its checkpoints, like its own schedulers."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    config = {key: value for key, value in ds_config.items() if key != "scheduler"}
    scheduler = None
    if "scheduler" in ds_config:
        factor = lr_factor(ds_config["scheduler"])
        scheduler = lambda optimizer: LambdaLR(optimizer, factor)  # noqa: E731 -- DeepSpeed calls it with its optimizer
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, weight_decay), config=config, lr_scheduler=scheduler
    )
    if engine.zero_nvme_offload_optimizer():
        _complete_nvme_resumes(engine)
    if compile:
        from finetune.training.compile import compile_blocks, limit_compile_threads

        limit_compile_threads(engine.device.type)
        compile_blocks(engine.module)
    return engine


def _complete_nvme_resumes(engine) -> None:
    """Every load_checkpoint of this engine also restores what DeepSpeed's NVMe resume skips (see
    finetune.training.nvme.complete_resume); without it a resumed run's loss departs from the uninterrupted one."""
    from finetune.training.nvme import complete_resume

    load = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, **kwargs):
        path, client_state = load(load_dir, tag=tag, **kwargs)
        if path is not None and kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only"):
            complete_resume(engine, load_dir, tag or (Path(load_dir) / "latest").read_text().strip())
        return path, client_state

    engine.load_checkpoint = load_checkpoint
