"""Typed configuration sections.

Hydra composes YAML from conf/; `parse_config` turns the composed DictConfig into these dataclasses in
one place (the runner). Library code receives the dataclasses (or plain arguments), never a DictConfig.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key and the fix, in one paragraph."""


@dataclass
class ModelConfig:
    # Preset name (`tiny`, `gptj-6b`): the architecture when `path` is unset (random init).
    name: str = "tiny"
    # Local HF checkpoint directory, or a hub id (online only). None: random init from the preset.
    path: Optional[str] = None
    dtype: str = "fp32"  # bf16 | fp16 | fp32: the dtype weights are loaded in
    # Overrides of GPTJConfig fields for the preset (e.g. {n_layer: 4}).
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    # Causal LM: compute the training and evaluation loss chunk by chunk over tokens, so that the (tokens x vocab)
    # fp32 logits never exist whole (false: full logits, as transformers).
    chunked_loss: bool = True
    # Tokens per chunk of that loss; null: chosen from the vocabulary (512 for GPT-J's 50400, ~100 MB of logits).
    loss_chunk_tokens: Optional[int] = None
    # q/k/v_proj and fc_in as one matrix product per block (docs/performance.md, "Fused projections"): auto | true |
    # false. auto: fused for full fine-tuning, unfused with LoRA/QLoRA (peft adapts the separate layers).
    fused_projections: Any = "auto"

    def uses_fused_projections(self, lora: "LoraConfig") -> bool:
        """Whether the training model fuses its projections; ConfigError when `true` meets LoRA."""
        if self.fused_projections is True and lora.enabled:
            raise ConfigError(
                "model.fused_projections=true cannot be combined with LoRA: peft attaches its adapters to the separate "
                f"q_proj/k_proj/v_proj/fc_in layers (lora.target_modules={list(lora.target_modules)}), and QLoRA "
                "quantizes each of them apart, so a fused block would have nothing to adapt. Set "
                "model.fused_projections=auto (fused for full fine-tuning, unfused with LoRA) or false."
            )
        return self.fused_projections is True or (self.fused_projections == "auto" and not lora.enabled)


BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    # Files: a path, a list of paths, a directory or a glob. None: the bundled data of the task.
    train_file: Any = None
    validation_file: Any = None
    # Hub dataset (online only) instead of files.
    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None
    # File format when it cannot be told from the extension: json | csv | parquet | text.
    format: Optional[str] = None
    # Plain text: one document per `line` or per `file`.
    text_unit: str = "line"
    # Held-out split carved from train when there is no validation file (0 disables).
    validation_fraction: float = 0.1
    split_seed: int = 1234
    max_seq_len: int = 256
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    num_proc: int = 1
    # datasets cache for processed features; None: datasets' default (~/.cache/huggingface/datasets).
    cache_dir: Optional[str] = None
    # Rows that fail validation (null/mistyped values, bad labels or answers, unparseable lines): `error` stops
    # at load time naming file, row and reason; `skip` drops them and counts them in the metrics.
    on_bad_row: str = "error"
    # The example id column: QA matches predictions to examples by it; predict copies it to its output.
    id_column: str = "id"

    # How examples share rows (finetune/data/packing.py): auto | stream | documents | examples | none (true: auto,
    # false: none). auto: `stream` for plain text, `examples` (padding-free batches) for instruction, cls and qa.
    packing: Any = "auto"
    # Training: order each step's rows by length before cutting them into micro batches (less padding; the rows of
    # each step are unchanged). Evaluation: go through the validation set longest first (results in input order).
    group_by_length: bool = False
    eval_group_by_length: bool = True

    # clm (text_column and truncation: cls too)
    text_column: str = "text"
    # Instruction data: prompt/response columns (or a template over columns); loss only on the response.
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    prompt_template: Optional[str] = None
    truncation: bool = True

    # cls
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    pair_separator: str = "\n"
    num_labels: Optional[int] = None
    problem_type: Optional[str] = None  # single_label | multi_label | regression; None: inferred

    # qa
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    question_first: bool = True
    qa_separator: str = ""
    qa_end_token: Any = "auto"  # <|endoftext|> closes each feature, the no-answer position: auto = with SQuAD v2
    doc_stride: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    # Unanswerable questions (SQuAD v2: empty answers or is_impossible). auto: on when the data has some;
    # true: always (a question may get the answer ""); false: SQuAD v1, an unanswerable question is a bad row.
    version_2_with_negative: Any = "auto"
    null_score_diff_threshold: float = 0.0


