"""Several training runs in one process group, one after another: `python train_worker.py jobs.json` on every rank
(the `run_ranks` fixture starts them), so that a test with many small runs pays for one start of its ranks.

jobs.json: {"runs": [{"run_dir": ..., "overrides": [...]}, ...], "results": path}. Each run is composed from
conf/train.yaml with its overrides and trained by `finetune.runner.run`, the function behind launch/train.py. A
user error (ConfigError and the like) is recorded as that run's result, with the rank's output, and the next run
goes on; rank 0 writes every result to `results`.

The helpers below are for the tests that use it (tests/integration/test_layout_invariance.py,
test_elastic_resume.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run_jobs(run_ranks, workdir: Path, runs: list[dict], *, world: int, timeout: float = 1800) -> list[dict]:
    """Train `runs` ({"run_dir", "overrides"}) on `world` CPU ranks in one process group; their results in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs, results = workdir / f"jobs_{len(list(workdir.glob('jobs_*')))}.json", workdir / "results.json"
    results.unlink(missing_ok=True)
    jobs.write_text(json.dumps({"runs": runs, "results": str(results)}))
    run_ranks(Path(__file__), str(jobs), world=world, timeout=timeout)
    return json.loads(results.read_text())


def instruction_data(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Prompt/response rows whose responses have very different lengths (1 to 60 words), as JSON lines."""
    import random

    rng = random.Random(seed)
    words = "the a model river stone quick blue runs under over seven light paper window".split()
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) + "?\n"
            response = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 5, 30, 60])))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    """The logged train loss of each step (the last record wins when a resumed run logs a step again)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {key: value for path in sorted((Path(run_dir) / "final").glob("*.safetensors"))
            for key, value in load_file(path).items()}


def relative_difference(a: dict, b: dict) -> float:
    """The largest ||a - b|| / ||b|| over the tensors of two state dicts with the same keys."""
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in a)


def main(jobs_file: str) -> None:
    from hydra import compose, initialize_config_dir

    from finetune import distributed, runner
    from finetune.cli import is_user_error

    jobs = json.loads(Path(jobs_file).read_text())
    runner.register_resolvers()
    results = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in jobs["runs"]:
            cfg = compose("train", overrides=["logger=none", *job["overrides"]])
            output = io.StringIO()
            try:
                with contextlib.redirect_stdout(output):
                    runner.run(cfg, run_dir=Path(job["run_dir"]))
                results.append({"ok": True, "run_dir": job["run_dir"], "output": output.getvalue()})
            except Exception as err:  # noqa: BLE001 - a user error is a result; anything else fails the test
                if not is_user_error(err):
                    raise
                results.append({"ok": False, "run_dir": job["run_dir"], "error": str(err), "type": type(err).__name__,
                                "output": output.getvalue()})
            print(output.getvalue(), flush=True)
    info = distributed.init_distributed()
    if info.is_main:
        Path(jobs["results"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
