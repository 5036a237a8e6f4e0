"""Data order without a launch: run length, the rows of each optimizer step for any layout, and resuming."""
from __future__ import annotations

import datasets
import pytest
import torch

from finetune.config import ConfigError, TrainerConfig
from finetune.distributed import DistInfo
from finetune.training.data_order import BatchLayout, DataPosition, total_optimizer_steps, train_steps


def rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"x": list(range(n))})


def collate(features):
    return {"x": torch.tensor([f["x"] for f in features])}


def take(stream, n):
    return [next(stream) for _ in range(n)]


def steps_of(layout: BatchLayout, data, *, seed=1, start=DataPosition(), n=5):
    """For each of n steps: the rows of every (rank, micro batch), and the position after the step."""
    streams = [train_steps(data, collate, info=DistInfo(r, layout.world_size, r), layout=layout, seed=seed,
                           start=start) for r in range(layout.world_size)]
    per_rank = [take(stream, n) for stream in streams]
    result = []
    for k in range(n):
        positions = [per_rank[r][k][0] for r in range(layout.world_size)]
        assert all(p == positions[0] for p in positions)
        micro = [[b["x"].tolist() for b in per_rank[r][k][1]] for r in range(layout.world_size)]
        result.append((positions[0], micro))
    return result


def test_total_steps_from_max_steps_or_epochs_count_global_batches():
    assert total_optimizer_steps(TrainerConfig(max_steps=7), num_rows=100, world_size=2) == 7
    # global batch 5 x 2 x 2 = 20 -> 5 steps per epoch; 1.5 epochs -> ceil(7.5)
    trainer = TrainerConfig(max_steps=None, epochs=1.5, micro_batch_size=5, grad_accum_steps=2)
    assert total_optimizer_steps(trainer, num_rows=100, world_size=2) == 8
    # the same global batch split another way: the same number of steps
    other = TrainerConfig(max_steps=None, epochs=1.5, micro_batch_size=1, grad_accum_steps=20)
    assert total_optimizer_steps(other, num_rows=100, world_size=1) == 8
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        total_optimizer_steps(TrainerConfig(micro_batch_size=8), num_rows=10, world_size=2)


LAYOUTS = [BatchLayout(4, 1, 1), BatchLayout(1, 4, 1), BatchLayout(2, 1, 2), BatchLayout(1, 2, 2),
           BatchLayout(2, 2, 1), BatchLayout(1, 1, 4)]


def test_every_layout_of_one_global_batch_trains_on_the_same_rows_in_every_step():
    data = rows(26)  # 6 global batches of 4 per epoch, 2 rows dropped; 8 steps run into the second epoch
    reference = None
    for layout in LAYOUTS:
        steps = steps_of(layout, data, n=8)
        step_rows = [sorted(i for rank in micro for batch in rank for i in batch) for _, micro in steps]
        for _, micro in steps:  # every rank holds grad_accum_steps micro batches of micro_batch_size rows
            assert [len(rank) for rank in micro] == [layout.grad_accum_steps] * layout.world_size
            assert all(len(batch) == layout.micro_batch_size for rank in micro for batch in rank)
        if reference is None:
            reference = step_rows
            positions = [p for p, _ in steps]
        assert step_rows == reference, layout
        assert [p for p, _ in steps] == positions
    assert positions[5] == DataPosition(0, 6) and positions[6] == DataPosition(1, 1)
    epoch0 = [i for step in reference[:6] for i in step]
    assert len(epoch0) == len(set(epoch0)) == 24  # no row twice in an epoch
    assert reference[6:8] != reference[0:2]  # the next epoch is another permutation


def test_a_stream_resumed_at_a_position_continues_identically_on_any_layout_of_the_global_batch():
    data = rows(12)  # 3 global batches of 4 per epoch
    full = steps_of(BatchLayout(2, 1, 2), data, seed=5, n=8)
    position = full[4][0]  # 5 steps done: epoch 1, 2 global batches consumed
    assert position == DataPosition(1, 2)
    for layout in (BatchLayout(2, 1, 2), BatchLayout(2, 2, 1), BatchLayout(1, 1, 4)):
        resumed = steps_of(layout, data, seed=5, start=position, n=3)
        assert [p for p, _ in resumed] == [p for p, _ in full[5:8]]
        flat = [sorted(i for rank in micro for batch in rank for i in batch) for _, micro in resumed]
        assert flat == [sorted(i for rank in micro for batch in rank for i in batch) for _, micro in full[5:8]]


def test_ranks_get_disjoint_contiguous_blocks_of_the_global_batch():
    steps = steps_of(BatchLayout(1, 2, 2), rows(8), n=2)
    for _, micro in steps:
        rank0 = [i for batch in micro[0] for i in batch]
        rank1 = [i for batch in micro[1] for i in batch]
        assert not set(rank0) & set(rank1)
