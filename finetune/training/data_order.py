"""The order of training rows: which rows each optimizer step trains on, which rank and micro batch gets which, and
where a resumed run picks up.

The order does not depend on the parallel layout. Each epoch is one permutation of the training rows, a pure
function of (seed, epoch), cut into global batches of micro_batch_size * grad_accum_steps * world_size rows (a
last partial one is dropped). Optimizer step k of an epoch trains on global batch k, whatever the layout: rank r
takes the r-th contiguous block of it, and cuts its block into grad_accum_steps micro batches. Two runs with the
same global batch therefore train on the same rows in every step, on 1 GPU with accumulation or on 8 without.

A checkpoint records the position as (epoch, global batches consumed), which means the same thing on any number of
ranks, so a resumed run, with the same layout or another one of the same global batch, continues with the rows
the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from finetune.config import ConfigError, TrainerConfig
from finetune.data.length_grouping import longest_first
from finetune.distributed import DistInfo


@dataclass
class DataPosition:
    """Where the training data stream stands: `global_batches` global batches of `epoch` are consumed."""

    epoch: int = 0
    global_batches: int = 0


@dataclass(frozen=True)
class BatchLayout:
    """How one global batch is split: per-rank micro batches, accumulated over steps, over ranks."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @classmethod
    def of(cls, trainer: TrainerConfig, world_size: int) -> "BatchLayout":
        return cls(trainer.micro_batch_size, trainer.grad_accum_steps, world_size)


def global_batches_per_epoch(num_rows: int, global_batch_size: int) -> int:
    return num_rows // global_batch_size


def total_optimizer_steps(trainer: TrainerConfig, *, num_rows: int, world_size: int) -> int:
    """trainer.max_steps, or the steps of trainer.epochs passes over the training data (one global batch each)."""
    layout = BatchLayout.of(trainer, world_size)
    per_epoch = global_batches_per_epoch(num_rows, layout.global_batch_size)
    if per_epoch == 0:
        raise ConfigError(
            f"The training set has {num_rows} rows, fewer than one global batch of {layout.global_batch_size} "
            f"(trainer.micro_batch_size={trainer.micro_batch_size} x trainer.grad_accum_steps="
            f"{trainer.grad_accum_steps} x {world_size} ranks), so not one optimizer step can be formed; lower "
            "trainer.micro_batch_size or trainer.grad_accum_steps, or add data."
        )
    if trainer.max_steps is not None:
        return trainer.max_steps
    return max(1, math.ceil(trainer.epochs * per_epoch))


def epoch_permutation(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The order of the rows in `epoch`: the same on every rank and for every layout."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_rows, generator=generator).tolist()


def rank_micro_batches(global_batch: list[int], layout: BatchLayout, rank: int,
                       lengths: Optional[np.ndarray] = None) -> list[list[int]]:
    """This rank's share of one global batch (rows in permutation order), as its grad_accum_steps micro batches.

    `lengths` (data.group_by_length): the global batch's rows are ordered longest first and cut into its
    ranks x grad_accum_steps micro batches, dealt to the ranks in turn, so the micro batches that run at the same
    time on different ranks have similar lengths. The rows of the step are the same either way."""
    size = layout.micro_batch_size
    if lengths is not None:
        rows = longest_first(global_batch, lengths)
        micro = [rows[i * size : (i + 1) * size] for i in range(layout.world_size * layout.grad_accum_steps)]
        return micro[rank :: layout.world_size]
    start = rank * layout.rows_per_rank
    block = global_batch[start : start + layout.rows_per_rank]
    return [block[i * size : (i + 1) * size] for i in range(layout.grad_accum_steps)]


def train_steps(
    dataset: datasets.Dataset, collate: Callable, *, info: DistInfo, layout: BatchLayout, seed: int,
    start: DataPosition, num_workers: int = 0, lengths: Optional[np.ndarray] = None,
) -> Iterator[tuple[DataPosition, list[dict[str, torch.Tensor]]]]:
    """Endless optimizer steps from `start` on: for each, this rank's micro batches (grad_accum_steps of them,
    collated) and the data position after the step. `lengths`: group each step's rows by length
    (`rank_micro_batches`)."""
    if layout.world_size != info.world_size:
        raise ValueError(f"layout for {layout.world_size} ranks used on {info.world_size}")
    size = layout.global_batch_size
    epoch, skip = start.epoch, start.global_batches
    while True:
        order = epoch_permutation(len(dataset), seed=seed, epoch=epoch)
        steps = global_batches_per_epoch(len(order), size)
        micro_batches = [
            micro
            for step in range(skip, steps)
            for micro in rank_micro_batches(order[step * size : (step + 1) * size], layout, info.rank, lengths)
        ]
        # Its own generator: creating a loader would otherwise draw from the global RNG (dropout's), at a point
        # where a resumed run does and the uninterrupted one does not.
        loader = iter(DataLoader(dataset, batch_sampler=micro_batches, collate_fn=collate, num_workers=num_workers,
                                 generator=torch.Generator().manual_seed(seed + epoch)))
        for done in range(skip + 1, steps + 1):
            yield DataPosition(epoch, done), [next(loader) for _ in range(layout.grad_accum_steps)]
        epoch, skip = epoch + 1, 0
