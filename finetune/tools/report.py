"""Pictures of a run and of a sweep, as PNG files (matplotlib, no display needed).

- A run dir gets `curves.png`: train loss, learning rate and every eval metric against the optimizer step, from
  its `metrics.jsonl` (launch/train.py draws it when the run ends).
- A sweep dir gets `optimization_history.png` (each trial's objective by trial number, failed trials marked, the
  best so far as a line) and `params.png` (the objective against each searched key), from its summary
  (finetune.tools.sweep; the summary callback draws them when the multirun ends).

`python launch/report.py DIR` redraws them for a run dir or a sweep dir, also while it runs (it reads only files
that are rewritten whole or appended to). The plotting functions return the figure, so that tests can read back
what was drawn.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finetune.tools.sweep import SweepSummary

CURVES_FILE = "curves.png"
HISTORY_FILE = "optimization_history.png"
PARAMS_FILE = "params.png"
PANEL_SIZE = (4.0, 2.8)  # inches per panel; at DPI this keeps a picture well under 100 kB
DPI = 90
_NOT_METRICS = {"step", "split", "time", "epoch", "total"}  # total: examples evaluated


class ReportError(ValueError):
    """Nothing to draw in the dir given; the message says what the dir should hold."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a half-written last line (the run is writing it) is left out. A step logged again
    after a resume keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl: pass a run dir (hydra.run.dir) or a sweep dir.")
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record and "split" in record:
            records[(record["split"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["step"], r["split"]))


def _series(records: Sequence[dict[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if r["split"] == split and _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: Path) -> "Figure":
    """One panel per curve: train loss, learning rate, then each eval metric, against the step."""
    records = read_metrics(run_dir)
    panels: list[tuple[str, str, str]] = [("train", "loss", "train loss"), ("train", "lr", "learning rate")]
    eval_keys = sorted({k for r in records if r["split"] == "eval" for k, v in r.items()
                        if k not in _NOT_METRICS and _is_number(v)})
    panels += [("eval", key, f"eval {key}") for key in eval_keys]
    panels = [p for p in panels if _series(records, p[0], p[1])[0]]
    if not panels:
        raise ReportError(f"{run_dir}/metrics.jsonl has no train or eval values yet: nothing to draw.")
    figure, axes = _grid(len(panels), title="/".join(Path(run_dir).resolve().parts[-2:]))
    first, last = min(r["step"] for r in records), max(r["step"] for r in records)
    for ax, (split, key, label) in zip(axes, panels):
        steps, values = _series(records, split, key)
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlim(first - 0.5, last + 0.5)  # every panel on the same steps: eval points line up with training
        ax.xaxis.set_major_locator(_integer_locator())
        ax.grid(alpha=0.3)
    return figure


def draw_run(run_dir: Path) -> Path:
    """Write RUN_DIR/curves.png; returns its path."""
    path = Path(run_dir) / CURVES_FILE
    _save(plot_run(run_dir), path)
    return path


def plot_history(summary: "SweepSummary") -> "Figure":
    """The objective of every finished trial by trial number, the best so far as a step line, failed trials as
    red crosses on the x axis (they have no score)."""
    trials = sorted(_numbered(summary), key=lambda p: p[0])
    figure, (ax,) = _grid(1, title=f"{Path(summary.sweep_dir).name}: {summary.metric} per trial")
    done = [(n, v) for n, p, v in trials if v is not None]
    failed = [n for n, p, v in trials if p.status == "failed"]
    if done:
        ax.plot([n for n, _ in done], [v for _, v in done], "o", color="tab:blue", label="trial")
        best, best_so_far = [], None
        for _, value in done:
            better = best_so_far is None or (value > best_so_far if summary.higher_is_better else value < best_so_far)
            best_so_far = value if better else best_so_far
            best.append(best_so_far)
        ax.step([n for n, _ in done], best, where="post", color="tab:orange", label="best so far")
    if failed:
        ax.plot(failed, [0.0] * len(failed), "x", color="tab:red", markersize=8, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"failed ({len(failed)})")
    ax.set_xlabel("trial", fontsize=8)
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel(summary.metric, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure


def plot_params(summary: "SweepSummary") -> "Figure":
    """The objective against each searched key, one panel per key (log x for a log-scale search)."""
    keys = list(summary.searched)
    if not keys:
        raise ReportError(f"{summary.sweep_dir}: no searched keys (every point has the same overrides).")
    figure, axes = _grid(len(keys), title=f"{Path(summary.sweep_dir).name}: {summary.metric} per parameter")
    trials = [(p, v) for _, p, v in _numbered(summary) if v is not None]
    for ax, key in zip(axes, keys):
        xs = [p.params.get(key) for p, _ in trials]
        ys = [v for _, v in trials]
        spec = summary.search_space.get(key, {})
        if spec.get("type") == "categorical" or not all(_is_number(x) for x in xs):
            choices = [str(c) for c in spec.get("choices", [])] or sorted({str(x) for x in xs})
            positions = [choices.index(str(x)) if str(x) in choices else len(choices) for x in xs]
            ax.set_xticks(range(len(choices)), choices, fontsize=7)
            ax.set_xlim(-0.5, max(len(choices), max(positions, default=0) + 1) - 0.5)
            ax.plot(positions, ys, "o", color="tab:blue")
        else:
            ax.plot(xs, ys, "o", color="tab:blue")
            if spec.get("log") or _spans_decades(xs):
                ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(summary.metric, fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def draw_sweep(summary: "SweepSummary") -> list[Path]:
    """Write the sweep's pictures into its dir; returns their paths (none while no trial has finished)."""
    sweep_dir = Path(summary.sweep_dir)
    written = []
    if any(v is not None or p.status == "failed" for _, p, v in _numbered(summary)):
        _save(plot_history(summary), sweep_dir / HISTORY_FILE)
        written.append(sweep_dir / HISTORY_FILE)
    if summary.searched and any(v is not None for _, _, v in _numbered(summary)):
        _save(plot_params(summary), sweep_dir / PARAMS_FILE)
        written.append(sweep_dir / PARAMS_FILE)
    return written


def report(directory: Path) -> list[Path]:
    """Redraw what `directory` has: a run dir's curves, or a sweep's summary, pictures and each point's curves."""
    from finetune.tools.sweep import SweepSummaryError, summarize

    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} does not exist; pass a run dir or a sweep dir.")
    if (directory / "metrics.jsonl").is_file():
        return [draw_run(directory)]
    try:
        summary = summarize(directory)
    except SweepSummaryError as error:
        raise ReportError(f"{directory} is neither a run dir (no metrics.jsonl) nor a sweep dir: {error}") from None
    written = [directory / "summary.md", *draw_sweep(summary)]
    for point in summary.points:
        run_dir = directory / point.path
        try:
            written.append(draw_run(run_dir))
        except ReportError:
            continue  # a point that has not logged anything yet
    return written


def _numbered(summary: "SweepSummary") -> list[tuple[int, Any, Optional[float]]]:
    """(trial number, point, objective or None) for every point, numbered by trial (path order for grid points)."""
    out = []
    for index, point in enumerate(sorted(summary.points, key=lambda p: (p.number is None, p.number or 0, p.path))):
        value = (point.results or {}).get(summary.metric) if point.status == "complete" else None
        out.append((point.number if point.number is not None else index, point, value if _is_number(value) else None))
    return out


def _grid(n: int, *, title: str) -> tuple["Figure", list[Any]]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display, the Agg canvas on savefig

    columns = min(3, n)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.4), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return figure, axes[:n]


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(figure: "Figure", path: Path) -> None:
    """Write atomically: a reader (a browser, report.py of another shell) never sees half a PNG."""
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png")
    partial.replace(path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _spans_decades(values: Sequence[Any]) -> bool:
    numbers = [v for v in values if _is_number(v)]
    return bool(numbers) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100