# The DataConfig keys each task reads (conf/data/<task>.yaml holds exactly these, each with its default).
DATA_KEYS_COMMON = (
    "train_file", "validation_file", "dataset_name", "dataset_config", "format", "text_unit", "validation_fraction",
    "split_seed", "max_seq_len", "max_train_samples", "max_eval_samples", "num_proc", "cache_dir", "on_bad_row",
    "id_column", "packing", "group_by_length", "eval_group_by_length",
)
DATA_KEYS_BY_TASK: dict[str, tuple[str, ...]] = {
    "clm": DATA_KEYS_COMMON + ("text_column", "prompt_column", "response_column", "prompt_template",
                               "truncation"),
    "cls": DATA_KEYS_COMMON + ("text_column", "text_pair_column", "label_column", "pair_separator", "num_labels",
                               "problem_type", "truncation"),
    "qa": DATA_KEYS_COMMON + ("question_column", "context_column", "answers_column", "question_first", "qa_separator",
                              "qa_end_token", "doc_stride", "max_answer_length", "n_best", "version_2_with_negative",
                              "null_score_diff_threshold"),
}  # fmt: skip


@dataclass
class GenerationConfig:
    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def to_typed(schema: type, node: Any, *, section: str):
    """Turn one composed config section (DictConfig or dict) into the dataclass `schema`.

    Unknown keys and wrongly typed values become a ConfigError naming `section.key`.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    # A `???` (mandatory) value would be silently dropped by the merge below and the default used instead.
    missing = sorted(OmegaConf.missing_keys(node)) if OmegaConf.is_config(node) else []
    if missing:  # keys come relative to the root config when `node` is a section of it
        keys = [key if key.startswith(f"{section}.") else f"{section}.{key}" for key in missing]
        raise ConfigError(
            f"{', '.join(keys)} must be set (the config has ??? there); pass {keys[0]}=... on the command line."
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = getattr(err, "key", None) or str(err)
        raise ConfigError(
            f"Unknown config key '{section}.{key}'. Check the spelling; the valid keys of '{section}' are: "
            f"{', '.join(f.name for f in dataclasses.fields(schema))}."
        ) from None
    except ValidationError as err:
        key = getattr(err, "key", None) or "?"
        raise ConfigError(f"Config value '{section}.{key}' is invalid: {str(err.msg).splitlines()[0]}.") from None


# ------------------------------------------------------------------------------------------------ training
PRECISIONS = ("bf16", "fp16", "fp32")
TASKS = ("clm", "cls", "qa")
SCHEDULERS = ("cosine", "linear", "constant")
LOGGER_BACKENDS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
LOSS_NORMALIZATIONS = ("global_batch", "micro_batch")
QUANTIZED_BASES = (None, "nf4")  # lora.quantize_base


@dataclass
class TaskConfig:
    name: str = "qa"  # clm | cls | qa


@dataclass
class TrainerConfig:
    # Optimizer steps of the whole run; null: `epochs` passes over the training data.
    max_steps: Optional[int] = 300
    epochs: float = 1.0
    # Stop after this many optimizer steps (checkpoint saved, LR schedule unchanged), to continue later.
    stop_after_steps: Optional[int] = None
    micro_batch_size: int = 8  # per rank
    eval_micro_batch_size: Optional[int] = None  # None: micro_batch_size
    grad_accum_steps: int = 1
    precision: str = "fp32"  # bf16 | fp16 | fp32: the training compute dtype (DeepSpeed's bf16/fp16 sections)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    log_every: int = 10
    eval_every: int = 0  # optimizer steps; 0: only at the end
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 2  # checkpoints kept in run_dir/checkpoints
    eval_at_end: bool = True
    seed: int = 42
    num_workers: int = 0  # DataLoader workers per rank
    # How long a collective waits for a rank that neither answers nor dies (hung, unreachable) before the job
    # fails; a rank that dies is noticed at once. Must exceed the longest wait at a barrier (a checkpoint save).
    collective_timeout_s: float = 600.0
    # bf16/fp32: each step with a non-finite loss or gradients is skipped (no update); this many in a row stop
    # the run. fp16 keeps DeepSpeed's loss scaling, which skips and counts overflowing steps by design.
    max_nonfinite_steps: int = 3
    # global_batch: each step's loss is the mean over every target of the global batch (tokens for clm, examples
    # for cls/qa), the same for any split into ranks, micro batches and accumulation. micro_batch: the mean of each
    # micro batch's own mean (layout-dependent; what DeepSpeed does by itself), to reproduce older runs.
    loss_normalization: str = "global_batch"
    # Shared nodes: final/ and eval_results.json readable by their owner only (files 0600, directories 0700).
    private_outputs: bool = False
    # A run dir must be the user's and writable by the user alone: a relaunch loads what it finds there. true: go
    # on with a warning when it is not (docs/security.md).
    allow_shared_run_dir: bool = False
    # torch.compile the transformer blocks (inductor; CPU needs g++, GPU Triton). The first step pays the compile
    # time (logged as compile_s); later steps of any batch length reuse the graphs. docs/performance.md.
    compile: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # not applied to biases and LayerNorm weights


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear (decay to 0) | constant (after warmup)
    warmup_steps: Optional[int] = None  # None: warmup_ratio * total steps
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine: final lr = min_lr_ratio * lr


@dataclass
class DeepSpeedSection:
    # DeepSpeed JSON: a path (absolute, or relative to the working directory or to the project root), or "auto":
    # the fastest shipped config the memory planner says fits the launched cluster (deepspeed=auto).
    config_file: str = "ds_configs/zero3.json"
    # Where ZeRO-3 NVMe offload swaps parameters and optimizer states (a fast local disk); required by zero3_nvme.
    nvme_path: Optional[str] = None
    # Refuse, before anything is built, a config whose memory estimate cannot fit the cluster; false skips the check.
    check_memory: bool = True
    # Memory per GPU / CPU RAM per node (GiB) for the planner instead of the detected figures; null: detect.
    device_memory_gb: Optional[float] = None
    cpu_memory_gb: Optional[float] = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Train the task head in full (peft's modules_to_save). null: yes for cls/qa (a fresh head has nothing to
    # adapt), no for clm (GPT-J's lm_head is 206M parameters and already fits the vocabulary).
    train_head: Optional[bool] = None
    # Also write merged full weights into final/ (next to the adapter), loadable without peft.
    merge_into_final: bool = False
    # QLoRA (lora=qlora): nf4 stores the frozen base's block linears in 4 bits (bitsandbytes NF4, double
    # quantization), computing in trainer.precision; null keeps the base in model.dtype.
    quantize_base: Optional[str] = None

    @property
    def quantized(self) -> bool:
        return self.quantize_base is not None

    def trains_head(self, task: str) -> bool:
        return self.train_head if self.train_head is not None else task != "clm"


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb (metrics.jsonl is written either way)
    mode: str = "offline"  # W&B: online | offline | disabled
    project: str = "gptj-finetune"
    entity: Optional[str] = None
    name: Optional[str] = None  # W&B run name; None: the run dir's name
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None


SWEEP_DIRECTIONS = ("maximize", "minimize")


@dataclass
class SweepConfig:
    """What a sweep optimises (conf/train.yaml `sweep`): launch/train.py returns it, the Optuna sweeper and the
    sweep summary read it."""

    objective: Optional[str] = None  # an eval metric; None: the task's (qa f1, cls accuracy, clm perplexity)
    direction: Optional[str] = None  # maximize | minimize; None: the metric's own (loss, perplexity, mse: minimize)


def parse_sweep_config(cfg: Any) -> SweepConfig:
    sweep = to_typed(SweepConfig, cfg.get("sweep") if cfg is not None else None, section="sweep")
    _require(sweep.direction is None or sweep.direction in SWEEP_DIRECTIONS, "sweep.direction", sweep.direction,
             f"use one of {', '.join(SWEEP_DIRECTIONS)}, or null for the metric's own direction.")
    _require(sweep.objective is None or bool(sweep.objective.strip()), "sweep.objective", sweep.objective,
             "name an eval metric (sweep.objective=f1), or null for the task's.")
    return sweep


@dataclass
class RunConfig:
    """Everything a training run needs, typed and cross-checked."""

    task: str
    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    optim: OptimConfig
    scheduler: SchedulerConfig
    deepspeed: DeepSpeedSection
    lora: LoraConfig
    logger: LoggerConfig
    # The composed config as plain containers (for W&B and logs).
    raw: dict[str, Any] = field(default_factory=dict)


def parse_config(cfg: Any) -> RunConfig:
    """The composed Hydra config -> RunConfig, with every check that needs no model, data or world size.

    The remaining checks happen where their inputs exist: DeepSpeed JSON vs config (engine.build_ds_config),
    LoRA targets vs model (lora.apply_lora), sequence length vs model positions (runner).
    """
    from omegaconf import OmegaConf

    task = to_typed(TaskConfig, cfg.get("task"), section="task").name
    run = RunConfig(
        task=task,
        model=to_typed(ModelConfig, cfg.get("model"), section="model"),
        data=to_typed(DataConfig, cfg.get("data"), section="data"),
        trainer=to_typed(TrainerConfig, cfg.get("trainer"), section="trainer"),
        optim=to_typed(OptimConfig, cfg.get("optim"), section="optim"),
        scheduler=to_typed(SchedulerConfig, cfg.get("scheduler"), section="scheduler"),
        deepspeed=to_typed(DeepSpeedSection, cfg.get("deepspeed"), section="deepspeed"),
        lora=to_typed(LoraConfig, cfg.get("lora"), section="lora"),
        logger=to_typed(LoggerConfig, cfg.get("logger"), section="logger"),
        raw=OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg),
    )
    validate(run)
    return run


# Sections whose keys do nothing while a switch is off: (section, the switch's key, is it on?, how to turn it on).
_SWITCHED_SECTIONS = (
    ("lora", "enabled", lambda run: run.lora.enabled, "LoRA is off (lora=none): add lora=lora to train adapters"),
    ("logger", "backend", lambda run: run.logger.backend != "none",
     "W&B logging is off (logger=none): add logger=wandb to log to Weights & Biases"),
)


def check_overrides_apply(run: RunConfig, overrides: Sequence[str]) -> None:
    """Refuse command-line settings that would be silently ignored: a lora.* key while LoRA is off, a logger.* key
    while W&B is off. `overrides` are Hydra's task overrides as written (`lora.r=16`)."""
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        for section, switch, is_on, fix in _SWITCHED_SECTIONS:
            if key.startswith(f"{section}.") and key != f"{section}.{switch}" and not is_on(run):
                raise ConfigError(f"{override} has no effect: {fix}, or drop {key}.")


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def validate(run: RunConfig) -> None:
    """Cross-field checks of a RunConfig; the first problem raises a ConfigError naming the key and the fix."""
    t, o, s, lg = run.trainer, run.optim, run.scheduler, run.logger
    _require(run.task in TASKS, "task", run.task, f"choose one of {', '.join(TASKS)} (task=qa).")
    for key, value in (("model.dtype", run.model.dtype), ("trainer.precision", t.precision)):
        _require(value in PRECISIONS, key, value, f"use one of {', '.join(PRECISIONS)}.")
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", t.max_steps,
             "set a positive number of optimizer steps, or null to train for trainer.epochs.")
    _require(t.max_steps is not None or t.epochs > 0, "trainer.epochs", t.epochs,
             "with trainer.max_steps=null the run length comes from epochs; set a positive value.")
    _require(t.stop_after_steps is None or t.stop_after_steps >= 1, "trainer.stop_after_steps", t.stop_after_steps,
             "set a positive step count (or null to run to the end).")
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size,
             "set the per-rank micro batch to 1 or more (raise trainer.grad_accum_steps for a larger global batch).")
    _require(t.eval_micro_batch_size is None or t.eval_micro_batch_size >= 1, "trainer.eval_micro_batch_size",
             t.eval_micro_batch_size, "set at least 1, or null to use trainer.micro_batch_size.")
    _require(t.grad_accum_steps >= 1, "trainer.grad_accum_steps", t.grad_accum_steps, "set at least 1.")
    _require(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "set a max gradient norm >= 0 (0 disables).")
    _require(t.log_every >= 1, "trainer.log_every", t.log_every, "log at least every N >= 1 steps.")
    for key in ("eval_every", "save_every"):
        value = getattr(t, key)
        _require(value >= 0, f"trainer.{key}", value, "use a step interval >= 0 (0: only at the end of training).")
    _require(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "keep at least the newest checkpoint (>= 1).")
    _require(t.num_workers >= 0, "trainer.num_workers", t.num_workers, "use 0 or more DataLoader workers.")
    _require(t.collective_timeout_s > 0, "trainer.collective_timeout_s", t.collective_timeout_s,
             "use a positive number of seconds, more than the longest checkpoint save (default 600).")
    _require(t.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", t.max_nonfinite_steps,
             "use 1 or more (1: stop at the first non-finite step).")
    _require(t.loss_normalization in LOSS_NORMALIZATIONS, "trainer.loss_normalization", t.loss_normalization,
             f"use one of {', '.join(LOSS_NORMALIZATIONS)} (global_batch: the same loss for every parallel layout).")
    _require(o.name == "adamw", "optim.name", o.name, "only adamw is supported (DeepSpeed's AdamW / CPU Adam).")
    _require(o.lr > 0, "optim.lr", o.lr, "the learning rate must be positive (e.g. 1e-5 for GPT-J 6B).")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "give two values in [0, 1), e.g. [0.9, 0.95].")
    _require(o.eps > 0, "optim.eps", o.eps, "use a small positive value such as 1e-8.")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "use 0 or a positive value.")
    _require(s.name in SCHEDULERS, "scheduler.name", s.name, f"use one of {', '.join(SCHEDULERS)} (scheduler=cosine).")
    _require(s.warmup_steps is None or s.warmup_steps >= 0, "scheduler.warmup_steps", s.warmup_steps,
             "use 0 or more steps, or null for warmup_ratio.")
    _require(0 <= s.warmup_ratio < 1, "scheduler.warmup_ratio", s.warmup_ratio, "use a fraction in [0, 1).")
    _require(0 <= s.min_lr_ratio <= 1, "scheduler.min_lr_ratio", s.min_lr_ratio, "use a fraction in [0, 1].")
    if run.lora.enabled:
        _require(run.lora.r >= 1, "lora.r", run.lora.r, "the LoRA rank must be at least 1 (8 or 16 are common).")
        _require(run.lora.alpha > 0, "lora.alpha", run.lora.alpha, "use a positive scale, commonly 2 * lora.r.")
        _require(0 <= run.lora.dropout < 1, "lora.dropout", run.lora.dropout, "use a probability in [0, 1).")
        _require(run.lora.quantize_base in QUANTIZED_BASES, "lora.quantize_base", run.lora.quantize_base,
                 "use nf4 (QLoRA's 4-bit NormalFloat: lora=qlora) or null for a 16-bit base (lora=lora).")
    _require(lg.backend in LOGGER_BACKENDS, "logger.backend", lg.backend, "use logger=wandb or logger=none.")
    _require(lg.mode in WANDB_MODES, "logger.mode", lg.mode, f"use one of {', '.join(WANDB_MODES)}.")
    _require(run.data.max_seq_len >= 8, "data.max_seq_len", run.data.max_seq_len, "use at least 8 tokens.")
    v2 = run.data.version_2_with_negative
    _require(isinstance(v2, bool) or v2 == "auto", "data.version_2_with_negative",
             run.data.version_2_with_negative, "use auto (detect unanswerable questions), true or false.")

    from finetune.data.packing import packing_mode

    packing_mode(run.data, run.task)  # raises a ConfigError naming data.packing
    fused = run.model.fused_projections
    _require(isinstance(fused, bool) or fused == "auto", "model.fused_projections", fused,
             "use auto (fused for full fine-tuning, unfused with LoRA), true or false.")
    run.model.uses_fused_projections(run.lora)  # raises a ConfigError for true with LoRA
    chunk = run.model.loss_chunk_tokens
    _require(chunk is None or (not isinstance(chunk, bool) and chunk > 0), "model.loss_chunk_tokens", chunk,
             "set the tokens per chunk of the causal-LM loss to a positive number (e.g. 512), or null to choose it "
             "from the vocabulary size; model.chunked_loss=false turns chunking off.")
    _require(run.data.on_bad_row in BAD_ROW_POLICIES, "data.on_bad_row", run.data.on_bad_row,
             f"use one of {', '.join(BAD_ROW_POLICIES)} (error stops at the first load; skip drops and counts).")
    for key in ("device_memory_gb", "cpu_memory_gb"):
        value = getattr(run.deepspeed, key)
        _require(value is None or value > 0, f"deepspeed.{key}", value,
                 "give the memory in GiB (> 0), or null to detect it.")
