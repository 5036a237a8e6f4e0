"""The training loop, one for every task: micro batches -> DeepSpeed engine -> logs, evals, checkpoints.

Data order is a pure function of (seed, epoch, world size): a DistributedSampler permutation per epoch, cut
into micro batches. A checkpoint records the position (epoch, micro batches consumed) and every rank's RNG
state, so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .config import ConfigError, DataConfig, TrainerConfig
from .data import TaskData, model_inputs
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, rng_state, set_rng_state
from .tasks import Task

CHECKPOINT_TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class DataPosition:
    """Where the training data stream stands: `batches` micro batches of `epoch` are consumed."""

    epoch: int = 0
    batches: int = 0


@dataclass
class LoopResult:
    global_step: int
    completed: bool  # False when stopped early (trainer.stop_after_steps or a stop signal)
    eval_results: Optional[dict[str, float]]  # rank 0's last evaluation (None on other ranks)
    preempted: bool = False  # stopped by a signal (SLURM time limit, preemption): checkpoint saved


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
    start: DataPosition, num_workers: int = 0,
) -> Iterator[tuple[DataPosition, dict[str, torch.Tensor]]]:
    """Endless micro batches of this rank from `start` on, each with the position after it."""
    epoch, skip = start.epoch, start.batches
    while True:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        full = len(indices) // micro_batch_size  # a last partial micro batch is dropped
        batches = [indices[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(full)]
        # Its own generator: creating a loader would otherwise draw from the global RNG (dropout's), at a point
        # where a resumed run does and the uninterrupted one does not.
        loader = DataLoader(dataset, batch_sampler=batches[skip:], collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for done, batch in enumerate(loader, start=skip + 1):
            yield DataPosition(epoch, done), batch
        epoch, skip = epoch + 1, 0


def evaluate(engine, task: Task, data: TaskData, data_cfg: DataConfig, collate: Callable, *, info: DistInfo,
             micro_batch_size: int) -> Optional[dict[str, float]]:
    """Metrics on the validation set: every rank runs its shard (ZeRO-3 needs all ranks in each forward), rank 0
    gathers the rows, drops the sampler's padding duplicates and computes the metrics (None on other ranks)."""
    features = model_inputs(data.validation, task.name)
    sampler = DistributedSampler(features, num_replicas=info.world_size, rank=info.rank, shuffle=False, drop_last=False)
    indices = list(sampler)
    records: list[tuple[int, Any]] = []
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(indices), micro_batch_size):
            chunk = indices[i : i + micro_batch_size]
            batch = _to_device(collate([features[j] for j in chunk]), engine.device)
            outputs = engine(**batch)
            records.extend(zip(chunk, task.eval_records(outputs, batch)))
    engine.train()
    gathered = all_gather_objects(records)
    if not info.is_main:
        return None
    by_index = {index: record for rank_records in gathered for index, record in rank_records}
    return task.compute_eval_metrics([by_index[i] for i in range(len(features))], data, data_cfg)


