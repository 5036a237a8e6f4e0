"""Consolidate a DeepSpeed checkpoint (ZeRO-0/2/3, any world size) into a Hugging Face-format directory.

The weights come from DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`): the fp32 master weights
of every rank, merged in lazy mode, so a ZeRO-3 tensor is only assembled when its output shard is written
(the rank files are memory-mapped). `checkpoint.save_pretrained` writes one shard at a time, so the process
never holds two full copies of the model. ZeRO-2 concatenates each param group's fp32 partitions once (DeepSpeed
does the same); stage 0 checkpoints hold the module's weights directly.

What the checkpoint does not hold is found next to it, in the run dir (run_dir/checkpoints/<tag>):
- the model config: `final/config.json`, else `.hydra/config.yaml` (model preset or model.path + overrides and
  the task's own tweaks, as the runner builds it), else an explicit `config=` path;
- the tokenizer: `final/`, else the base checkpoint (model.path), else the bundled GPT-J tokenizer;
- LoRA settings (r, alpha, targets): `final/adapter_config.json` (or `final/adapter/`), else the `lora` section of `.hydra/config.yaml`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from finetune.config import ConfigError, LoraConfig, ModelConfig, to_typed
from finetune.model import ARCHITECTURES, HEADS, GPTJConfig, build_model
from finetune.model.hf_weights import (
    CheckpointError,
    load_pretrained,
    make_staging_dir,
    publish_dir,
    read_config,
    resolve_model_dir,
    save_pretrained,
)
from finetune.model.tokenizer import GPTJTokenizer

LATEST = "latest"
ARCHITECTURE_TASKS = {ARCHITECTURES[cls]: task for task, cls in HEADS.items()}  # config.json architectures -> task
ADAPTER_CONFIG = "adapter_config.json"


# --- locating the checkpoint ------------------------------------------------------------------------
@dataclass(frozen=True)
class DeepSpeedCheckpoint:
    """One tag of a DeepSpeed checkpoint directory: `directory/tag/*_model_states.pt` (+ `*_optim_states.pt`)."""

    directory: Path  # holds the tags and `latest`
    tag: str

    @property
    def path(self) -> Path:
        return self.directory / self.tag

    @property
    def run_dir(self) -> Optional[Path]:
        """The training run dir around `checkpoints/`, when it looks like one (final/ or .hydra/ inside)."""
        parent = self.directory.parent
        return parent if (parent / "final").is_dir() or (parent / ".hydra").is_dir() else None


def _is_tag_dir(path: Path) -> bool:
    return any(path.glob("*model_states.pt"))


def _tags(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and _is_tag_dir(p))


def locate_checkpoint(path: str | Path, *, tag: Optional[str] = None) -> DeepSpeedCheckpoint:
    """The checkpoint at `path`: a run dir, its `checkpoints/` (the tag in `latest`, or `tag`), or a tag dir itself."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint={str(path)!r} is not a directory; pass RUN_DIR/checkpoints (DeepSpeed's checkpoint dir with "
            "its `latest` file) or one of its tag dirs, e.g. RUN_DIR/checkpoints/global_step100."
        )
    if (path / "checkpoints").is_dir() and not _is_tag_dir(path):
        path = path / "checkpoints"
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"checkpoint={path} is the tag dir {path.name!r} but tag={tag!r} was given; drop tag.")
        return DeepSpeedCheckpoint(path.parent, path.name)
    if tag is None:
        if not (path / LATEST).is_file():
            found = _tags(path)
            hint = f"tags found there: {', '.join(found)}" if found else "no checkpoint tags were found there either"
            raise CheckpointError(
                f"{path} has no '{LATEST}' file, so the checkpoint to export is unknown ({hint}). DeepSpeed writes "
                f"'{LATEST}' after a complete save; pass a tag dir instead, e.g. checkpoint={path}/global_stepN "
                "(or tag=global_stepN)."
            )
        tag = (path / LATEST).read_text().strip()
    if not (path / tag).is_dir() or not _is_tag_dir(path / tag):
        raise CheckpointError(
            f"{path / tag} is not a DeepSpeed checkpoint (no *_model_states.pt files); the save may have been "
            f"interrupted. Available tags: {', '.join(_tags(path)) or 'none'}."
        )
    return DeepSpeedCheckpoint(path, tag)


