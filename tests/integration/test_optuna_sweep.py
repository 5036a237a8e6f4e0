"""hydra/sweeper=optuna with the real trainer under the deepspeed launcher (2 CPU ranks, Hydra's basic launcher):
both ranks run the sweeper, draw the same trials and are told rank 0's objective; a failed trial is recorded with its
reason and the search goes on; the sweep dir gets trials.json, the summary and its pictures, each trial curves.png."""
import json

import pytest
import yaml
from PIL import Image

# slow: the sweeper, its failed trials and its seeding run in CI through toy Hydra apps (tests/unit/tools/)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_optuna_sweep_under_deepspeed_launcher_records_a_failed_trial_and_goes_on(launch, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run = launch(
        tmp_path / "unused_run_dir", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}", "hydra/sweeper=optuna",
        "task=qa", "model=tiny", "deepspeed=zero2", "trainer.max_steps=2", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.save_every=0", "data.max_eval_samples=16",
        # Two trials that must both run: BruteForceSampler visits every value of a discrete space (in seeded order).
        # micro batch 0 fails before training (a ConfigError on both ranks), 4 trains.
        "trainer.micro_batch_size=choice(4,0)", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        nprocs=2, timeout=420,
    )
    record = json.loads((sweep_dir / "trials.json").read_text())
    assert (record["objective"], record["direction"]) == ("f1", "maximize")
    by_batch = {t["params"]["trainer.micro_batch_size"]: t for t in record["trials"]}
    assert sorted(by_batch) == [0, 4], run.output[-3000:]
    failed, trained = by_batch[0], by_batch[4]
    assert failed["state"] == "failed" and failed["value"] is None
    assert "trainer.micro_batch_size=0 is invalid" in failed["reason"]
    assert trained["state"] == "complete", run.output[-3000:]
    trained_dir = sweep_dir / trained["run_dir"]
    # The objective told to Optuna is rank 0's eval f1 of that trial; both ranks trained it.
    assert trained["value"] == json.loads((trained_dir / "eval_results.json").read_text())["f1"]
    assert len(list(trained_dir.glob("checkpoints/*/*zero_pp_rank_*_optim_states.pt"))) == 2
    assert yaml.safe_load((trained_dir / ".hydra" / "overrides.yaml").read_text()) == trained["overrides"]

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["sweeper"] == "optuna" and summary["points"][0]["number"] == trained["number"]
    # The best trial as a single run: exactly the overrides it ran with.
    assert summary["best_command"] == "deepspeed launch/train.py " + " ".join(trained["overrides"])
    assert "trainer.micro_batch_size=4" in trained["overrides"]
    table = (sweep_dir / "summary.md").read_text()
    assert "failed: trainer.micro_batch_size=0 is invalid" in table
    for picture in (sweep_dir / "optimization_history.png", sweep_dir / "params.png", trained_dir / "curves.png"):
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.width > 300, picture