class Checkpointer:
    """DeepSpeed checkpoints in run_dir/checkpoints/global_step<N>, with the loop state in client_state."""

    def __init__(self, directory: Path, *, info: DistInfo, keep_last: int):
        self.directory, self.info, self.keep_last = directory, info, keep_last

    def exists(self) -> bool:
        return (self.directory / "latest").is_file()

    def save(self, engine, position: DataPosition) -> None:
        rng = all_gather_objects(rng_state())  # DeepSpeed writes client_state from rank 0 only
        client_state = {"position": asdict(position), "rng": rng, "world_size": self.info.world_size}
        engine.save_checkpoint(str(self.directory), tag=f"global_step{engine.global_steps}", client_state=client_state)
        barrier()  # every rank's shards are on disk before older checkpoints go
        if self.info.is_main:
            self._prune()
        barrier()

    def load(self, engine) -> DataPosition:
        path, client_state = engine.load_checkpoint(str(self.directory))
        if path is None or client_state is None:
            raise ConfigError(
                f"{self.directory} has a 'latest' file but no loadable checkpoint; delete the directory to start over "
                "or point hydra.run.dir at another run."
            )
        if client_state["world_size"] != self.info.world_size:
            raise ConfigError(
                f"The checkpoint in {path} was written by {client_state['world_size']} ranks but this launch has "
                f"{self.info.world_size}; relaunch with the same number of ranks to resume this run dir."
            )
        set_rng_state(client_state["rng"][self.info.rank])
        return DataPosition(**client_state["position"])

    def _prune(self) -> None:
        tags = sorted(
            (int(m.group(1)), p) for p in self.directory.iterdir() if p.is_dir() and (m := CHECKPOINT_TAG.match(p.name))
        )
        for _, path in tags[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def train(
    engine,
    *,
    task: Task,
    data: TaskData,
    data_cfg: DataConfig,
    trainer: TrainerConfig,
    collate: Callable,
    info: DistInfo,
    total_steps: int,
    checkpointer: Checkpointer,
    start: Optional[DataPosition],
    log: Callable[[int, str, dict[str, float]], None],
    progress: Optional[Any] = None,
    mfu_of: Optional[Callable[[float], Optional[float]]] = None,
    stop_requested: Optional[Callable[[], bool]] = None,
) -> LoopResult:
    """Train to `total_steps` optimizer steps (or trainer.stop_after_steps), saving with `checkpointer`.

    `start`: the data position of the checkpoint the engine was resumed from (`Checkpointer.load`), None for a
    fresh run. `log(step, split, values)` is called on every rank (the logger writes on rank 0 only);
    `progress` is a tqdm-like bar (rank 0); `mfu_of(tokens_per_s)` gives the MFU of a throughput (GPU only);
    `stop_requested()` (a collective, called once per step on every rank) asks for a checkpoint and an early stop."""
    position = start or DataPosition()
    stop_at = min(total_steps, trainer.stop_after_steps or total_steps)
    eval_batch = trainer.eval_micro_batch_size or trainer.micro_batch_size
    has_eval = data.validation is not None and len(data.validation) > 0
    batches = train_batches(data.train, collate, info=info, micro_batch_size=trainer.micro_batch_size,
                            seed=trainer.seed, start=position, num_workers=trainer.num_workers)
    meter = _Meter(engine.device)
    last_saved = engine.global_steps if start is not None else -1
    last_eval: Optional[dict[str, float]] = None
    engine.train()
    while engine.global_steps < stop_at:
        meter.start()
        for _ in range(trainer.grad_accum_steps):
            position, batch = next(batches)
            batch = _to_device(batch, engine.device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            meter.add_micro(float(loss.detach()), batch)
        step = engine.global_steps
        meter.end_step()
        if step % trainer.log_every == 0 or step == stop_at:
            values = meter.flush(lr=engine.get_lr()[0], grad_norm=engine.get_global_grad_norm(), mfu_of=mfu_of)
            log(step, "train", values)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
        if progress is not None:
            progress.update(1)
        if has_eval and trainer.eval_every and step % trainer.eval_every == 0 and step < total_steps:
            last_eval = evaluate(engine, task, data, data_cfg, collate, info=info, micro_batch_size=eval_batch)
            log(step, "eval", last_eval or {})
        if (trainer.save_every and step % trainer.save_every == 0) or step == stop_at:
            checkpointer.save(engine, position)
            last_saved = step
        if stop_requested is not None and step < stop_at and stop_requested():
            if last_saved != step:
                checkpointer.save(engine, position)
            return LoopResult(step, completed=False, eval_results=None, preempted=True)
    if engine.global_steps < total_steps:
        return LoopResult(engine.global_steps, completed=False, eval_results=None)
    if has_eval and trainer.eval_at_end:
        last_eval = evaluate(engine, task, data, data_cfg, collate, info=info, micro_batch_size=eval_batch)
        log(engine.global_steps, "eval", last_eval or {})
    return LoopResult(engine.global_steps, completed=True, eval_results=last_eval)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class _Meter:
    """Loss and throughput of the steps since the last log line, summed over ranks when flushed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = self.micro_steps = self.tokens = self.samples = self.seconds = 0.0
        self.steps = 0
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def add_micro(self, loss: float, batch: dict[str, torch.Tensor]) -> None:
        self.loss_sum += loss
        self.micro_steps += 1
        self.tokens += float(batch["attention_mask"].sum())
        self.samples += batch["input_ids"].shape[0]

    def end_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.steps += 1

    def flush(self, *, lr: float, grad_norm: Any, mfu_of: Optional[Callable[[float], Optional[float]]]
              ) -> dict[str, float]:
        loss_sum, micro, tokens, samples = all_reduce_sum(
            [self.loss_sum, self.micro_steps, self.tokens, self.samples], self.device
        )
        seconds = max(self.seconds, 1e-9)
        values = {
            "loss": loss_sum / micro,
            "lr": float(lr),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "step_time": seconds / self.steps,
        }
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            utilization = mfu_of(values["tokens_per_s"]) if mfu_of is not None else None
            if utilization is not None:
                values["mfu"] = utilization
        self.loss_sum = self.micro_steps = self.tokens = self.samples = self.seconds = 0.0
        self.steps = 0
        return values


def write_eval_results(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
