"""Length-grouped batching: micro batches of rows of similar length, so padded batches carry less padding.

Training (`data.group_by_length`): the rows of each optimizer step (its global batch) are ordered longest first
before they are cut into micro batches (`finetune.training.data_order.rank_micro_batches`). The step's rows are
the same as without grouping (the data order, and with a loss summed over the whole step its gradient, are
unchanged); only which rows share a micro batch changes.
Evaluation (`data.eval_group_by_length`, on by default): each rank goes through its rows longest first (the
largest batch comes first, so an out-of-memory shows at once); results are gathered by row index, so metrics
and predictions come back in input order.
"""
from __future__ import annotations

from typing import Sequence

import datasets
import numpy as np
import pyarrow.compute as pc


def example_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """Tokens of every row (the length of its input_ids), read from Arrow without decoding the rows."""
    column = dataset.select_columns(["input_ids"]).with_format("arrow")[:].column("input_ids")
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def longest_first(indices: Sequence[int], lengths: np.ndarray) -> list[int]:
    """`indices` ordered by decreasing length; equal lengths keep their order (a stable sort)."""
    indices = np.asarray(indices, dtype=np.int64)
    return indices[np.argsort(-lengths[indices], kind="stable")].tolist()
