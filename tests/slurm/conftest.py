"""Real SLURM clusters for the tests in this folder (scripts/local_slurm.sh starts them): one node on loopback, and,
for the multi-node tests, two nodes, each slurmd in its own network namespace.

Started once per session (each when first needed), in a temporary dir, and stopped by PID at the end. Tests submit with `cluster.sbatch`
and read job states from `scontrol` (finished jobs stay visible: MinJobAge is an hour; there is no sacct database).
The one node advertises 4 CPUs on this 2-core machine so that two 2-rank jobs (a 2-point sweep) run at once; each of
the two nodes advertises 2, so that two jobs of one rank per node run at once.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from slurm_helpers import CPU_JOB, REFERENCE_TRAINING, REPO, SLURM_TOOLS, FinishedRun, Job, LocalSlurm


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on a real local SLURM cluster (tests/slurm/conftest.py)")


def _missing_tools() -> list[str]:
    return [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]


def _cluster(directory, *, nodes: int, cpus: int):
    missing = _missing_tools()
    if missing:
        pytest.skip(f"SLURM packages not installed (missing {', '.join(missing)}): run .ci/install_slurm.sh as root")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmd starts jobs as their users)")
    script = REPO / "scripts" / "local_slurm.sh"
    env = {**os.environ, "LOCAL_SLURM_CPUS": str(cpus)}
    if nodes > 1:
        env["LOCAL_SLURM_NODES"] = str(nodes)
    else:  # the default: whatever the caller's environment says does not change the one-node cluster
        env.pop("LOCAL_SLURM_NODES", None)
    started = subprocess.run([str(script), "start", str(directory)], env=env, capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0, f"local SLURM did not start:\n{started.stderr}{started.stdout}"
        yield LocalSlurm(directory)
    finally:
        subprocess.run([str(script), "stop", str(directory)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    yield from _cluster(tmp_path_factory.mktemp("slurm"), nodes=1, cpus=4)


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory):
    """node1 and node2, each in its own network namespace, linked to the controller's by a veth pair."""
    yield from _cluster(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus=2)


@pytest.fixture(scope="session")
def reference_job(slurm_cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """An uninterrupted training job, submitted and left running (the preemption test's job runs beside it)."""
    base = tmp_path_factory.mktemp("reference")
    job = slurm_cluster.sbatch("launch/slurm/train.sbatch", *REFERENCE_TRAINING, options=CPU_JOB,
                               log=base / "slurm.out", env={"RUN_DIR": str(base / "run")})
    return job


@pytest.fixture(scope="session")
def reference_run(slurm_cluster: LocalSlurm, reference_job: Job) -> FinishedRun:
    fields = slurm_cluster.wait(reference_job, until={"COMPLETED"}, timeout=600)
    return FinishedRun(job=reference_job, run_dir=reference_job.log.parent / "run", fields=fields)
