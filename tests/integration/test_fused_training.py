"""Fused q/k/v/fc_in projections in real training: DeepSpeed ZeRO-3 on 2 CPU ranks, fp32, tiny clm.

The same seeded random init (the fused block draws the unfused numbers), trained 3 steps with
model.fused_projections=true and =false: the logged losses and the final/ weights (Hugging Face names in both)
agree within what fp32 reordering can move (train_worker.py: LOSS_RTOL, weight_disagreements); the projections'
sums are the only arithmetic the two order differently. Relaunching the unfused run's checkpoint with fused
projections is refused in one paragraph naming model.fused_projections, before anything is built or changed: the
optimizer's flat state is laid out by parameter, so it could not be restored into the other layout. Relaunched
with the default (auto), it resumes in the checkpoint's layout instead (this relaunch test is slow: make test-all).
Resume of a fused run (also on another number of ranks, through a universal checkpoint) and export of its ZeRO-3
checkpoints run in test_elastic_resume.py and tools/test_export_checkpoints.py: `model=tiny` fuses by default.
"""
from __future__ import annotations

import pytest
from train_worker import LOSS_RTOL, final_weights, instruction_data, run_jobs, train_losses, train_lrs, \
    weight_disagreements

pytestmark = pytest.mark.integration


def common(data) -> tuple[str, ...]:
    return ("task=clm", "model=tiny", "deepspeed=zero3", "trainer.precision=fp32", "trainer.max_steps=3",
            "trainer.save_every=3", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false",
            "trainer.seed=4", "trainer.micro_batch_size=2", "optim.lr=3e-3", "scheduler=constant",
            "scheduler.warmup_steps=1", "deepspeed.check_memory=false", f"data.train_file={data}",
            f"data.validation_file={data}", "data.prompt_column=prompt", "data.response_column=response",
            "data.max_seq_len=128")


@pytest.fixture(scope="module")
def trained(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    data = instruction_data(root / "instructions.jsonl", rows=24)
    dirs = {fused: root / f"fused_{fused}" for fused in ("true", "false")}
    runs = [{"run_dir": str(dirs[f]), "overrides": [*common(data), f"model.fused_projections={f}"]} for f in dirs]
    results = run_jobs(run_ranks, root / "jobs", runs, world=2)
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return root, data, dirs


def test_fused_and_unfused_zero3_training_agree(trained):
    _, _, dirs = trained
    fused, unfused = train_losses(dirs["true"]), train_losses(dirs["false"])
    assert sorted(fused) == sorted(unfused) == [1, 2, 3]
    for step, loss in unfused.items():
        assert fused[step] == pytest.approx(loss, rel=LOSS_RTOL), step
    weights = final_weights(dirs["true"])
    assert "transformer.h.0.attn.q_proj.weight" in weights and not any("qkv_fc_in" in k for k in weights)
    assert weight_disagreements(weights, final_weights(dirs["false"]), lrs=train_lrs(dirs["false"]),
                                weight_decay=0.0) == []


@pytest.mark.slow
def test_unfused_checkpoint_relaunched_fused_is_refused_and_auto_resumes_it(trained, run_ranks):
    root, data, dirs = trained
    more = [{"run_dir": str(dirs["false"]), "overrides": [*common(data), *extra, "trainer.max_steps=4"]}
            for extra in (("model.fused_projections=true",), ())]
    refused, resumed = run_jobs(run_ranks, root / "jobs", more, world=2)
    assert not refused["ok"] and refused["type"] == "ConfigError"
    assert "fused_projections" in refused["error"] and "Relaunch with the model settings" in refused["error"]
    assert resumed["ok"], resumed.get("error")
    assert sorted(train_losses(dirs["false"])) == [1, 2, 3, 4]  # the refused launch logged nothing; auto resumed
