"""`bench/gpu_suite.sh --dry-run`: every case of the GPU suite on CPU at tiny shapes, so the script cannot rot.

The same code as on the GPU (one process per run with its timeout, the planner's picks, the shipped DeepSpeed
configs filled by the trainer's code, zero.Init, both implementations on identical weights, generation, the
tables), in fp32. One run of the whole suite, shared by the tests below; most of its time is Python imports.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_cases  # noqa: E402


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", str(out)],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1500)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc, rows, out


def _rows(rows, kind, **match):
    return [r for r in rows if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


def test_every_case_runs_to_the_end(suite):
    proc, rows, _ = suite
    status = {(r["case"], r["run"]): r["status"] for r in _rows(rows, "status")}
    expected = {(case.name, run.name) for case in gpu_cases.CASES.values() for run in case.runs}
    assert set(status) == expected
    assert all(s == "ok" for s in status.values()), f"{status}\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0
    env = _rows(rows, "environment")[0]
    assert all(v == "ok" for v in env["imports"].values())


def test_training_runs_both_implementations_on_the_same_weights(suite):
    _, rows, _ = suite
    for case in ("full", "lora", "qlora"):  # qlora: the same 4-bit bytes on both sides (bitsandbytes quantizes both)
        ours, theirs = (_rows(rows, "training", case=case, run=run)[0] for run in ("ours", "transformers"))
        for row in (ours, theirs):
            assert row["tokens_per_s"] > 0 and len(row["step_times"]) == gpu_cases.DRY_SHAPES.steps
            assert all(math.isfinite(loss) for loss in row["losses"])
            assert (row["micro_batch"], row["checkpointing"]) == (ours["micro_batch"], ours["checkpointing"])
        # Same weights, batch and DeepSpeed config: the first losses agree to fp32 rounding, and so does the loss
        # after one optimizer step (LoRA: B starts at zero, so step 1 is the base model's loss).
        assert ours["losses"][0] == pytest.approx(theirs["losses"][0], abs=1e-5)
        assert ours["losses"][1] == pytest.approx(theirs["losses"][1], abs=1e-4)
        assert ours["losses"][-1] < ours["losses"][0]  # it learns
    full = _rows(rows, "training", case="full", run="ours")[0]
    assert full["zero_stage"] == 3 and not full["lora"]
    lora = _rows(rows, "training", case="lora", run="ours")[0]
    assert lora["lora"] and lora["trainable_params"] < full["trainable_params"] / 10
    offload = _rows(rows, "training", case="offload", run="ours")[0]
    assert offload["optimizer"] == "DeepSpeedCPUAdam" and offload["zero_stage"] == 3
    assert offload["cpu_adam_build_s"] >= 0 and offload["pin_memory"] is not None


def test_heads_train_one_step_each(suite):
    _, rows, _ = suite
    heads = {r["task"]: r for r in _rows(rows, "heads")}
    assert set(heads) == {"cls", "qa"}
    for row in heads.values():
        assert row["watched_changed"] and row["watched"] and math.isfinite(row["losses"][0])


def test_generation_and_logit_parity(suite):
    _, rows, _ = suite
    parity = _rows(rows, "parity")[0]
    assert parity["max_abs_diff"] < 1e-4 and parity["argmax_agreement"] == 1.0
    batches = gpu_cases.DRY_SHAPES.gen_batches
    for batch in batches:
        assert {r["impl"] for r in _rows(rows, "generation", batch=batch)} == {"ours", "transformers"}
        greedy = _rows(rows, "greedy", batch=batch)[0]
        assert greedy["rows_equal"] == greedy["rows"] == batch


def test_tables_and_profiles_are_written(suite):
    proc, _, out = suite
    summary = (out / "summary.md").read_text()
    for section in ("## Cases", "## Training", "## Task heads", "## Generation", "## Parity", "## Goals"):
        assert section in summary and section in proc.stdout
    profiles = (out / "profiles.txt").read_text()
    assert "=== full/ours" in profiles and "=== lora/ours" in profiles
    assert "===== offload/ours" in (out / "log.txt").read_text()


OOM_ONCE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, "bench")
import gpu_cases, torch

real, calls = gpu_cases.timed_step, []
def out_of_memory_once(engine, batch, sync):  # the first step runs out of memory, as a too-large batch would
    calls.append(1)
    if len(calls) == 1:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(engine, batch, sync)
gpu_cases.timed_step = out_of_memory_once
ctx = gpu_cases.Context(case="full", run="ours", dry=True, results=Path(sys.argv[1]), profiles=Path(sys.argv[2]),
                        deadline=time.time() + 600, options={"warmup": 0, "steps": 2})
gpu_cases.train(ctx, impl="ours", config=gpu_cases.ZERO3)
"""


def test_a_run_out_of_memory_is_retried_once_with_activation_checkpointing(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", OOM_ONCE, str(tmp_path / "r.jsonl"), str(tmp_path / "p.txt")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row["checkpointing"] and "out of memory" in row["notes"][0] and "retried" in row["why"]
    assert len(row["losses"]) == 2 and all(math.isfinite(loss) for loss in row["losses"])
