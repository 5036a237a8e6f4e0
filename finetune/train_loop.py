"""The training loop, one for every task: micro batches -> DeepSpeed engine -> logs, evals, checkpoints.

Data order is a pure function of (seed, epoch, world size): a DistributedSampler permutation per epoch, cut
into micro batches. A checkpoint records the position (epoch, micro batches consumed) and every rank's RNG
state, so a resumed run sees exactly the batches the uninterrupted run would have seen.

Faults: a checkpoint counts only once committed (every rank's files written, then a completion marker), so a run
killed while saving resumes from the previous one; a step whose loss or gradients are not finite is skipped, and
trainer.max_nonfinite_steps of them in a row stop the run; a failed collective (a rank died or hangs) ends it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from . import faults
from .config import ConfigError, DataConfig, TrainerConfig
from .data import TaskData, model_inputs
from .distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object, rng_state,
                          set_rng_state)
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


class TrainingError(RuntimeError):
    """Training cannot go on safely. The message says what happened, where the last complete checkpoint is and
    what to do; the run stops on every rank with a non-zero exit code."""


class NonFiniteLossError(TrainingError):
    """trainer.max_nonfinite_steps consecutive steps had a non-finite loss or gradients (bf16/fp32)."""


class DiskSpaceError(TrainingError):
    """The checkpoint file system has less free space than the next checkpoint needs."""


class RankFailureError(TrainingError):
    """A collective failed: another rank died, or hung past trainer.collective_timeout_s."""


COMPLETE_MARKER = "complete.json"  # in a tag dir: written last, it makes the checkpoint count
LATEST = "latest"  # DeepSpeed's pointer to the newest checkpoint (read by its tools and by launch/export.py)
SIZE_MARGIN = 1.1  # checkpoints of one run barely vary in size; the margin covers the estimate of the first one


class Checkpointer:
    """DeepSpeed checkpoints in run_dir/checkpoints/global_step<N>, with the loop state in client_state.

    A save is committed only once every rank's files are written: DeepSpeed writes the shards (without touching
    `latest`), the ranks meet at a barrier, then rank 0 writes the tag's completion marker (the list of its files
    and their sizes) and `latest`, each atomically (temp file + os.replace). A tag without the marker is what an
    interrupted save left: resuming ignores it, rank 0 removes it, and the newest complete checkpoint is loaded.
    Pruning to `keep_last` counts complete checkpoints only and runs after a commit, so it never deletes the
    only complete one, nor the one `latest` names.
    """

    def __init__(self, directory: Path, *, info: DistInfo, keep_last: int):
        self.directory, self.info, self.keep_last = Path(directory), info, keep_last
        self.last_complete: Optional[Path] = None  # the checkpoint a relaunch would resume from (for messages)

    # --- saving ---------------------------------------------------------------------------------------
    def save(self, engine, position: DataPosition) -> None:
        """Write and commit the checkpoint of the engine's current step (a collective: every rank calls it).

        Raises DiskSpaceError, before anything is written, when the file system lacks room for it."""
        step = engine.global_steps
        tag = f"global_step{step}"
        self._check_free_space(engine, tag)
        rng = all_gather_objects(rng_state())  # DeepSpeed writes client_state from rank 0 only
        client_state = {"position": asdict(position), "rng": rng, "world_size": self.info.world_size}
        leftover = self.directory / tag
        if self.info.is_main and leftover.is_dir() and not (leftover / COMPLETE_MARKER).exists():
            shutil.rmtree(leftover)  # an interrupted save of this same step: start it clean
        barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        faults.kill_if_active("kill_in_save", step=step, rank=self.info.rank)
        barrier()  # every rank's files are on disk: commit
        if self.info.is_main:
            _commit(self.directory / tag, step=step, world_size=self.info.world_size)
            _write_atomically(self.directory / LATEST, tag)
            self._prune()
        self.last_complete = self.directory / tag
        barrier()

    def _check_free_space(self, engine, tag: str) -> None:
        """Rank 0 compares the expected size with the free space; every rank raises the same error."""
        problem = None
        if self.info.is_main:
            needed, basis = self._expected_size(engine)
            where = next(p for p in (self.directory, *self.directory.parents) if p.exists())
            free = shutil.disk_usage(where).free
            if needed > free:
                problem = (
                    f"Not enough disk space for checkpoint {tag}: it needs about {needed / 2**30:.2f} GiB ({basis}) "
                    f"but the file system of {where} has {free / 2**30:.2f} GiB free. Nothing of it was written; "
                    f"the last complete checkpoint is {self.describe_last_complete()}. Free some space, lower "
                    f"trainer.keep_last (now {self.keep_last}; an old checkpoint is deleted only after a new one is "
                    "complete, so one extra checkpoint must fit), or move the run dir to a larger disk; then "
                    "relaunch with the same hydra.run.dir to resume."
                )
        problem = broadcast_object(problem)
        if problem:
            raise DiskSpaceError(problem)

    def _expected_size(self, engine) -> tuple[int, str]:
        complete = self._complete_tags()
        if complete:
            size = sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file())
            return int(size * SIZE_MARGIN), f"the size of {complete[-1].name}"
        params = list(engine.module.parameters())
        numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 partitions keep their full size here
        weights = sum(n * p.element_size() for n, p in zip(numel, params))
        trainable = sum(n for n, p in zip(numel, params) if p.requires_grad)
        # weights + an fp32 master copy and Adam's two fp32 moments per trainable parameter
        return int((weights + 12 * trainable) * SIZE_MARGIN), f"estimated from {sum(numel):,} parameters"

    def _prune(self) -> None:
        complete = self._complete_tags()
        keep = set(complete[-self.keep_last:])
        latest = self._latest_tag()
        if latest is not None:
            keep.add(self.directory / latest)
        for path in self._tag_dirs():
            if path not in keep:  # older complete ones, and leftovers of interrupted saves
                shutil.rmtree(path, ignore_errors=True)

    # --- resuming -------------------------------------------------------------------------------------
    def resume(self, engine) -> Optional[DataPosition]:
        """Load the newest complete checkpoint into `engine` and return its data position; None when there is
        none (a fresh run). A collective: rank 0 chooses (and removes leftovers of interrupted saves), every
        rank loads that same tag."""
        tag = broadcast_object(self._choose_and_clean() if self.info.is_main else None)
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None or client_state is None:
            raise ConfigError(
                f"{self.directory / tag} is marked complete but DeepSpeed could not load it; delete it to resume "
                "from an older checkpoint, delete the directory to start over, or point hydra.run.dir at another run."
            )
        if client_state["world_size"] != self.info.world_size:
            raise ConfigError(
                f"The checkpoint in {path} was written by {client_state['world_size']} ranks but this launch has "
                f"{self.info.world_size}; relaunch with the same number of ranks to resume this run dir."
            )
        set_rng_state(client_state["rng"][self.info.rank])
        self.last_complete = self.directory / tag
        return DataPosition(**client_state["position"])

    def _choose_and_clean(self) -> Optional[str]:
        """Rank 0: the tag to resume from, after setting aside what interrupted saves left."""
        tags = self._tag_dirs()
        if tags and not any((p / COMPLETE_MARKER).exists() for p in tags):
            # Written before completion markers existed: trust `latest` as DeepSpeed did, delete nothing.
            latest = self._latest_tag()
            return latest if latest is not None and (self.directory / latest).is_dir() else None
        complete = self._complete_tags()
        chosen = complete[-1] if complete else None
        for path in tags:
            if path == chosen:
                continue
            if not (path / COMPLETE_MARKER).exists():
                if chosen is None or _step_of(path) > _step_of(chosen):
                    _notice(f"removing {path}: its save was interrupted (no completion marker), so it is incomplete")
                    shutil.rmtree(path, ignore_errors=True)
            elif path not in complete:
                _notice(f"ignoring {path}: files listed in its {COMPLETE_MARKER} are missing or have another size")
        if chosen is None:
            return None
        if self._latest_tag() != chosen.name:  # a kill between the marker and `latest`, or a damaged newer tag
            _write_atomically(self.directory / LATEST, chosen.name)
        return chosen.name

    # --- inspection -----------------------------------------------------------------------------------
    def _tag_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        tags = [p for p in self.directory.iterdir() if p.is_dir() and CHECKPOINT_TAG.match(p.name)]
        return sorted(tags, key=_step_of)

    def _complete_tags(self) -> list[Path]:
        """Committed checkpoints whose files are all there, oldest first."""
        return [p for p in self._tag_dirs() if checkpoint_complete(p)]

    def _latest_tag(self) -> Optional[str]:
        latest = self.directory / LATEST
        return latest.read_text().strip() if latest.is_file() else None

    def describe_last_complete(self) -> str:
        """The checkpoint a relaunch would resume from, for messages."""
        last = self.last_complete or next(iter(reversed(self._complete_tags())), None)
        return str(last) if last is not None else "none (the run would start over)"


def checkpoint_complete(tag_dir: Path) -> bool:
    """Whether `tag_dir` was committed and every file its marker lists has the size it had then."""
    try:
        files = json.loads((tag_dir / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((tag_dir / name).is_file() and (tag_dir / name).stat().st_size == size for name, size in files.items())


def _commit(tag_dir: Path, *, step: int, world_size: int) -> None:
    files = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}
    _write_atomically(tag_dir / COMPLETE_MARKER,
                      json.dumps({"global_step": step, "world_size": world_size, "files": files}, indent=1) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part (rename is atomic on POSIX file systems)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _step_of(tag_dir: Path) -> int:
    return int(CHECKPOINT_TAG.match(tag_dir.name).group(1))


def _notice(message: str) -> None:
    print(f"Checkpoints: {message}", flush=True)


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

    `start`: the data position of the checkpoint the engine was resumed from (`Checkpointer.resume`), None for a
    fresh run. `log(step, split, values)` is called on every rank (the logger writes on rank 0 only);
    `progress` is a tqdm-like bar (rank 0); `mfu_of(tokens_per_s)` gives the MFU of a throughput (GPU only);
    `stop_requested()` (a collective, called once per step on every rank) asks for a checkpoint and an early stop.

    Raises a TrainingError (the same on every rank that sees it) when training cannot go on safely: see
    NonFiniteLossError, DiskSpaceError, RankFailureError."""
    try:
        return _train(engine, task=task, data=data, data_cfg=data_cfg, trainer=trainer, collate=collate, info=info,
                      total_steps=total_steps, checkpointer=checkpointer, start=start, log=log, progress=progress,
                      mfu_of=mfu_of, stop_requested=stop_requested)
    except RuntimeError as err:
        if not _collective_failure(err, info):
            raise
        raise RankFailureError(
            f"Rank {info.rank}: a collective operation failed ({str(err).splitlines()[0][:300]}). Another rank "
            "has most likely died (its output above says why) or stopped answering; collectives wait at most "
            f"trainer.collective_timeout_s={trainer.collective_timeout_s:g} s for a silent rank. The last complete "
            f"checkpoint is {checkpointer.describe_last_complete()}: relaunch with the same hydra.run.dir to resume "
            "from it."
        ) from err


