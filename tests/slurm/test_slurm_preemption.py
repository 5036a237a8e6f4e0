"""Preemption on a real SLURM: USR1 -> checkpoint -> requeue (same job id, same run dir) -> resume -> same result."""
import time

import pytest
from slurm_helpers import CPU_JOB, REFERENCE_TRAINING, STEPS, FinishedRun, Job, LocalSlurm, read_metrics, tail

pytestmark = pytest.mark.slurm


def wait_for_step(run_dir, step: int, *, timeout: float, job, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout
    while not any(row["step"] >= step for row in read_metrics(run_dir)):
        state = cluster.job(job.id).get("JobState")
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} ({state}) did not reach step {step}; log:\n{tail(job.log)}")
        time.sleep(0.5)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(
    slurm_cluster: LocalSlurm, reference_job: Job, request: pytest.FixtureRequest, tmp_path
):
    run_dir = tmp_path / "run"
    job = slurm_cluster.sbatch("launch/slurm/train.sbatch", *REFERENCE_TRAINING, options=CPU_JOB,
                               log=tmp_path / "slurm.out", env={"RUN_DIR": str(run_dir)})
    wait_for_step(run_dir, 3, timeout=400, job=job, cluster=slurm_cluster)
    # What SLURM sends before the time limit (--signal=USR1@120), to the training tasks.
    slurm_cluster.run("scancel", "--signal=USR1", job.id)

    # Rank 0 requeues the job after the checkpoint: same id, pending again once its processes are gone, with
    # SLURM's fixed requeue delay (BeginTime two minutes ahead), which the test skips.
    deadline = time.monotonic() + 180
    while not ((fields := slurm_cluster.job(job.id)).get("Restarts") == "1" and fields["JobState"] == "PENDING"):
        assert fields["JobState"] in ("RUNNING", "COMPLETING", "PENDING"), f"{fields['JobState']}:\n{tail(job.log)}"
        assert time.monotonic() < deadline, f"job {job.id} was not requeued; log:\n{tail(job.log)}"
        time.sleep(0.5)
    stopped_at = max(row["step"] for row in read_metrics(run_dir))
    assert stopped_at < STEPS, "the signal came after the end of training; nothing was preempted"
    assert (run_dir / "checkpoints" / f"global_step{stopped_at}").is_dir()
    slurm_cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")

    fields = slurm_cluster.wait(job, until={"COMPLETED"}, timeout=400)
    assert fields["Restarts"] == "1"
    log = tail(job.log, 400)
    assert "Resuming at step" in log, log
    rows = read_metrics(run_dir)
    # Every step ran exactly once: the requeued job went on from the checkpoint, not from step 1.
    assert sorted(row["step"] for row in rows) == list(range(1, STEPS + 1))
    # And it computed what the uninterrupted run (submitted at the same time) computed, step for step.
    reference_run: FinishedRun = request.getfixturevalue("reference_run")
    reference = {row["step"]: row["loss"] for row in read_metrics(reference_run.run_dir)}
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5, abs=1e-6), row["step"]
    assert (run_dir / "eval_results.json").is_file()
