"""Training across two nodes of a local SLURM cluster: node1 and node2 are slurmds in their own network namespaces
(own address, own hostname), so the ranks' gloo traffic crosses a veth link, as between real machines.

What every test compares with: the uninterrupted 1-node 2-rank job of conftest.py (`reference_run`). Two ranks on
two nodes hold the same rows and run the same gloo algorithm as two ranks on one node, so the losses must agree;
resumed on one rank with accumulation 2 (the same global batch), layout invariance says the same. Tolerance: a
loss is a mean, and the gradients sums, over at most a few hundred fp32 terms per rank; summing n fp32 terms in
another order moves the result by at most about n * 2**-24 relative (~1e-5 for n ~ 170), hence rel=1e-5, the
project's layout-invariance tolerance (docs/layout-invariance.md), and abs=1e-6 for losses near zero.

The first test runs in CI (the 2-node train.sbatch job, a run dir with a comma and a space in its name); the
others (the DeepSpeed launcher, a submitit sweep, a killed, a frozen and a disconnected node, preemption) are slow.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import (REFERENCE_TRAINING, REPO, STEPS, TINY_TRAINING, FinishedRun, Job, LocalSlurm, read_metrics,
                           tail)

pytestmark = pytest.mark.slurm

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0"]
SAME = dict(rel=1e-5, abs=1e-6)


def assert_losses_match_the_reference(run_dir: Path, reference_run: FinishedRun, steps=None) -> None:
    reference = {row["step"]: row["loss"] for row in read_metrics(reference_run.run_dir)}
    rows = read_metrics(run_dir)
    assert sorted(row["step"] for row in rows) == list(steps or range(1, STEPS + 1))
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], **SAME), row["step"]


def link_bytes(cluster: LocalSlurm, node: str) -> int:
    """Bytes that crossed `node`'s veth link (both directions), counted on the controller's end."""
    out = subprocess.run(["ip", "-j", "-s", "-n", cluster.controller_namespace(), "link", "show", "dev",
                          f"v{node.removeprefix('node')}"], capture_output=True, text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def test_train_sbatch_runs_one_world_across_two_nodes(two_node_cluster: LocalSlurm, reference_run: FinishedRun,
                                                       tmp_path):
    # A comma and a space: Hydra's override grammar would make a sweep of the first and fail on the second.
    run_dir = tmp_path / "run, on two nodes"
    before = link_bytes(two_node_cluster, "node2")
    job = two_node_cluster.sbatch("launch/slurm/train.sbatch", *REFERENCE_TRAINING, options=TWO_NODES,
                                  log=tmp_path / "slurm.out", env={"RUN_DIR": str(run_dir)})
    fields = two_node_cluster.wait(job, until={"COMPLETED"}, timeout=600)
    log = tail(job.log, 300)
    assert fields["NodeList"] == "node[1-2]" and fields["NumNodes"] == "2" and fields["NumTasks"] == "2"
    assert re.search(r"rendezvous node1:\d+, run dir " + re.escape(str(run_dir)), log), log
    assert re.search(r"Training qa \|.* ZeRO-3 \|.* world 2 \|", log), log
    assert_losses_match_the_reference(run_dir, reference_run)
    assert (run_dir / "final" / "config.json").is_file()
    # The ranks talked across node2's link: under ZeRO-3 rank 1 receives at least half the parameters in every
    # step's forward (fp32 weights: the size of final/'s safetensors), more than any SLURM chatter.
    weights = sum(p.stat().st_size for p in (run_dir / "final").glob("*.safetensors"))
    assert link_bytes(two_node_cluster, "node2") - before > STEPS * weights / 2


@pytest.mark.slow
def test_deepspeed_launcher_sbatch_runs_one_world_across_two_nodes(two_node_cluster: LocalSlurm,
                                                                   reference_run: FinishedRun, tmp_path):
    run_dir = tmp_path / "run, launcher"
    job = two_node_cluster.sbatch("launch/slurm/train_deepspeed_launcher.sbatch", *REFERENCE_TRAINING,
                                  options=TWO_NODES, log=tmp_path / "slurm.out",
                                  env={"RUN_DIR": str(run_dir), "GPUS_PER_NODE": "1"})
    fields = two_node_cluster.wait(job, until={"COMPLETED"}, timeout=600)
    assert fields["NodeList"] == "node[1-2]"
    assert (run_dir / "hostfile").read_text().split("\n")[:2] == ["node1 slots=1", "node2 slots=1"]
    assert re.search(r"Training qa \|.* world 2 \|", tail(job.log, 300))
    assert_losses_match_the_reference(run_dir, reference_run)


@pytest.mark.slow
def test_submitit_sweep_jobs_span_two_nodes_each(two_node_cluster: LocalSlurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        "python", "launch/train.py", "-m", "hydra/launcher=submitit_slurm", "hydra/callbacks=sweep_summary",
        f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
        "hydra.launcher.partition=debug", *TINY_TRAINING, "trainer.max_steps=4", "trainer.eval_every=0",
        "trainer.save_every=0", "optim.lr=1e-3,3e-2",
    ]
    result = subprocess.run(command, cwd=REPO, env=two_node_cluster.env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert sorted(p["path"] for p in summary["points"]) == ["0", "1"]
    for point in summary["points"]:
        assert point["results"] == json.loads((sweep_dir / point["path"] / "eval_results.json").read_text())
    # submitit's per-task logs: each job had a task on node1 (global rank 0) and one on node2 (global rank 1).
    job_dirs = sorted(sweep_dir.glob(".submitit/*_[01]"))
    assert len(job_dirs) == 2, job_dirs
    for job_dir in job_dirs:
        started = " ".join(p.read_text(errors="replace") for p in job_dir.glob("*_log.*"))
        assert re.search(r"hostname=node1, .*global_rank=0\(2\)", started), started[-2000:]
        assert re.search(r"hostname=node2, .*global_rank=1\(2\)", started), started[-2000:]


# ---- a node lost: killed, frozen, cut off; then resumed on the node that is left --------------------------------

# Checkpoints every 3 steps; the collective timeout short enough for a test, long above a step's time.
FAULT_TRAINING = [*TINY_TRAINING, f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=0",
                  "trainer.save_every=3", "trainer.keep_last=5", "trainer.collective_timeout_s=40"]
TIMEOUT_S = 40


def rank_pid(cluster: LocalSlurm, node: str) -> int:
    """The training process on `node` (its rank), found among the processes of the node's network namespace."""
    pids = subprocess.run(["ip", "netns", "pids", cluster.namespace(node)], capture_output=True, text=True,
                          check=True).stdout.split()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[1].endswith(b"launch/train.py"):
            return int(pid)
    raise AssertionError(f"no rank on {node}")


