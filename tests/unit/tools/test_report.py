"""finetune.tools.report: curves.png of a run and the pictures of a sweep, written as PNG files; what was drawn is
read back from the returned figures (one line per curve, with the data of metrics.jsonl), never from pixels."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.tools.report import ReportError, draw_run, draw_sweep, plot_history, plot_params, plot_run
from finetune.tools.sweep import summarize

REPO = Path(__file__).resolve().parents[3]


def write_metrics(run_dir, records, partial_line=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if partial_line:
        text += '{"step": 9, "split": "tra'  # the run is writing this line
    (run_dir / "metrics.jsonl").write_text(text)


def run_records():
    train = [{"step": s, "split": "train", "loss": 3.0 - 0.1 * s, "lr": 1e-3 * (1 - s / 10), "grad_norm": 1.0}
             for s in range(1, 9)]
    evals = [{"step": s, "split": "eval", "f1": 10.0 * s, "exact_match": 5.0 * s, "loss": 2.0 - 0.1 * s, "total": 100}
             for s in (4, 8)]
    return train + evals


def assert_png(path, min_bytes=5_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200


def test_run_curves_draw_one_line_per_curve_from_the_data(tmp_path):
    write_metrics(tmp_path / "run", run_records(), partial_line=True)
    figure = plot_run(tmp_path / "run")
    axes = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    # total is a count of examples, not a curve.
    assert sorted(axes) == ["eval exact_match", "eval f1", "eval loss", "learning rate", "train loss"]
    for title, ax in axes.items():
        assert len(ax.lines) == 1, title
    loss = axes["train loss"].lines[0]
    assert list(loss.get_xdata()) == list(range(1, 9))
    assert list(loss.get_ydata()) == pytest.approx([3.0 - 0.1 * s for s in range(1, 9)])
    assert list(axes["eval f1"].lines[0].get_xdata()) == [4, 8]
    assert list(axes["eval f1"].lines[0].get_ydata()) == [40.0, 80.0]
    assert_png(draw_run(tmp_path / "run"))


def test_a_resumed_step_keeps_its_last_record(tmp_path):
    records = run_records()
    records.append({"step": 3, "split": "train", "loss": 9.0, "lr": 1e-3})  # logged again after a resume
    write_metrics(tmp_path / "run", records)
    loss = next(ax for ax in plot_run(tmp_path / "run").axes if ax.get_title() == "train loss").lines[0]
    assert list(loss.get_xdata()) == list(range(1, 9)) and loss.get_ydata()[2] == 9.0


def test_nothing_to_draw_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        plot_run(tmp_path)
    write_metrics(tmp_path / "empty", [])
    with pytest.raises(ReportError, match="nothing to draw"):
        plot_run(tmp_path / "empty")


def make_trial_dir(sweep_dir, number, lr, results):
    run_dir = sweep_dir / str(number)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- task=qa\n- optim.lr={lr}\n")
    if results is not None:
        (run_dir / "eval_results.json").write_text(json.dumps(results))
    write_metrics(run_dir, run_records())


@pytest.fixture
def optuna_sweep(tmp_path):
    lrs = [1e-4, 5e-4, 2e-5, 8e-4, 3e-4]
    values = [30.0, None, 20.0, 50.0, 40.0]  # trial 1 failed
    trials = []
    for number, (lr, value) in enumerate(zip(lrs, values)):
        make_trial_dir(tmp_path, number, lr, {"f1": value} if value is not None else None)
        trials.append({"number": number, "job": number, "params": {"optim.lr": lr},
                       "overrides": ["task=qa", f"optim.lr={lr}"], "state": "complete" if value else "failed",
                       "value": value, "reason": None if value else "loss is nan", "run_dir": str(number)})
    (tmp_path / "trials.json").write_text(json.dumps({
        "sweeper": "optuna", "objective": "f1", "direction": "maximize", "seed": 0, "trials": trials,
        "search_space": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "step": None}}}))
    return tmp_path


def test_sweep_history_and_params_come_from_the_trials(optuna_sweep):
    summary = summarize(optuna_sweep)
    (ax,) = plot_history(summary).axes
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["trial"].get_xdata()) == [0, 2, 3, 4]
    assert list(lines["trial"].get_ydata()) == [30.0, 20.0, 50.0, 40.0]
    assert list(lines["best so far"].get_ydata()) == [30.0, 30.0, 50.0, 50.0]
    assert list(lines["failed (1)"].get_xdata()) == [1]  # a failed trial is marked, not scored
    (param_ax,) = plot_params(summary).axes
    assert param_ax.get_xscale() == "log" and param_ax.get_xlabel() == "optim.lr"
    assert sorted(zip(param_ax.lines[0].get_xdata(), param_ax.lines[0].get_ydata())) == [
        (2e-5, 20.0), (1e-4, 30.0), (3e-4, 40.0), (8e-4, 50.0)]
    for path in draw_sweep(summary):
        assert_png(path)


def test_report_script_redraws_a_sweep_and_its_runs(optuna_sweep):
    done = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(optuna_sweep)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = {Path(line).relative_to(optuna_sweep).as_posix() for line in done.stdout.split()}
    assert {"summary.md", "optimization_history.png", "params.png", "0/curves.png", "4/curves.png"} <= written
    for name in ("optimization_history.png", "params.png", "0/curves.png"):
        assert_png(optuna_sweep / name)
    bad = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(optuna_sweep / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
