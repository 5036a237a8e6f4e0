"""The training loop, one for every task: global batches -> micro batches -> DeepSpeed engine -> logs, evals,
checkpoints.

Each optimizer step trains on one global batch (finetune.training.data_order), with its loss normalised over the
whole global batch (finetune.training.loss): the rows and the gradient of a step do not depend on the layout.

Faults: a step whose loss or gradients are not finite is skipped, and trainer.max_nonfinite_steps of them in a
row stop the run; a failed collective (a rank died or hangs) ends it; checkpoints commit atomically
(finetune.training.checkpoints).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from finetune.config import DataConfig, TrainerConfig
from finetune.data import TaskData
from finetune.data.length_grouping import example_lengths
from finetune.distributed import DistInfo, all_reduce_sum, silent_ranks
from finetune.tasks import Task
from finetune.training import faults
from finetune.training.checkpoints import Checkpointer
from finetune.training.data_order import BatchLayout, DataPosition, train_steps
from finetune.training.errors import NonFiniteLossError, RankFailureError
from finetune.training.evaluation import evaluate, to_device
from finetune.training.host_memory import keep_freed_memory
from finetune.training.loss import backward_scale, global_target_count


@dataclass
class LoopResult:
    global_step: int
    completed: bool  # False when stopped early (trainer.stop_after_steps or a stop signal)
    eval_results: Optional[dict[str, float]]  # rank 0's last evaluation (None on other ranks)
    preempted: bool = False  # stopped by a signal (SLURM time limit, preemption): checkpoint saved



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
        if not collective_failure(err, info):
            raise
        silent = ", ".join(f"rank {rank} ({host})" for rank, host in silent_ranks() or ())
        who = (f"{silent[:1].upper()}{silent[1:]} did not answer afterwards: died (its output above says why) or "
               "hangs (a stopped process, a node cut off)" if silent else
               "Another rank has most likely died (its output above says why) or stopped answering")
        raise RankFailureError(
            f"Rank {info.rank}: a collective operation failed ({str(err).splitlines()[0][:300]}). {who}; "
            "collectives wait at most "
            f"trainer.collective_timeout_s={trainer.collective_timeout_s:g} s for a silent rank. The last complete "
            f"checkpoint is {checkpointer.describe_last_complete()}: relaunch with the same hydra.run.dir to resume "
            "from it."
        ) from err


# gloo reports a vanished peer as a plain RuntimeError ("Connection closed by peer"); NCCL as a DistBackendError.
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout", re.IGNORECASE)


def collective_failure(err: RuntimeError, info: DistInfo) -> bool:
    """Whether `err` is a collective that failed because a peer died or hung."""
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
    layout = BatchLayout.of(trainer, info.world_size)
    steps = train_steps(data.train, collate, info=info, layout=layout, seed=trainer.seed, start=position,
                        num_workers=trainer.num_workers,
                        lengths=example_lengths(data.train) if data_cfg.group_by_length else None)
    global_mean = trainer.loss_normalization == "global_batch"
    if engine.device.type == "cpu":  # the step's large host tensors then reuse memory instead of page-faulting
        keep_freed_memory()
    meter = _Meter(engine.device)
    guard = _NonFiniteGuard(engine, trainer, info)
    last_saved = engine.global_steps if start is not None else -1
    last_eval: Optional[dict[str, float]] = None
    engine.train()
    while engine.global_steps < stop_at:
        step = engine.global_steps + 1
        faults.wait_if_active("wait_in_step", step=step, rank=info.rank)
        meter.start()
        position, micro_batches = next(steps)
        if global_mean:  # counted before any backward pass: every micro batch's loss is scaled by the global count
            denominator = global_target_count(task, micro_batches, engine.device)
            scale = backward_scale(denominator, grad_accum_steps=layout.grad_accum_steps, world_size=info.world_size)
        else:  # DeepSpeed's mean of the micro batches' means
            denominator = torch.tensor(layout.grad_accum_steps * info.world_size, device=engine.device)
        step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)  # this rank's part, summed on device
        for micro, batch in enumerate(micro_batches):
            meter.add_micro(batch)
            batch = to_device(batch, engine.device)
            loss = engine(**batch, loss_reduction="sum").loss if global_mean else engine(**batch).loss
            if faults.active("nan_loss", step=step, rank=info.rank):
                loss = loss * float("nan")
            engine.backward(loss * scale if global_mean else loss)
            if micro == 0:
                faults.kill_if_active("kill_in_step", step=step, rank=info.rank)
            step_loss += loss.detach().double()
            if micro == layout.grad_accum_steps - 1:
                lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler moves on in step())
                guard.before_update(step_loss)
            engine.step()
        meter.end_step(step_loss, denominator)
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
        self.run: list[int] = []  # consecutive non-finite steps so far

    def before_update(self, step_loss: torch.Tensor) -> None:
        """Call before the engine.step() that ends the step (the accumulation boundary) with this rank's loss of
        the step. (DeepSpeed's own check sees a non-finite loss in the gradients it leaves.)"""
        if not self.own_check:
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        bad = not bool(torch.isfinite(step_loss)) or not all(bool(torch.isfinite(g).all()) for g in grads)
        bad = all_reduce_sum([float(bad)], self.engine.device)[0] > 0
        optimizer = self.engine.optimizer
        optimizer.overflow = bad
        if bad:
            optimizer.step = _no_update  # an instance attribute: the class's step() is back once it is deleted

    def after_update(self, step: int) -> bool:
        """Whether the step was applied (always True under fp16, whose skips are the loss scaler's business)."""
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


class _Meter:
    """Loss and throughput of the steps since the last log line, reduced over ranks when flushed.

    Each step's loss stays on the device until the flush (no host sync per micro batch): this rank's summed loss
    and the step's denominator (the global target count, or accumulation x ranks for micro-batch means). The flush
    sums the steps' losses over ranks in one all-reduce; the logged loss is the mean of the steps' exact losses."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_losses: list[torch.Tensor] = []
        self.denominators: list[torch.Tensor] = []
        self.tokens = self.samples = self.seconds = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def add_micro(self, batch: dict[str, torch.Tensor]) -> None:
        """Count a micro batch (still on the host)."""
        self.tokens += float(batch["attention_mask"].sum())
        # a packed batch is one row holding len(cu_seq_lens) - 1 examples
        self.samples += batch["cu_seq_lens"].numel() - 1 if "cu_seq_lens" in batch else batch["input_ids"].shape[0]

    def end_step(self, step_loss: torch.Tensor, denominator: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._t0
        self.step_losses.append(step_loss)
        self.denominators.append(denominator)

    def flush(self, *, lr: float, grad_norm: Any, mfu_of: Optional[Callable[[float], Optional[float]]]
              ) -> dict[str, float]:
        steps = len(self.step_losses)
        totals = torch.cat([torch.stack(self.step_losses).double(),
                            torch.tensor([self.tokens, self.samples], dtype=torch.float64, device=self.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        losses = totals[:steps] / torch.stack(self.denominators).double().clamp(min=1)
        tokens, samples = totals[steps:].tolist()
        seconds = max(self.seconds, 1e-9)
        values = {
            "loss": float(losses.mean()),
            "lr": float(lr),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "step_time": seconds / steps,
        }
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            utilization = mfu_of(values["tokens_per_s"]) if mfu_of is not None else None
            if utilization is not None:
                values["mfu"] = utilization
        self.step_losses, self.denominators = [], []
        self.tokens = self.samples = self.seconds = 0.0
        return values
