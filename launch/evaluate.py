"""Evaluate a trained model on a task's split, with the training loop's evaluation (config: conf/evaluate.yaml).

    python launch/evaluate.py task=qa model.path=outputs/qa/RUN/final
    python launch/evaluate.py task=cls model.path=DIR data.train_file=train.jsonl data.validation_file=dev.jsonl
    deepspeed --num_gpus 8 launch/evaluate.py task=qa model.path=/models/gptj-squad model.dtype=bf16

Prints the metrics as a table and writes them to eval.output. One process: the model whole on one device.
Several ranks (deepspeed / torchrun / srun): DeepSpeed ZeRO-3 inference (an engine without optimizer), each rank
holding a slice of the weights, so a model larger than one device fits; the rows are split over the ranks.
The data config must describe the data as training did (a classifier's labels come from data.train_file).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune import distributed  # noqa: E402
from finetune.builders import torch_dtype  # noqa: E402
from finetune.cli import hydra_app  # noqa: E402
from finetune.config import ConfigError, DataConfig, TaskConfig, to_typed  # noqa: E402
from finetune.data.sources import BUNDLED_DATA_DIR  # noqa: E402
from finetune.model import build_model, default_chunk_tokens  # noqa: E402
from finetune.model.hf_weights import load_state_into, read_config, resolve_model_dir  # noqa: E402
from finetune.model.tokenizer import GPTJTokenizer  # noqa: E402
from finetune.tasks import Task, get_task  # noqa: E402
from finetune.tools.predict import is_adapter_dir, load_model_for_inference, memory_check  # noqa: E402
from finetune.training.lora import base_quantization  # noqa: E402
from finetune.training.evaluation import evaluate, write_eval_results  # noqa: E402
from launch.train import strip_launcher_args  # noqa: E402


def split_data_config(data_cfg: DataConfig, split: str, task: str) -> DataConfig:
    """The data config whose validation split is `split` (train: all of data.train_file, or the bundled train set)."""
    if split == "validation":
        return data_cfg
    if split == "train":
        train = data_cfg.train_file if data_cfg.train_file is not None else str(BUNDLED_DATA_DIR / task / "train.jsonl")
        return dataclasses.replace(data_cfg, validation_file=train, max_eval_samples=None)
    raise ConfigError(f"eval.split={split!r} is not a split; use validation or train.")


def local_ranks() -> int:
    """Ranks on this host (torchrun: LOCAL_WORLD_SIZE, the deepspeed launcher: LOCAL_SIZE, srun)."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def refuse_if_too_big(model_dir: Path, *, task: str, dtype_name: str, zero3: bool, world_size: int,
                      source: str) -> None:
    """Before data and model: a model whose weights cannot fit the device(s) is a ConfigError (under ZeRO-3 each
    rank holds 1/world of them). A LoRA adapter is checked when its base is loaded."""
    from deepspeed.accelerator import get_accelerator

    if is_adapter_dir(model_dir):
        return
    device = get_accelerator().device_name()
    memory_check(task=task, dtype=torch_dtype(dtype_name), device=device, source=source,
                 shards=world_size if zero3 else 1,
                 ranks_on_host=local_ranks() if device == "cpu" else 1)(read_config(model_dir))


def inference_engine(model_dir: Path, *, task: str, dtype_name: str, zero3: bool, micro_batch_size: int,
                     world_size: int, base_model: Optional[str], check_memory: bool = True,
                     quantize_base: Optional[bool] = None):
    """A DeepSpeed engine without optimizer: ZeRO-3 (weights partitioned over ranks) or stage 0 (whole model).
    An adapter (a QLoRA adapter with its base quantized) is applied on every rank first, then partitioned."""
    import deepspeed

    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size, "zero_optimization": {"stage": 3 if zero3 else 0},
        "bf16": {"enabled": dtype_name == "bf16"}, "fp16": {"enabled": dtype_name == "fp16"},
        "steps_per_print": 10**9,
    }
    dtype = torch_dtype(dtype_name)
    if zero3 and not is_adapter_dir(model_dir):
        config = read_config(model_dir)  # its memory need was checked by refuse_if_too_big
        # Built partitioned and filled slice by slice: no rank ever holds the whole model. The dtype comes from the
        # config's bf16/fp16 flags: zero.Init's own `dtype` argument is ignored on accelerators without fp16 (CPU).
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(config, task=task, init=False)
        load_state_into(model, model_dir)
    else:  # an adapter is merged into its base on every rank first; deepspeed.initialize then partitions it
        model = load_model_for_inference(model_dir, task=task, dtype=dtype, base_model=base_model,
                                         check_memory=check_memory, quantize_base=quantize_base)
        if base_quantization(model) is not None:
            ds_config["zero_optimization"]["stage"] = 0
    if task == "clm":  # the evaluation loss chunk by chunk: no (tokens x vocab) logits
        model.loss_chunk_tokens = default_chunk_tokens(model.config.vocab_size)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def label_names(id2label: Optional[dict[int, str]]) -> Optional[list[str]]:
    return [id2label[i] for i in sorted(id2label)] if id2label else None


