"""Length-grouped batching: steps keep their rows in training; evaluation runs longest first, results in order."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from finetune.config import DataConfig
from finetune.data import DataCollator, TaskData
from finetune.data.length_grouping import example_lengths, group_steps_by_length, longest_first
from finetune.distributed import DistInfo
from finetune.model import GPTJConfig, build_model
from finetune.tasks import get_task
from finetune.training.data_order import DataPosition, train_batches
from finetune.training.evaluation import evaluate

LENGTHS = np.array([3, 9, 1, 9, 4, 7, 2, 8, 5, 6, 2, 7])


def test_lengths_and_longest_first():
    data = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in LENGTHS]})
    assert example_lengths(data).tolist() == LENGTHS.tolist()
    assert example_lengths(data.select([5, 2])).tolist() == [7, 1]
    assert longest_first([0, 1, 2, 3, 10, 6], LENGTHS) == [1, 3, 0, 10, 6, 2]  # ties keep their order


def test_steps_keep_their_rows_and_batch_sizes():
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    grouped = group_steps_by_length(batches, LENGTHS, micro_batches_per_step=2)
    assert grouped == [[1, 3, 5], [4, 0, 2], [7, 11, 9], [8, 6, 10]]
    # an epoch that starts one micro batch into a step: [0,1,2] ends that step; the next steps follow
    shifted = group_steps_by_length(batches, LENGTHS, micro_batches_per_step=2, first_step_start=1)
    assert shifted == [[1, 0, 2], [3, 7, 5], [8, 4, 6], [11, 9, 10]]


def test_training_order_groups_within_steps_only():
    data = datasets.Dataset.from_dict({"x": list(range(len(LENGTHS)))})

    def collate(features):
        return [f["x"] for f in features]

    def stream(lengths):
        batches = train_batches(data, collate, info=DistInfo(0, 1, 0), micro_batch_size=2, seed=3,
                                start=DataPosition(), lengths=lengths, micro_batches_per_step=3)
        return [next(batches)[1] for _ in range(12)]  # two epochs of 6 micro batches

    plain, grouped = stream(None), stream(LENGTHS)
    for step in range(4):
        rows_plain = sorted(r for b in plain[3 * step : 3 * step + 3] for r in b)
        rows_grouped = [r for b in grouped[3 * step : 3 * step + 3] for r in b]
        assert sorted(rows_grouped) == rows_plain
        assert list(LENGTHS[rows_grouped]) == sorted(LENGTHS[rows_grouped], reverse=True)
    assert grouped != plain


class ModelAsEngine(torch.nn.Module):
    """The evaluation loop's view of an engine (forward, eval/train, device), recording the row lengths it saw."""

    device = torch.device("cpu")

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, **batch):
        self.seen.append(int(batch["attention_mask"].sum(-1).max()))
        return self.model(**batch)


@pytest.mark.parametrize("packed", [False, True])
def test_evaluation_goes_longest_first_and_keeps_input_order(packed):
    g = torch.Generator().manual_seed(0)
    validation = datasets.Dataset.from_dict({
        "input_ids": [torch.randint(0, 999, (int(n),), generator=g).tolist() for n in LENGTHS],
        "attention_mask": [[1] * int(n) for n in LENGTHS],
        "labels": [i % 2 for i in range(len(LENGTHS))],
    })
    data = TaskData(train=None, validation=validation, num_labels=2, problem_type="single_label_classification")
    torch.manual_seed(0)
    model = build_model(GPTJConfig(vocab_size=1000, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, pad_token_id=999),
                        task="cls").eval()
    task, collate = get_task("cls"), DataCollator(999, packed=packed)
    records = []
    original = task.eval_records
    results = {}
    for grouped in (False, True):
        engine = ModelAsEngine(model)
        task.eval_records = lambda out, batch: records.append(original(out, batch)) or records[-1]
        results[grouped] = evaluate(engine, task, data, DataConfig(eval_group_by_length=grouped), collate,
                                    info=DistInfo(0, 1, 0), micro_batch_size=4)
        del task.eval_records
        if grouped and not packed:
            assert engine.seen == [9, 7, 3]  # each batch's longest row: the longest rows first
    assert results[True]["accuracy"] == results[False]["accuracy"]
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=1e-5)
