"""Sequence classification data: a text (or a pair joined by `pair_separator`) and a label.

Labels may be integer ids, string names (ids follow the sorted names of the training data), lists of ids or
names (multi-label: a multi-hot float vector), or floats (regression). The problem type and `num_labels` are
inferred from the training split unless the config sets them. No `<|endoftext|>` is appended: the classifier
reads the last non-padding token, and padding uses that same id. Texts longer than `max_seq_len` keep their
first `max_seq_len` tokens.

Bad rows (`check_cls_rows`): a text (or pair) that is null, not a string or empty; a label that is null, of the
wrong kind for the problem type, outside `num_labels`, or a name the training data does not have; and, with
`truncation: false`, a text over `max_seq_len` tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from finetune.config import ConfigError, DataConfig
from finetune.data.bad_rows import BAD_LABEL, MISSING, TOO_LONG, WRONG_TYPE, BadRow, text_problem
from finetune.data.errors import DataError
from finetune.data.pipeline import MASK, TOKENS, drop_bad_rows, map_split
from finetune.data.sources import RawSplit, load_splits, require_columns
from finetune.data.task_data import TaskData
from finetune.model.tokenizer import GPTJTokenizer

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
            f"The labels in column {column!r} of {train.source} have type {arrow_type} (a JSON type means rows "
            "mix kinds, e.g. numbers and strings); use one kind in every row: integer ids, string names, lists "
            "of either (multi-label) or floats (regression)."
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


def check_cls_rows(batch: dict[str, list], *, tokenizer: GPTJTokenizer, params: ClsParams) -> list[Optional[BadRow]]:
    """The problem of each row of a raw batch, or None for a good row (see the module docstring)."""
    problems = []
    for position, label in enumerate(batch[params.label_column]):
        problem = text_problem(batch[params.text_column][position], params.text_column)
        if problem is None and params.text_pair_column is not None:
            problem = text_problem(batch[params.text_pair_column][position], params.text_pair_column)
        problems.append(problem or _label_problem(label, params))
    if not params.truncation:
        good = [i for i, problem in enumerate(problems) if problem is None]
        texts = _texts(batch, params, rows=good)
        for i, ids in zip(good, tokenizer.encode_batch(texts)):
            if len(ids) > params.max_seq_len:
                problems[i] = BadRow(
                    params.text_column,
                    TOO_LONG,
                    f"the text has {len(ids)} tokens, more than data.max_seq_len={params.max_seq_len}, and "
                    "data.truncation is false. Raise data.max_seq_len, set data.truncation=true, or shorten it.",
                )
    return problems


def build_cls_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: ClsParams):
    """One map batch of checked rows -> `input_ids`, `attention_mask`, `labels`."""
    texts = _texts(batch, params, rows=range(len(batch[params.label_column])))
    input_ids = [ids[: params.max_seq_len] for ids in tokenizer.encode_batch(texts)]
    labels = [_label(value, params) for value in batch[params.label_column]]
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}


def _texts(batch: dict[str, list], params: ClsParams, *, rows) -> list[str]:
    if params.text_pair_column is None:
        return [batch[params.text_column][i] for i in rows]
    return [f"{batch[params.text_column][i]}{params.pair_separator}{batch[params.text_pair_column][i]}" for i in rows]


def _label_problem(value: Any, params: ClsParams) -> Optional[BadRow]:
    spec, field = params.labels, params.label_column
    if value is None:
        return BadRow(field, MISSING, "the label is missing (null); every row needs a label.")
    if spec.problem_type == REGRESSION:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return BadRow(field, WRONG_TYPE, f"expected a number (regression), got {type(value).__name__} {value!r}.")
        if not math.isfinite(value):
            return BadRow(field, BAD_LABEL, f"label {value!r} is not a finite number.")
        return None
    if spec.problem_type == MULTI:
        if not isinstance(value, list):
            return BadRow(field, WRONG_TYPE, f"expected a list of labels (multi-label), got {value!r}.")
        return next((p for p in (_label_id_problem(item, params) for item in value) if p is not None), None)
    return _label_id_problem(value, params)


def _label_id_problem(value: Any, params: ClsParams) -> Optional[BadRow]:
    spec, field = params.labels, params.label_column
    if isinstance(value, str):
        if spec.names is None or value not in spec.names:
            known = ", ".join(spec.names) if spec.names else "none: the training labels are ids"
            return BadRow(field, BAD_LABEL, f"label {value!r} is not a training label name (known: {known}).")
        return None
    if value is None:
        return BadRow(field, MISSING, "a label in the list is missing (null).")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return BadRow(field, WRONG_TYPE, f"expected a label id or name, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value) or value != int(value) or not 0 <= int(value) < spec.num_labels:
        return BadRow(
            field,
            BAD_LABEL,
            f"label {value!r} is outside 0..{spec.num_labels - 1} (num_labels={spec.num_labels}). Fix the label, or "
            "raise data.num_labels (it is inferred as max label + 1 from the training data when unset).",
        )
    return None


def _label(value: Any, params: ClsParams):
    spec = params.labels
    if spec.problem_type == REGRESSION:
        return float(value)
    if spec.problem_type == MULTI:
        multi_hot = [0.0] * spec.num_labels
        for item in value:
            multi_hot[_label_id(item, spec)] = 1.0
        return multi_hot
    return _label_id(value, spec)


def _label_id(value: Any, spec: LabelSpec) -> int:
    return spec.names.index(value) if isinstance(value, str) else int(value)


def process_cls_split(
    split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer, labels: LabelSpec
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Raw split -> model-ready features (cached) and the skipped rows per reason."""
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
    split, skipped = drop_bad_rows(split, check_cls_rows, tokenizer=tokenizer, params=params, cfg=cfg)
    mapped = map_split(
        split, build_cls_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"cls {split.name}", features=features
    )
    return mapped, skipped


def load_cls(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """Classification features for the train and validation splits, with the label set of the training data."""
    train, validation = load_splits(cfg, task="cls")
    require_columns(train, {cfg.label_column: "label_column"})
    labels = infer_label_spec(train, cfg)
    train_features, skipped = process_cls_split(train, cfg, tokenizer, labels)
    skipped_rows = {"train": skipped}
    validation_features = None
    if validation is not None:
        validation_features, skipped_rows["validation"] = process_cls_split(validation, cfg, tokenizer, labels)
    return TaskData(
        train=train_features,
        validation=validation_features,
        num_labels=labels.num_labels,
        id2label=labels.id2label(),
        problem_type=labels.problem_type,
        skipped_rows=skipped_rows,
    )