# gloo reports a vanished peer as a plain RuntimeError ("Connection closed by peer"); NCCL as a DistBackendError.
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout", re.IGNORECASE)


def _collective_failure(err: RuntimeError, info: DistInfo) -> bool:
    return info.world_size > 1 and (isinstance(err, torch.distributed.DistError)
                                    or bool(_COLLECTIVE_FAILURE.search(str(err))))


def _train(engine, *, task: Task, data: TaskData, data_cfg: DataConfig, trainer: TrainerConfig, collate: Callable,
           info: DistInfo, total_steps: int, checkpointer: Checkpointer, start: Optional[DataPosition],
           log: Callable[[int, str, dict[str, float]], None], progress: Optional[Any],
           mfu_of: Optional[Callable[[float], Optional[float]]], stop_requested: Optional[Callable[[], bool]],
           ) -> LoopResult:
    position = start or DataPosition()
    stop_at = min(total_steps, trainer.stop_after_steps or total_steps)
    eval_batch = trainer.eval_micro_batch_size or trainer.micro_batch_size
    has_eval = data.validation is not None and len(data.validation) > 0
    batches = train_batches(data.train, collate, info=info, micro_batch_size=trainer.micro_batch_size,
                            seed=trainer.seed, start=position, num_workers=trainer.num_workers)
    meter = _Meter(engine.device)
    guard = _NonFiniteGuard(engine, trainer, info)
    last_saved = engine.global_steps if start is not None else -1
    last_eval: Optional[dict[str, float]] = None
    engine.train()
    while engine.global_steps < stop_at:
        step = engine.global_steps + 1
        meter.start()
        for micro in range(trainer.grad_accum_steps):
            position, batch = next(batches)
            batch = _to_device(batch, engine.device)
            loss = engine(**batch).loss
            if faults.active("nan_loss", step=step, rank=info.rank):
                loss = loss * float("nan")
            engine.backward(loss)
            if micro == 0:
                faults.kill_if_active("kill_in_step", step=step, rank=info.rank)
            loss_value = float(loss.detach())
            guard.add_loss(loss_value)
            if micro == trainer.grad_accum_steps - 1:
                lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler moves on in step())
                guard.before_update()
            engine.step()
            meter.add_micro(loss_value, batch)
        meter.end_step()
        clean = guard.after_update(step)
        if step % trainer.log_every == 0 or step == stop_at:
            values = meter.flush(lr=lr, grad_norm=engine.get_global_grad_norm(), mfu_of=mfu_of)
            values["skipped_steps"] = float(engine.skipped_steps)
            log(step, "train", values)
            if progress is not None:
                progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
        if progress is not None:
            progress.update(1)
        guard.stop_at_limit(step, last_complete=checkpointer.describe_last_complete)
        if has_eval and trainer.eval_every and step % trainer.eval_every == 0 and step < total_steps:
            last_eval = evaluate(engine, task, data, data_cfg, collate, info=info, micro_batch_size=eval_batch)
            log(step, "eval", last_eval or {})
        if (trainer.save_every and step % trainer.save_every == 0) or step == stop_at:
            if clean:  # a skipped step changed nothing worth a checkpoint, and may precede a stop
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


