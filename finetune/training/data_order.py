"""The order of training rows: which micro batches each rank trains on, and where a resumed run picks up.

Data order is a pure function of (seed, epoch, world size): a DistributedSampler permutation per epoch, cut
into micro batches. A checkpoint records the position (epoch, micro batches consumed), so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from finetune.config import ConfigError, TrainerConfig
from finetune.data.length_grouping import group_steps_by_length
from finetune.distributed import DistInfo


@dataclass
class DataPosition:
    """Where the training data stream stands: `batches` micro batches of `epoch` are consumed."""

    epoch: int = 0
    batches: int = 0



def micro_batches_per_epoch(num_rows: int, *, world_size: int, micro_batch_size: int) -> int:
    return (num_rows // world_size) // micro_batch_size


def total_optimizer_steps(trainer: TrainerConfig, *, num_rows: int, world_size: int) -> int:
    """trainer.max_steps, or the steps of trainer.epochs passes over the training data."""
    per_epoch = micro_batches_per_epoch(num_rows, world_size=world_size, micro_batch_size=trainer.micro_batch_size)
    if per_epoch == 0:
        raise ConfigError(
            f"The training set has {num_rows} rows, fewer than trainer.micro_batch_size ({trainer.micro_batch_size}) "
            f"x {world_size} ranks, so not one batch can be formed; lower trainer.micro_batch_size or add data."
        )
    if trainer.max_steps is not None:
        return trainer.max_steps
    return max(1, math.ceil(trainer.epochs * per_epoch / trainer.grad_accum_steps))


def train_batches(
    dataset: datasets.Dataset, collate: Callable, *, info: DistInfo, micro_batch_size: int, seed: int,
    start: DataPosition, num_workers: int = 0, lengths: Optional[np.ndarray] = None, micro_batches_per_step: int = 1,
) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
    """Endless micro batches of this rank from `start` on, each with the position after it.

    `lengths` (data.group_by_length): the rows of each step (`micro_batches_per_step` micro batches) go into its
    micro batches longest first."""
    epoch, skip = start.epoch, start.batches
    while True:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        full = len(indices) // micro_batch_size  # a last partial micro batch is dropped
        batches = [indices[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(full)]
        if lengths is not None:
            batches = group_steps_by_length(batches, lengths, micro_batches_per_step=micro_batches_per_step,
                                            first_step_start=-(epoch * full) % micro_batches_per_step)
        # Its own generator: creating a loader would otherwise draw from the global RNG (dropout's), at a point
        # where a resumed run does and the uninterrupted one does not.
        loader = DataLoader(dataset, batch_sampler=batches[skip:], collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for done, batch in enumerate(loader, start=skip + 1):
            yield DataPosition(epoch, done), batch
        epoch, skip = epoch + 1, 0
