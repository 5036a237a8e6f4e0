"""Extractive question answering data (SQuAD v1.1 / v2.0).

Input layouts: SQuAD's nested JSON (data -> paragraphs -> qas -> answers, `is_impossible` in v2.0) or flat rows
(id, title, context, question, answers {text: [...], answer_start: [...]}); both give the same features.

A feature is `question + qa_separator + context window (+ <|endoftext|>)`, context first when `question_first` is
false. By default there is no separator (`qa_separator: ""`) and the end token comes only with SQuAD v2
(`qa_end_token: auto`): on v1 data neither earned its token in accuracy. Contexts longer than the room left are
split into windows that overlap by `doc_stride` tokens. The
answer's first and last tokens are the labels when the whole answer lies inside the window.

No-answer position: the final `<|endoftext|>` of each feature, not position 0. In a causal model position 0
attends only to itself, so a null score read there could not depend on the question or the context; the last
token attends to the whole feature and is never a context token. Its index is `len(input_ids) - 1`, so SQuAD v2
requires the end token. Without it (SQuAD v1), a window that does not hold the answer is labelled at the token
just before the context (or, context first, the feature's last token): never a possible answer token.

Unanswerable questions (SQuAD v2): empty answers, or `is_impossible: true` (nested or flat layout). With
`data.version_2_with_negative: auto` (the default) their presence in the data turns SQuAD v2 on, with one notice:
they train the no-answer position, evaluation may answer "" and reports HasAns/NoAns. `true` forces v2; `false`
keeps SQuAD v1, where an unanswerable question is a bad row.

Bad rows (`check_qa_rows`): a question or context that is null, not a string or empty; answers that are
malformed or whose text is not at `answer_start` in the context; no answer under SQuAD v1; a question too long
to leave room for the context; and, in validation, a null or repeated id.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from finetune.config import ConfigError, DataConfig
from finetune.data.bad_rows import BAD_ANSWER, DUPLICATE_ID, NO_ANSWER, TOO_LONG, BadRow, text_problem
from finetune.data.errors import DataError
from finetune.data.pipeline import CODE_VERSION, MASK, TOKENS, drop_bad_rows, map_split
from finetune.data.sources import RawSplit, load_splits, read_files, require_columns
from finetune.data.task_data import TaskData
from finetune.model.tokenizer import GPTJTokenizer, trim_offsets

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
    end_token: bool  # <|endoftext|> at the end of each feature
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


def _clear_impossible_answers(batch: dict[str, list], *, column: str) -> dict[str, list]:
    answers = [(_no_answers_like(value) if impossible is True else value)
               for value, impossible in zip(batch[column], batch["is_impossible"])]  # fmt: skip
    return {column: answers}


def _no_answers_like(value: Any) -> Any:
    return {"text": [], "answer_start": []} if isinstance(value, dict) or value is None else []


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
    """Keep and rename the configured columns to id, (title,) context, question, answers; the answers of rows
    marked `is_impossible` (flat SQuAD v2 rows) become empty, as SQuAD's nested layout gives them."""
    wanted = {cfg.id_column: "id", cfg.context_column: "context", cfg.question_column: "question",
              cfg.answers_column: "answers"}  # fmt: skip
    require_columns(split, {cfg.id_column: "id_column", cfg.context_column: "context_column",
                            cfg.question_column: "question_column", cfg.answers_column: "answers_column"})  # fmt: skip
    if "title" in split.dataset.column_names and "title" not in wanted:
        wanted["title"] = "title"
    dataset = split.dataset
    if "is_impossible" in dataset.column_names:
        dataset = dataset.map(_clear_impossible_answers, batched=True, fn_kwargs={"column": cfg.answers_column},
                              desc=f"is_impossible {split.name}")
    dataset = dataset.select_columns(list(wanted))
    renames = {old: new for old, new in wanted.items() if old != new}
    return replace(split, dataset=dataset.rename_columns(renames) if renames else dataset)


# ---------------------------------------------------------------------------------------------- checks
def check_qa_rows(batch: dict[str, list], *, tokenizer: GPTJTokenizer, params: QaParams) -> list[Optional[BadRow]]:
    """The problem of each row of a batch of standardized examples, or None for a good row (module docstring)."""
    problems = []
    for position, (question, context) in enumerate(zip(batch["question"], batch["context"])):
        problem = text_problem(question, "question") or text_problem(context, "context")
        if problem is None and params.keep_eval_columns and batch["id"][position] is None:
            problem = text_problem(None, "id")
        problems.append(problem or _answers_problem(batch["answers"][position], context, params))
    good = [i for i, problem in enumerate(problems) if problem is None]
    separator = len(tokenizer.encode(params.qa_separator))
    question_lengths = [len(ids) for ids in tokenizer.encode_batch([batch["question"][i].strip() for i in good])]
    rooms = {i: params.max_seq_len - length - separator - params.end_token for i, length in zip(good, question_lengths)}
    # Windows must advance: with room <= doc_stride only a context that fits in one window works.
    tight = [i for i in good if 1 <= rooms[i] <= params.doc_stride]
    context_lengths = dict(zip(tight, map(len, tokenizer.encode_batch([batch["context"][i] for i in tight]))))
    for i, length in zip(good, question_lengths):
        if rooms[i] < 1 or context_lengths.get(i, 0) > rooms[i]:
            problems[i] = BadRow(
                "question",
                TOO_LONG,
                f"the question has {length} tokens, leaving {rooms[i]} of data.max_seq_len={params.max_seq_len} "
                f"for the context, which must exceed data.doc_stride={params.doc_stride}. Raise data.max_seq_len, "
                "lower data.doc_stride, or shorten the question.",
            )
    return problems


