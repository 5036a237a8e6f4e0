"""Batch features into tensors: padded rows (to the longest of each batch), or one packed row (padding-free)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

IGNORE_INDEX = -100


class DataCollator:
    """`collator(features) -> dict of tensors` for every task.

    Padded (default): input_ids are padded with `pad_token_id`, attention_mask with 0, token labels (causal LM)
    with -100. GPT-J pads with `<|endoftext|>`, so the attention mask is what tells padding apart.
    `packed=True` (padding-free, as transformers' DataCollatorWithFlattening): the features are concatenated into
    one row (1, total) with `position_ids` restarting at every example and `cu_seq_lens` (n + 1,) marking where
    each feature starts; the model attends within each example only. A feature with `seq_lens` (a block of
    several documents, data.packing=documents) restarts positions at each of its pieces too. Token labels get -100
    at each example's first token: no prediction crosses from one example into the next.
    Either way, scalar labels and QA start/end positions (relative to their own feature) become long tensors;
    float labels (regression) and multi-hot lists (multi-label) float tensors. Other columns (QA's example_id,
    offset_mapping) are ignored.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: Optional[int] = None, packed: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch.")
        if self.packed:
            return self._packed(features)
        if "seq_lens" in features[0]:
            raise ValueError("Rows holding several documents (data.packing=documents) need DataCollator(packed=True).")
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

    def _packed(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        pieces = [list(f.get("seq_lens") or [n]) for f, n in zip(features, lengths)]
        if any(sum(p) != n for p, n in zip(pieces, lengths)):
            raise ValueError("A feature's seq_lens do not add up to its input_ids' length.")
        starts = torch.tensor([0] + [n for p in pieces for n in p]).cumsum(0)[:-1]  # of every piece
        total = sum(lengths)
        positions = torch.arange(total) - torch.repeat_interleave(starts, torch.tensor([n for p in pieces for n in p]))
        batch = {
            "input_ids": torch.tensor([[t for f in features for t in f["input_ids"]]], dtype=torch.long),
            "attention_mask": torch.ones(1, total, dtype=torch.long),
            "position_ids": positions[None],
            "cu_seq_lens": torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        }
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                batch[key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        if "labels" in features[0]:
            if _token_labels(features[0]["labels"], lengths[0]):
                flat = torch.tensor([[label for f in features for label in f["labels"]]], dtype=torch.long)
                flat[0, starts] = IGNORE_INDEX
                batch["labels"] = flat
            else:
                batch["labels"] = _labels([f["labels"] for f in features], lengths, max(lengths))
        return batch


def _token_labels(labels: Any, length: int) -> bool:
    """One int label per token (causal LM), as opposed to a class id, a float or a multi-hot vector."""
    return isinstance(labels, (list, tuple)) and len(labels) == length and isinstance(labels[0], int)


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