class _NonFiniteGuard:
    """Skips the update of a step whose loss or gradients are not finite, and stops a run after
    trainer.max_nonfinite_steps such steps in a row (bf16/fp32; fp16 keeps DeepSpeed's loss scaling).

    DeepSpeed's ZeRO and bf16 optimizers already check the gradients and skip such a step (no update, no LR
    step, `skipped_steps` counted, `was_step_applied()` False), agreeing over ranks. A plain torch optimizer
    (fp32 without ZeRO) is not checked: for it the ranks agree here (one all-reduce), the optimizer's step() is
    shadowed for that one call, and its `overflow` flag is set, which DeepSpeed's engine reads to skip the LR step
    and count the skip as for the others.
    """

    def __init__(self, engine, trainer: TrainerConfig, info: DistInfo):
        self.engine, self.info = engine, info
        self.limit = trainer.max_nonfinite_steps
        self.enabled = trainer.precision != "fp16"
        self.own_check = self.enabled and not hasattr(engine.optimizer, "overflow")
        self.local_bad = False
        self.run: list[int] = []  # consecutive non-finite steps so far

    def add_loss(self, loss: float) -> None:
        self.local_bad = self.local_bad or not math.isfinite(loss)

    def before_update(self) -> None:
        """Call before the engine.step() that ends the step (the accumulation boundary)."""
        if not self.own_check:
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        bad = self.local_bad or not all(bool(torch.isfinite(g).all()) for g in grads)
        bad = all_reduce_sum([float(bad)], self.engine.device)[0] > 0
        optimizer = self.engine.optimizer
        optimizer.overflow = bad
        if bad:
            optimizer.step = _no_update  # an instance attribute: the class's step() is back once it is deleted

    def after_update(self, step: int) -> bool:
        """Whether the step was applied (always True under fp16, whose skips are the loss scaler's business)."""
        self.local_bad = False
        if self.own_check:
            vars(self.engine.optimizer).pop("step", None)
        if not self.enabled or self.engine.was_step_applied():
            self.run = []
            return True
        self.run.append(step)
        if self.info.is_main:
            print(f"Step {step}: non-finite loss or gradients, update skipped ({len(self.run)} in a row, the run "
                  f"stops at trainer.max_nonfinite_steps={self.limit})", flush=True)
        return False

    def stop_at_limit(self, step: int, *, last_complete: Callable[[], str]) -> None:
        """Raise NonFiniteLossError once trainer.max_nonfinite_steps steps in a row were skipped."""
        if len(self.run) >= self.limit:
            steps = f"steps {self.run[0]}-{step}" if len(self.run) > 1 else f"step {step}"
            raise NonFiniteLossError(
                f"Stopped at step {step}: the loss or gradients were NaN or infinite in {len(self.run)} consecutive "
                f"steps ({steps}; trainer.max_nonfinite_steps={self.limit}). Each was skipped, and no checkpoint "
                f"was written after them; the last complete checkpoint is {last_complete()}. Usual causes: a "
                "learning rate too high for this model (optim.lr, scheduler.warmup_steps), overflow in bf16 "
                "(try trainer.precision=fp32), or broken data rows. Fix the cause, then relaunch with the same "
                "hydra.run.dir to resume from that checkpoint."
            )


def _no_update(*args: Any, **kwargs: Any) -> None:
    return None


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
