"""Run `launch/train.py` for real: DeepSpeed's launcher with CPU ranks (gloo), in a subprocess with a timeout."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"


@dataclass
class TrainingRun:
    run_dir: Path
    returncode: int
    output: str  # stdout and stderr of the launcher and every rank

    @property
    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def split(self, name: str) -> list[dict]:
        return [m for m in self.metrics if m["split"] == name]

    def train_losses(self) -> dict[int, float]:
        """Logged train loss per step (the last record wins when a resumed run logs a step again)."""
        return {m["step"]: m["loss"] for m in self.split("train")}

    @property
    def eval_results(self) -> dict:
        return json.loads((self.run_dir / "eval_results.json").read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> Path:
    """One processed-data cache for every launch of the session (rank 0 fills it, later launches reuse it)."""
    return tmp_path_factory.mktemp("hf_datasets_cache")


def launch_command(run_dir: Path, overrides: tuple[str, ...], *, nprocs: int, env: Optional[dict],
                   datasets_cache: Path) -> tuple[list[str], dict, int]:
    """The command line, environment and master port of one launch of launch/train.py."""
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    if nprocs:
        cmd = [str(bin_dir / "deepspeed"), "--master_port", str(port), "--num_gpus", str(nprocs), str(TRAIN)]
    else:
        cmd = [sys.executable, str(TRAIN)]
    cmd += [f"hydra.run.dir={run_dir}", "logger=none", *overrides]
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env.pop("MASTER_PORT", None)
    return cmd, full_env, port


def assert_no_shm_left(cmd: list[str], port: int) -> None:
    # DeepSpeed's CPU allreduce segments (66 MB of RAM each) must not outlive the launch, however it ended.
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"{' '.join(cmd)} left {[p.name for p in leaked]} in /dev/shm"


@pytest.fixture(scope="session")
def launch(datasets_cache):
    """`launch(run_dir, *overrides, nprocs=2, timeout=...)` -> TrainingRun. nprocs=0: plain `python launch/train.py`."""

    def _launch(run_dir: Path, *overrides: str, nprocs: int = 2, timeout: float = 600, check: bool = True,
                env: Optional[dict] = None) -> TrainingRun:
        cmd, full_env, port = launch_command(run_dir, overrides, nprocs=nprocs, env=env,
                                             datasets_cache=datasets_cache)
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        run = TrainingRun(Path(run_dir), proc.returncode, proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{run.output[-6000:]}")
        assert_no_shm_left(cmd, port)
        return run

    return _launch


@dataclass
class BackgroundLaunch:
    proc: subprocess.Popen
    cmd: list[str]
    port: int
    run_dir: Path

    def wait(self, timeout: float = 600) -> TrainingRun:
        output, _ = self.proc.communicate(timeout=timeout)
        assert_no_shm_left(self.cmd, self.port)
        return TrainingRun(self.run_dir, self.proc.returncode, output)


@pytest.fixture(scope="session")
def start_launch(datasets_cache):
    """`start_launch(run_dir, *overrides, nprocs=2)` -> BackgroundLaunch: the launch runs while the test goes on."""

    def _start(run_dir: Path, *overrides: str, nprocs: int = 2, env: Optional[dict] = None) -> BackgroundLaunch:
        cmd, full_env, port = launch_command(run_dir, overrides, nprocs=nprocs, env=env,
                                             datasets_cache=datasets_cache)
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        return BackgroundLaunch(proc, cmd, port, Path(run_dir))

    return _start
