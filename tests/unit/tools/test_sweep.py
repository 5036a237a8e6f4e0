"""finetune.tools.sweep: ranking a multirun's points by the sweep's objective and writing summary.json / summary.md;
the objective a trial returns and how a failed trial is reported (run_trial)."""
import json
import math
import signal
from types import SimpleNamespace

import pytest
import yaml

from finetune.config import ConfigError
from finetune.tasks import get_task
from finetune.tools.sweep import SweepSummaryError, TrialFailed, main, objective_of, run_trial, summarize


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


def test_ranks_by_the_task_objective_with_unfinished_points_last(qa_sweep):
    summary = summarize(qa_sweep)
    task = get_task("qa")
    assert (summary.metric, summary.higher_is_better) == (task.objective_metric, True) == ("f1", True)
    finished = [p for p in summary.points if p.results is not None]
    values = [p.results["f1"] for p in finished]
    assert values == sorted(values, reverse=True) and [p.path for p in finished] == ["1", "3", "0"]
    assert summary.points[-1].path == "2" and summary.points[-1].results is None
    written = json.loads((qa_sweep / "summary.json").read_text())
    assert [p["path"] for p in written["points"]] == [p.path for p in summary.points]


def test_markdown_table_shows_only_the_swept_overrides(qa_sweep):
    summarize(qa_sweep)
    table = (qa_sweep / "summary.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| rank"))
    assert "optim.lr" in header and "task" not in header.replace("run dir", "")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert rows[0].startswith("| 1 | 1 | complete | 3e-05 | 50 |")  # the best point first, with its learning rate
    assert "no results" in rows[-1] and rows[-1].rstrip().endswith("| 2 |")
    # The best point's overrides as a single run.
    assert "deepspeed launch/train.py task=qa optim.lr=3e-5\n" in table


def test_lower_is_better_metric_and_task_direction(tmp_path):
    make_point(tmp_path, "a", ["optim.lr=1"], {"perplexity": 9.0, "loss": 2.2}, task="clm")
    make_point(tmp_path, "b", ["optim.lr=2"], {"perplexity": 3.0, "loss": 1.1}, task="clm")
    summary = summarize(tmp_path)
    assert summary.metric == "perplexity" and summary.higher_is_better is False
    assert [p.path for p in summary.points] == ["b", "a"]


def test_cli_ranks_by_a_named_metric(qa_sweep, capsys):
    main([str(qa_sweep), "--metric", "loss"])  # loss: lower is better without saying so
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


# ------------------------------------------------------------------------------------------------ Optuna trials
def write_trials(sweep_dir, trials, objective="f1", direction="maximize"):
    record = {"sweeper": "optuna", "objective": objective, "direction": direction, "seed": 0,
              "search_space": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "step": None}},
              "trials": trials}
    (sweep_dir / "trials.json").write_text(json.dumps(record))


def trial(number, state, lr, value=None, reason=None):
    return {"number": number, "job": number, "params": {"optim.lr": lr}, "overrides": ["task=qa", f"optim.lr={lr}"],
            "state": state, "value": value, "reason": reason, "run_dir": str(number)}


def test_optuna_trials_carry_status_and_reason_and_a_failed_trial_is_never_scored(tmp_path):
    make_point(tmp_path, "0", ["task=qa", "optim.lr=0.0001"], {"exact_match": 10.0, "f1": 30.0})
    # A trial that died after writing partial results (e.g. a NaN stop after an eval) still has no score.
    make_point(tmp_path, "1", ["task=qa", "optim.lr=0.0009"], {"exact_match": 0.0, "f1": 0.0})
    make_point(tmp_path, "2", ["task=qa", "optim.lr=0.0003"], {"exact_match": 20.0, "f1": 45.0})
    write_trials(tmp_path, [
        trial(0, "complete", 1e-4, 30.0), trial(1, "failed", 9e-4, reason="loss is nan at step 3"),
        trial(2, "complete", 3e-4, 45.0),
        # A SLURM job that never started: no run dir, only the sweeper's record.
        trial(3, "failed", 5e-5, reason="SLURM job 17 ended (OUT_OF_MEMORY) without a result: oom-kill"),
        trial(4, "running", 2e-4),
    ])
    summary = summarize(tmp_path)
    assert (summary.sweeper, summary.metric, summary.searched) == ("optuna", "f1", ["optim.lr"])
    by_number = {p.number: p for p in summary.points}
    assert [p.number for p in summary.points[:2]] == [2, 0]  # only completed trials are ranked
    assert by_number[1].status == "failed" and by_number[1].results is None
    assert by_number[3].reason.startswith("SLURM job 17 ended (OUT_OF_MEMORY)") and by_number[3].path == "3"
    assert by_number[4].status == "running"
    assert summary.best.number == 2
    assert summary.best_command == "deepspeed launch/train.py task=qa optim.lr=0.0003"
    table = (tmp_path / "summary.md").read_text()
    assert "## Best: trial 2, f1 = 45 (run dir `2`)" in table
    assert "| - | 1 | failed: loss is nan at step 3 | 0.0009 |" in table
    assert "5 points: 2 complete, 2 failed, 1 running" in table


