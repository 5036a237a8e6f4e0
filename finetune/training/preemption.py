"""Graceful stop on a scheduler's warning signal: checkpoint, exit, and let SLURM requeue the job.

SLURM warns a job before its time limit with the signal asked for by `--signal=USR1@120` (launch/slurm/train.sbatch),
and sends SIGTERM on preemption or `scancel` (then SIGKILL after the cluster's KillWait). The handler only sets a
flag; the training loop checks it once per step, all ranks agree on it (`requested_on_any_rank`, because the signal
does not reach every rank in the same step), save a checkpoint together and stop with `exit_for_restart`: rank 0
calls `requeue()`, and the requeued job (same job id, so the same run dir) resumes from that checkpoint.

In the loop, once per step:
    if preemption.requested_on_any_rank():
        save_checkpoint(...)
        preemption.exit_for_restart(is_main=dist.is_main)
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Callable, NoReturn, Optional, Union

import torch

log = logging.getLogger(__name__)

# USR1: train.sbatch's warning before the time limit; USR2: submitit's (the Hydra sweep launcher); TERM: preemption.
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEUE_TIMEOUT_S = 60  # well below trainer.collective_timeout_s, which the other ranks wait under meanwhile
_Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


class PreemptionHandler:
    """Turns the given signals into a flag the training loop polls. Install once per run, from the main thread."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self._received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, _Handler] = {}

    def install(self) -> "PreemptionHandler":
        # Replaces, not chains, earlier handlers: submitit's own USR1 handler would requeue and exit at once,
        # before the checkpoint is written.
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers found by `install` (one process may run several sweep points)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._received is None:
            self._received = signal.Signals(signum)
            log.warning("Received %s: will save a checkpoint and stop after this step", self._received.name)

    @property
    def requested(self) -> bool:
        """Whether a stop signal reached this process."""
        return self._received is not None

    @property
    def received(self) -> Optional[signal.Signals]:
        """The first stop signal that arrived, if any."""
        return self._received

    def requested_on_any_rank(self) -> bool:
        """`requested` on any rank, the same answer on all of them. A collective: every rank must call it."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.requested
        # NCCL reduces only device tensors; gloo (CPU) only host ones.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self) -> bool:
        """Inside a SLURM job, ask SLURM to requeue it (call on rank 0 once the checkpoint is complete).

        SLURM then ends the job's processes (SIGTERM, which this handler absorbs) and starts the job again under
        the same id after its fixed requeue delay (about two minutes) and any queue wait. Needs the job to be
        requeueable (`--requeue`). Returns whether SLURM accepted; elsewhere does nothing and returns False.
        """
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            return False
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False,
                                    timeout=REQUEUE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            # An unresponsive slurmctld must not keep the ranks (waiting at the next barrier) past their timeout.
            log.warning("scontrol requeue %s did not complete (%s): the job will not restart by itself; the "
                        "checkpoint stands, resubmit the job to resume it", job_id, err)
            return False
        if result.returncode != 0:
            # E.g. a job being cancelled (scancel sends SIGTERM too): nothing to requeue, the checkpoint still stands.
            log.warning("scontrol requeue %s failed (%s): the job will not restart by itself", job_id, result.stderr.strip())
            return False
        log.warning("SLURM job %s requeued: it resumes from the checkpoint just saved", job_id)
        return True

    def exit_for_restart(self, *, is_main: bool) -> NoReturn:
        """After the checkpoint: rank 0 requeues the job (inside SLURM); every rank exits with 128 + the signal.

        Raises SystemExit rather than returning, so that `finally` blocks still run but nothing reports the run as
        finished: submitit, for one, writes no result for it and keeps waiting for the requeued job.
        """
        if is_main:
            self.requeue()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # No rank exits before the requeue: srun --kill-on-bad-exit would end rank 0 before it asked.
            torch.distributed.barrier()
        raise SystemExit(128 + int(self._received or signal.SIGTERM))