# --- reading the weights ----------------------------------------------------------------------------
class _LazyTensor:
    """A ZeRO-3 parameter not yet gathered from the rank files; `save_pretrained` materializes it per shard
    through `.detach()`, LoRA merging through `.float()`."""

    def __init__(self, gathered: Any):
        self._gathered = gathered
        self.shape = torch.Size(gathered.shape)
        self.dtype = gathered.dtype

    def materialize(self) -> torch.Tensor:
        return self._gathered.contiguous()

    detach = contiguous = materialize

    def float(self) -> torch.Tensor:
        return self.materialize().float()


def read_checkpoint_state(checkpoint: DeepSpeedCheckpoint) -> dict[str, Any]:
    """The full state dict of the checkpointed module (names as in `engine.module`), values tensors or lazy tensors.

    ZeRO-1/2/3: fp32 master weights via `get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`.
    Stage 0 (no ZeRO): the module weights stored in `mp_rank_00_model_states.pt`, memory-mapped.
    Every pickle file of the checkpoint passes the restricted unpickler first (docs/security.md): DeepSpeed's
    consolidation unpickles them without restriction.
    """
    from finetune.training.checkpoint_trust import verify_checkpoint_dir

    verify_checkpoint_dir(checkpoint.path)
    if not any(checkpoint.path.glob("*_optim_states.pt")):
        model_file = checkpoint.path / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{checkpoint.path} has neither ZeRO optimizer shards nor {model_file.name}; the "
                                  "checkpoint is incomplete.")
        return _stage0_module_state(model_file)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from finetune.training.nvme import offloaded_master_weights

    try:
        # NVMe offload keeps the fp32 weights in the checkpoint's offloaded_tensors/, not in the optimizer files.
        with contextlib.redirect_stdout(sys.stderr), offloaded_master_weights(checkpoint.path):
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(checkpoint.directory), tag=checkpoint.tag, lazy_mode=True
            )
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(
            f"DeepSpeed could not consolidate {checkpoint.path}: {err}. Every rank's files of one save must be there "
            "(export another tag if this one is incomplete)."
        ) from None
    return {k: v if isinstance(v, torch.Tensor) else _LazyTensor(v) for k, v in state.items()}


