"""The run dir's lock and permission check without a launch: a second holder is refused by name, a dead or
requeued holder's lock is taken over, a run dir others can write into is refused. (Two real launches into one run
dir: tests/integration/test_run_dir_safety.py.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from finetune.training.run_dir import (
    LOCK_FILE,
    Holder,
    RunDirInUseError,
    RunDirLock,
    RunDirPermissionError,
    check_permissions,
    stale_reason,
)


def hold_lock_in_another_process(run_dir, *, slurm_job_id=None):
    """A child process that takes the lock and keeps it until its stdin closes."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from finetune.training.run_dir import RunDirLock
        lock = RunDirLock(Path({str(run_dir)!r}))
        lock.acquire()
        print("locked", flush=True)
        sys.stdin.read()
    """)
    env = {key: value for key, value in os.environ.items() if key != "SLURM_JOB_ID"}
    if slurm_job_id:
        env["SLURM_JOB_ID"] = slurm_job_id
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_launch_is_refused_naming_the_holder_and_the_next_takes_over_once_it_ended(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:
        with pytest.raises(RunDirInUseError) as err:
            RunDirLock(tmp_path, notice=print).acquire()
        message = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and str(tmp_path) in message
        assert "hydra.run.dir" in message and len(message.splitlines()) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    said = []
    lock = RunDirLock(tmp_path, notice=said.append)
    lock.acquire()  # the kernel dropped the dead holder's lock
    assert lock.held and f"taken over from the launch before, pid {holder.pid}" in said[0]
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert oct((tmp_path / LOCK_FILE).stat().st_mode & 0o777) == oct(0o600)
    lock.release()
    RunDirLock(tmp_path, notice=said.append).acquire()  # released: taken again in this process, no notice
    assert len(said) == 1


def test_a_lock_held_past_its_owner_is_broken_when_the_owner_is_stale(tmp_path):
    holder = hold_lock_in_another_process(tmp_path)
    try:  # the lock is held (a child that outlived its launch, say), and the record says it is stale
        said = []
        RunDirLock(tmp_path, notice=said.append, stale=lambda h: "pid 1234 is no longer running").acquire()
        assert "breaking the lock left by" in said[0] and "pid 1234 is no longer running" in said[0]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_stale_holders_dead_pid_requeued_or_finished_job_and_live_ones():
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "no longer running" in stale_reason(Holder(host=host, pid=dead.pid), job_id="")
    assert stale_reason(Holder(host=host, pid=os.getpid()), job_id="") is None
    # a requeued SLURM job relaunches under its own id, maybe on another node: the lock is its own
    assert "restart" in stale_reason(Holder(host="node7", pid=99, slurm_job_id="42"), host=host, job_id="42")
    other_job = Holder(host="node7", pid=99, slurm_job_id="41")
    assert "has ended" in stale_reason(other_job, host=host, job_id="42", job_finished=lambda job: True)
    assert stale_reason(other_job, host=host, job_id="42", job_finished=lambda job: False) is None
    assert stale_reason(other_job, host=host, job_id="42", job_finished=lambda job: None) is None  # cannot tell
    # another host, no SLURM: nothing tells whether it still runs
    assert stale_reason(Holder(host="node7", pid=99), host=host, job_id="") is None


def test_a_run_dir_others_can_write_into_is_refused_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    os.chmod(run_dir, 0o700)
    check_permissions(run_dir, allow_shared=False)  # the user's alone
    os.chmod(run_dir / "checkpoints", 0o777)
    with pytest.raises(RunDirPermissionError) as err:
        check_permissions(run_dir, allow_shared=False)
    message = str(err.value)
    assert "checkpoints is writable by its group and others" in message
    assert "trainer.allow_shared_run_dir=true" in message and "chmod go-w" in message
    said = []
    check_permissions(run_dir, allow_shared=True, notice=said.append)
    assert said[0].startswith("warning:") and "writable by its group and others" in said[0]


def test_a_new_run_dir_made_group_writable_by_the_umask_is_tightened(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o775)  # umask 002
    said = []
    check_permissions(run_dir, allow_shared=False, notice=said.append)
    assert run_dir.stat().st_mode & 0o777 == 0o755 and "removed the group/other write permission" in said[0]
    # one with checkpoints already in it is not silently fixed: someone may have written them
    (run_dir / "checkpoints").mkdir()
    os.chmod(run_dir, 0o775)
    with pytest.raises(RunDirPermissionError, match="writable by its group"):
        check_permissions(run_dir, allow_shared=False)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a directory to another user")
def test_a_run_dir_of_another_user_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    os.chown(run_dir, 12345, 12345)
    with pytest.raises(RunDirPermissionError, match="belongs to uid 12345, not to you"):
        check_permissions(run_dir, allow_shared=False)