def _answer_lists(value: Any) -> Optional[tuple[list, list]]:
    """(texts, starts) of SQuAD's {"text": [...], "answer_start": [...]} or of a list of {"text", "answer_start"}."""
    if isinstance(value, dict):
        return list(value.get("text") or []), list(value.get("answer_start") or [])
    if isinstance(value, list) and all(isinstance(a, dict) for a in value):
        return [a.get("text") for a in value], [a.get("answer_start") for a in value]
    return None


def _answers_problem(value: Any, context: str, params: QaParams) -> Optional[BadRow]:
    lists = _answer_lists(value)
    if lists is None:
        return BadRow("answers", BAD_ANSWER, f"expected {{'text': [...], 'answer_start': [...]}}, got {value!r:.60}.")
    texts, starts = lists
    if len(texts) != len(starts):
        return BadRow("answers", BAD_ANSWER, f"{len(texts)} answer texts but {len(starts)} answer_start values.")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int) or start < 0:
            return BadRow("answers", BAD_ANSWER, f"answer {text!r} at {start!r}: need a non-empty text and an int "
                          "start >= 0.")  # fmt: skip
        found = context[start : start + len(text)]
        if found != text:
            return BadRow(
                "answers.answer_start",
                BAD_ANSWER,
                f"answer {text!r} should start at character {start}, but the context reads {found!r} there. "
                "answer_start must be the 0-based character offset of the answer text in the context.",
            )
    if not texts and not params.allow_no_answer:
        return BadRow(
            "answers",
            NO_ANSWER,
            "the question has no answer, and data.version_2_with_negative=false treats that as a bad row (SQuAD "
            "v1). Set data.version_2_with_negative=auto (the default) or true to train on unanswerable questions.",
        )
    return None


def _duplicate_ids(split: RawSplit) -> list[tuple[int, BadRow]]:
    """Every repeat of an id after its first row: evaluation matches predictions to examples by id."""
    seen: set = set()
    repeats = []
    for position, example_id in enumerate(split.dataset.select_columns(["id"]).to_dict()["id"]):
        if example_id in seen:
            detail = (f"id {example_id!r} is used twice; evaluation matches predictions to examples by id, so ids "
                      "must be unique.")
            repeats.append((position, BadRow("id", DUPLICATE_ID, detail)))
        seen.add(example_id)
    return repeats


# ---------------------------------------------------------------------------------------------- features
def build_qa_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: QaParams):
    """One map batch of checked examples -> one feature per context window."""
    out: dict[str, list] = {name: [] for name in (EVAL_FEATURES if params.keep_eval_columns else TRAIN_FEATURES)}
    questions = [question.strip() for question in batch["question"]]
    contexts = batch["context"]
    separator = tokenizer.encode(params.qa_separator)
    closing = [tokenizer.eos_token_id] if params.end_token else []
    question_ids = tokenizer.encode_batch(questions)
    context_encodings = tokenizer.encode_with_offsets(contexts)
    for position, context in enumerate(contexts):
        q_ids = question_ids[position]
        c_ids = context_encodings[position].ids
        offsets = trim_offsets(context, context_encodings[position].offsets)
        texts, starts = _answer_lists(batch["answers"][position])
        target = _token_span(offsets, starts[0], starts[0] + len(texts[0])) if texts else None
        room = params.max_seq_len - len(q_ids) - len(separator) - len(closing)
        for start, end in _windows(len(c_ids), room, params.doc_stride):
            window = c_ids[start:end]
            if params.question_first:
                ids, context_at = q_ids + separator + window + closing, len(q_ids) + len(separator)
            else:
                ids, context_at = window + separator + q_ids + closing, 0
            # A window without the answer labels a token outside the context: the end token, else the token
            # before the context (the question's last, or the separator's).
            null = len(ids) - 1 if closing or not params.question_first else context_at - 1
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


# ---------------------------------------------------------------------------------------------- loading
def qa_params(cfg: DataConfig, *, keep_eval_columns: bool) -> QaParams:
    if cfg.doc_stride < 0:
        raise ConfigError(f"data.doc_stride={cfg.doc_stride} must be >= 0 (the overlap of context windows in tokens).")
    if not isinstance(cfg.qa_end_token, bool):  # "auto" is resolved by load_qa first, with the version
        raise ConfigError(f"data.qa_end_token={cfg.qa_end_token!r} must be auto, true or false.")
    if cfg.version_2_with_negative is True and not cfg.qa_end_token:
        raise ConfigError(
            "data.qa_end_token=false leaves no no-answer position, which SQuAD v2 data (unanswerable questions, "
            "data.version_2_with_negative true or found by auto) needs: the null score is read at the final "
            "<|endoftext|>. Set data.qa_end_token=true, or data.version_2_with_negative=false to treat "
            "unanswerable questions as bad rows."
        )
    return QaParams(
        max_seq_len=cfg.max_seq_len,
        doc_stride=cfg.doc_stride,
        question_first=cfg.question_first,
        qa_separator=cfg.qa_separator,
        end_token=cfg.qa_end_token,
        allow_no_answer=cfg.version_2_with_negative is True,  # "auto" is resolved by load_qa first
        keep_eval_columns=keep_eval_columns,
    )


