"""A 2-point Hydra sweep on a real SLURM with the submitit launcher preset, and the summary it writes."""
import json
import subprocess
import sys

import pytest
import yaml
from slurm_helpers import REPO, TINY_TRAINING, LocalSlurm

pytestmark = pytest.mark.slurm

# The preset is for GPU nodes (8 tasks, 8 GPUs); the CPU test node gets 2 single-CPU tasks per job.
CPU_LAUNCHER = ["hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=null",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20", "hydra.launcher.partition=debug"]


def test_submitit_sweep_runs_one_job_per_point_and_writes_the_summary(slurm_cluster: LocalSlurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "launch/train.py", "-m", "hydra/launcher=submitit_slurm", "hydra/callbacks=sweep_summary",
        f"hydra.sweep.dir={sweep_dir}", *CPU_LAUNCHER, *TINY_TRAINING,
        "trainer.max_steps=4", "trainer.eval_every=0", "trainer.save_every=0", "optim.lr=1e-3,3e-2",
    ]
    result = subprocess.run(command, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sweep_dir.glob(".submitit/*/*_0_log.*"))
    assert result.returncode == 0, f"{result.stderr[-3000:]}\njob logs:\n{logs}"

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["higher_is_better"] is True  # qa's objective
    points = summary["points"]
    assert sorted(p["path"] for p in points) == ["0", "1"]
    for point in points:
        point_dir = sweep_dir / point["path"]
        # Each point is its own SLURM job of 2 ranks training in its own sweep subdir.
        assert point["results"] == json.loads((point_dir / "eval_results.json").read_text())
        assert yaml.safe_load((point_dir / ".hydra" / "overrides.yaml").read_text()) == point["overrides"]
        assert len(list(point_dir.glob("checkpoints/*/zero_pp_rank_1_*optim_states.pt"))) == 1
    assert sorted(float(o.split("=")[1]) for p in points for o in p["overrides"] if o.startswith("optim.lr=")) == [
        1e-3, 3e-2]
    scores = [p["results"]["f1"] for p in points]
    assert scores == sorted(scores, reverse=True)
    # Two different jobs ran the points.
    assert len(list(sweep_dir.glob(".submitit/*_0/"))) + len(list(sweep_dir.glob(".submitit/*_1/"))) == 2
    table = (sweep_dir / "summary.md").read_text()
    assert "optim.lr" in table and "f1" in table
