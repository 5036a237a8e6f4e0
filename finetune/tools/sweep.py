"""Sweeps: what a trial returns (its objective), how a failed trial is reported, and the summary of a multirun.

A trial is one training run of a Hydra multirun (a grid point, or an Optuna trial: hydra/sweeper=optuna).
`run_trial` wraps launch/train.py's training: it returns the objective (`sweep.objective`, by default the task's
`objective_metric`), rank 0's value on every rank; in a multirun a failure becomes `TrialFailed` with its reason,
which Hydra records as the job's failure instead of ending the sweep.

The summary reads `<point>/.hydra/overrides.yaml` and `<point>/eval_results.json` under a sweep dir, and the
Optuna sweeper's `trials.json` when there is one (each trial's state and failure reason), and writes `summary.json`
and `summary.md` there: every trial with its parameters, metric, status and run dir, the best one and the command
that reruns it as a single run. It runs at the end of a multirun through `SweepSummaryCallback`
(conf/hydra/callbacks/sweep_summary.yaml, on by default), which also draws the sweep's pictures
(finetune.tools.report), or by hand:

    python -m finetune.tools.sweep multirun/2024-05-01/12-00-00 [--metric f1] [--lower-is-better]
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

try:  # Hydra is a dependency, but the summary also works without it (e.g. on a copied sweep dir).
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

TRIALS_FILE = "trials.json"  # written by hydra_plugins/finetune_sweeps/optuna_sweeper.py
LOWER_IS_BETTER = ("loss", "perplexity", "mse")  # metrics a sweep minimises unless sweep.direction says otherwise
NOT_METRICS = ("step", "total")  # eval_results.json entries that are counts, not scores


# ------------------------------------------------------------------------------------------------ the objective
def direction_of(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER or metric.endswith("_loss") else "maximize"


def objective_of(cfg: Any) -> tuple[str, str]:
    """(metric, maximize|minimize) a sweep of the composed config `cfg` optimises: `sweep.objective` and
    `sweep.direction`, by default the task's objective metric and that metric's direction."""
    from finetune.config import parse_sweep_config

    sweep = parse_sweep_config(cfg)
    metric = sweep.objective
    if metric is None:
        from finetune.tasks import get_task  # torch and datasets: only when the task must say

        task = cfg.get("task") if cfg is not None else None
        metric = get_task(str((task.get("name") if hasattr(task, "get") else task) or "qa")).objective_metric
    return metric, sweep.direction or direction_of(metric)


class TrialFailed(RuntimeError):
    """A sweep trial failed; the message is the reason recorded for it (Hydra keeps it as the job's failure)."""


def run_trial(train: Callable[[], Any], *, objective: str, sweeping: bool) -> Optional[float]:
    """Run `train` (-> the runner's LoopResult, eval results on rank 0) and return rank 0's `objective` on every rank.

    Outside a multirun a failure stays what it is (exit code, message). In a multirun it becomes `TrialFailed`
    with its reason, agreed by the ranks, so that the sweep records it and goes on; a completed run without a
    finite objective fails too, never scores 0. Not caught: a stop for a restart (exit 128+signal: SLURM requeues
    the job, which resumes) and a lost rank (the process group is gone, this process cannot run another trial).
    """
    from finetune import distributed

    result, reason = None, None
    try:
        result = train()
    except SystemExit as stop:
        if not sweeping or _ends_process(stop):
            raise
        context = stop.__context__  # the runner exits with a code `from None`; its error is still the context
        reason = _one_line(str(context)) if context is not None else f"exited with code {stop.code}"
    except Exception as error:  # noqa: BLE001 -- any failure of a trial is that trial's, the sweep goes on
        if not sweeping or _ends_process(error):
            raise
        from finetune.cli import is_user_error, print_user_error

        if is_user_error(error):
            print_user_error(str(error))
            reason = _one_line(str(error))
        else:
            traceback.print_exc()
            reason = _one_line(f"{type(error).__name__}: {error}")
    if reason is None:
        results = getattr(result, "eval_results", None)
        value = results.get(objective) if isinstance(results, dict) else None
        if distributed.env_rank() == 0 and sweeping:
            if not isinstance(results, dict):
                reason = "the run ended without eval results (trainer.eval_at_end=false?)"
            elif not _is_finite_number(value):
                reason = (f"{objective} is {value}" if objective in results else
                          f"no {objective} in the eval results ({', '.join(sorted(results))}): set sweep.objective")
    else:
        value = None
    value, reason = distributed.broadcast_object((value, reason))  # rank 0's outcome is the trial's
    if reason is not None:
        raise TrialFailed(reason)
    return float(value) if _is_finite_number(value) else None


def _ends_process(error: BaseException) -> bool:
    from finetune.training.errors import RankFailureError

    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128:
        return True  # finetune.training.preemption: checkpointed, requeued; the job resumes the trial
    seen = error
    while seen is not None:
        if isinstance(seen, RankFailureError):
            return True
        seen = seen.__context__
    return False


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ the summary
class SweepSummaryError(ValueError):
    """The sweep dir cannot be summarized; the message says why and what to do."""


@dataclass
class SweepPoint:
    path: str  # relative to the sweep dir
    overrides: list[str]
    results: Optional[dict[str, Any]]  # None: no eval_results.json (the point failed or has not finished)
    status: str = "complete"  # complete | failed | running | no results (a grid point that did not finish)
    reason: Optional[str] = None  # why it failed
    number: Optional[int] = None  # Optuna's trial number, or the job number of a grid point
    params: dict[str, Any] = field(default_factory=dict)  # the searched keys' values


@dataclass
class SweepSummary:
    sweep_dir: str
    metric: str
    higher_is_better: bool
    points: list[SweepPoint]  # ranked: best first, points without the metric last
    searched: list[str] = field(default_factory=list)  # the keys the sweep varied
    sweeper: str = "grid"  # grid | optuna
    search_space: dict[str, Any] = field(default_factory=dict)  # Optuna: each key's distribution
    best_command: Optional[str] = None  # reruns the best point as a single run

    @property
    def best(self) -> Optional[SweepPoint]:
        first = self.points[0] if self.points else None
        return first if first is not None and _number((first.results or {}).get(self.metric)) is not None else None


def read_trials(sweep_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(sweep_dir) / TRIALS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def collect_points(sweep_dir: Path, trials: Optional[dict[str, Any]] = None) -> list[SweepPoint]:
    """Every run under `sweep_dir` that Hydra started (it has `.hydra/overrides.yaml`), in path order, with the
    Optuna sweeper's record of each trial (state, reason, params) merged in; a trial whose job never wrote its dir
    comes from that record alone."""
    points = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        if run_dir == sweep_dir:
            continue  # a single run's own dir, not a sweep point
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        results_file = run_dir / "eval_results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        path = str(run_dir.relative_to(sweep_dir))
        points.append(SweepPoint(path=path, overrides=list(overrides), results=results,
                                 status="complete" if results is not None else "no results",
                                 number=int(path) if path.isdigit() else None))
    if trials is not None:
        by_path = {p.path: p for p in points}
        for trial in trials.get("trials", []):
            point = by_path.get(trial["run_dir"])
            if point is None:
                point = SweepPoint(path=trial["run_dir"], overrides=list(trial["overrides"]), results=None)
                points.append(point)
            point.status, point.reason, point.number = trial["state"], trial.get("reason"), trial["number"]
            point.params = dict(trial["params"])
            if point.status == "failed":
                point.results = None  # whatever it left behind, a failed trial has no score
            elif point.status == "complete" and point.results is None and trial.get("value") is not None:
                point.results = {trials["objective"]: trial["value"]}  # a task that writes no eval_results.json
    return points


def task_metric(sweep_dir: Path, points: Sequence[SweepPoint]) -> tuple[str, bool]:
    """The sweep's objective and its direction: the Optuna sweeper's record, else the first point's composed config
    (sweep.objective, or the task's objective metric)."""
    trials = read_trials(sweep_dir)
    if trials is not None:
        return trials["objective"], trials["direction"] == "maximize"
    for point in points:
        config_file = sweep_dir / point.path / ".hydra" / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
            if config.get("task"):
                metric, direction = objective_of(config)
                return metric, direction == "maximize"
    raise SweepSummaryError(
        f"Cannot tell the task of the sweep in {sweep_dir}: no point has a .hydra/config.yaml with a `task` entry. "
        "Name the metric to rank by: python -m finetune.tools.sweep DIR --metric NAME [--lower-is-better]."
    )


def rank_points(points: Sequence[SweepPoint], *, metric: str, higher_is_better: bool) -> list[SweepPoint]:
    def key(point: SweepPoint) -> tuple[int, float]:
        value = _number((point.results or {}).get(metric)) if point.status == "complete" else None
        if value is None:
            return (1, 0.0)
        return (0, -value if higher_is_better else value)

    return sorted(points, key=key)  # stable: ties keep path order


def summarize(
    sweep_dir: str | Path, *, metric: Optional[str] = None, higher_is_better: Optional[bool] = None
) -> SweepSummary:
    """Rank the sweep's points by `metric` (default: the sweep's objective) and write summary.json / summary.md."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepSummaryError(f"Sweep dir {sweep_dir} does not exist; pass the dir Hydra printed for the multirun.")
    trials = read_trials(sweep_dir)
    points = collect_points(sweep_dir, trials)
    if not points:
        raise SweepSummaryError(
            f"No sweep points in {sweep_dir}: no subdir has .hydra/overrides.yaml. Pass a multirun dir "
            "(hydra.sweep.dir), not a single run's dir."
        )
    if metric is None:
        metric, task_higher = task_metric(sweep_dir, points)
        higher_is_better = task_higher if higher_is_better is None else higher_is_better
    elif higher_is_better is None:
        higher_is_better = direction_of(metric) == "maximize"
    if trials is not None:
        searched = list(trials.get("search_space", {}))
    else:
        searched = _swept_keys(points)
        for point in points:
            point.params = {key: _parse_value(value) for key, value in _override_values(point.overrides).items()
                            if key in searched}
    summary = SweepSummary(
        sweep_dir=str(sweep_dir),
        metric=metric,
        higher_is_better=higher_is_better,
        points=rank_points(points, metric=metric, higher_is_better=higher_is_better),
        searched=searched,
        sweeper="optuna" if trials is not None else "grid",
        search_space=dict((trials or {}).get("search_space", {})),
    )
    if summary.best is not None:
        summary.best_command = reproduce_command(summary.best.overrides)
    (sweep_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    (sweep_dir / "summary.md").write_text(to_markdown(summary))
    return summary


def reproduce_command(overrides: Sequence[str]) -> str:
    """The single run of a sweep point: its overrides, as the sweep passed them, after the training script."""
    launcher = "python" if "deepspeed=none" in overrides else "deepspeed"  # deepspeed=none: one process
    return f"{launcher} launch/train.py " + " ".join(shlex.quote(o) for o in overrides)


def to_markdown(summary: SweepSummary) -> str:
    """The best point and its command, then a table: rank, status, the searched keys, the ranking metric first,
    then the other metrics, the run dir."""
    metric_names = [summary.metric] + sorted(
        {k for p in summary.points for k, v in (p.results or {}).items()
         if k not in (summary.metric, *NOT_METRICS) and _number(v) is not None}
    )
    direction = "higher" if summary.higher_is_better else "lower"
    counts = {s: sum(p.status == s for p in summary.points) for s in ("complete", "failed", "running", "no results")}
    what = "Optuna search" if summary.sweeper == "optuna" else "Grid sweep"
    lines = [
        f"# Sweep summary: {summary.sweep_dir}",
        "",
        f"{what}, {len(summary.points)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
        f"Ranked by `{summary.metric}` ({direction} is better); failed and unfinished points have no rank and no "
        "score.",
        "",
    ]
    best = summary.best
    if best is not None:
        label = f"trial {best.number}" if best.number is not None else "point"
        lines += [
            f"## Best: {label}, {summary.metric} = {_format(best.results[summary.metric])} (run dir `{best.path}`)",
            "",
            "Rerun it as a single run (the result does not depend on the number of ranks; on SLURM pass the same "
            "overrides to `sbatch launch/slurm/train.sbatch`):",
            "",
            "```bash",
            summary.best_command or "",
            "```",
            "",
        ]
    else:
        lines += ["No point has finished with the metric yet.", ""]
    header = ["rank", "trial", "status", *summary.searched, *metric_names, "run dir"]
    lines += ["## Points", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rank = 0
    for point in summary.points:
        ranked = point.status == "complete" and _number((point.results or {}).get(summary.metric)) is not None
        rank += ranked
        status = point.status + (f": {point.reason}" if point.reason else "")
        row = [str(rank) if ranked else "-", "" if point.number is None else str(point.number),
               status.replace("|", "\\|")]
        row += [_format_param(point.params.get(key, "")) for key in summary.searched]
        row += [_format((point.results or {}).get(name)) if point.results is not None else "" for name in metric_names]
        row.append(point.path)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _override_values(overrides: Sequence[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def _swept_keys(points: Sequence[SweepPoint]) -> list[str]:
    """Override keys whose value is not the same in every point (all keys when there is one point)."""
    per_point = [_override_values(p.overrides) for p in points]
    keys = sorted({k for values in per_point for k in values})
    if len(points) == 1:
        return keys
    return [k for k in keys if len({values.get(k) for values in per_point}) > 1]


def _parse_value(text: str) -> Any:
    """An override's value as a number where it is one (3e-5 too, which YAML 1.1 reads as a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _format(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4g}"


def _format_param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepSummaryCallback(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: once every point of a multirun has finished, writes the summary and draws the pictures
    into the sweep dir, and each point's curves.png where it is missing."""

    def __init__(self, metric: Optional[str] = None, higher_is_better: Optional[bool] = None) -> None:
        self.metric = metric
        self.higher_is_better = higher_is_better

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import logging

        from finetune.distributed import env_rank

        if env_rank() != 0:  # a multirun under the deepspeed launcher runs on every rank; one summary is enough
            return
        log = logging.getLogger(__name__)
        try:
            summary = summarize(config.hydra.sweep.dir, metric=self.metric, higher_is_better=self.higher_is_better)
        except SweepSummaryError as error:  # a failed summary must not turn a finished sweep into an error
            log.warning("No sweep summary: %s", error)
            return
        log.info("Sweep summary (by %s): %s", summary.metric, Path(summary.sweep_dir) / "summary.md")
        try:
            from finetune.tools.report import draw_sweep

            for picture in draw_sweep(summary):
                log.info("Sweep picture: %s", picture)
        except Exception as error:  # noqa: BLE001 -- a picture must not turn a finished sweep into an error
            log.warning("No sweep pictures: %s: %s", type(error).__name__, error)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun dir (hydra.sweep.dir)")
    parser.add_argument("--metric", help="metric to rank by (default: the sweep's objective)")
    parser.add_argument("--lower-is-better", action="store_true", help="rank ascending (with --metric)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(
            args.sweep_dir, metric=args.metric, higher_is_better=(False if args.lower_is_better else None)
        )
    except SweepSummaryError as error:
        parser.exit(2, f"error: {error}\n")
    print((Path(summary.sweep_dir) / "summary.md").read_text(), end="")


if __name__ == "__main__":
    main()
