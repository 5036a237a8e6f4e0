"""Typed configuration sections.

Hydra composes YAML from conf/; `parse_config` turns the composed DictConfig into these dataclasses in
one place (the runner). Library code receives the dataclasses (or plain arguments), never a DictConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the key and the fix, in one paragraph."""


@dataclass
class ModelConfig:
    # Preset name (`tiny`, `gptj-6b`) used when `path` is unset or holds no config.json.
    name: str = "tiny"
    # Local HF checkpoint directory, or a hub id (online only). None: random init from the preset.
    path: Optional[str] = None
    dtype: str = "fp32"  # bf16 | fp16 | fp32: the dtype weights are loaded in
    # Overrides of GPTJConfig fields for the preset (e.g. {n_layer: 4}).
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


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

    # clm
    text_column: str = "text"
    packing: bool = True
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
    id_column: str = "id"
    question_first: bool = True
    qa_separator: str = "\n"
    doc_stride: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0


@dataclass
class GenerationConfig:
    max_length: Optional[int] = None
    max_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
