"""Run a task's row -> features function over a split with `datasets.map`, cached under an explicit fingerprint.

The fingerprint is computed from everything the output depends on: the raw split's fingerprint (which changes
with the files), the task parameters, the tokenizer's fingerprint, `num_proc` and the map batch size (packing
groups follow map shards and batches) and a hash of this package's data code. It is identical in every
process, so rank 0 builds the cache and the other ranks, calling the same function after it, load the same
files instead of recomputing. datasets writes each cache file under a temporary name and renames it only when
the function finished, so a `RowError` raised mid-way leaves no cache entry behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable

import datasets
from datasets.fingerprint import Hasher

from finetune.config import DataConfig
from finetune.data.errors import DataError, RowError
from finetune.data.sources import RawSplit
from finetune.tokenizer import GPTJTokenizer

MAP_BATCH_SIZE = 1000
# Output column types, given to map so Arrow need not infer them (slow on long int lists); ids fit in int32.
TOKENS = datasets.List(datasets.Value("int32"))
MASK = datasets.List(datasets.Value("int8"))


def _code_version() -> str:
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")) + [package.parent / "tokenizer.py"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


CODE_VERSION = _code_version()


def map_split(
    split: RawSplit,
    function: Callable[..., dict[str, list]],
    *,
    tokenizer: GPTJTokenizer,
    params: Any,
    cfg: DataConfig,
    desc: str,
    features: datasets.Features | None = None,
) -> datasets.Dataset:
    """`split.dataset.map(function)` in batches, replacing all columns by the function's output.

    `function(batch, indices, *, tokenizer, params)` may return more or fewer rows than it got and raises
    `RowError(index, field, problem)` for bad rows; that becomes a `DataError` naming the file and row.
    `features` fixes the output schema where Arrow could not infer it from a batch (e.g. all-null lists).
    """
    fingerprint = Hasher.hash(
        [
            split.dataset._fingerprint,  # no public accessor; datasets itself chains on it
            f"{function.__module__}.{function.__qualname__}",
            dataclasses.asdict(params),
            tokenizer.fingerprint,
            cfg.num_proc,
            MAP_BATCH_SIZE,
            CODE_VERSION,
        ]
    )
    try:
        return split.dataset.map(
            function,
            batched=True,
            batch_size=MAP_BATCH_SIZE,
            with_indices=True,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=split.dataset.column_names,
            fn_kwargs={"tokenizer": tokenizer, "params": params},
            new_fingerprint=fingerprint,
            features=features,
            desc=desc,
        )
    except RowError as error:
        raise DataError(
            f"Bad {split.name} example at {split.locate(error.index)}, field {error.field!r}: {error.problem}"
        ) from None
