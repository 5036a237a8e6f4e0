"""A training file with bad rows under both `data.on_bad_row` policies, on 2 CPU ranks: the default stops every
rank, with one message (printed once) naming the file, line and reason (exit 2); `skip` trains and logs the
skipped counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "finetune" / "assets" / "data" / "cls"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory) -> Path:
    """32 good rows of the bundled cls data, then a cut-off line, a null text and a numeric text (lines 33-35)."""
    good = (BUNDLED / "train.jsonl").read_text().splitlines()[:32]
    bad = ['{"text": "cut off', json.dumps({"text": None, "label": "negative"}),
           json.dumps({"text": 5, "label": "positive"})]
    path = tmp_path_factory.mktemp("bad_rows") / "train.jsonl"
    path.write_text("\n".join(good + bad) + "\n")
    return path


def overrides(path: Path) -> tuple[str, ...]:
    return ("task=cls", "deepspeed=zero2", f"data.train_file={path}",
            f"data.validation_file={BUNDLED / 'validation.jsonl'}", "data.max_eval_samples=8", "trainer.max_steps=2",
            "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.log_every=1")  # fmt: skip


def test_default_policy_stops_every_rank_naming_file_and_line(launch, tmp_path, bad_file):
    run = launch(tmp_path / "run", *overrides(bad_file), check=False, timeout=400)  # a hang is a failure too
    assert run.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    assert f"Cannot read {bad_file} as json: line 33 is not valid JSON" in run.output
    assert run.output.count("line 33 is not valid JSON") == 1  # both ranks fail alike; rank 0 alone says it
    assert "data.on_bad_row=skip" in run.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_policy_trains_and_logs_the_skipped_rows(launch, tmp_path, bad_file):
    run = launch(tmp_path / "run", *overrides(bad_file), "data.on_bad_row=skip")
    assert f"dropped 3 of 35 train rows (missing: 1, unparseable: 1, wrong_type: 1); first: file {bad_file}, line 33" \
           in run.output  # fmt: skip
    assert run.output.count("dropped 3 of 35 train rows") == 1  # printed on rank 0 only
    (record,) = run.split("data")
    assert record == {"step": 0, "split": "data", "skipped_rows_train": 3, "skipped_rows_train_missing": 1,
                      "skipped_rows_train_unparseable": 1, "skipped_rows_train_wrong_type": 1,
                      "skipped_rows_validation": 0}  # fmt: skip
    assert sorted(run.train_losses()) == [1, 2]
