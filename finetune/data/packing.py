"""How examples share rows (`data.packing`), and how a token stream becomes blocks of whole documents.

Modes:
- `stream` (clm): the token stream of all documents (or instruction examples) is cut into blocks of exactly
  `max_seq_len`; the examples of a block attend to each other across `<|endoftext|>`. Micro batches are padded
  (only the last block of each map group is short).
- `documents` (clm): blocks as `stream`, but attention and positions restart at every document, as if each
  document were alone. With `truncation: false`, blocks hold whole documents only (first fit, in order), and a
  document longer than `max_seq_len` is a bad row.
- `examples` (every task): one example per row in the dataset, and each micro batch's examples are concatenated
  into one row with per-example attention (padding-free batches, as transformers' DataCollatorWithFlattening).
  The rows of each micro batch and of each step are those of the unpacked run: only the layout changes.
- `none`: one example per row, each micro batch padded to its longest row.
`auto` (default) is `stream` for plain text and `examples` otherwise; `true` means `auto` and `false` `none`.
"""
from __future__ import annotations

from typing import Any, Sequence

from finetune.config import ConfigError, DataConfig

PACKING_MODES = ("auto", "stream", "documents", "examples", "none")
# Modes whose micro batches are one packed row (DataCollator(packed=True)); the others pad.
PACKED_BATCH_MODES = ("documents", "examples")


def is_instruction(cfg: DataConfig) -> bool:
    return any(v is not None for v in (cfg.prompt_column, cfg.prompt_template, cfg.response_column))


def packing_mode(cfg: DataConfig, task: str) -> str:
    """The packing mode `cfg.packing` means for `task` (auto and booleans resolved); a ConfigError if invalid."""
    value = cfg.packing
    if isinstance(value, bool):
        value = "auto" if value else "none"
    if value not in PACKING_MODES:
        raise ConfigError(
            f"data.packing={cfg.packing!r} is invalid: use one of {', '.join(PACKING_MODES)} (true means auto, false "
            "none)."
        )
    if value == "auto":
        return "stream" if task == "clm" and not is_instruction(cfg) else "examples"
    if task != "clm" and value in ("stream", "documents"):
        raise ConfigError(
            f"data.packing={value} concatenates a token stream, which only causal LM data has; for task={task} use "
            "data.packing=examples (padding-free batches) or none (padded batches)."
        )
    return value


def packs_batches(cfg: DataConfig, task: str) -> bool:
    """Whether each micro batch of `task` is one packed row (else padded rows)."""
    return packing_mode(cfg, task) in PACKED_BATCH_MODES


def cut_blocks(sequences: Sequence[tuple[list[int], list[Any]]], block: int) -> list[tuple[list, list, list[int]]]:
    """The concatenated sequences cut into blocks of `block` tokens (the last one shorter), each with the lengths
    of the sequence pieces it holds: a sequence crossing a block edge continues as a new piece in the next block."""
    blocks: list[tuple[list, list, list[int]]] = []
    ids: list = []
    labels: list = []
    pieces: list[int] = []
    for seq_ids, seq_labels in sequences:
        start = 0
        while start < len(seq_ids):
            take = min(block - len(ids), len(seq_ids) - start)
            ids += seq_ids[start : start + take]
            labels += seq_labels[start : start + take]
            pieces.append(take)
            start += take
            if len(ids) == block:
                blocks.append((ids, labels, pieces))
                ids, labels, pieces = [], [], []
    if ids:
        blocks.append((ids, labels, pieces))
    return blocks


def fit_whole(sequences: Sequence[tuple[list[int], list[Any]]], block: int) -> list[tuple[list, list, list[int]]]:
    """Whole sequences (each at most `block` tokens) into blocks of at most `block` tokens, in order: a sequence
    that does not fit in the current block starts the next one."""
    blocks: list[tuple[list, list, list[int]]] = []
    ids: list = []
    labels: list = []
    pieces: list[int] = []
    for seq_ids, seq_labels in sequences:
        if len(seq_ids) > block:
            raise ValueError(f"A sequence of {len(seq_ids)} tokens cannot fit a block of {block}.")
        if len(ids) + len(seq_ids) > block:
            blocks.append((ids, labels, pieces))
            ids, labels, pieces = [], [], []
        ids += seq_ids
        labels += seq_labels
        pieces.append(len(seq_ids))
    if ids:
        blocks.append((ids, labels, pieces))
    return blocks
