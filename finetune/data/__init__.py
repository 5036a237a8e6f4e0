"""Task data: raw files or hub datasets -> cached, model-ready `datasets.Dataset`s.

`load_task_data(task, cfg, tokenizer)` is the entry point; `DataCollator` batches its features and
`postprocess_qa_predictions` turns QA logits back into answer text.
"""
from __future__ import annotations

import datasets

from finetune.config import ConfigError, DataConfig
from finetune.data.clm import load_clm
from finetune.data.cls import load_cls
from finetune.data.collate import DataCollator
from finetune.data.errors import DataError
from finetune.data.qa import load_qa
from finetune.data.qa_postprocess import postprocess_qa_predictions, qa_references
from finetune.data.task_data import MODEL_INPUT_COLUMNS, TaskData
from finetune.model.tokenizer import GPTJTokenizer

_LOADERS = {"clm": load_clm, "cls": load_cls, "qa": load_qa}


def load_task_data(task: str, cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """Train and validation features for `task` ("clm", "cls" or "qa"), from cfg's files, hub dataset or bundled data.

    Deterministic and cached: a second call with the same data, config and tokenizer (on any rank) loads the
    features written by the first. Bad data raises `DataError` naming the file, row and field.
    """
    if task not in _LOADERS:
        raise ConfigError(f"Unknown task {task!r}; use one of {', '.join(_LOADERS)}.")
    return _LOADERS[task](cfg, tokenizer)


def model_inputs(dataset: datasets.Dataset, task: str) -> datasets.Dataset:
    """`dataset` without the columns the model does not take (QA validation's example_id and offset_mapping)."""
    return dataset.select_columns([c for c in MODEL_INPUT_COLUMNS[task] if c in dataset.column_names])


__all__ = [
    "DataCollator",
    "DataError",
    "MODEL_INPUT_COLUMNS",
    "TaskData",
    "load_task_data",
    "model_inputs",
    "postprocess_qa_predictions",
    "qa_references",
]