def start_and_wait_for_a_checkpoint(cluster: LocalSlurm, tmp_path: Path) -> tuple[Job, Path]:
    run_dir = tmp_path / "run"
    job = cluster.sbatch("launch/slurm/train.sbatch", *FAULT_TRAINING, options=TWO_NODES, log=tmp_path / "slurm.out",
                         env={"RUN_DIR": str(run_dir)})
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "global_step3" / "complete.json").is_file():
        state = cluster.job(job.id).get("JobState")
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, f"{state}:\n{tail(job.log)}"
        time.sleep(0.2)
    return job, run_dir


def wait_until_ended(cluster: LocalSlurm, job: Job, timeout: float) -> tuple[dict, float]:
    """Until the job's run ended: it finished, or SLURM requeued it (after a node failure) and it waits again."""
    started = time.monotonic()
    while (fields := cluster.job(job.id))["JobState"] in ("RUNNING", "COMPLETING", "CONFIGURING") or (
            fields["JobState"] == "PENDING" and fields.get("Restarts") == "0"):
        assert time.monotonic() - started < timeout, f"job {job.id} still {fields['JobState']}:\n{tail(job.log)}"
        time.sleep(0.5)
    return fields, time.monotonic() - started


def last_complete_step(run_dir: Path) -> int:
    tags = [p.parent.name for p in (run_dir / "checkpoints").glob("global_step*/complete.json")]
    assert tags, "no complete checkpoint"
    step = max(int(tag.removeprefix("global_step")) for tag in tags)
    # Intact: DeepSpeed's model and optimizer shards of both ranks are there.
    assert len(list((run_dir / "checkpoints" / f"global_step{step}").glob("*optim_states.pt"))) == 2
    return step


