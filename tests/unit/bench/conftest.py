"""bench/ holds scripts, not a package: its modules import each other by file name, so put it on sys.path."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
