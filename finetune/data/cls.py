"""Sequence classification data: a text (or a pair joined by `pair_separator`) and a label.

Labels may be integer ids, string names (ids follow the sorted names of the training data), lists of ids or
names (multi-label: a multi-hot float vector), or floats (regression). The problem type and `num_labels` are
inferred from the training split unless the config sets them. No `<|endoftext|>` is appended: the classifier
reads the last non-padding token, and padding uses that same id. Texts longer than `max_seq_len` keep their
first `max_seq_len` tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from finetune.config import ConfigError, DataConfig
from finetune.data.errors import DataError, RowError
from finetune.data.pipeline import MASK, TOKENS, map_split
from finetune.data.sources import RawSplit, load_splits, require_columns
from finetune.data.task_data import TaskData
from finetune.tokenizer import GPTJTokenizer

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
_PROBLEM_TYPES = {"single_label": SINGLE, "multi_label": MULTI, "regression": REGRESSION, SINGLE: SINGLE,
                  MULTI: MULTI, REGRESSION: REGRESSION}  # fmt: skip


@dataclass(frozen=True)
class LabelSpec:
    problem_type: str  # HF name
    num_labels: int
    names: Optional[tuple[str, ...]] = None  # string labels in id order; None: the data holds ids (or floats)

    def id2label(self) -> Optional[dict[int, str]]:
        if self.problem_type == REGRESSION:
            return None
        names = self.names or ()
        return {i: names[i] if i < len(names) else f"LABEL_{i}" for i in range(self.num_labels)}


@dataclass(frozen=True)
class ClsParams:
    max_seq_len: int
    truncation: bool
    text_column: str
    text_pair_column: Optional[str]
    pair_separator: str
    label_column: str
    labels: LabelSpec


def infer_label_spec(train: RawSplit, cfg: DataConfig) -> LabelSpec:
    """Problem type, number of labels and label names, from the config or else the training labels."""
    column = cfg.label_column
    feature = train.dataset.features[column]
    arrow_type = train.dataset.data.schema.field(column).type
    is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    value_type = arrow_type.value_type if is_list else arrow_type
    inner_feature = getattr(feature, "feature", feature)
    # The label column of the rows in this split (`.data` would also hold rows carved off for validation).
    values = train.dataset.select_columns([column]).with_format("arrow")[:].column(column)
    if is_list:
        values = pc.list_flatten(values)

    problem_type = _PROBLEM_TYPES.get(cfg.problem_type) if cfg.problem_type is not None else None
    if cfg.problem_type is not None and problem_type is None:
        raise ConfigError(f"data.problem_type={cfg.problem_type!r}: use single_label, multi_label or regression.")
    inferred = MULTI if is_list else REGRESSION if pa.types.is_floating(value_type) else SINGLE
    problem_type = problem_type or inferred
    if (problem_type == MULTI) != is_list:
        shape = "lists" if is_list else "single values"
        raise ConfigError(
            f"data.problem_type={cfg.problem_type} but the labels in column {column!r} of {train.source} are "
            f"{shape}. Multi-label data needs a list of labels per row; the other types one label per row."
        )
    if problem_type == REGRESSION:
        if cfg.num_labels not in (None, 1):
            raise ConfigError(f"data.num_labels={cfg.num_labels}: regression predicts one value; set it to 1.")
        return LabelSpec(REGRESSION, 1)

    names: Optional[tuple[str, ...]] = None
    if isinstance(inner_feature, datasets.ClassLabel):
        names = tuple(inner_feature.names)
        num_found = len(names)
    elif pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        names = tuple(sorted(v for v in pc.unique(values).to_pylist() if v is not None))
        num_found = len(names)
    elif pa.types.is_integer(value_type) or pa.types.is_floating(value_type) or pa.types.is_boolean(value_type):
        largest = pc.max(pc.cast(values, pa.float64())).as_py() if len(values) else None
        num_found = int(largest) + 1 if largest is not None and largest >= 0 else 1
    else:
        raise DataError(
            f"The labels in column {column!r} of {train.source} have type {arrow_type}; use integer ids, string "
            "names, lists of either (multi-label) or floats (regression)."
        )
    if cfg.num_labels is not None and names is not None and cfg.num_labels < len(names):
        raise ConfigError(
            f"data.num_labels={cfg.num_labels} but the training data of {train.source} has {len(names)} label names "
            f"({', '.join(names)}). Raise data.num_labels or unset it to infer it."
        )
    num_labels = cfg.num_labels if cfg.num_labels is not None else num_found
    if problem_type == SINGLE and num_labels < 2 and cfg.num_labels is None:
        raise DataError(
            f"The training data of {train.source} has a single label class in column {column!r}; classification "
            "needs at least two. Check the label column, or set data.num_labels."
        )
    return LabelSpec(problem_type, num_labels, names)


def build_cls_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: ClsParams):
    """One map batch of raw rows -> `input_ids`, `attention_mask`, `labels`."""
    texts = []
    for position, index in enumerate(indices):
        text = _text(batch[params.text_column][position], index, params.text_column)
        if params.text_pair_column is not None:
            pair = _text(batch[params.text_pair_column][position], index, params.text_pair_column)
            text = f"{text}{params.pair_separator}{pair}"
        texts.append(text)
    input_ids = []
    for ids, index in zip(tokenizer.encode_batch(texts), indices):
        if len(ids) > params.max_seq_len and not params.truncation:
            raise RowError(
                index,
                params.text_column,
                f"the text has {len(ids)} tokens, more than data.max_seq_len={params.max_seq_len}, and "
                "data.truncation is false. Raise data.max_seq_len, set data.truncation=true, or shorten it.",
            )
        input_ids.append(ids[: params.max_seq_len])
    labels = [_label(value, index, params) for value, index in zip(batch[params.label_column], indices)]
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}


def _text(value: Any, index: int, field: str) -> str:
    if not isinstance(value, str):
        problem = "the value is missing (null)" if value is None else f"expected text, got {type(value).__name__}"
        raise RowError(index, field, f"{problem}. Every row needs a string here.")
    return value


def _label(value: Any, index: int, params: ClsParams):
    spec, field = params.labels, params.label_column
    if value is None:
        raise RowError(index, field, "the label is missing (null). Every row needs a label.")
    if spec.problem_type == REGRESSION:
        return float(value)
    if spec.problem_type == MULTI:
        multi_hot = [0.0] * spec.num_labels
        for item in value:
            multi_hot[_label_id(item, index, params)] = 1.0
        return multi_hot
    return _label_id(value, index, params)


def _label_id(value: Any, index: int, params: ClsParams) -> int:
    spec, field = params.labels, params.label_column
    if isinstance(value, str):
        if spec.names is None or value not in spec.names:
            known = ", ".join(spec.names) if spec.names else "none: the training labels are ids"
            raise RowError(index, field, f"label {value!r} is not a training label name (known: {known}).")
        return spec.names.index(value)
    if value is None or float(value) != int(value) or not 0 <= int(value) < spec.num_labels:
        raise RowError(
            index,
            field,
            f"label {value!r} is outside 0..{spec.num_labels - 1} (num_labels={spec.num_labels}). Fix the label, or "
            "raise data.num_labels (it is inferred as max label + 1 from the training data when unset).",
        )
    return int(value)


def process_cls_split(split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer, labels: LabelSpec) -> datasets.Dataset:
    columns = {cfg.text_column: "text_column", cfg.label_column: "label_column"}
    if cfg.text_pair_column is not None:
        columns[cfg.text_pair_column] = "text_pair_column"
    require_columns(split, columns)
    params = ClsParams(
        max_seq_len=cfg.max_seq_len,
        truncation=cfg.truncation,
        text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column,
        pair_separator=cfg.pair_separator,
        label_column=cfg.label_column,
        labels=labels,
    )
    label_type = {
        SINGLE: datasets.Value("int64"),
        MULTI: datasets.List(datasets.Value("float32")),
        REGRESSION: datasets.Value("float32"),
    }[labels.problem_type]
    features = datasets.Features({"input_ids": TOKENS, "attention_mask": MASK, "labels": label_type})
    return map_split(
        split, build_cls_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"cls {split.name}", features=features
    )


def load_cls(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """Classification features for the train and validation splits, with the label set of the training data."""
    train, validation = load_splits(cfg, task="cls")
    require_columns(train, {cfg.label_column: "label_column"})
    labels = infer_label_spec(train, cfg)
    return TaskData(
        train=process_cls_split(train, cfg, tokenizer, labels),
        validation=process_cls_split(validation, cfg, tokenizer, labels) if validation is not None else None,
        num_labels=labels.num_labels,
        id2label=labels.id2label(),
        problem_type=labels.problem_type,
    )
