"""bench/gpu_suite.py, the GPU suite's driver: which carried wheels it installs, how it stops a run that hangs, what
it does with the time budget, and the tables and goals it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gpu_suite
import pytest

SUITE = Path(gpu_suite.__file__)


def test_installs_the_wheels_that_are_missing_or_older_here(tmp_path):
    names = ["deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl",
             "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
             "typing_extensions-4.16.0-py3-none-any.whl", "omegaconf-2.3.1-py3-none-any.whl"]
    here = {"hjson": "3.1.0", "pydantic-core": "2.9.0", "typing-extensions": "4.20.1", "omegaconf": "2.10.0"}
    chosen = gpu_suite.wheels_to_install([tmp_path / n for n in names], here.get)
    # deepspeed: missing; pydantic-core 2.9 < 2.50 (not by string order); the rest are as new or newer here.
    assert [w.name.split("-")[0] for w in chosen] == ["deepspeed", "pydantic_core"]


def test_missing_modules_are_looked_up_with_the_runs_environment(tmp_path):
    (tmp_path / "carried_pkg").mkdir()
    (tmp_path / "carried_pkg" / "__init__.py").write_text("")
    modules = ("json", "carried_pkg", "no_such_module_here")
    assert gpu_suite.missing_modules(dict(os.environ), modules) == ["carried_pkg", "no_such_module_here"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # what the installed wheels' folder does
    assert gpu_suite.missing_modules(env, modules) == ["no_such_module_here"]


def test_case_options_per_case_and_for_all():
    options = gpu_suite.case_options(["full.micro_batch=4", "steps=3", "offload.pin_memory=false",
                                      "lora.checkpointing=true", "full.note=abc"], ["full", "lora", "offload"])
    assert options["full"] == {"micro_batch": 4, "steps": 3, "note": "abc"}
    assert options["lora"] == {"steps": 3, "checkpointing": True}
    assert options["offload"] == {"steps": 3, "pin_memory": False}
    with pytest.raises(SystemExit, match="no case 'ful'"):
        gpu_suite.case_options(["ful.micro_batch=4"], ["full"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        gpu_suite.case_options(["full.micro_batch"], ["full"])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a killed process waiting to be reaped is gone for our purposes


def test_a_run_past_its_timeout_is_killed_with_everything_it_started(tmp_path):
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print(c.pid, flush=True); time.sleep(120)")
    with open(tmp_path / "log", "w+") as log:
        status, seconds = gpu_suite.run_process([sys.executable, "-c", script], env=dict(os.environ), timeout=2,
                                                log=log)
    assert status == "timeout"
    assert 2 <= seconds < 2 + gpu_suite.KILL_GRACE_S + 5
    grandchild = int((tmp_path / "log").read_text().split()[0])
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_run_status_follows_the_exit_code(tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert gpu_suite.run_process([sys.executable, "-c", "pass"], env=dict(os.environ), timeout=30,
                                     log=log)[0] == "ok"
        assert gpu_suite.run_process([sys.executable, "-c", "import sys; sys.exit(3)"], env=dict(os.environ),
                                     timeout=30, log=log)[0] == "failed (exit 3)"


def _suite(tmp_path, *args) -> tuple[int, list[dict], str]:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}  # its lock clean-up touches nothing shared
    proc = subprocess.run([sys.executable, str(SUITE), str(tmp_path / "out"), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    return proc.returncode, rows, (tmp_path / "out" / "summary.md").read_text()


def test_a_case_past_its_own_timeout_is_reported_and_the_suite_still_writes_its_tables(tmp_path):
    code, rows, summary = _suite(tmp_path, "--cases", "setup", "--timeout", "setup=1")
    assert code == 1
    status = [r for r in rows if r["kind"] == "status"]
    assert [(r["case"], r["status"]) for r in status] == [("setup", "timeout")]
    assert status[0]["seconds"] < 1 + gpu_suite.KILL_GRACE_S + 5
    assert "| setup | probe | timeout |" in summary


def test_no_case_starts_once_the_budget_is_spent(tmp_path):
    code, rows, summary = _suite(tmp_path, "--cases", "setup", "--budget-s", "5")
    assert code == 1
    assert [(r["case"], r["status"]) for r in rows if r["kind"] == "status"] == [("setup", "skipped")]
    assert not [r for r in rows if r["kind"] == "environment"]  # it never ran
    assert "skipped" in summary


def _training(case, run, tokens_per_s, **extra):
    row = {"case": case, "run": run, "kind": "training", "zero_stage": 3, "offload": False, "micro_batch": 2,
           "seq_len": 2048, "checkpointing": False, "step_s": 4096 / tokens_per_s, "tokens_per_s": tokens_per_s,
           "mfu": None, "peak_bytes": 100 * 2**30, "estimate_bytes": 100 * 2**30, "estimate_error": None,
           "init_s": 30.0, "losses": [10.9, 10.8]}
    return {**row, **extra}


def test_goals_compare_ours_with_transformers_and_the_targets():
    training = [
        _training("full", "ours", 12000, mfu=0.42, estimate_error=-0.05),
        _training("full", "transformers", 10000),
        _training("lora", "ours", 21000, mfu=0.40, estimate_error=0.20),
        _training("lora", "transformers", 20000),
    ]
    generation = [{"batch": 1, "impl": "ours", "tokens_per_s": 30.0}, {"batch": 1, "impl": "transformers",
                                                                        "tokens_per_s": 25.0},
                  {"batch": 8, "impl": "ours", "tokens_per_s": 190.0}, {"batch": 8, "impl": "transformers",
                                                                         "tokens_per_s": 200.0}]
    met = {goal: (measured, ok) for goal, measured, ok in gpu_suite.goals(training, generation)}
    assert met["full: MFU >= 40%"] == ("42.0%", "yes")
    assert met["lora: MFU >= 45%"] == ("40.0%", "no")
    assert met["full: tokens/s >= 1.1x transformers'"] == ("1.20", "yes")
    assert met["lora: tokens/s >= 1.1x transformers'"] == ("1.05", "no")
    assert met["full: planner within 15% of the measured peak"] == ("-5.0%", "yes")
    assert met["lora: planner within 15% of the measured peak"] == ("+20.0%", "no")
    assert met["generation, batch 1: tokens/s >= transformers'"] == ("1.20", "yes")
    assert met["generation, batch 8: tokens/s >= transformers'"] == ("0.95", "no")


def test_summary_has_the_ratio_against_transformers_and_the_loss_parity():
    rows = [
        {"kind": "suite", "started": "2026-11-30T10:00:00", "commit": "abc1234"},
        {"kind": "environment", "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0"},
         "versions": {"torch": "2.11.0"}, "matmul_tflops": 780.0, "matmul_size": 8192, "matmul_dtype": "bf16"},
        {"case": "full", "run": "ours", "kind": "status", "status": "ok", "seconds": 50.0},
        _training("full", "ours", 12000, mfu=0.42, losses=[10.9, 10.8]),
        _training("full", "transformers", 10000, losses=[10.9001, 10.8002]),
    ]
    summary = gpu_suite.summarize(rows, dry=False)
    assert "NVIDIA H200" in summary and "780 TFLOP/s" in summary
    ours = next(line for line in summary.splitlines() if line.startswith("| full | ours | ZeRO-3"))
    assert "| 1.20 |" in ours and "| 42.0% |" in ours
    assert "10.80000 / 10.80020 (diff -2.00e-04)" in summary
    assert "## Goals" in summary and "Not evaluated" not in summary


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace") \
                    and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_stopping_the_suite_stops_its_running_case_and_still_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    suite = subprocess.Popen([sys.executable, str(SUITE), str(out), "--dry-run", "--cases", "setup"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not _processes_mentioning(str(out / "results.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(out / "results.jsonl")), "the setup run never started"
    suite.terminate()
    assert suite.wait(timeout=30) == 128 + 15
    time.sleep(0.5)
    assert not _processes_mentioning(str(out / "results.jsonl"))  # the case's process went with it
    assert (out / "summary.md").exists()
