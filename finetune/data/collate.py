"""Batch features into tensors with dynamic right padding (to the longest sequence of each batch)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

IGNORE_INDEX = -100


class DataCollator:
    """`collator(features) -> dict of tensors` for every task.

    input_ids are padded with `pad_token_id`, attention_mask with 0, token labels (causal LM) with -100.
    Scalar labels and QA start/end positions become long tensors; float labels (regression) and multi-hot
    lists (multi-label) become float tensors. Other columns (QA's example_id, offset_mapping) are ignored.
    GPT-J pads with `<|endoftext|>`, so the attention mask is what tells padding apart.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch.")
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id),
            "attention_mask": _pad([f["attention_mask"] if "attention_mask" in f else [1] * n
                                    for f, n in zip(features, lengths)], width, 0),
        }
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "labels" in features[0]:
            batch["labels"] = _labels([f["labels"] for f in features], lengths, width)
        return batch


def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _labels(labels: list[Any], lengths: list[int], width: int) -> torch.Tensor:
    first = labels[0]
    if isinstance(first, torch.Tensor):
        first = first.tolist()
    if isinstance(first, (list, tuple)):
        if first and isinstance(first[0], float):  # multi-hot (multi-label classification)
            return torch.tensor([list(map(float, row)) for row in labels], dtype=torch.float)
        if len(first) == lengths[0]:  # one label per token (causal LM)
            return _pad(labels, width, IGNORE_INDEX)
        raise ValueError(f"Cannot collate labels of length {len(first)} for input_ids of length {lengths[0]}.")
    if isinstance(first, float):  # regression
        return torch.tensor([float(label) for label in labels], dtype=torch.float)
    return torch.tensor([int(label) for label in labels], dtype=torch.long)
