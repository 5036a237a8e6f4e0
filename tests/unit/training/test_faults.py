"""FINETUNE_FAULT parsing and matching (the test-only fault injection used by the fault-tolerance tests)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.training import faults


@pytest.fixture(autouse=True)
def test_switch(monkeypatch):
    monkeypatch.setenv(faults.SWITCH, "1")


def test_points_match_their_step_and_rank(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_in_step@5:rank1, nan_loss@9+, kill_in_save")
    assert faults.active("kill_in_step", step=5, rank=1)
    assert not faults.active("kill_in_step", step=5, rank=0) and not faults.active("kill_in_step", step=6, rank=1)
    assert not faults.active("nan_loss", step=8, rank=0)
    assert faults.active("nan_loss", step=9, rank=0) and faults.active("nan_loss", step=50, rank=1)
    assert faults.active("kill_in_save", step=3, rank=0)


def test_unset_injects_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert not any(faults.active(point, step=1, rank=0) for point in faults.POINTS)
    faults.kill_if_active("kill_in_step", step=1, rank=0)  # still alive


@pytest.mark.parametrize("spec", ["kill_in_stp@5", "nan_loss@x", "nan_loss:1"])
def test_a_typo_is_an_error_not_a_silent_no_op(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    with pytest.raises(ValueError, match="FINETUNE_FAULT"):
        faults.active("nan_loss", step=1, rank=0)


def test_kill_is_a_sigkill():
    code = "from finetune.training import faults; faults.kill_if_active('kill_in_step', step=2, rank=0); print('survived')"
    proc = subprocess.run([sys.executable, "-c", code], env={"FINETUNE_FAULT": "kill_in_step@2", faults.SWITCH: "1", "PATH": ""},
                          capture_output=True, text=True)
    assert proc.returncode == -9 and "survived" not in proc.stdout
    assert "kill_in_step killing rank 0 at step 2" in proc.stderr


def test_without_the_test_switch_a_fault_is_ignored_with_a_warning(monkeypatch, capsys):
    monkeypatch.delenv(faults.SWITCH)
    monkeypatch.setenv(faults.ENV, "raise_in_save@3, kill_in_step@3")
    faults.raise_if_active("raise_in_save", step=3, rank=0)  # no error
    faults.kill_if_active("kill_in_step", step=3, rank=0)  # still alive
    assert "FINETUNE_FAULT='raise_in_save@3, kill_in_step@3' is ignored" in capsys.readouterr().err


def test_raise_in_save_raises_on_its_rank_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "raise_in_save@3:rank1")
    faults.raise_if_active("raise_in_save", step=3, rank=0)
    with pytest.raises(faults.InjectedFault, match="raise_in_save at step 3 on rank 1"):
        faults.raise_if_active("raise_in_save", step=3, rank=1)