def process_qa_split(
    split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer, *, evaluation: bool
) -> tuple[datasets.Dataset, RawSplit, dict[str, int]]:
    """Standardized split -> features (cached), the split of good examples, and the skipped rows per reason."""
    params = qa_params(cfg, keep_eval_columns=evaluation)
    features = EVAL_FEATURES if evaluation else TRAIN_FEATURES
    extra = _duplicate_ids(split) if evaluation else ()
    split, skipped = drop_bad_rows(split, check_qa_rows, tokenizer=tokenizer, params=params, cfg=cfg, extra=extra)
    mapped = map_split(
        split, build_qa_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"qa {split.name}", features=features
    )
    return mapped, split, skipped


def count_unanswerable(split: RawSplit) -> int:
    """Rows of a standardized split whose answers are empty (no text): SQuAD v2's unanswerable questions."""
    column = split.dataset.select_columns(["answers"]).with_format("arrow")[:].column("answers")
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("text") >= 0 and pa.types.is_list(kind.field("text").type):
        lengths = pc.list_value_length(pc.struct_field(column, "text"))
    elif pa.types.is_list(kind):  # a list of {"text", "answer_start"} objects
        lengths = pc.list_value_length(column)
    else:  # anything else is a bad row of its own, found by the row checks
        return 0
    return int(pc.sum(pc.equal(pc.fill_null(lengths, 0), 0)).as_py() or 0)


def resolve_version_2(cfg: DataConfig, splits: Sequence[Optional[RawSplit]]) -> bool:
    """data.version_2_with_negative as a bool: `auto` is on when some question of the data has no answer."""
    setting = cfg.version_2_with_negative
    if setting is not True and setting is not False and setting != "auto":
        raise ConfigError(f"data.version_2_with_negative={setting!r} is invalid: use auto, true or false.")
    if setting != "auto":
        return setting
    counts = {split.name: (count_unanswerable(split), len(split.dataset)) for split in splits if split is not None}
    if not any(unanswerable for unanswerable, _ in counts.values()):
        return False
    if _is_rank_zero():
        found = " and ".join(f"{n} of {total} {name}" for name, (n, total) in counts.items())
        print(
            f"data.version_2_with_negative=auto: {found} questions have no answer, so this is SQuAD v2 data: "
            'unanswerable questions are trained, the model may answer "" and evaluation reports HasAns/NoAns '
            "metrics. Set data.version_2_with_negative=false to treat them as bad rows instead (SQuAD v1).",
            file=sys.stderr,
            flush=True,
        )
    return True


def resolve_end_token(cfg: DataConfig, version_2: bool) -> DataConfig:
    """data.qa_end_token `auto` as a bool: the end token with SQuAD v2 only (its one use is the no-answer position;
    on SQuAD v1 it cost a token per feature and no accuracy). Other values are left for `qa_params` to check."""
    return replace(cfg, qa_end_token=version_2) if cfg.qa_end_token == "auto" else cfg


def resolve_qa_format(cfg: DataConfig, splits: Sequence[Optional[RawSplit]]) -> DataConfig:
    """`auto` settings as bools: SQuAD v2 when the data has unanswerable questions, and the end token with it."""
    version_2 = resolve_version_2(cfg, splits)
    return resolve_end_token(replace(cfg, version_2_with_negative=version_2), version_2)


def _is_rank_zero() -> bool:
    from finetune.distributed import env_rank  # every rank loads the data (rank 0 first); one of them says so

    return env_rank() == 0


def load_qa(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """QA features; validation keeps example_id/offset_mapping, and `validation_examples` the raw examples."""
    train, validation = load_splits(cfg, task="qa", reader=read_qa_files)
    train = standardize_columns(train, cfg)
    validation = standardize_columns(validation, cfg) if validation is not None else None
    cfg = resolve_qa_format(cfg, [train, validation])
    train_features, _, skipped = process_qa_split(train, cfg, tokenizer, evaluation=False)
    if validation is None:
        return TaskData(train=train_features, validation=None, skipped_rows={"train": skipped},
                        version_2_with_negative=cfg.version_2_with_negative)
    validation_features, validation, validation_skipped = process_qa_split(validation, cfg, tokenizer, evaluation=True)
    return TaskData(
        train=train_features,
        validation=validation_features,
        validation_examples=validation.dataset,  # the good examples only: metrics score what was predicted
        skipped_rows={"train": skipped, "validation": validation_skipped},
        version_2_with_negative=cfg.version_2_with_negative,
    )

