"""The universal conversion's bookkeeping without a launch: reuse of a committed conversion, the disk check, and a
failed conversion that leaves the original and no half-written copy. (Real conversions and loads on 1 and 2 ranks:
tests/integration/test_elastic_resume.py.)"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from finetune.training import universal
from finetune.training.checkpoints import COMPLETE_MARKER, commit_tag_dir
from finetune.training.errors import CheckpointConversionError, DiskSpaceError
from finetune.training.universal import STAGING, convert_to_universal


def checkpoint(tmp_path, tag="global_step3"):
    source = tmp_path / tag
    source.mkdir(parents=True)
    (source / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    return source


def test_a_committed_conversion_is_reused(tmp_path):
    checkpoint(tmp_path)
    done = tmp_path / "global_step3_universal"
    (done / "zero").mkdir(parents=True)
    commit_tag_dir(done, record={"universal_of": "global_step3"})
    said = []
    assert convert_to_universal(tmp_path, "global_step3", log=said.append) == "global_step3_universal"
    assert "converted at an earlier launch" in said[0] and not (tmp_path / STAGING).exists()
    assert json.loads((done / COMPLETE_MARKER).read_text())["universal_of"] == "global_step3"


def test_no_room_for_the_conversion_is_refused_before_it_starts(tmp_path, monkeypatch):
    checkpoint(tmp_path)
    monkeypatch.setattr(universal.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(DiskSpaceError, match="needs about .* GiB free"):
        convert_to_universal(tmp_path, "global_step3", log=lambda message: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3"]


def test_a_failed_conversion_leaves_the_original_and_nothing_half_written(tmp_path):
    source = checkpoint(tmp_path)
    (tmp_path / STAGING / "global_step3_universal").mkdir(parents=True)  # what a killed conversion left
    with pytest.raises(CheckpointConversionError) as err:
        convert_to_universal(tmp_path, "global_step3", log=lambda message: None)
    assert str(source) in str(err.value) and "unchanged" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3"]
    assert (source / "mp_rank_00_model_states.pt").read_bytes() == b"not a checkpoint"


def test_a_conversion_that_does_not_finish_in_time_is_stopped_with_an_error(tmp_path, monkeypatch):
    assert universal.conversion_timeout_s(2**30) == universal.MIN_CONVERSION_TIMEOUT_S
    assert universal.conversion_timeout_s(100 * 2**30) == 100 * universal.CONVERSION_SECONDS_PER_GIB
    source = checkpoint(tmp_path)
    monkeypatch.setattr(universal, "conversion_timeout_s", lambda size: 0.01)
    with pytest.raises(CheckpointConversionError) as err:
        convert_to_universal(tmp_path, "global_step3", log=lambda message: None)
    assert "did not finish within 0 s" in str(err.value) and "unchanged" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step3"] and source.is_dir()
