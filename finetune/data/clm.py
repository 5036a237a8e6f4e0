"""Causal language modelling data: plain text (packed or one example per document) and prompt/response data.

Plain text: each document is tokenized and followed by `<|endoftext|>`; labels equal input_ids (the model shifts
them). With `packing`, the token stream of each group of `MAP_BATCH_SIZE` documents is cut into blocks of
`max_seq_len`; the group's last, shorter block is KEPT (the collator pads it), so no token is ever dropped.
Documents are not masked from each other inside a block; the `<|endoftext|>` between them marks the boundary.
Empty documents (blank lines) are skipped.

Prompt/response data: the prompt (a column, or `prompt_template` filled from columns) and the response are
tokenized separately and joined as-is (put any separator in the template), then `<|endoftext|>`; labels are -100
on prompt tokens, so the loss covers the response and its end-of-text only. Blocks or truncated examples left
with no response token are dropped.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

import datasets

from finetune.config import ConfigError, DataConfig
from finetune.data.errors import DataError, RowError
from finetune.data.pipeline import MASK, TOKENS, map_split
from finetune.data.sources import RawSplit, load_splits, require_columns
from finetune.data.task_data import TaskData
from finetune.tokenizer import GPTJTokenizer

IGNORE_INDEX = -100
FEATURES = datasets.Features({"input_ids": TOKENS, "attention_mask": MASK, "labels": TOKENS})


@dataclass(frozen=True)
class ClmParams:
    max_seq_len: int
    packing: bool
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
        packing=cfg.packing,
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


def build_clm_features(batch: dict[str, list], indices: list[int], *, tokenizer: GPTJTokenizer, params: ClmParams):
    """One map batch of raw rows -> `input_ids`, `attention_mask`, `labels` (packed blocks or one row per document)."""
    sequences = _instruction_sequences(batch, indices, tokenizer, params) if params.instruction else (
        _text_sequences(batch, indices, tokenizer, params)
    )
    if params.packing:
        ids = [token for seq_ids, _, _ in sequences for token in seq_ids]
        labels = [label for _, seq_labels, _ in sequences for label in seq_labels]
        step = params.max_seq_len
        blocks = [(ids[i : i + step], labels[i : i + step]) for i in range(0, len(ids), step)]
    else:
        blocks = []
        for seq_ids, seq_labels, index in sequences:
            if len(seq_ids) > params.max_seq_len and not params.truncation:
                field = params.response_column if params.instruction else params.text_column
                raise RowError(
                    index,
                    field,
                    f"the example has {len(seq_ids)} tokens, more than data.max_seq_len={params.max_seq_len}, and "
                    "data.truncation is false. Raise data.max_seq_len, set data.truncation=true, or shorten it.",
                )
            blocks.append((seq_ids[: params.max_seq_len], seq_labels[: params.max_seq_len]))
    # A block with no response token adds nothing to the loss (and a batch of them would divide by zero).
    blocks = [(ids, labels) for ids, labels in blocks if any(label != IGNORE_INDEX for label in labels)]
    return {
        "input_ids": [ids for ids, _ in blocks],
        "attention_mask": [[1] * len(ids) for ids, _ in blocks],
        "labels": [labels for _, labels in blocks],
    }


def _text_sequences(batch, indices, tokenizer: GPTJTokenizer, params: ClmParams):
    texts = batch[params.text_column]
    for text, index in zip(texts, indices):
        _require_string(text, index, params.text_column)
    kept = [(text, index) for text, index in zip(texts, indices) if text.strip()]
    encoded = tokenizer.encode_batch([text for text, _ in kept])
    eos = tokenizer.eos_token_id
    return [(ids + [eos], ids + [eos], index) for ids, (_, index) in zip(encoded, kept)]


def _instruction_sequences(batch, indices, tokenizer: GPTJTokenizer, params: ClmParams):
    columns = list(batch)
    prompts, responses = [], []
    for position, index in enumerate(indices):
        row = {column: batch[column][position] for column in columns}
        if params.prompt_column is not None:
            _require_string(row[params.prompt_column], index, params.prompt_column)
            prompts.append(row[params.prompt_column])
        else:
            for field in required_columns(params):
                if row[field] is None:
                    raise RowError(index, field, "the value is missing (null), but data.prompt_template uses it.")
            prompts.append(params.prompt_template.format(**row))
        _require_string(row[params.response_column], index, params.response_column)
        responses.append(row[params.response_column])
    eos = tokenizer.eos_token_id
    sequences = []
    encoded = zip(tokenizer.encode_batch(prompts), tokenizer.encode_batch(responses), indices)
    for prompt_ids, response_ids, index in encoded:
        ids = prompt_ids + response_ids + [eos]
        labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids + [eos]
        sequences.append((ids, labels, index))
    return sequences


def _require_string(value, index: int, field: str) -> None:
    if not isinstance(value, str):
        problem = "the value is missing (null)" if value is None else f"expected text, got {type(value).__name__}"
        raise RowError(index, field, f"{problem}. Every row needs a string here.")


def process_clm_split(split: RawSplit, cfg: DataConfig, tokenizer: GPTJTokenizer) -> datasets.Dataset:
    """Raw split -> model-ready features (cached; see finetune.data.pipeline)."""
    params = clm_params(cfg, text_format=split.fmt == "text")
    require_columns(split, required_columns(params))
    features = map_split(
        split, build_clm_features, tokenizer=tokenizer, params=params, cfg=cfg, desc=f"clm {split.name}",
        features=FEATURES,
    )
    if len(features) == 0:
        raise DataError(
            f"The {split.name} data ({split.source}) gave no training examples: every document is empty or has no "
            "response token within data.max_seq_len."
        )
    return features


def load_clm(cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
    """Causal LM features for the train and validation splits of the config."""
    train, validation = load_splits(cfg, task="clm")
    return TaskData(
        train=process_clm_split(train, cfg, tokenizer),
        validation=process_clm_split(validation, cfg, tokenizer) if validation is not None else None,
    )