def _stage0_module_state(model_file: Path) -> dict[str, Any]:
    """The module weights of a stage-0 model file, unpickled with the restricted unpickler (docs/security.md)."""
    from finetune.training.checkpoint_trust import load_restricted

    try:
        saved = load_restricted(model_file, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{model_file} holds objects other than tensors, plain containers and RNG states, so it is not loaded "
            f"(unpickling it could run code): {str(err).splitlines()[0]} Export a checkpoint written by this "
            "project's training; if this one was copied from elsewhere, it may have been tampered with."
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        raise CheckpointError(f"{model_file} holds no 'module' state dict; it is not a DeepSpeed model file.")
    return dict(saved["module"])


# --- what the run knew ------------------------------------------------------------------------------
@dataclass
class RunDescription:
    """What export needs besides the weights."""

    config: GPTJConfig
    task: str
    tokenizer_dir: Optional[Path]  # None: the bundled tokenizer
    dtype: str  # the run's model.dtype: the default export dtype
    lora: Optional[LoraConfig] = None
    base_model: Optional[str] = None  # the run's model.path (LoRA base)


def _hydra_config(run_dir: Optional[Path]) -> Optional[Any]:
    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")


def _task_of(config_file: Path) -> str:
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURE_TASKS:
            return ARCHITECTURE_TASKS[name]
    raise CheckpointError(
        f"{config_file} names no GPT-J head in 'architectures' ({architectures}); expected one of "
        f"{sorted(ARCHITECTURE_TASKS)}. Pass task=clm|cls|qa."
    )


def _lora_from_adapter(adapter_dir: Path) -> LoraConfig:
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    targets = raw.get("target_modules") or []
    return LoraConfig(enabled=True, r=int(raw["r"]), alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                      target_modules=sorted(targets) if isinstance(targets, (list, set)) else [targets],
                      train_head=bool(raw.get("modules_to_save")))


def describe_run(
    checkpoint: DeepSpeedCheckpoint,
    *,
    config_path: Optional[str | Path] = None,
    task: Optional[str] = None,
    base_model: Optional[str] = None,
) -> RunDescription:
    """Model config, task, tokenizer, default dtype and LoRA settings of the run that wrote `checkpoint`.

    `base_model` stands in for the run's model.path (the checkpoint it started from) when that has moved.
    """
    run_dir = checkpoint.run_dir
    final = run_dir / "final" if run_dir is not None else None
    hydra = _hydra_config(run_dir)
    model_cfg = to_typed(ModelConfig, hydra.get("model"), section="model") if hydra is not None else ModelConfig()
    if base_model is not None:
        model_cfg.path = base_model
    task = task or (hydra.task.name if hydra is not None else None)

    if config_path is not None:
        config_file = Path(config_path).expanduser()
        config_file = config_file / "config.json" if config_file.is_dir() else config_file
        if not config_file.is_file():
            raise ConfigError(f"config={str(config_path)!r} is neither a config.json nor a directory holding one.")
        config = read_config(config_file.parent)
        task = task or _task_of(config_file)
    elif final is not None and (final / "config.json").is_file():
        config = read_config(final)
        task = task or _task_of(final / "config.json")
    elif hydra is not None:
        config = _config_from_hydra(hydra, model_path=model_cfg.path)
    else:
        raise ConfigError(
            f"The model config of {checkpoint.path} is unknown: the run dir around it has neither final/config.json "
            "nor .hydra/config.yaml. Pass config=PATH (a config.json, or a checkpoint dir holding one) and task=..."
        )
    if task not in HEADS:
        raise ConfigError(f"task={task!r} is unknown; pass task=clm, task=cls or task=qa.")

    lora = None
    # The adapter sits in final/ itself, or in final/adapter/ beside merged weights (runner.export_final).
    adapter_dirs = [] if final is None else [d for d in (final, final / "adapter") if (d / ADAPTER_CONFIG).is_file()]
    if adapter_dirs:
        lora = _lora_from_adapter(adapter_dirs[0])
    elif hydra is not None and hydra.get("lora") is not None and hydra.lora.get("enabled", False):
        lora = to_typed(LoraConfig, hydra.lora, section="lora")
    tokenizer_dir = final if final is not None and (final / "tokenizer.json").is_file() else None
    if tokenizer_dir is None and model_cfg.path is not None and Path(model_cfg.path).expanduser().is_dir():
        tokenizer_dir = Path(model_cfg.path).expanduser()
    return RunDescription(config=config, task=task, tokenizer_dir=tokenizer_dir, dtype=model_cfg.dtype, lora=lora,
                          base_model=model_cfg.path)


def _config_from_hydra(hydra: Any, *, model_path: Optional[str]) -> GPTJConfig:
    """The runner's model config for the run's composed config (classification reads its data for the labels)."""
    from finetune.config import parse_config
    from finetune.runner import model_config
    from finetune.tasks import get_task

    run = parse_config(hydra)
    if model_path is not None:
        try:
            model_path = str(resolve_model_dir(model_path))
        except CheckpointError as err:
            raise CheckpointError(
                f"The run started from model.path={model_path!r}, whose config.json is needed to rebuild the model "
                f"config, and it cannot be read ({err}). Pass base_model=DIR (that base checkpoint, e.g. moved "
                "elsewhere) or config=PATH."
            ) from None
    run.model = dataclasses.replace(run.model, path=model_path)
    task = get_task(run.task)
    tokenizer = GPTJTokenizer.from_pretrained(run.model.path)
    data = task.load_data(run.data, tokenizer) if run.task == "cls" else None
    overrides = task.model_overrides(data, tokenizer) if data is not None else {"pad_token_id": tokenizer.pad_token_id}
    return model_config(run, overrides)


# --- where the output may go -------------------------------------------------------------------------
def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def refuse_output_over_sources(out_dir: str | Path, checkpoint: DeepSpeedCheckpoint, *,
                               base_model: Optional[str] = None) -> None:
    """A CheckpointError when `out_dir` is, contains or lies inside what export reads: replacing it (overwrite)
    would delete the source. Symlinks are resolved first."""
    out = Path(out_dir).expanduser().resolve()
    sources = {"checkpoint dir": checkpoint.directory}
    if checkpoint.run_dir is not None:
        sources["run dir"] = checkpoint.run_dir
    if base_model is not None and Path(base_model).expanduser().is_dir():
        sources["base model"] = Path(base_model).expanduser()
    outermost = (checkpoint.run_dir or checkpoint.directory).resolve()
    for what, source in sources.items():
        source = source.resolve()
        if _within(out, source) or _within(source, out):
            where = "is" if out == source else ("lies inside" if _within(out, source) else "contains")
            suggestion = source if what == "base model" else outermost
            raise CheckpointError(
                f"out={str(out_dir)!r} {where} the {what} {source} that export reads: writing it (or replacing it "
                f"with overwrite=true) would destroy the source. Choose an out=DIR outside {suggestion}, e.g. "
                f"out={suggestion.parent / (suggestion.name + '-hf')}."
            )


# --- export -----------------------------------------------------------------------------------------
def is_lora_state(state: dict[str, Any]) -> bool:
    from finetune.training.lora import PEFT_PREFIX

    return any(key.startswith(PEFT_PREFIX) for key in state)


def _peft_skeleton(config: GPTJConfig, task: str, lora: LoraConfig):
    """The PeftModel the run trained, on the meta device: its parameter names, and the writer of adapter files."""
    from finetune.training.lora import apply_lora

    with torch.device("meta"):
        return apply_lora(build_model(config, task=task, device="meta"), lora)


def _fill_base_weights(state: dict[str, Any], run: RunDescription, *, base_model: Optional[str]) -> None:
    """Add the frozen base weights a checkpoint saved without (`exclude_frozen_parameters`), read from `base_model`."""
    expected = _peft_skeleton(run.config, run.task, run.lora).state_dict()
    missing = [k for k in expected if k not in state]
    if not missing:
        return
    base = base_model or (run.base_model if run.base_model and Path(run.base_model).expanduser().is_dir() else None)
    if base is None:
        raise CheckpointError(
            f"This LoRA checkpoint holds only the adapter ({len(missing)} frozen base tensors are not in it, e.g. "
            f"{missing[0]}), so merged weights need the base model: pass base_model=DIR, the Hugging Face checkpoint "
            "the run fine-tuned (its model.path). Or export the adapter alone with merge_lora=false."
        )
    from finetune.training.lora import apply_lora

    model = apply_lora(load_pretrained(base, task=run.task, dtype=torch.float32, config_overrides=_head_overrides(run.config)),
                       run.lora)
    base_state = model.state_dict()
    for key in missing:
        state[key] = base_state[key]


def _head_overrides(config: GPTJConfig) -> dict[str, Any]:
    return {"num_labels": config.num_labels, "id2label": config.id2label, "pad_token_id": config.pad_token_id}


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tag: Optional[str] = None,
    dtype: Optional[str] = None,
    merge_lora: bool = True,
    base_model: Optional[str] = None,
    config_path: Optional[str | Path] = None,
    task: Optional[str] = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    private: bool = False,
) -> Path:
    """Write the HF-format model of a DeepSpeed checkpoint into `out_dir` (atomically); returns `out_dir`.

    `dtype` (bf16 | fp16 | fp32; None: the run's model.dtype) is the saved weights' dtype. A LoRA checkpoint
    gives merged full weights (`merge_lora`), or the adapter alone (peft files + tokenizer, as final/ holds it).
    `base_model` supplies base weights a LoRA checkpoint was saved without. An `out_dir` that is, holds or lies
    in the checkpoint, its run dir or the base model is refused; an existing one is replaced only with
    `overwrite`, in one swap. `private`: files 0600, directories 0700.
    """
    from finetune.builders import torch_dtype

    if dtype is not None:
        torch_dtype(dtype, key="dtype")  # a typo fails before any reading
    location = locate_checkpoint(checkpoint, tag=tag)
    refuse_output_over_sources(out_dir, location, base_model=base_model)
    run = describe_run(location, config_path=config_path, task=task, base_model=base_model)
    refuse_output_over_sources(out_dir, location, base_model=run.base_model)
    target_dtype = torch_dtype(dtype or run.dtype, key="dtype")
    tokenizer = GPTJTokenizer.from_pretrained(run.tokenizer_dir)
    state = read_checkpoint_state(location)

    if not is_lora_state(state):
        save_pretrained(state, out_dir, config=run.config, task=run.task, dtype=target_dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite, extra_writer=tokenizer.save_pretrained,
                    private=private)
        return Path(out_dir)
    if run.lora is None:
        raise ConfigError(
            f"{location.path} holds a LoRA model but its run dir records no LoRA settings (final/{ADAPTER_CONFIG} or "
            "the lora section of .hydra/config.yaml); export needs lora.r and lora.alpha to merge."
        )
    quantized = drop_4bit_base(state)
    if not merge_lora:
        return _export_adapter(state, out_dir, run=run, tokenizer=tokenizer, dtype=target_dtype, overwrite=overwrite,
                               private=private, quantized_base=quantized)
    from finetune.training.lora import merged_state_dict

    _fill_base_weights(state, run, base_model=base_model)  # a QLoRA base: its original 16-bit weights
    merged = merged_state_dict(state, run.lora)
    save_pretrained(merged, out_dir, config=run.config, task=run.task, dtype=target_dtype,
                    max_shard_size=max_shard_size, overwrite=overwrite, extra_writer=tokenizer.save_pretrained,
                    private=private)
    return Path(out_dir)


