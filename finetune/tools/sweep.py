"""Summary of a Hydra multirun: every point's overrides and final eval metrics, best first.

Reads `<point>/.hydra/overrides.yaml` and `<point>/eval_results.json` under a sweep dir and writes
`summary.json` and `summary.md` there. Runs by itself at the end of a multirun through `SweepSummaryCallback`
(conf/hydra/callbacks/sweep_summary.yaml), or by hand:

    python -m finetune.tools.sweep multirun/2024-05-01/12-00-00 [--metric f1] [--lower-is-better]

The ranking metric defaults to the task's main metric (`finetune.tasks`), read from the points' composed config.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

try:  # Hydra is a dependency, but the summary also works without it (e.g. on a copied sweep dir).
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class SweepSummaryError(ValueError):
    """The sweep dir cannot be summarized; the message says why and what to do."""


@dataclass
class SweepPoint:
    path: str  # relative to the sweep dir
    overrides: list[str]
    results: Optional[dict[str, Any]]  # None: no eval_results.json (the point failed or has not finished)


@dataclass
class SweepSummary:
    sweep_dir: str
    metric: str
    higher_is_better: bool
    points: list[SweepPoint]  # ranked: best first, points without the metric last


def collect_points(sweep_dir: Path) -> list[SweepPoint]:
    """Every run under `sweep_dir` that Hydra started (it has `.hydra/overrides.yaml`), in path order."""
    points = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        run_dir = overrides_file.parent.parent
        if run_dir == sweep_dir:
            continue  # a single run's own dir, not a sweep point
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        results_file = run_dir / "eval_results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        points.append(SweepPoint(path=str(run_dir.relative_to(sweep_dir)), overrides=list(overrides), results=results))
    return points


def task_metric(sweep_dir: Path, points: Sequence[SweepPoint]) -> tuple[str, bool]:
    """The task's main metric and its direction, from the first point's composed config."""
    from finetune.tasks import get_task

    for point in points:
        config_file = sweep_dir / point.path / ".hydra" / "config.yaml"
        if config_file.is_file():
            task = (yaml.safe_load(config_file.read_text()) or {}).get("task")
            name = task.get("name") if isinstance(task, dict) else task
            if name:
                found = get_task(str(name))
                return found.main_metric, found.higher_is_better
    raise SweepSummaryError(
        f"Cannot tell the task of the sweep in {sweep_dir}: no point has a .hydra/config.yaml with a `task` entry. "
        "Name the metric to rank by: python -m finetune.tools.sweep DIR --metric NAME [--lower-is-better]."
    )


def rank_points(points: Sequence[SweepPoint], *, metric: str, higher_is_better: bool) -> list[SweepPoint]:
    def key(point: SweepPoint) -> tuple[int, float]:
        value = _number((point.results or {}).get(metric))
        if value is None:
            return (1, 0.0)
        return (0, -value if higher_is_better else value)

    return sorted(points, key=key)  # stable: ties keep path order


def summarize(
    sweep_dir: str | Path, *, metric: Optional[str] = None, higher_is_better: Optional[bool] = None
) -> SweepSummary:
    """Rank the sweep's points by `metric` (default: the task's main metric) and write summary.json / summary.md."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepSummaryError(f"Sweep dir {sweep_dir} does not exist; pass the dir Hydra printed for the multirun.")
    points = collect_points(sweep_dir)
    if not points:
        raise SweepSummaryError(
            f"No sweep points in {sweep_dir}: no subdir has .hydra/overrides.yaml. Pass a multirun dir "
            "(hydra.sweep.dir), not a single run's dir."
        )
    if metric is None:
        metric, task_higher = task_metric(sweep_dir, points)
        higher_is_better = task_higher if higher_is_better is None else higher_is_better
    elif higher_is_better is None:
        higher_is_better = True
    summary = SweepSummary(
        sweep_dir=str(sweep_dir),
        metric=metric,
        higher_is_better=higher_is_better,
        points=rank_points(points, metric=metric, higher_is_better=higher_is_better),
    )
    (sweep_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    (sweep_dir / "summary.md").write_text(to_markdown(summary))
    return summary


def to_markdown(summary: SweepSummary) -> str:
    """A table: rank, the overrides that differ between points, the ranking metric first, then the other metrics."""
    swept = _swept_keys(summary.points)
    metric_names = [summary.metric] + sorted(
        {k for p in summary.points for k, v in (p.results or {}).items() if k != summary.metric and _number(v) is not None}
    )
    direction = "higher" if summary.higher_is_better else "lower"
    header = ["rank", *swept, *metric_names, "run dir"]
    lines = [
        f"# Sweep summary: {summary.sweep_dir}",
        "",
        f"Ranked by `{summary.metric}` ({direction} is better). Points without results failed or did not finish.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for rank, point in enumerate(summary.points, start=1):
        values = _override_values(point.overrides)
        results = point.results or {}
        row = [str(rank) if point.results is not None else "-"]
        row += [values.get(key, "") for key in swept]
        row += [_format(results.get(name)) if point.results is not None else "no results" for name in metric_names]
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


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _format(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.4g}"


class SweepSummaryCallback(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: writes the summary into the sweep dir once every point of a multirun has finished."""

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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun dir (hydra.sweep.dir)")
    parser.add_argument("--metric", help="metric to rank by (default: the task's main metric)")
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
