"""Rows that fail validation: what is wrong with them, and what `data.on_bad_row` does about it.

`error` (the default) stops at load time with one paragraph naming the file, the row, the field, the reason and
the fix; `skip` drops the rows, prints one summary line (rank 0) and returns the counts per reason, which the
runner logs to the metrics. Locations are computed lazily: finding the line of a row may scan its file, so it
is done only for the few rows a message shows.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from finetune.config import BAD_ROW_POLICIES, ConfigError
from finetune.data.errors import DataError

SHOWN = 3  # bad rows quoted in full in a message; the rest are counted

# Reasons (the keys of the counts): what a user would grep for in a metrics file.
MISSING = "missing"  # null or absent value in a required column
WRONG_TYPE = "wrong_type"  # e.g. a number where text is required
EMPTY = "empty"  # empty text where the task needs some
TOO_LONG = "too_long"  # over data.max_seq_len with data.truncation=false, or a QA question leaving no room
BAD_LABEL = "bad_label"  # label outside num_labels, unknown label name, or not a label at all
BAD_ANSWER = "bad_answer"  # QA answers malformed, or the answer text is not at answer_start
NO_ANSWER = "no_answer"  # unanswerable QA question without data.version_2_with_negative
DUPLICATE_ID = "duplicate_id"  # QA validation ids must be unique
UNPARSEABLE = "unparseable"  # a JSON Lines line that is not a JSON object, a csv line with too many fields


@dataclass(frozen=True)
class BadRow:
    """What is wrong with one row: the field (column; "" for a line that cannot be parsed), a reason key (above)
    and a sentence saying the fix."""

    field: str
    reason: str
    detail: str


# A bad row with a way to say where it is ("file F, line N"), called only when the location is shown.
Located = tuple[Callable[[], str], BadRow]


def check_policy(policy: str) -> str:
    if policy not in BAD_ROW_POLICIES:
        raise ConfigError(f"data.on_bad_row={policy!r} is invalid: use one of {', '.join(BAD_ROW_POLICIES)}.")
    return policy


def handle_bad_rows(bad: Sequence[Located], *, policy: str, split: str, total: int) -> dict[str, int]:
    """Raise (policy error) or report (policy skip) `bad`, the bad rows of `split` (of `total` rows read).

    Returns the number of skipped rows per reason (empty when there were none).
    """
    if not bad:
        return {}
    counts = dict(Counter(problem.reason for _, problem in bad))
    if check_policy(policy) == "error":
        raise DataError(_error_message(bad, counts, split=split))
    if _is_rank_zero():
        shown = "; ".join(f"{locate()} ({_what(problem)})" for locate, problem in bad[:SHOWN])
        print(
            f"data.on_bad_row=skip: dropped {len(bad)} of {total} {split} rows ({_format_counts(counts)}); "
            f"first: {shown}.",
            file=sys.stderr,
            flush=True,
        )
    return counts


def _error_message(bad: Sequence[Located], counts: dict[str, int], *, split: str) -> str:
    fix = "Fix the data, or set data.on_bad_row=skip to drop bad rows (they are counted in the metrics)."
    if len(bad) == 1:
        locate, problem = bad[0]
        return f"Bad {split} example at {locate()}{_field(problem)}: {problem.detail} {fix}"
    first = " ".join(
        f"({n}) at {locate()}{_field(problem)}: {problem.detail}" for n, (locate, problem) in enumerate(bad[:SHOWN], 1)
    )
    more = f" (showing the first {SHOWN})" if len(bad) > SHOWN else ""
    return f"{len(bad)} bad {split} examples ({_format_counts(counts)}){more}: {first} {fix}"


def _field(problem: BadRow) -> str:
    return f", field {problem.field!r}" if problem.field else ""  # an unparseable line has no fields


def _what(problem: BadRow) -> str:
    return f"{problem.field}: {problem.reason}" if problem.field else problem.reason


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))


def _is_rank_zero() -> bool:
    from finetune.distributed import env_rank  # every rank validates (rank 0 first); one of them reports

    return env_rank() == 0


def text_problem(value: object, field: str, *, allow_empty: bool = False) -> BadRow | None:
    """The problem with `value` as the text of required column `field`, or None when it is usable."""
    if value is None:
        return BadRow(field, MISSING, "the value is missing (null); every row needs text here.")
    if not isinstance(value, str):
        return BadRow(field, WRONG_TYPE, f"expected text, got {type(value).__name__} {_short(value)}.")
    if not value and not allow_empty:
        return BadRow(field, EMPTY, "the text is empty; every row needs some here.")
    return None


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