def drop_4bit_base(state: dict[str, Any]) -> bool:
    """Remove a QLoRA checkpoint's 4-bit base weights and their quantization constants from `state`; whether there
    were any. Merged exports then take the base's original 16-bit weights from the base model, as final/ does
    (docs/lora.md, "Merging"), never the 4-bit ones."""
    # Packed 4-bit weights are integer tensors (ZeRO consolidation keeps them, without their constants).
    four_bit = [key for key, value in state.items() if key.endswith(".base_layer.weight")
                and not getattr(value, "dtype", torch.float32).is_floating_point]
    for weight in four_bit:
        for key in [k for k in state if k == weight or k.startswith(f"{weight}.")]:
            del state[key]
    return bool(four_bit)


def _export_adapter(state: dict[str, Any], out_dir: str | Path, *, run: RunDescription, tokenizer: GPTJTokenizer,
                    dtype: torch.dtype, overwrite: bool, private: bool, quantized_base: bool = False) -> Path:
    """peft's adapter files (LoRA A/B and the trained head) + tokenizer, published by one swap."""
    from finetune.training.lora import save_adapter

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} already exists and is not empty; choose another out=DIR or pass overwrite=true.")
    adapter_keys = [k for k in state if ".lora_" in k or ".modules_to_save." in k]
    adapter_state = {}
    for key in adapter_keys:
        value = state[key]
        value = value.materialize() if isinstance(value, _LazyTensor) else value
        adapter_state[key] = value.to(dtype).contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out_dir, private=private)
    try:
        save_adapter(_peft_skeleton(run.config, run.task, run.lora), staging, gathered_state_dict=adapter_state,
                     base_model_name_or_path=run.base_model)
        if quantized_base:  # what tools read to quantize the base as trained (finetune.tools.predict)
            from finetune.model.quantized import BASE_QUANTIZATION_FILE

            record = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                      "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch.")}
            (staging / BASE_QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tokenizer.save_pretrained(staging)
        publish_dir(staging, out_dir, private=private)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
