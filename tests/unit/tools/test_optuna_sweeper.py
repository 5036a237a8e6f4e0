"""hydra/sweeper=optuna (hydra_plugins/finetune_sweeps): the search space from Hydra's sweep syntax, a seeded search
that records failed trials and goes on, its discovery by Hydra after `pip install -e .`, and the SLURM launcher's
waiting for every job (a job that dies without a result becomes a failed point).

The sweeps here run a toy Hydra app whose "training" is a formula, so that they take seconds; the real trainer under
the sweeper is tests/integration/test_optuna_sweep.py (2 ranks) and tests/slurm/test_slurm_optuna_sweep.py."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.finetune_sweeps.optuna_sweeper import format_value, search_space
from hydra_plugins.finetune_sweeps import slurm_launcher
from hydra_plugins.finetune_sweeps.slurm_launcher import last_error_line, wait_for_results

REPO = Path(__file__).resolve().parents[3]


def test_search_space_from_sweep_overrides():
    space, fixed = search_space([
        "task=qa", "optim.lr=tag(log,interval(1e-5,1e-3))", "lora.r=choice(8,16,32)", "optim.weight_decay=interval(0,0.1)",
        "trainer.grad_accum_steps=range(1,5)", "lora.alpha=tag(int,interval(8,64))", "trainer.max_steps=10",
        "lora.r=choice(4,8)",  # the later one wins (the command line over hydra.sweeper.params)
    ])
    assert fixed == ["task=qa", "trainer.max_steps=10"]
    assert space["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["lora.r"] == CategoricalDistribution([4, 8])
    assert space["optim.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert space["trainer.grad_accum_steps"] == IntDistribution(1, 4)  # range() stops before 5
    assert space["lora.alpha"] == IntDistribution(8, 64)


def test_sampled_values_become_overrides_hydra_reads_back():
    assert [format_value(v) for v in (0.1 + 0.2, 16, None, True, "lora")] == [
        "0.30000000000000004", "16", "null", "true", "lora"]  # every digit of a float: the same value again


TOY_APP = '''
from types import SimpleNamespace

import hydra

from finetune.tools.sweep import run_trial


@hydra.main(version_base="1.3", config_path=".", config_name="toy")
def main(cfg):
    def train():
        if cfg.x > cfg.fail_above:
            raise RuntimeError(f"x={cfg.x} is too large")
        return SimpleNamespace(eval_results={"loss": (cfg.x - 0.3) ** 2 + 0.01 * cfg.n})

    return run_trial(train, objective="loss", sweeping=True)


main()
'''

TOY_CONFIG = '''
defaults:
  - override hydra/sweeper: optuna
  - _self_
hydra:
  searchpath: [file://{conf}]
  callbacks:
    sweep_summary:
      _target_: finetune.tools.sweep.SweepSummaryCallback
task: {{name: clm}}
sweep: {{objective: loss, direction: null}}
x: 0.5
n: 1
fail_above: 0.5
'''


def run_toy_sweep(tmp_path: Path, name: str, *overrides: str) -> dict:
    app = tmp_path / "toy_app.py"
    app.write_text(TOY_APP)
    (tmp_path / "toy.yaml").write_text(TOY_CONFIG.format(conf=REPO / "conf"))
    sweep_dir = tmp_path / name
    done = subprocess.run(
        [sys.executable, str(app), "-m", f"hydra.sweep.dir={sweep_dir}", "x=interval(0,1)", "n=choice(1,2)",
         "hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=3", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((sweep_dir / "trials.json").read_text())


def test_a_seeded_search_records_failed_trials_and_goes_on(tmp_path):
    record = run_toy_sweep(tmp_path, "first")
    assert (record["objective"], record["direction"], record["seed"]) == ("loss", "minimize", 0)
    trials = record["trials"]
    assert [t["number"] for t in trials] == list(range(8))  # every trial ran, failures or not
    failed = [t for t in trials if t["state"] == "failed"]
    complete = [t for t in trials if t["state"] == "complete"]
    assert failed and complete and len(failed) + len(complete) == 8
    for t in failed:
        assert t["params"]["x"] > 0.5 and t["value"] is None
        assert t["reason"] == f"RuntimeError: x={t['params']['x']} is too large"
    for t in complete:
        assert t["value"] == pytest.approx((t["params"]["x"] - 0.3) ** 2 + 0.01 * t["params"]["n"])
        assert t["overrides"] == [f"x={t['params']['x']!r}", f"n={t['params']['n']}"]
    # The summary callback ran at the end: the best trial first, failures listed with their reason.
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    best = min(complete, key=lambda t: t["value"])
    assert summary["points"][0]["number"] == best["number"] and summary["higher_is_better"] is False
    assert (tmp_path / "first" / "optimization_history.png").is_file()
    # Same seed, same command: the same trials.
    again = run_toy_sweep(tmp_path, "again")
    assert [t["params"] for t in again["trials"]] == [t["params"] for t in trials]


def test_a_sweep_without_a_search_space_is_a_clear_error(tmp_path):
    app = tmp_path / "toy_app.py"
    app.write_text(TOY_APP)
    (tmp_path / "toy.yaml").write_text(TOY_CONFIG.format(conf=REPO / "conf"))
    done = subprocess.run([sys.executable, str(app), "-m", f"hydra.sweep.dir={tmp_path / 's'}", "x=0.1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0 and "nothing to search" in done.stderr


def test_pip_install_e_makes_hydra_find_the_plugins(tmp_path):
    # From another dir, without the repository on sys.path: only the installed package can provide them.
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "from hydra.plugins.launcher import Launcher; p = Plugins.instance(); "
            "print(*[c.__module__ + '.' + c.__name__ for t in (Sweeper, Launcher) for c in p.discover(t)])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    found = done.stdout.split()
    assert "hydra_plugins.finetune_sweeps.optuna_sweeper.OptunaSweeper" in found, done.stderr
    assert "hydra_plugins.finetune_sweeps.slurm_launcher.SlurmLauncher" in found


def test_slurm_launcher_waits_for_every_job_and_records_a_lost_one(tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.LocalExecutor(folder=tmp_path / "jobs")
    executor.update_parameters(timeout_min=2)
    # The lost job comes first: upstream's launch would raise there and abandon the other one.
    # Library callables: submitit pickles them by name for the job's own process. os._exit: a job killed without
    # writing a result (as an out-of-memory kill leaves it).
    jobs = [executor.submit(os._exit, 9),
            executor.submit(JobReturn, overrides=["x=1"], status=JobStatus.COMPLETED, _return_value=1.5)]
    for job in jobs:
        job._results_timeout_s = 1  # submitit's grace for a slow shared file system (15 s) is not needed here
    returns = wait_for_results(jobs, [["x=0"], ["x=1"]])
    assert returns[1].status == JobStatus.COMPLETED and returns[1].return_value == 1.5
    lost = returns[0]
    assert lost.status == JobStatus.FAILED and lost.overrides == ["x=0"]
    # Hydra's plugin scan (run by other tests) re-executes plugin modules: the class is the module's current one
    assert isinstance(lost._return_value, slurm_launcher.JobLost)
    assert str(lost._return_value).startswith(f"SLURM job {jobs[0].job_id} ended (")


def test_last_error_line_finds_what_went_wrong():
    log = textwrap.dedent("""\
        train: 40%|####      | 4/10
        slurmstepd: error: Detected 1 oom_kill event in StepId=17.0. Some of the step tasks have been OOM Killed.
        srun: Job step aborted
        ----------------------------------------
        """)
    assert last_error_line(log).startswith("slurmstepd: error: Detected 1 oom_kill event")
    assert last_error_line("just this\n") == "just this"
