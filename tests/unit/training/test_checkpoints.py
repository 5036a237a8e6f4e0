"""Training checkpoints without a launch: commit, resume, pruning and the disk check (a fake engine writes the files)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.config import ConfigError
from finetune.distributed import DistInfo, rng_state
from finetune.training import checkpoints, commit
from finetune.training.checkpoints import COMPLETE_MARKER, Checkpointer, checkpoint_complete
from finetune.training.data_order import DataPosition
from finetune.training.errors import DiskSpaceError
from finetune.training.resume import RunLayout


def _shard_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"module": {"weight": torch.zeros(100)}}, buffer)
    return buffer.getvalue()


SHARD = _shard_bytes()  # a torch file, as DeepSpeed writes (the restricted unpickler reads it before a resume)


class FakeCheckpointEngine:
    """Writes what DeepSpeed's save_checkpoint would (a small torch file per rank and kind) and records loads."""

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
            (Path(directory) / tag / name).write_bytes(SHARD)
        self.saved.append(tag)
        self.client_states[tag] = client_state

    def load_checkpoint(self, directory, *, tag):
        self.loaded.append(tag)
        return str(Path(directory) / tag), self.client_states[tag]


def resume(checkpointer: Checkpointer, engine: FakeCheckpointEngine):
    """What the runner does: find the resume point before the engine exists, then load it (None: fresh)."""
    point = checkpointer.find_resume_point()
    return None if point is None else checkpointer.resume(engine, point, seed=0)


def save_at(checkpointer: Checkpointer, engine: FakeCheckpointEngine, step: int) -> None:
    engine.global_steps = step
    checkpointer.save(engine, DataPosition(0, step))


def test_a_save_is_committed_with_a_marker_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 5)
    marker = json.loads((tmp_path / "global_step5" / COMPLETE_MARKER).read_text())
    assert marker["files"] == {"mp_rank_00_model_states.pt": len(SHARD),
                               "zero_pp_rank_0_mp_rank_00_optim_states.pt": len(SHARD)}
    assert marker["checksums"]["mp_rank_00_model_states.pt"] == commit.file_checksum(
        tmp_path / "global_step5" / "mp_rank_00_model_states.pt")
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
    position = resume(resumed, engine)
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
    assert resume(ckpt, engine) == DataPosition(0, 2)
    assert (tmp_path / "global_step4").is_dir()
    assert "ignoring" in capsys.readouterr().out


def test_resume_without_a_complete_checkpoint_starts_fresh(tmp_path):
    engine = FakeCheckpointEngine()
    assert resume(Checkpointer(tmp_path / "missing", info=DistInfo(0, 1, 0), keep_last=2), engine) is None
    (tmp_path / "global_step3").mkdir()  # the first save was interrupted
    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / "global_step1").mkdir()
    (tmp_path / "global_step1" / COMPLETE_MARKER).write_text("{}")  # a marker from another tool: not ours
    assert resume(Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2), engine) is None
    assert engine.loaded == [] and not (tmp_path / "global_step3").exists()


def test_resume_of_a_run_dir_from_before_completion_markers_trusts_latest(tmp_path):
    for step in (2, 4):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    engine = FakeCheckpointEngine()
    engine.client_states["global_step4"] = {"position": {"epoch": 0, "batches": 4}, "rng": [rng_state()],
                                           "world_size": 1}
    # the position was counted in one rank's micro batches then: 4 micro batches of accumulation 2 = 2 steps
    old = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2, layout=RunLayout(1, 4, 2))
    assert resume(old, engine) == DataPosition(0, 2)
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
    free["bytes"] = 2 * len(SHARD)  # less than the previous checkpoint takes: its two shards and its marker
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


def test_the_marker_records_layout_and_model_and_a_relaunch_reads_them_before_any_engine(tmp_path):
    layout = RunLayout(world_size=1, micro_batch_size=2, grad_accum_steps=2, zero_stage=2, config_file="z2.json")
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2, layout=layout, model={"n_layer": 2})
    save_at(ckpt, FakeCheckpointEngine(), 3)
    marker = json.loads((tmp_path / "global_step3" / COMPLETE_MARKER).read_text())
    assert marker["layout"]["grad_accum_steps"] == 2 and marker["model"] == {"n_layer": 2}
    point = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).find_resume_point()
    assert (point.tag, point.step, point.layout, point.model) == ("global_step3", 3, layout, {"n_layer": 2})
    # a marker from before layouts were recorded still tells the world size
    marker.pop("layout"), marker.pop("model")
    (tmp_path / "global_step3" / COMPLETE_MARKER).write_text(json.dumps(marker))
    point = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).find_resume_point()
    assert point.layout == RunLayout(world_size=1) and point.model is None


