"""Redraw the pictures of a run or a sweep (finetune/tools/report.py), also while it runs.

    python launch/report.py outputs/qa/2024-05-01_12-00-00      # a run dir: curves.png
    python launch/report.py multirun/qa/2024-05-01_12-00-00     # a sweep dir: summary.md, optimization_history.png,
                                                                # params.png, and every trial's curves.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune.tools.report import ReportError, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launch/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run dir (has metrics.jsonl) or a sweep dir (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        written = report(args.dir)
    except ReportError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
