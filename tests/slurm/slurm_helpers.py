"""Helpers for the tests on a local SLURM cluster: submitting, waiting on job states, reading run dirs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[2]
SLURM_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
# Per-job options that fit the CPU test node: 2 ranks, one CPU each, no GPUs (train.sbatch asks for 8 of each).
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
# The tiny model, ZeRO-3 (conf/train.yaml's default), W&B off: seconds of training per job.
TINY_TRAINING = ["task=qa", "model=tiny", "deepspeed=zero3", "logger=none", "trainer.micro_batch_size=4"]


@dataclass
class Job:
    id: str
    log: Path


class LocalSlurm:
    def __init__(self, directory: Path):
        self.directory = directory
        self.env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
        if (directory / "bin").is_dir():  # several nodes: the commands enter the controller's network namespace
            self.env["PATH"] = f"{directory / 'bin'}:{self.env['PATH']}"

    def namespace(self, node: str) -> str:
        """The network namespace of `node` (node1, node2, ...) on a cluster of several nodes."""
        names = (self.directory / "netns").read_text().split()
        return next(name for name in names if name.endswith(f"-n{node.removeprefix('node')}"))

    def controller_namespace(self) -> str:
        return next(name for name in (self.directory / "netns").read_text().split() if name.endswith("-ctl"))

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{result.stdout}")
        return result.stdout

    def sbatch(self, script: str, *args: str, options: Iterable[str] = (), log: Path, env: Optional[dict] = None) -> Job:
        """Submit from the repository root (as a user would), with the job's environment extended by `env`."""
        command = ["sbatch", "--parsable", f"--output={log}", *options, script, *args]
        result = subprocess.run(
            command, cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        return Job(id=result.stdout.strip().split(";")[0], log=log)

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of the job (JobState, Restarts, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: Job, *, until: Iterable[str], timeout: float, poll: float = 2.0) -> dict[str, str]:
        """Wait for one of the states in `until`; a terminal state that is not wanted fails with the job's log."""
        wanted = set(until)
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job.id)
            state = fields.get("JobState", "")
            if state in wanted:
                return fields
            if state in terminal or time.monotonic() > deadline:
                raise AssertionError(f"job {job.id} is {state} (waited for {sorted(wanted)}); log:\n{tail(job.log)}")
            time.sleep(poll)


def tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return f"({path} does not exist)"
    kept = [l for l in path.read_text(errors="replace").splitlines() if "FutureWarning" not in l and "return func(" not in l]
    return "\n".join(kept[-lines:])


def read_metrics(run_dir: Path, split: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("split") == split]


# One uninterrupted run, shared: the sbatch test checks it, the preemption test compares its losses with it.
STEPS = 16
REFERENCE_TRAINING = [*TINY_TRAINING, f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=0",
                      "trainer.save_every=0"]


@dataclass
class FinishedRun:
    job: Job
    run_dir: Path
    fields: dict[str, str]


