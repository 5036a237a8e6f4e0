"""Loss normalisation over the global batch: the same gradient whatever the parallel layout.

An optimizer step's loss is the summed loss of every target in the global batch (every micro batch of every
rank) divided by their number N: a token mean for clm, an example (feature) mean for cls and qa. Averaging each
micro batch's own mean instead, as DeepSpeed's accumulation and rank averaging do, lets a token in a micro batch
with few targets weigh more than one in a full micro batch, so results would depend on how the global batch is
split (the gradient-accumulation loss bug that transformers fixed with `num_items_in_batch`).

The loop counts the step's targets before its backward passes (the task's `num_loss_targets` on every micro batch
of the step, one all-reduce), then back-propagates each micro batch's summed loss times
`grad_accum_steps * world_size / N`: DeepSpeed divides by grad_accum_steps in `backward` and averages the
gradients over ranks, which leaves exactly the gradient of (sum over the global batch) / N.

`trainer.loss_normalization=micro_batch` keeps the per-micro-batch mean (the behaviour before this; the
benchmark's reference), for reproducing older runs.
"""
from __future__ import annotations

from typing import Sequence

import torch

from finetune.tasks import Task


def global_target_count(task: Task, micro_batches: Sequence[dict[str, torch.Tensor]], device: torch.device
                        ) -> torch.Tensor:
    """N: the loss targets of this step's micro batches on every rank (one all-reduce; no host sync)."""
    local = torch.stack([task.num_loss_targets(batch).to(torch.int64) for batch in micro_batches]).sum()
    count = local.to(device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
    return count


def backward_scale(count: torch.Tensor, *, grad_accum_steps: int, world_size: int) -> torch.Tensor:
    """The factor for each micro batch's summed loss that makes DeepSpeed's gradient that of the global mean.

    A step without any target (every label -100) gets a zero gradient instead of a division by zero."""
    return (grad_accum_steps * world_size) / count.clamp(min=1).to(torch.float32)