def test_trial_value_stands_in_for_missing_eval_results(tmp_path):
    make_point(tmp_path, "0", ["x=1"], None, task="clm")
    write_trials(tmp_path, [trial(0, "complete", 1e-4, 2.5)], objective="loss", direction="minimize")
    summary = summarize(tmp_path)
    assert summary.best.results == {"loss": 2.5} and summary.higher_is_better is False


# ------------------------------------------------------------------------------------------------ the objective
@pytest.mark.parametrize("cfg, expected", [
    ({"task": {"name": "qa"}}, ("f1", "maximize")),
    ({"task": {"name": "cls"}}, ("accuracy", "maximize")),
    ({"task": {"name": "clm"}}, ("perplexity", "minimize")),
    ({"task": {"name": "qa"}, "sweep": {"objective": "loss"}}, ("loss", "minimize")),
    ({"task": {"name": "clm"}, "sweep": {"objective": "loss", "direction": "maximize"}}, ("loss", "maximize")),
])
def test_objective_defaults_to_the_task_and_can_be_set(cfg, expected):
    assert objective_of(cfg) == expected


def test_a_wrong_direction_names_the_key():
    with pytest.raises(ConfigError, match="sweep.direction='up' is invalid"):
        objective_of({"task": {"name": "qa"}, "sweep": {"direction": "up"}})


def finished(**results):
    return lambda: SimpleNamespace(eval_results=results)


def test_run_trial_returns_the_objective():
    assert run_trial(finished(f1=42.5, loss=1.0), objective="f1", sweeping=True) == 42.5
    # A single run never fails on the objective: it returns what there is.
    assert run_trial(finished(loss=1.0), objective="f1", sweeping=False) is None


def test_run_trial_turns_failures_into_recorded_reasons_in_a_sweep():
    def stopped():
        try:
            raise RuntimeError("loss is nan at step 3")
        except RuntimeError:
            raise SystemExit(3) from None  # what the runner does after printing its error

    with pytest.raises(TrialFailed, match="^loss is nan at step 3$"):
        run_trial(stopped, objective="f1", sweeping=True)
    with pytest.raises(SystemExit):  # outside a sweep the exit stays an exit
        run_trial(stopped, objective="f1", sweeping=False)

    def user_error():
        raise ConfigError("trainer.micro_batch_size=0 is invalid: set 1 or more.")

    with pytest.raises(TrialFailed, match="micro_batch_size=0 is invalid"):
        run_trial(user_error, objective="f1", sweeping=True)

    def out_of_memory():
        raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrialFailed, match="^MemoryError: CUDA out of memory"):
        run_trial(out_of_memory, objective="f1", sweeping=True)
    # Not scored as 0: a NaN objective or a missing one is a failure.
    with pytest.raises(TrialFailed, match="f1 is nan"):
        run_trial(finished(f1=math.nan), objective="f1", sweeping=True)
    with pytest.raises(TrialFailed, match=r"no accuracy in the eval results \(f1, loss\): set sweep.objective"):
        run_trial(finished(f1=1.0, loss=2.0), objective="accuracy", sweeping=True)


def test_a_stop_for_a_restart_is_not_a_failed_trial():
    def preempted():
        raise SystemExit(128 + signal.SIGUSR2)  # checkpointed; SLURM requeues the job, which resumes the trial

    with pytest.raises(SystemExit) as exited:
        run_trial(preempted, objective="f1", sweeping=True)
    assert exited.value.code == 128 + signal.SIGUSR2
