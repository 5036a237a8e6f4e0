"""Rank discovery and the shared default run-dir name, without starting a process group."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    assert distributed.launch_stamp().endswith(f"-{os.getpid()}")


def test_launches_in_the_same_second_get_their_own_run_dirs(clean_env):
    """Generated run dir names are unique, not just to the second: two launches side by side differ."""
    child = [sys.executable, "-c", "from finetune.distributed import launch_stamp; print(launch_stamp())"]
    procs = [subprocess.Popen(child, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    first, second = (proc.communicate()[0].strip() for proc in procs)
    assert first != second and first[:16] == second[:16]


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


def _timeout_worker(rank: int, port: int, out_dir: str) -> None:
    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    info = distributed.init_distributed(collective_timeout_s=2)
    result = {}
    with distributed.main_process_first(info):  # rank 0 "processes data" longer than the collective timeout
        if info.is_main:
            time.sleep(3)
    result["setup_wait"] = "ok"
    if info.is_main:  # rank 1 hangs without dying: rank 0's collective must give up after ~2 s, not 30 min
        started = time.monotonic()
        try:
            torch.distributed.all_reduce(torch.zeros(1))
            result["hung_peer"] = "returned"
        except RuntimeError as err:
            result["hung_peer"] = type(err).__name__
        result["seconds"] = time.monotonic() - started
    else:
        time.sleep(5)  # then it exits, which would end rank 0's wait too: the bound below tells them apart
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(result, out)
    os._exit(0)  # the group is broken: skip its teardown


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_collective_timeout_bounds_a_hung_peer_but_not_the_setup_wait(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_timeout_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["setup_wait"] == "ok" and json.loads((tmp_path / "rank1.json").read_text())["setup_wait"] == "ok"
    assert rank0["hung_peer"] != "returned"
    assert 1.5 < rank0["seconds"] < 4.5, rank0


def test_a_taken_rendezvous_port_fails_at_once_with_a_clear_message(tmp_path):
    """Rank 0 of a 2-rank launch whose MASTER_PORT another process holds: one paragraph, exit 2, no timeout."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "launch/train.py", "model=tiny", "logger=none", "trainer.collective_timeout_s=900",
             f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=850,
        )
        seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: The rendezvous port MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is taken" in result.stderr
    assert "Traceback" not in result.stderr
    # At once: start-up alone, far from the 900 s rank 0 would wait for rank 1 on a port of its own.
    assert seconds < 450, seconds


def _silent_worker(rank: int, port: int, out_dir: str) -> None:
    import torch

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    distributed.init_distributed(collective_timeout_s=2)
    if rank == 2:  # hangs without dying (a stopped process, a node cut off)
        time.sleep(15)
        os._exit(0)
    try:
        torch.distributed.all_reduce(torch.zeros(1))
    except RuntimeError:
        pass
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
        json.dump(distributed.silent_ranks(), out)
    time.sleep(1)  # rank 0 serves the store: let rank 1 finish its check-in
    os._exit(0)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_after_a_failed_collective_the_ranks_left_name_the_silent_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_silent_worker, args=(port, str(tmp_path)), nprocs=3, join=True, start_method="fork")
    host = socket.gethostname()
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [[2, host]], rank
