"""finetune.tools.sweep: ranking a multirun's points by the task metric and writing summary.json / summary.md."""
import json

import pytest
import yaml

from finetune.tasks import get_task
from finetune.tools.sweep import SweepSummaryError, main, summarize


def make_point(sweep_dir, name, overrides, results, task="qa"):
    hydra_dir = sweep_dir / name / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"task": {"name": task}, "optim": {"lr": 0.1}}))
    if results is not None:
        (sweep_dir / name / "eval_results.json").write_text(json.dumps(results))


@pytest.fixture
def qa_sweep(tmp_path):
    make_point(tmp_path, "0", ["task=qa", "optim.lr=1e-5"], {"exact_match": 10.0, "f1": 30.0, "loss": 2.0})
    make_point(tmp_path, "1", ["task=qa", "optim.lr=3e-5"], {"exact_match": 40.0, "f1": 50.0, "loss": 1.5})
    make_point(tmp_path, "2", ["task=qa", "optim.lr=1e-4"], None)  # failed point
    make_point(tmp_path, "3", ["task=qa", "optim.lr=3e-4"], {"exact_match": 20.0, "f1": 45.0, "loss": 1.0})
    return tmp_path


def test_ranks_by_the_task_main_metric_with_unfinished_points_last(qa_sweep):
    summary = summarize(qa_sweep)
    task = get_task("qa")
    assert (summary.metric, summary.higher_is_better) == (task.main_metric, task.higher_is_better)
    finished = [p for p in summary.points if p.results is not None]
    values = [p.results[task.main_metric] for p in finished]
    assert values == sorted(values, reverse=task.higher_is_better)
    assert summary.points[-1].path == "2" and summary.points[-1].results is None
    written = json.loads((qa_sweep / "summary.json").read_text())
    assert [p["path"] for p in written["points"]] == [p.path for p in summary.points]


def test_markdown_table_shows_only_the_swept_overrides(qa_sweep):
    summarize(qa_sweep)
    table = (qa_sweep / "summary.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| rank"))
    assert "optim.lr" in header and "task" not in header.replace("run dir", "")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert rows[0].startswith("| 1 | 3e-5 |")  # the best point first, with its learning rate
    assert "no results" in rows[-1] and rows[-1].rstrip().endswith("| 2 |")


def test_lower_is_better_metric_and_task_direction(tmp_path):
    make_point(tmp_path, "a", ["optim.lr=1"], {"perplexity": 9.0, "loss": 2.2}, task="clm")
    make_point(tmp_path, "b", ["optim.lr=2"], {"perplexity": 3.0, "loss": 1.1}, task="clm")
    summary = summarize(tmp_path)
    assert summary.metric == "perplexity" and summary.higher_is_better is False
    assert [p.path for p in summary.points] == ["b", "a"]


def test_cli_ranks_by_a_named_metric(qa_sweep, capsys):
    main([str(qa_sweep), "--metric", "loss", "--lower-is-better"])
    written = json.loads((qa_sweep / "summary.json").read_text())
    losses = [p["results"]["loss"] for p in written["points"] if p["results"]]
    assert written["metric"] == "loss" and losses == sorted(losses)
    assert "Ranked by `loss` (lower is better)" in capsys.readouterr().out


def test_a_dir_without_points_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SweepSummaryError, match="No sweep points"):
        summarize(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "missing")])
    assert exited.value.code == 2 and "does not exist" in capsys.readouterr().err
