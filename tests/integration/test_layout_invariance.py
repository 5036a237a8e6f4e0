"""The same training whatever the parallel layout: real DeepSpeed (ZeRO-2, fp32) on 1 and 2 CPU ranks.

For each task (instruction clm data with responses of 1 to 60 words, cls, qa) and each layout of a global batch of
4 rows (micro batch x accumulation x ranks: 4x1x1, 1x4x1, 2x1x2, 1x2x2), three optimizer steps at a high learning
rate: the logged losses of steps 1-3 and the final weights agree within what fp32 reordering can move (the
bounds and their reasons are in train_worker.py: LOSS_RTOL, weight_disagreements). One run with the loss normalised
per micro batch (DeepSpeed's own averaging, the behaviour before #15) shows that this data tells the layouts apart when
the loss is not normalised over the global batch, and that the same comparison rejects it. One more run, clm 1x4x1
under another CPU's kernels (OTHER_CPU_ARITHMETIC), shows that the bounds hold across CPUs too: CI lands on AVX2,
AVX-512 and AMX machines alike. Three launches (1 rank, 2 ranks, 1 rank) run all of it.
"""
from __future__ import annotations

import pytest
from train_worker import (LOSS_RTOL, OTHER_CPU_ARITHMETIC, final_weights, instruction_data, run_jobs,
                          train_losses, train_lrs, weight_disagreements)

pytestmark = pytest.mark.integration

LR, STEPS = 3e-3, 3
LAYOUTS = {1: [(4, 1), (1, 4)], 2: [(2, 1), (1, 2)]}  # world size -> (micro batch, accumulation)
COMMON = ("model=tiny", "deepspeed=zero2", "trainer.precision=fp32", f"trainer.max_steps={STEPS}",
          "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0",
          "trainer.seed=3", f"optim.lr={LR}", "scheduler=constant", "scheduler.warmup_steps=1",
          "deepspeed.check_memory=false")


@pytest.fixture(scope="module")
def layout_runs(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    clm_file = instruction_data(root / "instructions.jsonl")
    tasks = {
        "clm": ("task=clm", f"data.train_file={clm_file}", f"data.validation_file={clm_file}",
                "data.prompt_column=prompt", "data.response_column=response", "data.packing=false",
                "data.max_seq_len=128"),
        "cls": ("task=cls",),
        "qa": ("task=qa",),
    }
    dirs = {}
    for world, layouts in LAYOUTS.items():
        runs = []
        for task, overrides in tasks.items():
            for micro, accum in layouts:
                run_dir = root / f"{task}_{micro}x{accum}x{world}"
                dirs[task, micro, accum, world] = run_dir
                runs.append({"run_dir": str(run_dir), "overrides": [*COMMON, *overrides,
                             f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={accum}"]})
        if world == 1:  # the reference for "this data can tell the layouts apart"
            dirs["clm-micro-mean"] = root / "clm_micro_mean_1x4x1"
            runs.append({"run_dir": str(dirs["clm-micro-mean"]), "overrides": [
                *COMMON, *tasks["clm"], "trainer.micro_batch_size=1", "trainer.grad_accum_steps=4",
                "trainer.loss_normalization=micro_batch"]})
        results = run_jobs(run_ranks, root / f"world{world}", runs, world=world)
        assert all(r["ok"] for r in results), [r.get("error") for r in results]
    dirs["clm-other-cpu"] = root / "clm_1x4x1_other_cpu"
    results = run_jobs(run_ranks, root / "other_cpu", [{"run_dir": str(dirs["clm-other-cpu"]), "overrides": [
        *COMMON, *tasks["clm"], "trainer.micro_batch_size=1", "trainer.grad_accum_steps=4"]}], world=1,
        env=OTHER_CPU_ARITHMETIC)
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return dirs


# The QA head's bias, and the final LayerNorm's bias (which reaches the loss only through the QA head), add one
# constant to every position's start (or end) logit, which the softmax over positions ignores: their gradients are
# zero up to rounding, and Adam turns that rounding into steps of up to the learning rate either way, differently
# per layout. They change no prediction: only Adam's bound applies to them (weight_disagreements' `free`).
SOFTMAX_INVARIANT = {"qa": ("qa_outputs.bias", "transformer.ln_f.bias")}


def disagreements(run_dir, reference_dir, task: str) -> list[str]:
    """What the run's steps 1-3 and final weights differ from the reference's by, beyond fp32 reordering."""
    losses, expected = train_losses(run_dir), train_losses(reference_dir)
    if sorted(losses) != sorted(expected):
        return [f"steps {sorted(losses)}, expected {sorted(expected)}"]
    problems = [f"step {step}: loss {losses[step]!r} vs {expected[step]!r}" for step in expected
                if losses[step] != pytest.approx(expected[step], rel=LOSS_RTOL)]
    return problems + weight_disagreements(final_weights(run_dir), final_weights(reference_dir),
                                           lrs=train_lrs(reference_dir),
                                           free=SOFTMAX_INVARIANT.get(task, ()))


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_losses_and_final_weights_do_not_depend_on_the_layout(layout_runs, task):
    runs = {key: path for key, path in layout_runs.items() if key[0] == task}
    reference = runs[task, 4, 1, 1]
    losses = train_losses(reference)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]  # it trained
    for key, run_dir in runs.items():
        assert disagreements(run_dir, reference, task) == [], key


def test_the_layouts_agree_under_another_cpus_arithmetic(layout_runs):
    assert disagreements(layout_runs["clm-other-cpu"], layout_runs["clm", 4, 1, 1], "clm") == []


def test_the_clm_data_tells_layouts_apart_without_global_normalisation(layout_runs):
    global_mean = train_losses(layout_runs["clm", 4, 1, 1])
    micro_means = train_losses(layout_runs["clm-micro-mean"])
    # Step 1 logs the same weights' loss, averaged per micro batch: rows with 1 and 60 response words weigh alike.
    assert abs(micro_means[1] - global_mean[1]) > 10 * LOSS_RTOL * global_mean[1]
    assert abs(micro_means[3] - global_mean[3]) > 10 * LOSS_RTOL * global_mean[3]
    # The comparison that passes every layout fails this run clearly: its losses, and whole tensors of weights.
    problems = disagreements(layout_runs["clm-micro-mean"], layout_runs["clm", 4, 1, 1], "clm")
    assert [p for p in problems if p.startswith("step 3: loss")], problems
    tensors = final_weights(layout_runs["clm", 4, 1, 1])
    assert len([p for p in problems if p.split(":")[0] in tensors]) > len(tensors) // 2, problems
