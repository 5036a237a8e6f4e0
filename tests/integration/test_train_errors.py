"""Bad input to launch/train.py: one clear message naming the setting and the fix, exit code 2, no traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def assert_user_error(run, *fragments: str) -> None:
    assert run.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    for fragment in fragments:
        assert fragment in run.output, run.output[-3000:]


def test_ds_json_contradicting_the_batch_size_fails_on_every_rank(launch, tmp_path):
    bad = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    bad["train_batch_size"] = 64
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(bad))
    run = launch(tmp_path / "run", "task=qa", f"deepspeed.config_file={path}", "trainer.micro_batch_size=8", check=False)
    # the deepspeed launcher passes the ranks' exit code on
    assert_user_error(run, '"train_batch_size" is 64 but the Hydra config gives 16', "mine.json")
    assert run.output.count('"train_batch_size" is 64') == 1  # every rank fails alike; rank 0 alone says it
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_model_path_single_process(launch, tmp_path):
    """`python launch/train.py` (no launcher); the other validation errors are unit-tested on parse_config/engine."""
    run = launch(tmp_path / "run", "model.path=/nonexistent/gpt-j", nprocs=0, check=False)
    assert_user_error(run, "/nonexistent/gpt-j")
