"""Training checkpoints without a launch: commit, resume, pruning and the disk check (a fake engine writes the files)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.distributed import DistInfo, rng_state
from finetune.training import checkpoints
from finetune.training.checkpoints import COMPLETE_MARKER, Checkpointer, checkpoint_complete
from finetune.training.data_order import DataPosition
from finetune.training.errors import DiskSpaceError


class FakeCheckpointEngine:
    """Writes what DeepSpeed's save_checkpoint would (a file per rank of 1000 bytes) and records loads."""

    def __init__(self, step: int = 0):
        self.global_steps = step
        self.saved: list[str] = []
        self.loaded: list[str] = []
        self.client_states: dict[str, dict] = {}
        self.module = torch.nn.Linear(10, 10)  # 110 fp32 parameters, for the size estimate

    def save_checkpoint(self, directory, *, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is the Checkpointer's to write, after the commit
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (Path(directory) / tag / name).write_bytes(b"x" * 1000)
        self.saved.append(tag)
        self.client_states[tag] = client_state

    def load_checkpoint(self, directory, *, tag):
        self.loaded.append(tag)
        return str(Path(directory) / tag), self.client_states[tag]


def save_at(checkpointer: Checkpointer, engine: FakeCheckpointEngine, step: int) -> None:
    engine.global_steps = step
    checkpointer.save(engine, DataPosition(0, step))


def test_a_save_is_committed_with_a_marker_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 5)
    marker = json.loads((tmp_path / "global_step5" / COMPLETE_MARKER).read_text())
    assert marker["files"] == {"mp_rank_00_model_states.pt": 1000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 1000}
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed into place
    assert checkpoint_complete(tmp_path / "global_step5")
    (tmp_path / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated later
    assert not checkpoint_complete(tmp_path / "global_step5")


def test_resume_skips_an_interrupted_save_and_removes_it(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 4)
    # killed while saving step 6: shards on disk, no marker, `latest` still at 4
    (tmp_path / "global_step6").mkdir()
    (tmp_path / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    # killed between marker and `latest` cannot leave `latest` behind a complete tag for long: simulate it too
    (tmp_path / "latest").write_text("global_step2")
    resumed = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    position = resumed.resume(engine)
    assert engine.loaded == ["global_step4"] and position == DataPosition(0, 4)
    assert not (tmp_path / "global_step6").exists()
    assert "global_step6" in capsys.readouterr().out
    assert (tmp_path / "latest").read_text() == "global_step4"
    assert resumed.last_complete == tmp_path / "global_step4"


def test_resume_ignores_a_damaged_checkpoint_without_deleting_it(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 4)
    (tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert ckpt.resume(engine) == DataPosition(0, 2)
    assert (tmp_path / "global_step4").is_dir()
    assert "ignoring" in capsys.readouterr().out


def test_resume_without_a_complete_checkpoint_starts_fresh(tmp_path):
    engine = FakeCheckpointEngine()
    assert Checkpointer(tmp_path / "missing", info=DistInfo(0, 1, 0), keep_last=2).resume(engine) is None
    (tmp_path / "global_step3").mkdir()  # the first save was interrupted
    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / "global_step1").mkdir()
    (tmp_path / "global_step1" / COMPLETE_MARKER).write_text("{}")  # a marker from another tool: not ours
    assert Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).resume(engine) is None
    assert engine.loaded == [] and not (tmp_path / "global_step3").exists()


def test_resume_of_a_run_dir_from_before_completion_markers_trusts_latest(tmp_path):
    for step in (2, 4):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    engine = FakeCheckpointEngine()
    engine.client_states["global_step4"] = {"position": {"epoch": 0, "batches": 4}, "rng": [rng_state()],
                                           "world_size": 1}
    assert Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).resume(engine) == DataPosition(0, 4)
    assert engine.loaded == ["global_step4"] and (tmp_path / "global_step2").is_dir()


def test_prune_keeps_the_newest_complete_checkpoints_and_never_the_only_one(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    for step in (5, 10, 50):
        save_at(ckpt, engine, step)
    (tmp_path / "zero_to_fp32.py").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step50", "latest", "zero_to_fp32.py"]
    # keep_last=1 and a newer leftover without marker: the complete one stays, the leftover goes at the next save
    (tmp_path / "global_step60").mkdir()
    ckpt.keep_last = 1
    ckpt._prune()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step50"]
    save_at(ckpt, engine, 100)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step100"]


def test_save_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints", info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    free = {"bytes": 10**9}
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    save_at(ckpt, engine, 1)  # first save: estimated from the parameters (110 * (4 + 12) bytes + margin)
    free["bytes"] = 1500  # less than the 2000 bytes the previous checkpoint takes
    with pytest.raises(DiskSpaceError) as err:
        save_at(ckpt, engine, 2)
    message = str(err.value)
    assert "global_step2" in message and str(tmp_path) in message and "trainer.keep_last" in message
    assert "0.00 GiB" in message and "global_step1" in message  # needed/free and the last complete checkpoint
    assert engine.saved == ["global_step1"] and not (tmp_path / "checkpoints" / "global_step2").exists()
    free["bytes"] = 1000
    fresh = Checkpointer(tmp_path / "other", info=DistInfo(0, 1, 0), keep_last=2)
    with pytest.raises(DiskSpaceError, match="estimated from 110 parameters"):
        save_at(fresh, engine, 1)
