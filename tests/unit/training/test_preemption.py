"""finetune.training.preemption: signals become a flag, ranks agree on it, rank 0 asks SLURM to requeue."""
import os
import signal
import stat
import sys

import pytest
import torch
import torch.multiprocessing as mp

from finetune.training.preemption import PreemptionHandler


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments; exits with $FAKE_SCONTROL_RC."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nsleep ${{FAKE_SCONTROL_SLEEP:-0}}\n'
                      f'exit ${{FAKE_SCONTROL_RC:-0}}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_signal_sets_the_flag_and_uninstall_restores_the_previous_handler(signum):
    previous = signal.getsignal(signum)
    handler = PreemptionHandler().install()
    try:
        assert not handler.requested
        os.kill(os.getpid(), signum)
        assert handler.requested and handler.received == signum
        assert handler.requested_on_any_rank()  # no process group: this process decides alone
    finally:
        handler.uninstall()
    assert signal.getsignal(signum) == previous


def test_requeue_outside_slurm_does_nothing(fake_scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert PreemptionHandler().requeue() is False
    assert not fake_scontrol.exists()


def test_requeue_inside_slurm_asks_scontrol_for_this_job(fake_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert PreemptionHandler().requeue() is True
    assert fake_scontrol.read_text().split() == ["requeue", "4242"]


def test_requeue_refused_by_slurm_is_reported_not_raised(fake_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    assert PreemptionHandler().requeue() is False


def test_a_hung_scontrol_is_given_up_on_after_its_timeout(fake_scontrol, monkeypatch, caplog):
    from finetune.training import preemption

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("FAKE_SCONTROL_SLEEP", "30")
    monkeypatch.setattr(preemption, "REQUEUE_TIMEOUT_S", 0.5)
    assert PreemptionHandler().requeue() is False
    assert "scontrol requeue 4242 did not complete" in caplog.text and "resubmit the job" in caplog.text


@pytest.mark.parametrize("is_main", [True, False])
def test_exit_for_restart_requeues_on_rank_0_only_and_exits_with_the_signal(fake_scontrol, monkeypatch, is_main):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    handler = PreemptionHandler().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit) as exited:
            handler.exit_for_restart(is_main=is_main)
    finally:
        handler.uninstall()
    assert exited.value.code == 128 + signal.SIGUSR1
    assert fake_scontrol.exists() == is_main


def _agreement_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    handler = PreemptionHandler().install()
    try:
        first = handler.requested_on_any_rank()
        if rank == 1:  # the signal reaches one rank only
            os.kill(os.getpid(), signal.SIGUSR1)
        second = handler.requested_on_any_rank()
    finally:
        handler.uninstall()
        torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as out:
        out.write(f"{first} {second}")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo file rendezvous and fork start method")
def test_ranks_agree_when_only_one_of_them_got_the_signal(tmp_path):
    mp.spawn(_agreement_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["False True", "False True"]
