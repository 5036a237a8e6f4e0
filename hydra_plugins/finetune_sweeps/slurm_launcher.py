"""The submitit SLURM launcher (hydra-submitit-launcher, the `slurm` extra), waiting for every job of a batch and
turning a job that ended without a result into a failed sweep point instead of an exception.

Upstream's launch ends with `[j.results()[0] for j in jobs]`: the first job that was killed (out of memory, time
limit, preempted past its requeues, a rank that crashed) raises there, the sweep stops and the batch's other jobs
are left running unwatched. Here such a job becomes a FAILED JobReturn whose error names the job, its SLURM state
and the last error line of its log; the sweeper records it (hydra/sweeper=optuna goes on; Hydra's basic sweeper
still stops, after the whole batch). conf/hydra/launcher/submitit_slurm.yaml selects this class.
"""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # the `slurm` extra is not installed: nothing to extend, and Hydra must still start
    _SubmititSlurmLauncher = None


class JobLost(RuntimeError):
    """A SLURM job of a sweep ended without a result; the message says which and why."""


# SLURM states of a job that will not run again (a requeued job is PENDING or REQUEUED, then RUNNING).
ENDED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "TIMEOUT"}


def wait_for_results(jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]],
                     poll_s: float = 10.0) -> list[JobReturn]:
    """Rank 0's JobReturn of every submitit job, waiting for all of them; a job without one becomes FAILED."""
    returns = []
    for job, overrides in zip(jobs, job_overrides):
        state = wait_for_job(job, poll_s=poll_s)
        error: Optional[BaseException] = None
        if state is None or has_result(job, grace_s=RESULT_GRACE_S):
            try:  # job.results() waits on submitit's own (sacct) view: only for a job known to be done
                returns.append(job.results()[0])
                continue
            except Exception as raised:  # noqa: BLE001 -- UncompletedJobError / FailedJobError, or unpickling
                error = raised
        reason = lost_job_reason(job, error, state=state)
        log.warning("%s", reason)
        returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=JobLost(reason)))
    return returns


RESULT_GRACE_S = 30.0  # a shared file system may show the result file after the job has ended


def has_result(job: Any, *, grace_s: float) -> bool:
    """Whether the ended job's result files appear within `grace_s` (job.done() is True once they exist)."""
    deadline = time.monotonic() + grace_s
    while not job.done():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def wait_for_job(job: Any, *, poll_s: float) -> Optional[str]:
    """Until the job has a result or has ended; returns its SLURM state when scontrol told it.

    submitit's own wait asks `sacct`, which needs SLURM's accounting database: where there is none (small clusters,
    the local test cluster) it never learns that a job died without a result, and would wait forever. `scontrol`
    knows every job the controller has, and finished ones for MinJobAge (5 minutes by default)."""
    while not job.done():
        state = slurm_state(job.job_id) if type(job).__name__ == "SlurmJob" else None
        if state in ENDED_STATES:
            return state
        time.sleep(poll_s)
    return None


def slurm_state(job_id: str) -> Optional[str]:
    """The job's state as scontrol shows it; None where scontrol is missing or does not know the job."""
    if shutil.which("scontrol") is None:
        return None
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                               timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bJobState=(\w+)", shown.stdout)
    return match.group(1) if match else None


def lost_job_reason(job: Any, error: Optional[BaseException], *, state: Optional[str] = None) -> str:
    state = state or _safe(lambda: job.state) or "UNKNOWN"
    text = _safe(job.stderr) or _safe(job.stdout) or str(error or "")
    return f"SLURM job {job.job_id} ended ({state}) without a result: {last_error_line(text)}"


def last_error_line(text: str) -> str:
    """The line of a log that says what went wrong: the last one naming an error, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("-=")]
    for line in reversed(lines):
        lowered = line.lower()
        if "error" in lowered or "killed" in lowered or "cancelled" in lowered or "oom" in lowered:
            return line[-400:]
    return lines[-1][-400:] if lines else "no log"


def _safe(read: Any) -> Optional[str]:
    try:
        value = read()
    except Exception:  # noqa: BLE001 -- sacct/scontrol missing or the log gone: report what is known
        return None
    return str(value) if value else None


if _SubmititSlurmLauncher is not None:

    class SlurmLauncher(_SubmititSlurmLauncher):  # type: ignore[misc,valid-type]
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit
            from hydra.core.singleton import Singleton
            from hydra.core.utils import filter_overrides
            from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
            from omegaconf import OmegaConf

            assert self.config is not None and len(job_overrides) > 0
            # The executor as upstream builds it (hydra-submitit-launcher 1.2 SlurmLauncher.launch).
            specific_init_keys = {"max_num_timeout"}
            init_params = {"folder": self.params["submitit_folder"]}
            init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init_keys})
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
            base_params = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{
                k if k in base_params else f"{self._EXECUTOR}_{k}": v
                for k, v in self.params.items() if k not in specific_init_keys | {"submitit_folder"}
            })
            log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, self.config.hydra.sweep.dir)
            job_params = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*job_params))
            return wait_for_results(jobs, job_overrides)