def test_rng_states_come_back_on_the_same_world_size_and_are_reseeded_per_rank_on_another(tmp_path):
    engine = FakeCheckpointEngine()
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    torch.manual_seed(123)
    save_at(ckpt, engine, 4)
    expected = torch.rand(3)
    torch.manual_seed(0)
    resume(ckpt, engine)
    assert torch.equal(torch.rand(3), expected)  # the stream continues where the save left it
    # the same checkpoint resumed by rank 1 of 2: a stream of its own, from (seed, step, rank)
    engine.client_states["global_step4"]["world_size"] = 3
    draws = []
    for rank in (0, 1, 0):
        other = Checkpointer(tmp_path, info=DistInfo(rank, 2, rank), keep_last=2)
        other.resume(engine, Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).find_resume_point(),
                     seed=7)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    assert checkpoints.resume_seed(7, 4, 0) != checkpoints.resume_seed(7, 4, 1) != checkpoints.resume_seed(8, 4, 1)


def test_a_universal_copy_is_pruned_with_its_original(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=1)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    (tmp_path / "global_step2_universal" / "zero").mkdir(parents=True)
    save_at(ckpt, engine, 4)
    (tmp_path / "global_step4_universal").mkdir()
    save_at(ckpt, engine, 6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step6"]


def test_step_counters_shared_by_a_universal_load_are_unshared():
    # DeepSpeed's ZeRO-3 universal loader hands both parameter groups one `step` tensor; torch's Adam would then
    # count every step twice (tests/integration/test_elastic_resume.py fails on ZeRO-3 without this).
    shared = torch.tensor(6.0)
    state = {"weights": {"step": shared, "exp_avg": torch.zeros(2)}, "biases": {"step": shared}}
    checkpoints._unshare_step_counters(SimpleNamespace(basic_optimizer=SimpleNamespace(state=state)))
    assert state["weights"]["step"] is not state["biases"]["step"]
    state["weights"]["step"] += 1
    assert float(state["weights"]["step"]) == 7.0 and float(state["biases"]["step"]) == 6.0


def test_files_are_fsynced_before_the_marker_and_a_flipped_byte_falls_back_to_the_previous_checkpoint(
        tmp_path, monkeypatch, capsys):
    synced = []
    real_fsync_tree = checkpoints.fsync_tree
    monkeypatch.setattr(checkpoints, "fsync_tree", lambda path: (
        synced.append((path.name, (path / COMPLETE_MARKER).exists())), real_fsync_tree(path)))
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 4)
    assert synced == [("global_step2", False), ("global_step4", False)]  # each before its marker existed
    shard = tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    assert checkpoint_complete(tmp_path / "global_step4")
    assert resume(Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3), engine) == DataPosition(0, 2)
    out = capsys.readouterr().out
    assert "passing over" in out and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in out and "global_step4" in out
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert (tmp_path / "global_step4").is_dir()  # kept to look at, until the run saves step 4 anew
    save_at(ckpt, engine, 4)
    assert commit.checksum_mismatches(tmp_path / "global_step4") == []


def test_latest_is_checked_against_the_tag_pattern_and_the_run_dir(tmp_path, capsys):
    engine = FakeCheckpointEngine()
    ckpt = Checkpointer(tmp_path / "checkpoints", info=DistInfo(0, 1, 0), keep_last=3)
    save_at(ckpt, engine, 2)
    # with completion markers, `latest` decides nothing: a bad one is said and rewritten
    for bad in ("../../elsewhere/global_step9", "global_step2/../../x", "\x00\xff", "global_step7"):
        (tmp_path / "checkpoints" / "latest").write_bytes(bad.encode("utf-8", "surrogateescape"))
        assert ckpt.find_resume_point().tag == "global_step2"
        assert "not a checkpoint of this dir" in capsys.readouterr().out
        assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step2"
    # before completion markers, `latest` chose: one that is not a tag of this dir is refused
    old = tmp_path / "old" / "checkpoints"
    (old / "global_step3").mkdir(parents=True)
    (tmp_path / "other_run" / "global_step9").mkdir(parents=True)
    for bad in ("../../other_run/global_step9", "global_step5", "rm -rf ~", "\x00"):
        (old / "latest").write_text(bad)
        with pytest.raises(ConfigError) as err:
            Checkpointer(old, info=DistInfo(0, 1, 0), keep_last=2).find_resume_point()
        assert "not a checkpoint of this run dir" in str(err.value) and "nothing was loaded" in str(err.value)
    assert (old / "global_step3").is_dir() and (tmp_path / "other_run" / "global_step9").is_dir()


def test_a_symlinked_tag_dir_is_neither_loaded_nor_pruned(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "global_step9"
    ckpt = Checkpointer(tmp_path / "checkpoints", info=DistInfo(0, 1, 0), keep_last=1)
    engine = FakeCheckpointEngine()
    save_at(Checkpointer(elsewhere.parent, info=DistInfo(0, 1, 0), keep_last=1), engine, 9)
    save_at(ckpt, engine, 2)
    (tmp_path / "checkpoints" / "global_step9").symlink_to(elsewhere)
    assert ckpt.find_resume_point().tag == "global_step2"
    save_at(ckpt, engine, 3)
    assert (elsewhere / COMPLETE_MARKER).is_file()
