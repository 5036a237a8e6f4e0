"""Hydra multirun without SLURM: the basic launcher runs the points one after another in the same processes, so
each point must tear down DeepSpeed and the process group and build them again (here under the deepspeed
launcher with 2 CPU ranks, the harder case: both ranks walk the sweep in step)."""
import json

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_multirun_under_deepspeed_launcher_rebuilds_state_between_points(launch, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run = launch(
        # hydra.mode=MULTIRUN is `-m` (which would have to come before every override).
        tmp_path / "unused_run_dir", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep_dir}", "hydra/callbacks=sweep_summary",
        "task=qa", "model=tiny", "deepspeed=zero3", "trainer.max_steps=6", "trainer.log_every=1",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.micro_batch_size=4",
        # Hydra's sweeper syntax: a choice sweep.
        "optim.lr=choice(1e-3,3e-2)",
        nprocs=2, timeout=360,
    )
    losses = {}
    for point in ("0", "1"):
        point_dir = sweep_dir / point
        overrides = yaml.safe_load((point_dir / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=", 1)[1])
        rows = [json.loads(line) for line in (point_dir / "metrics.jsonl").read_text().splitlines()]
        losses[lr] = {row["step"]: row["loss"] for row in rows if row["split"] == "train"}
        assert sorted(losses[lr]) == [1, 2, 3, 4, 5, 6], run.output[-3000:]
        assert (point_dir / "eval_results.json").is_file()
        # Both ranks took part in every point (a ZeRO-3 partition each), in a world rebuilt for the point.
        assert len(list(point_dir.glob("checkpoints/*/zero_pp_rank_*_optim_states.pt"))) == 2
    assert sorted(losses) == [1e-3, 3e-2]
    first, second = losses[1e-3], losses[3e-2]
    # Same seed: the second point starts from the same fresh weights, not from where the first one ended ...
    assert first[1] == pytest.approx(second[1], rel=1e-6)
    # ... and then follows its own learning rate.
    assert first[6] != pytest.approx(second[6], rel=1e-3)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert sorted(p["path"] for p in summary["points"]) == ["0", "1"]