def resume_on_one_node(cluster: LocalSlurm, run_dir: Path, tmp_path: Path, reference_run: FinishedRun) -> None:
    """The run dir, resubmitted on the node that is left: one rank, accumulation 2, the same global batch."""
    stopped_at = last_complete_step(run_dir)
    job = cluster.sbatch("launch/slurm/train.sbatch", *FAULT_TRAINING, "trainer.grad_accum_steps=2",
                         options=["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                                  "--exclude=node2"],
                         log=tmp_path / "resumed.out", env={"RUN_DIR": str(run_dir)})
    cluster.wait(job, until={"COMPLETED"}, timeout=600)
    log = tail(job.log, 400)
    assert f"Resuming at step {stopped_at}" in log or f"Resuming at step {stopped_at + 1}" in log, log
    # Every step up to the end, each step's last logged loss (steps after the checkpoint ran twice) as the reference's.
    last = {row["step"]: row["loss"] for row in read_metrics(run_dir)}
    reference = {row["step"]: row["loss"] for row in read_metrics(reference_run.run_dir)}
    assert sorted(last) == list(range(1, STEPS + 1))
    for step, loss in last.items():
        assert loss == pytest.approx(reference[step], **SAME), step


@pytest.mark.slow
def test_a_killed_node_ends_the_job_at_once_and_the_run_resumes_on_one_node(
    two_node_cluster: LocalSlurm, reference_run: FinishedRun, tmp_path
):
    job, run_dir = start_and_wait_for_a_checkpoint(two_node_cluster, tmp_path)
    os.kill(rank_pid(two_node_cluster, "node2"), signal.SIGKILL)
    fields, seconds = wait_until_ended(two_node_cluster, job, timeout=120)
    assert fields["JobState"] == "FAILED", fields
    assert seconds < TIMEOUT_S, f"{seconds:.0f} s: the job waited for the collective timeout"
    resume_on_one_node(two_node_cluster, run_dir, tmp_path, reference_run)


@pytest.mark.slow
def test_a_frozen_node_ends_the_job_within_the_collective_timeout_naming_it(
    two_node_cluster: LocalSlurm, reference_run: FinishedRun, tmp_path
):
    job, run_dir = start_and_wait_for_a_checkpoint(two_node_cluster, tmp_path)
    os.kill(rank_pid(two_node_cluster, "node2"), signal.SIGSTOP)
    fields, seconds = wait_until_ended(two_node_cluster, job, timeout=TIMEOUT_S + 120)
    assert fields["JobState"] == "FAILED", fields
    # The collective timeout, then a check-in of a few seconds (distributed.CHECK_IN_WAIT) and the exit.
    assert seconds < TIMEOUT_S + 60, seconds
    log = tail(job.log, 400)
    assert "Rank 1 (node2) did not answer" in log, log
    resume_on_one_node(two_node_cluster, run_dir, tmp_path, reference_run)


@pytest.mark.slow
def test_a_node_cut_off_ends_the_job_within_the_collective_timeout(
    two_node_cluster: LocalSlurm, reference_run: FinishedRun, tmp_path
):
    job, run_dir = start_and_wait_for_a_checkpoint(two_node_cluster, tmp_path)
    link = ["ip", "-n", two_node_cluster.namespace("node2"), "link", "set", "eth0"]
    subprocess.run([*link, "down"], check=True)
    try:
        # Rank 0 gives up after the collective timeout and names the rank it lost. SLURM, which no longer reaches
        # node2 to end its step, marks the node down after SlurmdTimeout (60 s in scripts/local_slurm.sh: later, so
        # that the message comes first), ends the job and, the job being requeueable (--requeue), queues it again
        # to wait for two nodes.
        fields, seconds = wait_until_ended(two_node_cluster, job, timeout=TIMEOUT_S + 300)
        assert seconds < 60 + 90, seconds  # SlurmdTimeout, then SLURM's pings and kill wait
        assert fields["JobState"] in ("FAILED", "NODE_FAIL", "PENDING"), fields
        deadline = time.monotonic() + 60
        while "Rank 1 (node2) did not answer" not in (log := tail(job.log, 400)):
            assert time.monotonic() < deadline, log
            time.sleep(1)
        assert "Node failure on node2" in log or fields["JobState"] == "FAILED", log
        # Go on without node2: the requeued job would wait for two nodes.
        two_node_cluster.run("scancel", job.id)
    finally:
        subprocess.run([*link, "up"], check=True)
    # The node repaired, the admin returns it to service; it is idle once its slurmd answers again.
    two_node_cluster.run("scontrol", "update", "NodeName=node2", "State=RESUME")
    deadline = time.monotonic() + 120
    while two_node_cluster.run("sinfo", "-h", "-n", "node2", "-o", "%t").strip() != "idle":
        assert time.monotonic() < deadline, two_node_cluster.run("sinfo")
        time.sleep(1)
    resume_on_one_node(two_node_cluster, run_dir, tmp_path, reference_run)


@pytest.mark.slow
def test_usr1_requeues_a_two_node_job_which_resumes_on_two_nodes(
    two_node_cluster: LocalSlurm, reference_run: FinishedRun, tmp_path
):
    run_dir = tmp_path / "run"
    job = two_node_cluster.sbatch("launch/slurm/train.sbatch", *REFERENCE_TRAINING, options=TWO_NODES,
                                  log=tmp_path / "slurm.out", env={"RUN_DIR": str(run_dir)})
    deadline = time.monotonic() + 600
    while not any(row["step"] >= 3 for row in read_metrics(run_dir)):
        assert time.monotonic() < deadline and two_node_cluster.job(job.id)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.3)
    two_node_cluster.run("scancel", "--signal=USR1", job.id)
    deadline = time.monotonic() + 180
    while not ((fields := two_node_cluster.job(job.id)).get("Restarts") == "1" and fields["JobState"] == "PENDING"):
        assert time.monotonic() < deadline, f"job {job.id} was not requeued; log:\n{tail(job.log)}"
        time.sleep(0.5)
    stopped_at = max(row["step"] for row in read_metrics(run_dir))
    assert stopped_at < STEPS, "the signal came after the end of training; nothing was preempted"
    two_node_cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    fields = two_node_cluster.wait(job, until={"COMPLETED"}, timeout=600)
    assert fields["Restarts"] == "1" and fields["NodeList"] == "node[1-2]"
    assert "Resuming at step" in tail(job.log, 400)
    assert_losses_match_the_reference(run_dir, reference_run)