def check_labels(task: Task, model_config, data) -> None:
    """A classifier must be evaluated with the label ids it was trained with."""
    if task.name != "cls":
        return
    model_names, data_names = label_names(model_config.id2label), label_names(data.id2label)
    if model_config.num_labels != data.num_labels or (model_names and data_names and model_names != data_names):
        raise ConfigError(
            f"The model classifies into {model_config.num_labels} labels {model_names}, but the data gives "
            f"{data.num_labels} labels {data_names}. Labels are read from data.train_file: pass the training data's "
            "files (data.train_file=... data.validation_file=...) as in training."
        )


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
                     + [f"{k:<{width}}  {v:.6g}" for k, v in metrics.items()])


@hydra_app("evaluate")
def main(cfg: DictConfig) -> None:
    if cfg.model.get("path") is None:
        raise ConfigError("model.path= is required: python launch/evaluate.py task=qa model.path=DIR (a trained model).")
    task = get_task(to_typed(TaskConfig, cfg.task, section="task").name)
    data_cfg = split_data_config(to_typed(DataConfig, cfg.data, section="data"), cfg.eval.split, task.name)
    torch_dtype(cfg.model.dtype)
    if cfg.eval.micro_batch_size < 1:
        raise ConfigError(f"eval.micro_batch_size={cfg.eval.micro_batch_size} must be at least 1.")
    model_dir = resolve_model_dir(cfg.model.path)
    info = distributed.init_distributed()
    try:
        zero3 = cfg.eval.zero3 if cfg.eval.zero3 is not None else info.world_size > 1
        if cfg.check_memory:
            refuse_if_too_big(model_dir, task=task.name, dtype_name=cfg.model.dtype, zero3=zero3,
                              world_size=info.world_size, source=str(cfg.model.path))
        tokenizer = GPTJTokenizer.from_pretrained(model_dir)
        with distributed.main_process_first(info):
            data = task.load_data(data_cfg, tokenizer)
        if data.validation is None or len(data.validation) == 0:
            raise ConfigError(f"The {cfg.eval.split} split is empty; set data.validation_file (or data.validation_fraction).")
        engine = inference_engine(model_dir, task=task.name, dtype_name=cfg.model.dtype, zero3=zero3,
                                  micro_batch_size=cfg.eval.micro_batch_size, world_size=info.world_size,
                                  base_model=cfg.base_model, check_memory=cfg.check_memory,
                                  quantize_base=cfg.get("quantize_base"))
        zero3 = engine.zero_optimization_partition_weights()
        check_labels(task, engine.module.config, data)
        metrics = evaluate(engine, task, data, data_cfg, task.collator(tokenizer, data_cfg), info=info,
                           micro_batch_size=cfg.eval.micro_batch_size)
        if info.is_main:
            print(f"{task.name} | {cfg.model.path} | split {cfg.eval.split} | {len(data.validation)} rows | "
                  f"world {info.world_size}{' (ZeRO-3)' if zero3 else ''}\n{format_table(metrics)}", flush=True)
            if cfg.eval.output:
                write_eval_results(Path(cfg.eval.output), {"task": task.name, "split": cfg.eval.split,
                                                           "model": str(cfg.model.path), **metrics},
                                   private=cfg.private_outputs)
                print(f"Wrote {cfg.eval.output}", file=sys.stderr)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    torch.set_grad_enabled(False)
    main()
