"""Extractive question answering data (SQuAD v1.1 / v2.0).

Input layouts: SQuAD's nested JSON (data -> paragraphs -> qas -> answers, `is_impossible` in v2.0) or flat rows
(id, title, context, question, answers {text: [...], answer_start: [...]}); both give the same features.

A feature is `question + qa_separator + context window + <|endoftext|>` (context first when `question_first` is
false). Contexts longer than the room left are split into windows that overlap by `doc_stride` tokens. The
answer's first and last tokens are the labels when the whole answer lies inside the window.

No-answer position: the final `<|endoftext|>` of each feature, not position 0. In a causal model position 0
attends only to itself, so a null score read there could not depend on the question or the context; the last
token attends to the whole feature and is never a context token. Its index is `len(input_ids) - 1`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

import datasets
from datasets.fingerprint import Hasher

from finetune.config import ConfigError, DataConfig
from finetune.data.errors import DataError, RowError
from finetune.data.pipeline import CODE_VERSION, MASK, TOKENS, map_split
from finetune.data.sources import RawSplit, load_splits, read_files, require_columns
from finetune.data.task_data import TaskData
from finetune.tokenizer import GPTJTokenizer, trim_offsets

_ANSWERS = datasets.Features(
    {"text": datasets.List(datasets.Value("string")), "answer_start": datasets.List(datasets.Value("int64"))}
)
FLAT_FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
     "question": datasets.Value("string"), "answers": _ANSWERS}
)  # fmt: skip
_INT = datasets.Value("int32")
TRAIN_FEATURES = datasets.Features(
    {"input_ids": TOKENS, "attention_mask": MASK, "start_positions": _INT, "end_positions": _INT}
)
EVAL_FEATURES = datasets.Features(
    {**TRAIN_FEATURES, "example_id": datasets.Value("string"), "offset_mapping": datasets.List(datasets.List(_INT))}
)
_SQUAD_JSON_START = re.compile(r'^\s*\{\s*"(data|version)"\s*:')


@dataclass(frozen=True)
class QaParams:
    max_seq_len: int
    doc_stride: int
    question_first: bool
    qa_separator: str
    allow_no_answer: bool
    keep_eval_columns: bool  # validation: also example_id and offset_mapping for post-processing


# ---------------------------------------------------------------------------------------------- reading
def read_qa_files(files: Sequence[str], fmt: str, cfg: DataConfig) -> datasets.Dataset:
    """Like `read_files`, but files in SQuAD's JSON layout (a top-level "data" list) become one row per question."""
    squad_json = [fmt == "json" and _looks_like_squad_json(path) for path in files]
    if not any(squad_json):
        return read_files(files, fmt, cfg)
    if not all(squad_json):
        raise DataError(
            f"The QA files {list(files)} mix SQuAD's JSON layout (a top-level 'data' list) with flat rows; use one "
            "layout per split."
        )
    top_level = read_files(files, fmt, cfg, json_field="data")
    if "paragraphs" not in top_level.column_names:
        return top_level  # {"data": [flat rows]}
    return top_level.map(
        _flatten_squad,
        batched=True,
        remove_columns=top_level.column_names,
        features=FLAT_FEATURES,
        new_fingerprint=Hasher.hash([top_level._fingerprint, "flatten_squad", CODE_VERSION]),
        desc="flatten SQuAD",
    )


def _looks_like_squad_json(path: str) -> bool:
    if not path.lower().endswith(".json"):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        return bool(_SQUAD_JSON_START.match(handle.read(4096)))


def _flatten_squad(batch: dict[str, list]) -> dict[str, list]:
    rows: dict[str, list] = {name: [] for name in FLAT_FEATURES}
    for title, paragraphs in zip(batch.get("title", [None] * len(batch["paragraphs"])), batch["paragraphs"]):
        for paragraph in paragraphs or []:
            for qa in paragraph.get("qas") or []:
                answers = [] if qa.get("is_impossible") else (qa.get("answers") or [])
                rows["id"].append(qa.get("id"))
                rows["title"].append(title)
                rows["context"].append(paragraph.get("context"))
                rows["question"].append(qa.get("question"))
                rows["answers"].append(
                    {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]}
                )
    return rows


def standardize_columns(split: RawSplit, cfg: DataConfig) -> RawSplit:
    """Keep and rename the configured columns to id, (title,) context, question, answers."""
    wanted = {cfg.id_column: "id", cfg.context_column: "context", cfg.question_column: "question",
              cfg.answers_column: "answers"}  # fmt: skip
    require_columns(split, {cfg.id_column: "id_column", cfg.context_column: "context_column",
                            cfg.question_column: "question_column", cfg.answers_column: "answers_column"})  # fmt: skip
    if "title" in split.dataset.column_names and "title" not in wanted:
        wanted["title"] = "title"
    dataset = split.dataset.select_columns(list(wanted))
    renames = {old: new for old, new in wanted.items() if old != new}
    return replace(split, dataset=dataset.rename_columns(renames) if renames else dataset)


