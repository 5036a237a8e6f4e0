"""Data order without a launch: run length, and the resumable stream of micro batches each rank trains on."""
from __future__ import annotations

import datasets
import pytest
import torch

from finetune.config import ConfigError, TrainerConfig
from finetune.distributed import DistInfo
from finetune.training.data_order import DataPosition, total_optimizer_steps, train_batches


def rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"x": list(range(n))})


def ids(batch) -> list[int]:
    return batch["x"].tolist()


def collate(features):
    return {"x": torch.tensor([f["x"] for f in features])}


def test_total_steps_from_max_steps_or_epochs():
    assert total_optimizer_steps(TrainerConfig(max_steps=7), num_rows=100, world_size=2) == 7
    # 100 rows / 2 ranks / micro 5 = 10 micro batches per epoch; accum 2 -> 5 steps per epoch
    trainer = TrainerConfig(max_steps=None, epochs=1.5, micro_batch_size=5, grad_accum_steps=2)
    assert total_optimizer_steps(trainer, num_rows=100, world_size=2) == 8  # ceil(7.5)
    with pytest.raises(ConfigError, match="fewer than trainer.micro_batch_size"):
        total_optimizer_steps(TrainerConfig(micro_batch_size=8), num_rows=10, world_size=2)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_ranks_split_each_epoch_into_disjoint_batches():
    data = rows(20)
    per_rank = [take(train_batches(data, collate, info=DistInfo(r, 2, r), micro_batch_size=3, seed=1,
                                   start=DataPosition()), 3) for r in (0, 1)]
    seen = [i for stream in per_rank for _, batch in stream for i in ids(batch)]
    assert len(seen) == len(set(seen)) == 18  # 10 rows per rank -> 3 full micro batches each, no overlap
    assert [pos for pos, _ in per_rank[0]] == [DataPosition(0, 1), DataPosition(0, 2), DataPosition(0, 3)]


def test_stream_restarted_at_a_position_continues_identically_across_epochs():
    data, info = rows(12), DistInfo(1, 2, 1)
    full = take(train_batches(data, collate, info=info, micro_batch_size=2, seed=5, start=DataPosition()), 8)
    # 6 rows per rank -> 3 batches per epoch; resume after the 2nd batch of epoch 1 (5 consumed)
    position = full[4][0]
    assert position == DataPosition(1, 2)
    resumed = take(train_batches(data, collate, info=info, micro_batch_size=2, seed=5, start=position), 3)
    assert [ids(b) for _, b in resumed] == [ids(b) for _, b in full[5:8]]
    assert [p for p, _ in resumed] == [p for p, _ in full[5:8]]
    # each epoch is a different order
    assert [ids(b) for _, b in full[:3]] != [ids(b) for _, b in full[3:6]]
