"""One run per run dir, one outcome on every rank: real 2-rank launches.

1. A launch is held in its step 3 (test fault wait_in_step) while a second launch into the same run dir starts:
   the second is refused, naming the first, before touching anything; released, the first completes intact.
2. A byte flipped in a shard of its newest checkpoint (step 6), then a relaunch where rank 1 raises as the step-8
   save starts: the relaunch passes over the damaged checkpoint for step 4 and saves step 6 anew; at step 8 rank 1
   leaves without meeting the others at a barrier, rank 0 stops at once saying what rank 1 said, nothing of
   step 8 is committed.
3. (in CI) A run dir whose `latest` names something that is not one of its checkpoints: every rank stops with the
   same one-paragraph error, printed once, long before the collective timeout.
"""
from __future__ import annotations

import json
import re
import time

import pytest

from finetune.training import commit

pytestmark = [pytest.mark.integration]

ARGS = ("task=qa", "model=tiny", "deepspeed=zero2", "trainer.save_every=2", "trainer.keep_last=2",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.micro_batch_size=4",
        "trainer.precision=fp32", "trainer.seed=11")
COLLECTIVE_TIMEOUT_S = 300  # what a rank left waiting would sit through; the outcomes below come far sooner
USER_ERROR_EXIT_CODE = 2


def fault(spec: str, **extra: str) -> dict:
    return {"FINETUNE_FAULT": spec, "FINETUNE_FAULT_INJECTION": "1", **extra}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shared_run_dir(launch, start_launch, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_dir_lock") / "run"
    release = run_dir.parent / "release"
    first = start_launch(run_dir, *ARGS, "trainer.max_steps=6",
                         env=fault("wait_in_step@3", FINETUNE_FAULT_RELEASE=str(release)))
    try:
        # held in step 3: steps 1-2 trained and checkpointed, the lock taken
        wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file() or first.proc.poll() is not None, 300,
                 "the first launch's step-2 checkpoint")
        holder = json.loads((run_dir / ".lock").read_text())
        second = launch(run_dir, *ARGS, "trainer.max_steps=6", check=False)
        metrics_while_held = (run_dir / "metrics.jsonl").read_text()
    finally:
        release.touch()
    first_run = first.wait(timeout=300)
    checkpoints = run_dir / "checkpoints"
    after_first = {"losses": first_run.train_losses(), "metrics": first_run.metrics,
                   "latest": (checkpoints / "latest").read_text(),
                   "checkpoints": sorted(p.name for p in checkpoints.iterdir() if p.is_dir()),
                   "final": (run_dir / "final" / "config.json").is_file()}
    # a bit flip in a shard of the newest checkpoint, of the kind a crash or a bad disk leaves: same size
    shard = checkpoints / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    started = time.monotonic()
    raised = launch(run_dir, *ARGS, "trainer.max_steps=10", f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
                    env=fault("raise_in_save@8:rank1"), check=False)
    return {"first": first_run, "after_first": after_first, "holder": holder, "second": second,
            "metrics_while_held": metrics_while_held,
            "raised": raised, "raised_seconds": time.monotonic() - started}


@pytest.mark.slow
def test_a_second_launch_into_a_run_dir_in_use_is_refused_and_the_first_completes_intact(shared_run_dir):
    second, holder = shared_run_dir["second"], shared_run_dir["holder"]
    assert second.returncode == USER_ERROR_EXIT_CODE, second.output[-3000:]
    refusals = re.findall(r"error: The run dir \S+ is in use by another launch: pid (\d+) on (\S+),", second.output)
    assert refusals == [(str(holder["pid"]), holder["host"])]  # once, naming the holder
    assert "Training qa" not in second.output and "Resuming" not in second.output
    first, after = shared_run_dir["first"], shared_run_dir["after_first"]
    assert first.returncode == 0, first.output[-3000:]
    assert sorted(after["losses"]) == [1, 2, 3, 4, 5, 6]
    held = [json.loads(line) for line in shared_run_dir["metrics_while_held"].splitlines()]
    assert held and after["metrics"][: len(held)] == held  # never truncated
    assert after["latest"] == "global_step6" and after["checkpoints"] == ["global_step4", "global_step6"]
    assert after["final"]


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_one_before_and_is_saved_anew(shared_run_dir):
    run, first = shared_run_dir["raised"], shared_run_dir["after_first"]["losses"]
    assert re.search(r"passing over \S+global_step6: zero_pp_rank_1_mp_rank_00_optim_states.pt differ\(s\) from the "
                     r"checksums in its complete.json", run.output), run.output[-4000:]
    assert "Resuming at step 4: qa" in run.output
    losses = run.train_losses()
    assert (losses[5], losses[6]) == (first[5], first[6])  # the same steps again, to the bit (CPU, fp32)
    step6 = run.run_dir / "checkpoints" / "global_step6"
    assert (step6 / "complete.json").is_file() and commit.checksum_mismatches(step6) == []  # saved anew


@pytest.mark.slow
def test_a_rank_that_raises_makes_every_rank_stop_at_once_with_its_reason_and_commits_nothing(shared_run_dir):
    run = shared_run_dir["raised"]
    assert "Run dir lock: taken over from the launch before" in run.output
    assert "raise_in_save raising on rank 1 at step 8" in run.output
    assert run.returncode != 0
    # rank 0 did not wait for the collective timeout, and says why it stopped: rank 1's own error
    assert shared_run_dir["raised_seconds"] < COLLECTIVE_TIMEOUT_S
    assert re.search(r"error: Rank 0: a collective operation failed .* The ranks that failed said: rank 1: "
                     r"InjectedFault: FINETUNE_FAULT: raise_in_save at step 8 on rank 1", run.output), (
        run.output[-4000:])
    checkpoints = run.run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "global_step6"
    assert not (checkpoints / "global_step8" / "complete.json").exists()
    assert sorted(run.train_losses()) == list(range(1, 9))


def test_a_bad_latest_gives_every_rank_the_same_error_at_once(launch, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "global_step2").mkdir(parents=True)  # a run dir from before completion markers
    (tmp_path / "other" / "global_step9").mkdir(parents=True)
    (checkpoints / "latest").write_text("../../other/global_step9")
    started = time.monotonic()
    run = launch(run_dir, *ARGS, "trainer.max_steps=4", f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
                 check=False)
    elapsed = time.monotonic() - started
    assert run.returncode == USER_ERROR_EXIT_CODE, run.output[-3000:]
    errors = re.findall(r"train\.py: error(?: \(rank \d\))?: (.*)", run.output)
    assert len(errors) == 1 and "names '../../other/global_step9', which is not a checkpoint of this run dir" in (
        errors[0]), run.output[-3000:]
    assert "Traceback" not in run.output
    assert elapsed < COLLECTIVE_TIMEOUT_S
    assert (checkpoints / "global_step2").is_dir() and (tmp_path / "other" / "global_step9").is_dir()