# ---------------------------------------------------------------------------------------------- features
def build_qa_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: QaParams):
    """One map batch of examples -> one feature per context window."""
    out: dict[str, list] = {name: [] for name in (EVAL_FEATURES if params.keep_eval_columns else TRAIN_FEATURES)}
    questions = [_text(q, i, "question").strip() for q, i in zip(batch["question"], indices)]
    contexts = [_text(c, i, "context") for c, i in zip(batch["context"], indices)]
    separator = tokenizer.encode(params.qa_separator)
    eos = tokenizer.eos_token_id
    question_ids = tokenizer.encode_batch(questions)
    context_encodings = tokenizer.encode_with_offsets(contexts)
    for position, index in enumerate(indices):
        context, q_ids = contexts[position], question_ids[position]
        c_ids = context_encodings[position].ids
        offsets = trim_offsets(context, context_encodings[position].offsets)
        answers = _checked_answers(batch["answers"][position], context, index, params)
        target = _token_span(offsets, *answers[0]) if answers else None

        room = params.max_seq_len - len(q_ids) - len(separator) - 1
        if room < 1 or (len(c_ids) > room and room <= params.doc_stride):
            raise RowError(
                index,
                "question",
                f"the question has {len(q_ids)} tokens, leaving {room} of data.max_seq_len={params.max_seq_len} for "
                f"the context, which must exceed data.doc_stride={params.doc_stride}. Raise data.max_seq_len, lower "
                "data.doc_stride, or shorten the question.",
            )
        for start, end in _windows(len(c_ids), room, params.doc_stride):
            window = c_ids[start:end]
            if params.question_first:
                ids, context_at = q_ids + separator + window + [eos], len(q_ids) + len(separator)
            else:
                ids, context_at = window + separator + q_ids + [eos], 0
            null = len(ids) - 1
            if target is not None and start <= target[0] and target[1] < end:
                start_position, end_position = context_at + target[0] - start, context_at + target[1] - start
            else:
                start_position = end_position = null
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["start_positions"].append(start_position)
            out["end_positions"].append(end_position)
            if params.keep_eval_columns:
                mapping: list[Any] = [None] * len(ids)
                mapping[context_at : context_at + len(window)] = [list(span) for span in offsets[start:end]]
                out["example_id"].append(batch["id"][position])
                out["offset_mapping"].append(mapping)
    return out


def _windows(length: int, room: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most `room` tokens covering `length`, consecutive ones overlapping by `stride`."""
    windows, start = [], 0
    while True:
        end = min(start + room, length)
        windows.append((start, end))
        if end >= length:
            return windows
        start = end - stride


def _token_span(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int]:
    """First and last context token overlapping characters [start_char, end_char).

    Written so that a character split over several byte-level tokens (which all carry that character's span)
    contributes its first token at the start and its last token at the end.
    """
    first = next(i for i, (_, end) in enumerate(offsets) if end > start_char)
    last = max(i for i, (start, _) in enumerate(offsets) if start < end_char)
    return first, last


def _checked_answers(value: Any, context: str, index: int, params: QaParams) -> list[tuple[int, int]]:
    """Character spans [start, end) of the gold answers, each checked against the context."""
    if isinstance(value, dict):
        texts, starts = value.get("text") or [], value.get("answer_start") or []
    elif isinstance(value, list):  # a list of {"text", "answer_start"} objects
        texts = [a.get("text") for a in value]
        starts = [a.get("answer_start") for a in value]
    else:
        raise RowError(index, "answers", "expected {'text': [...], 'answer_start': [...]}, got "
                       f"{type(value).__name__}.")  # fmt: skip
    if len(texts) != len(starts):
        raise RowError(index, "answers", f"{len(texts)} answer texts but {len(starts)} answer_start values.")
    spans = []
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not isinstance(start, int) or not text:
            raise RowError(index, "answers", f"answer {text!r} at {start!r}: need a non-empty text and an int start.")
        found = context[start : start + len(text)]
        if found != text:
            raise RowError(
                index,
                "answers.answer_start",
                f"answer {text!r} should start at character {start}, but the context reads {found!r} there. "
                "answer_start must be the 0-based character offset of the answer text in the context.",
            )
        spans.append((start, start + len(text)))
    if not spans and not params.allow_no_answer:
        raise RowError(
            index,
            "answers",
            "the question has no answer. Set data.version_2_with_negative=true to train on unanswerable questions.",
        )
    return spans


def _text(value: Any, index: int, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(index, field, "the value is missing (null)." if value is None else "expected text.")
    return value


# ---------------------------------------------------------------------------------------------- loading
def _check_unique_ids(split: RawSplit) -> None:
    ids = split.dataset.select_columns(["id"]).to_dict()["id"]
    seen: set = set()
    for position, example_id in enumerate(ids):
        if example_id in seen:
            raise DataError(
                f"Bad {split.name} example at {split.locate(position)}, field 'id': id {example_id!r} is used twice. "
                "Evaluation matches predictions to examples by id, so ids must be unique."
            )
        seen.add(example_id)


def qa_params(cfg: DataConfig, *, keep_eval_columns: bool) -> QaParams:
    if cfg.doc_stride < 0:
        raise ConfigError(f"data.doc_stride={cfg.doc_stride} must be >= 0 (the overlap of context windows in tokens).")
    return QaParams(
        max_seq_len=cfg.max_seq_len,
        doc_stride=cfg.doc_stride,
        question_first=cfg.question_first,
        qa_separator=cfg.qa_separator,
        allow_no_answer=cfg.version_2_with_negative,
        keep_eval_columns=keep_eval_columns,
    )


def process_qa_split(split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer, *, evaluation: bool):
    params = qa_params(cfg, keep_eval_columns=evaluation)
    features = EVAL_FEATURES if evaluation else TRAIN_FEATURES
    return map_split(
        split, build_qa_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"qa {split.name}", features=features
    )


def load_qa(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """QA features; validation keeps example_id/offset_mapping, and `validation_examples` the raw examples."""
    train, validation = load_splits(cfg, task="qa", reader=read_qa_files)
    train = standardize_columns(train, cfg)
    if validation is None:
        return TaskData(train=process_qa_split(train, cfg, tokenizer, evaluation=False), validation=None)
    validation = standardize_columns(validation, cfg)
    _check_unique_ids(validation)
    return TaskData(
        train=process_qa_split(train, cfg, tokenizer, evaluation=False),
        validation=process_qa_split(validation, cfg, tokenizer, evaluation=True),
        validation_examples=validation.dataset,
    )

