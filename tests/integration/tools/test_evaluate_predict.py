"""launch/evaluate.py and launch/predict.py as a user runs them, on the final/ of a real training run (conftest)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.data.sources import BUNDLED_DATA_DIR

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
EVALUATE, PREDICT = REPO / "launch" / "evaluate.py", REPO / "launch" / "predict.py"
QA_VALIDATION = BUNDLED_DATA_DIR / "qa" / "validation.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], *, cwd: Path, datasets_cache: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_DATASETS_CACHE": str(datasets_cache), "HF_HUB_OFFLINE": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def metrics_of(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("step", "task", "split", "model")}


def test_evaluate_under_zero3_reproduces_the_training_eval_results(qa_run, datasets_cache, tmp_path):
    # The run evaluated on 2 ranks with micro batch 2; the same setting gives the same numbers, loss included
    # (the task averages per-batch losses, so the batching must match for the loss).
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()), "--num_gpus", "2",
           str(EVALUATE), "task=qa", f"model.path={qa_run.run_dir / 'final'}", "eval.micro_batch_size=2",
           f"eval.output={tmp_path / 'eval.json'}"]
    result = run(cmd, cwd=tmp_path, datasets_cache=datasets_cache)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "(ZeRO-3)" in result.stdout
    written = json.loads((tmp_path / "eval.json").read_text())
    expected = metrics_of(qa_run.eval_results)
    assert metrics_of(written) == pytest.approx(expected, rel=1e-5)
    assert {"exact_match", "f1"} <= expected.keys()
    assert written["split"] == "validation" and written["task"] == "qa"


def test_evaluate_in_one_process_prints_a_table_and_writes_json(qa_run, datasets_cache, tmp_path):
    cmd = [sys.executable, str(EVALUATE), "task=qa", f"model.path={qa_run.run_dir / 'final'}"]
    result = run(cmd, cwd=tmp_path, datasets_cache=datasets_cache)
    assert result.returncode == 0, result.stderr[-4000:]
    written = json.loads((tmp_path / "eval_results.json").read_text())  # the default eval.output
    # Span metrics do not depend on batching; the loss (a mean of batch means) does.
    for key in ("exact_match", "f1"):
        assert written[key] == pytest.approx(qa_run.eval_results[key], abs=1e-9)
        assert any(line.split()[:1] == [key] for line in result.stdout.splitlines())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_writes_one_row_per_input_and_resumes(qa_run, datasets_cache, tmp_path):
    from finetune.config import DataConfig
    from finetune.data import qa_references
    from finetune.data.qa import read_qa_files
    from finetune.metrics import squad_metrics

    output = tmp_path / "answers.jsonl"
    cmd = [sys.executable, str(PREDICT), "task=qa", f"model.path={qa_run.run_dir / 'final'}", f"input={QA_VALIDATION}",
           f"output={output}", "batch_size=16"]
    result = run(cmd, cwd=tmp_path, datasets_cache=datasets_cache)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(output)
    examples = read_qa_files([str(QA_VALIDATION)], "json", DataConfig())
    assert [r["index"] for r in rows] == list(range(len(examples)))
    assert [r["id"] for r in rows] == examples["id"]
    assert all(isinstance(r["answer"], str) and isinstance(r["score"], float) for r in rows)
    # The same post-processing as evaluation: the answers score what training's evaluation reported.
    em = squad_metrics({r["id"]: r["answer"] for r in rows}, qa_references(examples))["exact_match"]
    assert em == pytest.approx(qa_run.eval_results["exact_match"], abs=1e-9)

    # A crash mid-write: 37 complete lines and half of the 38th. The rerun completes the file without duplicates.
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:37]) + lines[37][:20])
    result = run(cmd, cwd=tmp_path, datasets_cache=datasets_cache)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed: 37 rows" in result.stderr
    resumed = read_jsonl(output)
    assert [{k: v for k, v in r.items() if k != "score"} for r in resumed] == [
        {k: v for k, v in r.items() if k != "score"} for r in rows]
    # Other batches pad to other widths, which moves float sums in the last bits only.
    assert [r["score"] for r in resumed] == pytest.approx([r["score"] for r in rows], rel=1e-5)


def test_bad_input_gets_one_clear_error(qa_run, datasets_cache, tmp_path):
    final = qa_run.run_dir / "final"
    wrong_columns = tmp_path / "rows.jsonl"
    wrong_columns.write_text('{"query": "Who?", "passage": "Nobody."}\n')
    cases = {
        "model.path= is required": [EVALUATE, "task=qa"],
        "does not exist": [EVALUATE, "task=qa", f"model.path={tmp_path / 'missing'}"],
        "input='": [PREDICT, "task=qa", f"model.path={final}", f"input={tmp_path / 'nope.jsonl'}", "output=o.jsonl"],
        "has no column 'question' (set by data.question_column)": [
            PREDICT, "task=qa", f"model.path={final}", f"input={wrong_columns}", "output=o.jsonl"],
        "model.dtype='int4'": [PREDICT, "task=qa", f"model.path={final}", f"input={QA_VALIDATION}", "output=o.jsonl",
                               "model.dtype=int4"],
    }
    for expected, (script, *overrides) in cases.items():
        result = run([sys.executable, str(script), *overrides], cwd=tmp_path, datasets_cache=datasets_cache)
        assert result.returncode == 2, (overrides, result.stderr[-3000:])
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "o.jsonl").exists()
