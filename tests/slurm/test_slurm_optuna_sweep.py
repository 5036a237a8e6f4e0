"""hydra/sweeper=optuna on a real SLURM with the submitit preset, 2 trials at a time: each trial is a 2-rank job;
a job killed while it trains (SIGKILL to its ranks, as an out-of-memory kill leaves it: no checkpoint, no requeue,
no result) is recorded as a failed trial with its SLURM state, the batch's other job is still waited for, and the
search goes on to the next batch. (A plain `scancel` is SIGTERM, which the ranks take for a preemption: they
checkpoint, requeue the job and the trial resumes; docs/slurm.md.)"""
import json
import subprocess
import sys
import time

import pytest
from slurm_helpers import REPO, TINY_TRAINING, LocalSlurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU_LAUNCHER = ["hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20", "hydra.launcher.partition=debug"]


def running_array_tasks(cluster: LocalSlurm) -> dict[str, str]:
    out = cluster.run("squeue", "-h", "-o", "%i %T", check=False)
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_optuna_sweep_on_slurm_records_a_killed_job_and_goes_on(slurm_cluster: LocalSlurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "launch/train.py", "-m", "hydra/launcher=submitit_slurm", "hydra/sweeper=optuna",
        f"hydra.sweep.dir={sweep_dir}", *CPU_LAUNCHER, *TINY_TRAINING,
        "trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
        "data.max_eval_samples=16", "optim.lr=tag(log,interval(1e-4,1e-2))",
        "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2",
    ]
    sweep = subprocess.Popen(command, cwd=REPO, env=slurm_cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # Kill the first batch's second job once its ranks run (Hydra made its run dir; loading, training and the export
    # take far longer than the poll).
    cancelled = None
    deadline = time.monotonic() + 400
    while cancelled is None and time.monotonic() < deadline and sweep.poll() is None:
        tasks = running_array_tasks(slurm_cluster)
        second = next((job for job, state in tasks.items() if job.endswith("_1") and state == "RUNNING"), None)
        if second is not None and (sweep_dir / "1" / ".hydra" / "config.yaml").is_file():
            slurm_cluster.run("scancel", "--signal=KILL", second)
            cancelled = second
        time.sleep(1)
    output, _ = sweep.communicate(timeout=900)
    assert cancelled is not None, output[-3000:]
    assert sweep.returncode == 0, output[-3000:]

    trials = {t["number"]: t for t in json.loads((sweep_dir / "trials.json").read_text())["trials"]}
    assert sorted(trials) == [0, 1, 2]  # the search went on after the lost job
    lost = trials[1]
    assert lost["state"] == "failed" and lost["value"] is None
    assert lost["reason"].startswith(f"SLURM job {cancelled} ended (") and "without a result" in lost["reason"]
    for number in (0, 2):
        trial = trials[number]
        assert trial["state"] == "complete", trial
        point_dir = sweep_dir / trial["run_dir"]
        assert trial["value"] == json.loads((point_dir / "eval_results.json").read_text())["f1"]
        # Each trial is its own SLURM job of 2 ranks.
        assert len(list(point_dir.glob("checkpoints/*/*zero_pp_rank_1_*optim_states.pt"))) == 1
        assert (point_dir / "curves.png").is_file()
    table = (sweep_dir / "summary.md").read_text()
    assert f"failed: SLURM job {cancelled} ended (" in table
    assert (sweep_dir / "optimization_history.png").is_file() and (sweep_dir / "params.png").is_file()
