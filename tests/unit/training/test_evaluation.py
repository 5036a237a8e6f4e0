"""Sharded evaluation without a launch: shards gathered on rank 0, the sampler's padding duplicates dropped."""
from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from finetune.config import DataConfig
from finetune.data import TaskData
from finetune.distributed import DistInfo
from finetune.tasks import get_task
from finetune.training import evaluation
from finetune.training.evaluation import evaluate


class FakeEngine:
    """Returns cls logits that encode the row: logits = [x, -x] -> predicted class 0 for x > 0."""

    device = torch.device("cpu")

    def eval(self):
        pass

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask=None, labels=None):
        x = input_ids[:, 0].float()
        return SimpleNamespace(logits=torch.stack([x, -x], dim=-1), loss=torch.tensor(0.0))


def test_evaluate_gathers_shards_and_drops_padding_duplicates(monkeypatch):
    # 5 rows over 2 ranks: the sampler pads rank 1 with a duplicate of row 0.
    values = [3, -1, 2, -4, 5]
    labels = [0, 0, 0, 1, 1]  # predictions are [0, 1, 0, 1, 0] -> 3 of 5 right
    validation = datasets.Dataset.from_dict({
        "input_ids": [[v] for v in values], "attention_mask": [[1]] * 5, "labels": labels})
    data = TaskData(train=None, validation=validation, num_labels=2, problem_type="single_label_classification")
    task = get_task("cls")
    from finetune.data import DataCollator

    collator = DataCollator(pad_token_id=0)
    gathered = []

    def fake_gather(records):  # what all_gather_object returns once every rank has contributed
        gathered.append(records)
        return list(gathered)

    monkeypatch.setattr(evaluation, "all_gather_objects", fake_gather)
    # "rank 1" runs its shard first; "rank 0" then sees both shards and computes the metrics
    assert evaluate(FakeEngine(), task, data, DataConfig(), collator, info=DistInfo(1, 2, 1), micro_batch_size=2) is None
    result = evaluate(FakeEngine(), task, data, DataConfig(), collator, info=DistInfo(0, 2, 0), micro_batch_size=2)
    assert [len(r) for r in gathered] == [3, 3]  # 6 rows for 5: one padding duplicate
    assert result["accuracy"] == pytest.approx(3 / 5)
