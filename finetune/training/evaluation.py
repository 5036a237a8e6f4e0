"""Evaluation on the validation set, shared by the training loop and launch/evaluate.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DistributedSampler

from finetune.config import DataConfig
from finetune.data import TaskData, model_inputs
from finetune.data.length_grouping import example_lengths, longest_first
from finetune.distributed import DistInfo, all_gather_objects
from finetune.files import atomic_write_text
from finetune.tasks import Task


def evaluate(engine, task: Task, data: TaskData, data_cfg: DataConfig, collate: Callable, *, info: DistInfo,
             micro_batch_size: int) -> Optional[dict[str, float]]:
    """Metrics on the validation set: every rank runs its shard (ZeRO-3 needs all ranks in each forward), rank 0
    gathers the rows, drops the sampler's padding duplicates and computes the metrics (None on other ranks)."""
    features = model_inputs(data.validation, task.name)
    sampler = DistributedSampler(features, num_replicas=info.world_size, rank=info.rank, shuffle=False, drop_last=False)
    indices = list(sampler)
    if data_cfg.eval_group_by_length:  # records are keyed by row index: the metrics see input order
        indices = longest_first(indices, example_lengths(features))
    records: list[tuple[int, Any]] = []
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(indices), micro_batch_size):
            chunk = indices[i : i + micro_batch_size]
            batch = to_device(collate([features[j] for j in chunk]), engine.device)
            outputs = engine(**batch)
            records.extend(zip(chunk, task.eval_records(outputs, batch)))
    engine.train()
    gathered = all_gather_objects(records)
    if not info.is_main:
        return None
    by_index = {index: record for rank_records in gathered for index, record in rank_records}
    return task.compute_eval_metrics([by_index[i] for i in range(len(features))], data, data_cfg)



def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}



def write_eval_results(path: Path, results: dict[str, Any], *, private: bool = False) -> None:
    """eval_results.json, replaced atomically: a reader or a crash sees the old results or the new ones."""
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n", private=private)
