"""What a relaunch does with a checkpoint written by another parallel layout (elastic resume).

Every checkpoint records the layout that wrote it (`RunLayout`: ranks, micro batch, accumulation, ZeRO stage,
offload) and the model it holds (`model_signature`). Before anything is built, a relaunch compares them with its
own, so the project's checks speak before DeepSpeed's loader:

* another model (layers, width, vocabulary, head, LoRA) is refused: its weights cannot load;
* the global batch is kept: the data position and the learning-rate schedule count global batches, and the loss
  of a step is its mean. When only the number of ranks changed, the accumulation is re-derived to keep it (the
  micro batch too, lowered, when it no longer divides a rank's share); a global batch that cannot be kept is
  refused, listing the (micro batch, accumulation) pairs that work;
* a checkpoint partitioned for another world size or ZeRO configuration is converted to DeepSpeed's universal
  form and loaded from it (finetune.training.universal).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from finetune.config import ConfigError, LoraConfig, TrainerConfig

# GPTJConfig fields that decide the shapes of the weights a checkpoint holds.
SHAPE_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "rotary_dim", "tie_word_embeddings")


@dataclass(frozen=True)
class RunLayout:
    """How a run was split: what a checkpoint records about the launch that wrote it.

    Checkpoints written before layouts were recorded know their world size only (the other fields None)."""

    world_size: int
    micro_batch_size: Optional[int] = None
    grad_accum_steps: Optional[int] = None
    zero_stage: Optional[int] = None
    offload: tuple[str, ...] = ()  # devices ZeRO offloads to: "cpu", "nvme"
    config_file: Optional[str] = None  # the DeepSpeed JSON

    @property
    def global_batch_size(self) -> Optional[int]:
        if self.micro_batch_size is None or self.grad_accum_steps is None:
            return None
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def describe(self) -> str:
        if self.global_batch_size is None:
            return f"{self.world_size} rank(s)"
        return (f"global batch {self.global_batch_size} = micro batch {self.micro_batch_size} x accumulation "
                f"{self.grad_accum_steps} x {self.world_size} rank(s)")

    def partitioning(self) -> str:
        offload = f" + {'/'.join(self.offload)} offload" if self.offload else ""
        return f"ZeRO-{self.zero_stage}{offload} on {self.world_size} rank(s)"

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["offload"] = list(self.offload)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "RunLayout":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["offload"] = tuple(values.get("offload") or ())
        return cls(**values)


def model_signature(config: Any, *, task: str, lora: LoraConfig, fused_projections: bool = False) -> dict[str, Any]:
    """What decides the parameters a checkpoint holds: the head, the weight shapes, the LoRA adapters, and whether
    the blocks fuse their projections (the optimizer's flat state is laid out by parameter; absent when unfused).

    `config` is the GPTJConfig the run builds (num_labels counts for the classification head only)."""
    signature: dict[str, Any] = {"task": task, **{key: getattr(config, key) for key in SHAPE_FIELDS}}
    if task == "cls":
        signature["num_labels"] = config.num_labels
    signature["lora"] = (
        {"r": lora.r, "target_modules": sorted(lora.target_modules), "train_head": lora.trains_head(task),
         # a 4-bit base's packed weights cannot load into a 16-bit one (nor back); absent for lora=lora, as before
         **({"quantize_base": lora.quantize_base} if lora.quantized else {})}
        if lora.enabled else None
    )
    if fused_projections:
        signature["fused_projections"] = True
    return signature


def check_same_model(saved: Optional[dict[str, Any]], current: dict[str, Any], *, checkpoint: str) -> None:
    """Refuse (ConfigError) to resume a checkpoint of another model: name every field that differs."""
    if saved is None:  # written before signatures were recorded: DeepSpeed's loader is the check
        return
    differences = [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise ConfigError(
            f"The checkpoint {checkpoint} holds another model than this launch builds ({'; '.join(differences)}), "
            "so its weights cannot be loaded. Relaunch with the model settings of that run (model=..., "
            "model.overrides, model.fused_projections, task=..., lora=...), or point hydra.run.dir at a new "
            "directory to start a new run; nothing in the run dir was changed."
        )


def splits_of(global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """The (micro batch, accumulation) pairs that make `global_batch` on `world_size` ranks, largest micro first."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    return [(micro, per_rank // micro) for micro in range(per_rank, 0, -1) if per_rank % micro == 0]


def plan_batch_layout(saved: RunLayout, trainer: TrainerConfig, world_size: int, *, checkpoint: str
                      ) -> tuple[TrainerConfig, Optional[str]]:
    """The trainer settings to resume `saved` with on `world_size` ranks, and a notice when they changed.

    The global batch is kept. When the micro batch and accumulation asked for are those the checkpoint was
    written with (only the number of ranks changed), the accumulation is re-derived; the micro batch is lowered
    only when it no longer divides a rank's share. When they were changed, they must give the same global batch.
    Otherwise, or when no split exists, a ConfigError lists what works."""
    global_batch = saved.global_batch_size
    asked = trainer.micro_batch_size * trainer.grad_accum_steps * world_size
    if global_batch is None or asked == global_batch:
        return trainer, None
    unchanged = (trainer.micro_batch_size, trainer.grad_accum_steps) == (saved.micro_batch_size,
                                                                        saved.grad_accum_steps)
    splits = splits_of(global_batch, world_size)
    if unchanged and splits:
        micro, accum = next((m, a) for m, a in splits if m <= trainer.micro_batch_size)
        notice = (
            f"Resuming {checkpoint} ({saved.describe()}) on {world_size} rank(s): keeping its global batch of "
            f"{global_batch} with trainer.micro_batch_size={micro} and trainer.grad_accum_steps={accum}"
            + (f" (micro batch lowered from {trainer.micro_batch_size}: it must divide the "
               f"{global_batch // world_size} rows of each rank)" if micro != trainer.micro_batch_size else "")
            + ". Set both to choose another split of the same global batch."
        )
        return dataclasses.replace(trainer, micro_batch_size=micro, grad_accum_steps=accum), notice
    asked_text = (f"trainer.micro_batch_size={trainer.micro_batch_size} x trainer.grad_accum_steps="
                  f"{trainer.grad_accum_steps} x {world_size} rank(s) = {asked}")
    if splits:
        options = ", ".join(f"({m}, {a})" for m, a in splits)
        fix = (f"On {world_size} rank(s) these (trainer.micro_batch_size, trainer.grad_accum_steps) keep it: "
               f"{options}; set both to one of them.")
    else:
        ranks = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        fix = (f"{global_batch} rows cannot be split evenly over {world_size} ranks, so no micro batch and "
               f"accumulation keep it there; resume on a number of ranks that divides {global_batch} "
               f"({', '.join(map(str, ranks))}).")
    raise ConfigError(
        f"Cannot resume {checkpoint} with this batch layout: it was trained with a {saved.describe()}, and this "
        f"launch asks for {asked_text}. A run keeps its global batch (its data position and learning-rate "
        f"schedule count global batches). {fix} To train with another global batch, start a new run "
        "(another hydra.run.dir); nothing in the run dir was changed."
    )


def needs_conversion(saved: RunLayout, current: RunLayout) -> bool:
    """Whether the checkpoint's ZeRO partitioning differs from this launch's, so DeepSpeed's own loader cannot
    read it (it refuses another data-parallel world size) and the universal form is needed."""
    if saved.zero_stage is None:  # an older checkpoint: only its world size is known
        return saved.world_size != current.world_size and (current.zero_stage or 0) > 0
    if saved.zero_stage == 0 and current.zero_stage == 0:  # full optimizer state in one file: any world size
        return False
    return (saved.world_size, saved.zero_stage, saved.offload) != (current.world_size, current.zero_stage,
                                                                   current.offload)


def check_convertible(saved: RunLayout, current: RunLayout, *, checkpoint: str) -> None:
    """Refuse (ConfigError) the conversions DeepSpeed cannot do, before anything is converted."""
    problem = None
    if "nvme" in saved.offload or "nvme" in current.offload:
        problem = ("DeepSpeed's universal checkpoints do not cover NVMe offload (its optimizer states live in the "
                   "swap files, and the universal loader skips NVMe-offloaded optimizers)")
    elif saved.zero_stage == 0 or (current.zero_stage or 0) == 0:
        problem = ("a ZeRO-0 run keeps whole optimizer states and a ZeRO run partitioned ones; DeepSpeed converts "
                   "between partitionings of ZeRO stages 1-3 only")
    elif saved.zero_stage is not None and not stage_change_supported(saved.zero_stage, current.zero_stage):
        problem = (f"DeepSpeed's universal loader reads a checkpoint into the ZeRO stage that wrote it only (ZeRO-"
                   f"{saved.zero_stage} here, ZeRO-{current.zero_stage} now)")
    if problem:
        raise ConfigError(
            f"Cannot resume {checkpoint} ({saved.partitioning()}) as {current.partitioning()}: {problem}. Relaunch "
            f"with deepspeed.config_file={saved.config_file or 'the one of that run'} on {saved.world_size} "
            "rank(s), or start a new run (another hydra.run.dir); nothing in the run dir was changed."
        )


def stage_change_supported(saved_stage: int, new_stage: Optional[int]) -> bool:
    """Whether a ZeRO-`saved_stage` checkpoint loads into ZeRO-`new_stage` (through the universal form)."""
    return saved_stage == new_stage
