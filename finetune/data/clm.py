"""Causal language modelling data: plain text (packed or one example per document) and prompt/response data.

Plain text: each document is tokenized and followed by `<|endoftext|>`; labels equal input_ids (the model shifts
them). `data.packing` (finetune.data.packing) decides the rows:
- `stream` (plain text's default): the token stream of each group of `MAP_BATCH_SIZE` documents is cut into
  blocks of `max_seq_len`; the group's last, shorter block is KEPT (the collator pads it), so no token is ever
  dropped. Documents are not masked from each other inside a block; the `<|endoftext|>` between them marks the
  boundary.
- `documents`: the same blocks with a `seq_lens` column, the lengths of the document pieces in each block; the
  collator restarts positions and attention at each piece. With `truncation: false`, blocks take whole
  documents only and a document over `max_seq_len` is a bad row.
- `examples` (instruction data's default) and `none`: one example per row, its first `max_seq_len` tokens.
Empty documents (blank lines) are skipped.

Prompt/response data: the prompt (a column, or `prompt_template` filled from columns) and the response are
tokenized separately and joined as-is (put any separator in the template), then `<|endoftext|>`; labels are -100
on prompt tokens, so the loss covers the response and its end-of-text only. Blocks or truncated examples left
with no response token are dropped.

Bad rows (`check_clm_rows`): a text, prompt or response that is null or not a string, an empty response, a
template that cannot be filled from the row, and, with `truncation: false` and any packing but `stream`, an
example over `max_seq_len` tokens. Empty plain-text documents are not bad: they are skipped silently.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

import datasets

from finetune.config import ConfigError, DataConfig
from finetune.data.bad_rows import TOO_LONG, WRONG_TYPE, BadRow, text_problem
from finetune.data.errors import DataError
from finetune.data.packing import cut_blocks, fit_whole, packing_mode
from finetune.data.pipeline import MASK, TOKENS, drop_bad_rows, map_split
from finetune.data.sources import RawSplit, load_splits, require_columns
from finetune.data.task_data import TaskData
from finetune.model.tokenizer import GPTJTokenizer

IGNORE_INDEX = -100
FEATURES = datasets.Features({"input_ids": TOKENS, "attention_mask": MASK, "labels": TOKENS})
DOCUMENT_FEATURES = datasets.Features({**FEATURES, "seq_lens": TOKENS})


@dataclass(frozen=True)
class ClmParams:
    max_seq_len: int
    packing: str  # stream | documents | examples | none (finetune.data.packing)
    truncation: bool
    text_column: str
    prompt_column: Optional[str]
    response_column: Optional[str]
    prompt_template: Optional[str]

    @property
    def instruction(self) -> bool:
        return self.response_column is not None


def clm_params(cfg: DataConfig, *, text_format: bool = False) -> ClmParams:
    """Task parameters from the config (plain-text files always use datasets' column 'text')."""
    instruction = cfg.prompt_column is not None or cfg.prompt_template is not None or cfg.response_column is not None
    if instruction and cfg.response_column is None:
        raise ConfigError("data.prompt_column/prompt_template is set but data.response_column is not: set it too.")
    if instruction and (cfg.prompt_column is None) == (cfg.prompt_template is None):
        raise ConfigError("Instruction data needs exactly one of data.prompt_column or data.prompt_template.")
    if cfg.max_seq_len < 2:
        raise ConfigError(f"data.max_seq_len={cfg.max_seq_len} is too small; use at least 2 (GPT-J allows 2048).")
    return ClmParams(
        max_seq_len=cfg.max_seq_len,
        packing=packing_mode(cfg, "clm"),
        truncation=cfg.truncation,
        text_column="text" if text_format else cfg.text_column,
        prompt_column=cfg.prompt_column,
        response_column=cfg.response_column,
        prompt_template=cfg.prompt_template,
    )


def required_columns(params: ClmParams) -> dict[str, str]:
    """Columns the data must have -> the config key naming each."""
    if not params.instruction:
        return {params.text_column: "text_column"}
    columns = {params.response_column: "response_column"}
    if params.prompt_column is not None:
        columns[params.prompt_column] = "prompt_column"
    else:
        for _, field, _, _ in string.Formatter().parse(params.prompt_template):
            if field:
                columns[field] = "prompt_template"
    return columns


def check_clm_rows(batch: dict[str, list], *, tokenizer: GPTJTokenizer, params: ClmParams) -> list[Optional[BadRow]]:
    """The problem of each row of a raw batch, or None for a good row (see the module docstring)."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    problems = [_row_problem(row, params) for row in rows]
    if params.packing == "stream" or params.truncation:  # the stream is cut anywhere by design
        return problems
    good = [i for i, problem in enumerate(problems) if problem is None]
    field = params.response_column if params.instruction else params.text_column
    for i, length in zip(good, _sequence_lengths([rows[i] for i in good], tokenizer, params)):
        if length > params.max_seq_len:
            packed = f" (data.packing={params.packing} keeps every example whole)" if params.packing != "none" else ""
            problems[i] = BadRow(
                field,
                TOO_LONG,
                f"the example has {length} tokens, more than data.max_seq_len={params.max_seq_len}, and "
                f"data.truncation is false{packed}. Raise data.max_seq_len, set data.truncation=true, or shorten it.",
            )
    return problems


def _row_problem(row: dict, params: ClmParams) -> Optional[BadRow]:
    if not params.instruction:
        return text_problem(row[params.text_column], params.text_column, allow_empty=True)
    if params.prompt_column is not None:
        problem = text_problem(row[params.prompt_column], params.prompt_column, allow_empty=True)
        if problem is not None:
            return problem
    else:
        for field in required_columns(params):
            if field != params.response_column and row[field] is None:
                return text_problem(None, field)
        try:
            params.prompt_template.format(**row)
        except (KeyError, IndexError, TypeError, ValueError) as error:
            detail = f"data.prompt_template cannot be filled from the row ({error})."
            return BadRow("prompt_template", WRONG_TYPE, detail)
    return text_problem(row[params.response_column], params.response_column)


def _sequence_lengths(rows: list[dict], tokenizer: GPTJTokenizer, params: ClmParams) -> list[int]:
    """Tokens of each row's example, <|endoftext|> included (0 for an empty document, which is skipped)."""
    if not params.instruction:
        texts = [row[params.text_column] for row in rows]
        return [len(ids) + 1 if text.strip() else 0 for ids, text in zip(tokenizer.encode_batch(texts), texts)]
    prompts = tokenizer.encode_batch([_prompt(row, params) for row in rows])
    responses = tokenizer.encode_batch([row[params.response_column] for row in rows])
    return [len(prompt) + len(response) + 1 for prompt, response in zip(prompts, responses)]


def _prompt(row: dict, params: ClmParams) -> str:
    if params.prompt_column is not None:
        return row[params.prompt_column]
    return params.prompt_template.format(**row)


def build_clm_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: ClmParams):
    """One map batch of checked rows -> `input_ids`, `attention_mask`, `labels` (packed blocks or one per document)."""
    sequences = _instruction_sequences(batch, tokenizer, params) if params.instruction else (
        _text_sequences(batch, tokenizer, params)
    )
    if params.packing in ("stream", "documents"):
        pack = fit_whole if (params.packing == "documents" and not params.truncation) else cut_blocks
        blocks = pack(sequences, params.max_seq_len)
    else:
        blocks = [(ids[: params.max_seq_len], labels[: params.max_seq_len], []) for ids, labels in sequences]
    # A block with no response token adds nothing to the loss (and a batch of them would divide by zero).
    blocks = [block for block in blocks if any(label != IGNORE_INDEX for label in block[1])]
    out = {
        "input_ids": [ids for ids, _, _ in blocks],
        "attention_mask": [[1] * len(ids) for ids, _, _ in blocks],
        "labels": [labels for _, labels, _ in blocks],
    }
    if params.packing == "documents":
        out["seq_lens"] = [pieces for _, _, pieces in blocks]
    return out


