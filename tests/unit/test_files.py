"""finetune.files and what uses it: atomic eval_results.json, one-swap publishing, no process-wide umask changes,
private outputs, and `make clean` / bench/gpu_wheels.sh that delete nothing but their own artefacts."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune import files
from finetune.files import atomic_write_text, make_private, new_file_mode, swap_into_place
from finetune.training.evaluation import write_eval_results

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def current_umask() -> int:  # the test's own process: reading it by setting it is fine here
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- eval_results.json ------------------------------------------------------------------------------
def test_eval_results_survive_a_crash_before_the_new_file_is_complete(tmp_path, monkeypatch):
    results = tmp_path / "eval_results.json"
    write_eval_results(results, {"step": 100, "f1": 0.5})
    before = results.read_text()

    def crash(*args, **kwargs):
        raise OSError("machine went down before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="machine went down"):
        write_eval_results(results, {"step": 200, "f1": 0.7})
    assert results.read_text() == before  # the old results, whole: never a half-written or empty file
    assert [p.name for p in tmp_path.iterdir()] == ["eval_results.json"]  # no temporary file left behind
    monkeypatch.undo()
    write_eval_results(results, {"step": 200, "f1": 0.7}, private=True)
    assert json.loads(results.read_text()) == {"step": 200, "f1": 0.7}
    assert mode(results) == 0o600


def test_atomic_write_fsyncs_before_it_renames_and_keeps_the_mode(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(0o640)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o640
    assert events[:2] == ["fsync", "replace"]


# --- permissions ------------------------------------------------------------------------------------
def test_new_file_mode_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    expected = 0o666 & ~current_umask()

    def forbidden(mask):
        raise AssertionError("os.umask changes the mask of every thread of the process")

    monkeypatch.setattr(os, "umask", forbidden)
    assert new_file_mode(tmp_path) == expected
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_make_private_covers_a_whole_tree(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.json").write_text("{}")
    (tmp_path / "out" / "sub" / "b.bin").write_bytes(b"x")
    make_private(tmp_path / "out")
    assert mode(tmp_path / "out") == mode(tmp_path / "out" / "sub") == 0o700
    assert mode(tmp_path / "out" / "a.json") == mode(tmp_path / "out" / "sub" / "b.bin") == 0o600


# --- publishing a directory -------------------------------------------------------------------------
def staged(tmp_path: Path, content: str) -> Path:
    staging = tmp_path / f".out.partial-{content}"
    staging.mkdir()
    (staging / "weights").write_text(content)
    return staging


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_swap_replaces_the_old_output_and_removes_it(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    swap_into_place(staged(tmp_path, "old"), out)
    seen = []
    real_rmtree = shutil.rmtree
    # When the old output is deleted, the new one is already in place.
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (seen.append((out / "weights").read_text()),
                                                              real_rmtree(p, *a, **k)))
    swap_into_place(staged(tmp_path, "new"), out)
    assert seen == ["new"]
    assert (out / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_swap_leaves_the_old_output_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # the two-rename path, which can fail in between
    out = tmp_path / "out"
    swap_into_place(staged(tmp_path, "old"), out)
    new = staged(tmp_path, "new")
    real_rename = Path.rename

    def rename(self, target):
        if self == new:
            raise OSError("disk quota exceeded")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="quota"):
        swap_into_place(new, out)
    assert (out / "weights").read_text() == "old"


# --- scripts that delete ----------------------------------------------------------------------------
def test_make_clean_deletes_no_runs():
    commands = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "rm -rf" in commands and ".venv" in commands
    for kept in ("outputs", "multirun"):
        assert kept not in commands.split(), commands


def test_gpu_wheels_refuses_a_dest_it_did_not_make(tmp_path):
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "thesis.tex").write_text("years of work")
    # PYTHON=false: the script must stop before it would run Python (and before any download).
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh"), str(dest)], capture_output=True,
                            text=True, env={**os.environ, "PYTHON": "false"})
    assert result.returncode == 2, result.stderr
    assert "is not a wheel bundle made by this script" in result.stderr and "nothing was deleted" in result.stderr
    assert (dest / "thesis.tex").read_text() == "years of work"
