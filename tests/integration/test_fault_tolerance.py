"""Faults injected into real 2-rank runs (finetune/training/faults.py), each relaunched in the same run dir:

1. the uninterrupted reference run;
2. rank 0 killed (-9) while saving the step-4 checkpoint, before the commit -> the job exits non-zero;
3. relaunch: the incomplete step-4 checkpoint is removed, the run resumes from step 2; rank 1 is killed in the middle
   of step 7 -> the whole job exits non-zero within seconds;
4. relaunch: resumes from step 6; from step 9 rank 1's loss is NaN -> steps 9 and 10 are skipped and the run stops
   (trainer.max_nonfinite_steps=2) with an error naming the last good checkpoint, without saving the bad state.
Every loss logged before a fault equals the reference's to the bit (CPU, fp32): same seed, same batches.
"""
from __future__ import annotations

import math
import re
import time

import pytest

pytestmark = [pytest.mark.integration]

STEPS = 10
ARGS = ("task=qa", "model=tiny", "deepspeed=zero2", f"trainer.max_steps={STEPS}", "trainer.save_every=2",
        "trainer.keep_last=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false",
        "trainer.micro_batch_size=4", "trainer.precision=fp32", "trainer.seed=11")
KILL_TO_EXIT_BOUND_S = 20  # the launcher polls every second; the survivor's collective fails at once
TRAINING_ERROR_EXIT_CODE = 3


def fault(spec: str) -> dict:
    return {"FINETUNE_FAULT": spec, "FINETUNE_FAULT_INJECTION": "1"}  # the test switch: see faults.py


@pytest.fixture(scope="module")
def runs(launch, tmp_path_factory):
    reference = launch(tmp_path_factory.mktemp("ft_reference") / "run", *ARGS)
    run_dir = tmp_path_factory.mktemp("ft_faults") / "run"
    # The launches share one run dir: what each left behind is read right after it.
    killed_in_save = launch(run_dir, *ARGS, env=fault("kill_in_save@4:rank0"), check=False)
    after_save_kill = {"losses": killed_in_save.train_losses(),
                       "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
                       "latest": (run_dir / "checkpoints" / "latest").read_text()}
    killed_in_step = launch(run_dir, *ARGS, env=fault("kill_in_step@7:rank1"), check=False)
    after_step_kill = {"ended": time.time(), "losses": killed_in_step.train_losses()}
    nan = launch(run_dir, *ARGS, "trainer.max_nonfinite_steps=2", env=fault("nan_loss@9+:rank1"), check=False)
    return {"reference": reference, "killed_in_save": killed_in_save, "after_save_kill": after_save_kill,
            "killed_in_step": killed_in_step, "after_step_kill": after_step_kill, "nan": nan}


def test_reference_run_completes(runs):
    reference = runs["reference"]
    assert sorted(reference.train_losses()) == list(range(1, STEPS + 1))
    assert (reference.run_dir / "final").is_dir()
    assert (reference.run_dir / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"


def test_kill_during_a_save_leaves_the_previous_checkpoint_latest(runs):
    run = runs["killed_in_save"]
    assert run.returncode != 0
    assert "kill_in_save killing rank 0 at step 4" in run.output
    after = runs["after_save_kill"]
    assert after["latest"] == "global_step2"
    assert "global_step4" in after["checkpoints"]  # DeepSpeed's shards, never committed
    # same seed and config: the same losses as the reference, to the bit
    losses, reference = after["losses"], runs["reference"].train_losses()
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(losses[step] == reference[step] for step in losses), (losses, reference)


def test_relaunch_resumes_from_the_last_complete_checkpoint_and_a_dead_rank_ends_the_job(runs):
    run, reference = runs["killed_in_step"], runs["reference"].train_losses()
    assert re.search(r"removing \S+global_step4: its save was interrupted", run.output)
    assert "Resuming at step 2: qa" in run.output
    assert run.returncode != 0
    killed_at = float(re.search(r"kill_in_step killing rank 1 at step 7, t=([\d.]+)", run.output).group(1))
    assert runs["after_step_kill"]["ended"] - killed_at < KILL_TO_EXIT_BOUND_S
    # the surviving rank says what happened, the timeout that bounds a silent rank, and where to resume from
    assert "trainer.collective_timeout_s=600" in run.output
    assert re.search(r"last complete checkpoint is \S+global_step6", run.output)
    losses = runs["after_step_kill"]["losses"]
    assert sorted(losses) == list(range(1, 7))  # 5 and 6 were trained, step 7 never finished
    assert all(losses[step] == reference[step] for step in range(3, 7)), (losses, reference)


def test_nan_loss_is_skipped_then_stops_the_run_without_saving_the_bad_state(runs):
    run, reference = runs["nan"], runs["reference"].train_losses()
    assert "Resuming at step 6: qa" in run.output
    assert run.returncode == TRAINING_ERROR_EXIT_CODE
    assert "Stopped at step 10" in run.output and "steps 9-10" in run.output
    assert re.search(r"last complete checkpoint is \S+global_step8", run.output)
    records = {m["step"]: m for m in run.split("train")}
    assert all(records[step]["loss"] == reference[step] for step in (7, 8))  # resumed exactly, again
    assert math.isnan(records[9]["loss"]) and math.isnan(records[10]["loss"])
    assert (records[8]["skipped_steps"], records[9]["skipped_steps"], records[10]["skipped_steps"]) == (0, 1, 2)
    checkpoints = run.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["global_step6", "global_step8"]
    assert (checkpoints / "latest").read_text() == "global_step8"
    assert not (run.run_dir / "final").exists()
