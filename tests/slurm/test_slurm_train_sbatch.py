"""launch/slurm/train.sbatch on a real SLURM: 2 srun tasks become the 2 ranks of one ZeRO-3 world."""
import json
import re

import pytest
from slurm_helpers import STEPS, FinishedRun, read_metrics, tail

pytestmark = pytest.mark.slurm


def test_sbatch_trains_tiny_model_with_zero3_on_two_ranks(reference_run: FinishedRun):
    run_dir, log = reference_run.run_dir, tail(reference_run.job.log, 200)
    assert reference_run.fields["JobState"] == "COMPLETED"
    assert reference_run.fields["NumTasks"] == "2"
    # Both tasks joined one world (not two worlds of one) under ZeRO-3.
    assert re.search(r"Training qa \|.* ZeRO-3 \|.* world 2 \|", log), log
    # Each rank wrote its own ZeRO-3 partition of the model and optimizer state.
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in checkpoint.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert results["step"] == STEPS and "exact_match" in results
    assert (run_dir / "final" / "config.json").is_file()
    # The run dir comes from the job (RUN_DIR), and Hydra's overrides passed through sbatch unchanged.
    assert f"trainer.max_steps={STEPS}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
