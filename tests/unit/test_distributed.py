"""Rank discovery and the shared default run-dir name, without starting a process group."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from finetune import distributed


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_launch_stamp_is_the_slurm_job_under_srun(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "4242")
    clean_env.setenv("SLURM_STEP_ID", "3")
    clean_env.setenv("SLURM_PROCID", "5")
    assert distributed.launch_stamp() == "slurm-4242-3"


def test_launch_stamp_is_shared_by_the_children_of_one_launcher(clean_env):
    """Two "ranks" started by one parent, more than a second apart, get the parent's start time."""
    child = [sys.executable, "-c", "from finetune.distributed import launch_stamp; print(launch_stamp())"]
    parent = (
        "import os, subprocess, sys, time\n"
        f"run = lambda: subprocess.run({child!r}, capture_output=True, text=True, env={{**os.environ, 'LOCAL_RANK': '0'}})\n"
        "a = run(); time.sleep(1.5); b = run()\n"
        "print(a.stdout.strip(), b.stdout.strip())\n"
    )
    first, second = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split()
    assert first == second


def test_launch_stamp_without_a_launcher_is_now(clean_env):
    before = time.strftime("%Y-%m-%d_%H-%M", time.localtime())
    assert distributed.launch_stamp().startswith(before[:13])


def test_env_for_a_single_process(clean_env):
    distributed._fill_env_from_slurm_or_single()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == "0"  # the store picks a port


def test_env_from_srun(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("MASTER_ADDR", "node1")
    distributed._fill_env_from_slurm_or_single()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "8", "1")
    assert distributed.env_rank() == 3


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    distributed.seed_everything(1)
    state = distributed.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    distributed.seed_everything(2)
    distributed.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
