"""Run a task's row -> features function over a split with `datasets.map`, cached under an explicit fingerprint.

The fingerprint is computed from everything the output depends on: the raw split's fingerprint (which changes
with the files), the task parameters, the tokenizer's fingerprint, `num_proc` and the map batch size (packing
groups follow map shards and batches) and a hash of this package's data code. It is identical in every
process, so rank 0 builds the cache and the other ranks, calling the same function after it, load the same
files instead of recomputing. datasets writes each cache file under a temporary name and renames it only when
the function finished, so an error raised mid-way leaves no cache entry behind.

Before that, `drop_bad_rows` runs the task's row checks (a cached map too) and applies `data.on_bad_row`, so the
feature functions only ever see valid rows.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from finetune.config import DataConfig
from finetune.data.bad_rows import BadRow, Located, check_policy, handle_bad_rows
from finetune.data.sources import RawSplit
from finetune.model.tokenizer import GPTJTokenizer

MAP_BATCH_SIZE = 1000
# Output column types, given to map so Arrow need not infer them (slow on long int lists); ids fit in int32.
TOKENS = datasets.List(datasets.Value("int32"))
MASK = datasets.List(datasets.Value("int8"))
_PROBLEM_FEATURES = datasets.Features({name: datasets.Value("string") for name in ("field", "reason", "detail")})

# check(batch, *, tokenizer, params) -> one BadRow or None per row of the batch.
RowCheck = Callable[..., list[Optional[BadRow]]]


def _code_version() -> str:
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")) + [package.parent / "model" / "tokenizer.py"]:
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

    `function(batch, indices, *, tokenizer, params)` may return more or fewer rows than it got; it gets rows that
    passed `drop_bad_rows`. `features` fixes the output schema where Arrow could not infer it from a batch.
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


def drop_bad_rows(
    split: RawSplit,
    check: RowCheck,
    *,
    tokenizer: GPTJTokenizer,
    params: Any,
    cfg: DataConfig,
    extra: Sequence[tuple[int, BadRow]] = (),
) -> tuple[RawSplit, dict[str, int]]:
    """Validate every row of `split` with `check` (plus `extra` (position, problem) pairs found across rows) and
    apply `cfg.on_bad_row`: raise a `DataError` naming file, line, field and reason, or drop the bad rows.

    Returns the split of good rows (unchanged when all are good) and the skipped rows per reason, including the
    lines `load_splits` could not parse.
    """
    check_policy(cfg.on_bad_row)
    problems = split.dataset.map(
        _problem_columns,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=split.dataset.column_names,
        fn_kwargs={"check": check, "tokenizer": tokenizer, "params": params},
        features=_PROBLEM_FEATURES,
        new_fingerprint=Hasher.hash(
            [split.dataset._fingerprint, f"{check.__module__}.{check.__qualname__}", dataclasses.asdict(params),
             tokenizer.fingerprint, MAP_BATCH_SIZE, CODE_VERSION]  # fmt: skip
        ),
        desc=f"check {split.name} rows",
    )
    reasons = problems.with_format("arrow")[:].column("reason")
    positions = pc.indices_nonzero(pc.is_valid(reasons)).to_pylist()
    found = {p: BadRow(**row) for p, row in zip(positions, problems.select(positions).to_list())}
    for position, problem in extra:
        found.setdefault(position, problem)
    bad: list[Located] = [(functools.partial(_constant, location), problem) for location, problem in split.read_skips]
    bad += [(functools.partial(split.locate, position), found[position]) for position in sorted(found)]
    counts = handle_bad_rows(bad, policy=cfg.on_bad_row, split=split.name,
                             total=len(split.dataset) + len(split.read_skips))  # fmt: skip
    if found:
        split = split.select([i for i in range(len(split.dataset)) if i not in found])
    return split, counts


def _problem_columns(batch: dict[str, list], *, check: RowCheck, tokenizer: GPTJTokenizer, params: Any):
    problems = check(batch, tokenizer=tokenizer, params=params)
    return {name: [getattr(p, name) if p is not None else None for p in problems] for name in _PROBLEM_FEATURES}


def _constant(value: str) -> str:
    return value