def _text_sequences(batch, tokenizer: GPTJTokenizer, params: ClmParams) -> list[tuple[list[int], list[int]]]:
    kept = [text for text in batch[params.text_column] if text.strip()]
    eos = tokenizer.eos_token_id
    return [(ids + [eos], ids + [eos]) for ids in tokenizer.encode_batch(kept)]


def _instruction_sequences(batch, tokenizer: GPTJTokenizer, params: ClmParams) -> list[tuple[list[int], list[int]]]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    prompts = tokenizer.encode_batch([_prompt(row, params) for row in rows])
    responses = tokenizer.encode_batch([row[params.response_column] for row in rows])
    eos = tokenizer.eos_token_id
    return [
        (prompt_ids + response_ids + [eos], [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos])
        for prompt_ids, response_ids in zip(prompts, responses)
    ]


def process_clm_split(
    split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Raw split -> model-ready features (cached; see finetune.data.pipeline) and the skipped rows per reason."""
    params = clm_params(cfg, text_format=split.fmt == "text")
    require_columns(split, required_columns(params))
    split, skipped = drop_bad_rows(split, check_clm_rows, tokenizer=tokenizer, params=params, cfg=cfg)
    features = map_split(
        split, build_clm_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"clm {split.name}",
        features=DOCUMENT_FEATURES if params.packing == "documents" else FEATURES,
    )
    if len(features) == 0:
        raise DataError(
            f"The {split.name} data ({split.source}) gave no training examples: every document is empty or has no "
            "response token within data.max_seq_len."
        )
    return features, skipped


def load_clm(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """Causal LM features for the train and validation splits of the config."""
    train, validation = load_splits(cfg, task="clm")
    train_features, skipped = process_clm_split(train, cfg, tokenizer)
    skipped_rows = {"train": skipped}
    validation_features = None
    if validation is not None:
        validation_features, skipped_rows["validation"] = process_clm_split(validation, cfg, tokenizer)
    return TaskData(train=train_features, validation=validation_features, skipped_rows=skipped_rows)
