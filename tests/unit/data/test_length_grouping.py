"""Length-grouped batching: steps keep their rows in training; evaluation runs longest first, results in order."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from finetune.config import DataConfig
from finetune.data import DataCollator, TaskData
from finetune.data.length_grouping import example_lengths, longest_first
from finetune.distributed import DistInfo
from finetune.model import GPTJConfig, build_model
from finetune.tasks import get_task
from finetune.training.data_order import BatchLayout, DataPosition, train_steps
from finetune.training.evaluation import evaluate

LENGTHS = np.array([3, 9, 1, 9, 4, 7, 2, 8, 5, 6, 2, 7])


def test_lengths_and_longest_first():
    data = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in LENGTHS]})
    assert example_lengths(data).tolist() == LENGTHS.tolist()
    assert example_lengths(data.select([5, 2])).tolist() == [7, 1]
    assert longest_first([0, 1, 2, 3, 10, 6], LENGTHS) == [1, 3, 0, 10, 6, 2]  # ties keep their order


def grouped_steps(layout, lengths, n=4):
    """For n steps: every rank's micro batches (row indices), from the layout-free global order."""
    data = datasets.Dataset.from_dict({"x": list(range(len(LENGTHS)))})

    def collate(features):
        return [f["x"] for f in features]

    streams = [train_steps(data, collate, info=DistInfo(r, layout.world_size, r), layout=layout, seed=3,
                           start=DataPosition(), lengths=lengths) for r in range(layout.world_size)]
    return [[next(stream)[1] for stream in streams] for _ in range(n)]


@pytest.mark.parametrize("micro, accum, world", [(2, 3, 1), (1, 3, 2), (3, 1, 2)])
def test_training_groups_each_global_batch_by_length_and_keeps_its_rows(micro, accum, world):
    layout = BatchLayout(micro_batch_size=micro, grad_accum_steps=accum, world_size=world)
    plain, grouped = grouped_steps(layout, None), grouped_steps(layout, LENGTHS)
    for plain_step, grouped_step in zip(plain, grouped):
        rows = lambda step: sorted(r for rank in step for batch in rank for r in batch)  # noqa: E731
        assert rows(grouped_step) == rows(plain_step)  # the same rows in every step
        assert all(len(batch) == micro for rank in grouped_step for batch in rank)
        # micro batch k of every rank runs at the same time: the longest rows go first, spread over the ranks
        in_turn = [grouped_step[r][k] for k in range(accum) for r in range(world)]
        flat = [row for batch in in_turn for row in batch]
        assert list(LENGTHS[flat]) == sorted(LENGTHS[flat], reverse=True)
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
