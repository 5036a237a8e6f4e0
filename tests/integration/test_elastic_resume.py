"""Resuming on another number of ranks: real DeepSpeed on 1 and 2 CPU ranks, instruction clm data, fp32.

For ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload, LoRA (under ZeRO-3, its base frozen and partitioned) and QLoRA (under
ZeRO-2, its 4-bit base frozen and replicated):
- 2 ranks (micro batch 2, global batch 4) train 6 steps, saving at step 3: the uninterrupted reference;
- its step-3 checkpoint is relaunched on 1 rank with the same command: the accumulation is re-derived (2) to keep
  the global batch, the checkpoint is converted to DeepSpeed's universal form, steps 4-6 are trained;
- 1 rank (micro batch 2 x accumulation 2) trains 6 steps, and its step-3 checkpoint is resumed on 2 ranks.
Weight decay is on (biases and norms without: two optimizer groups) and the learning rate changes every step, so
the groups and the schedule must come back as saved. Steps 4-6 and the final weights equal the uninterrupted runs'
within what fp32 reordering can move (and the 1-rank and 2-rank uninterrupted runs equal each other; the bounds
and their reasons are in train_worker.py: LOSS_RTOL, weight_disagreements). Then the bad input: a global
batch that cannot be kept, a split that changes the global batch, a checkpoint of another model, each refused
with one paragraph before anything is built or changed. Three launches (2 ranks, 1 rank, 2 ranks) run all of it.
`make test` (CI) runs ZeRO-3 and the bad input; ZeRO-2, ZeRO-3 + CPU offload, LoRA and QLoRA are marked slow
(`make test-all`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_worker import (LOSS_RTOL, final_weights, instruction_data, run_jobs, train_losses, train_lrs,
                          weight_disagreements)

pytestmark = pytest.mark.integration

# CI trains ZeRO-3 (the stage whose universal load needed repairs); `make test-all` adds the others (slow).
CONFIGS = {"zero3": ("deepspeed=zero3",)}
MORE_CONFIGS = {
    "zero2": ("deepspeed=zero2",),
    "zero3_offload": ("deepspeed=zero3_offload",),
    "lora": ("deepspeed=zero3", "lora=lora", "lora.dropout=0"),
    "qlora": ("deepspeed=zero2", "lora=qlora", "lora.dropout=0"),  # a 4-bit base, replicated under ZeRO-2
}
WEIGHT_DECAY = 0.1


def common(data: Path) -> tuple[str, ...]:
    return ("task=clm", "model=tiny", "trainer.precision=fp32", "trainer.max_steps=6", "trainer.save_every=3",
            "trainer.keep_last=3", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false",
            "trainer.seed=5", "optim.lr=1e-3", f"optim.weight_decay={WEIGHT_DECAY}", "scheduler=linear",
            "scheduler.warmup_steps=2", "deepspeed.check_memory=false", f"data.train_file={data}",
            f"data.validation_file={data}", "data.prompt_column=prompt", "data.response_column=response",
            "data.packing=false", "data.max_seq_len=128")


def interrupted_copy(run_dir: Path, to: Path) -> Path:
    """`run_dir` as it was right after its step-3 checkpoint: later checkpoints, metrics and final/ removed."""
    shutil.copytree(run_dir, to)
    for path in (to / "checkpoints").iterdir():
        if path.is_dir() and path.name != "global_step3":
            shutil.rmtree(path)
    (to / "checkpoints" / "latest").write_text("global_step3")
    shutil.rmtree(to / "final", ignore_errors=True)
    (to / "metrics.jsonl").unlink()
    return to


def files_of(run_dir: Path) -> list[tuple[str, int]]:
    """The checkpoints' and final/'s files with their modification times: what a refused relaunch must not touch."""
    return sorted((str(p.relative_to(run_dir)), p.stat().st_mtime_ns) for sub in ("checkpoints", "final")
                  for p in (run_dir / sub).rglob("*") if p.is_file())


def train_elastic(run_ranks, root: Path, configs: dict, *, bad_input: bool):
    """The three launches for `configs` (and the bad input); (run dirs, results per launch, files before launch 3)."""
    data = instruction_data(root / "instructions.jsonl")
    two_rank_args = ("trainer.micro_batch_size=2", "trainer.grad_accum_steps=1")
    one_rank_args = ("trainer.micro_batch_size=2", "trainer.grad_accum_steps=2")
    dirs: dict[str, Path] = {}

    # 1. two ranks: the uninterrupted references, saving at step 3
    runs = []
    for name, args in configs.items():
        dirs[f"{name}/2"] = root / f"{name}_2ranks"
        runs.append({"run_dir": str(dirs[f"{name}/2"]), "overrides": [*common(data), *args, *two_rank_args]})
    results = {"2": run_jobs(run_ranks, root / "launch_2a", runs, world=2)}

    # 2. one rank: uninterrupted references; the 2-rank step-3 checkpoints resumed with the 2-rank command;
    # a run whose global batch (3) cannot be split over 2 ranks
    runs = []
    for name, args in configs.items():
        dirs[f"{name}/1"] = root / f"{name}_1rank"
        runs.append({"run_dir": str(dirs[f"{name}/1"]), "overrides": [*common(data), *args, *one_rank_args]})
    for name, args in configs.items():
        dirs[f"{name}/2->1"] = interrupted_copy(dirs[f"{name}/2"], root / f"{name}_2to1")
        runs.append({"run_dir": str(dirs[f"{name}/2->1"]), "overrides": [*common(data), *args, *two_rank_args]})
    if bad_input:
        dirs["odd"] = root / "odd_global_batch"
        runs.append({"run_dir": str(dirs["odd"]), "overrides": [*common(data), *CONFIGS["zero3"],
                     "trainer.micro_batch_size=3", "trainer.max_steps=1", "trainer.save_every=0"]})
    results["1"] = run_jobs(run_ranks, root / "launch_1", runs, world=1)

    # 3. two ranks: the 1-rank step-3 checkpoints resumed; then the bad input
    runs = []
    for name, args in configs.items():
        dirs[f"{name}/1->2"] = interrupted_copy(dirs[f"{name}/1"], root / f"{name}_1to2")
        runs.append({"run_dir": str(dirs[f"{name}/1->2"]), "overrides": [*common(data), *args, *one_rank_args]})
    if bad_input:
        dirs["bad/odd"] = dirs["odd"]
        dirs["bad/split"] = interrupted_copy(dirs["zero3/2"], root / "bad_split")
        dirs["bad/model"] = interrupted_copy(dirs["zero3/2"], root / "bad_model")
        runs += [
            {"run_dir": str(dirs["bad/odd"]), "overrides": [*common(data), *CONFIGS["zero3"],
                                                          "trainer.micro_batch_size=3", "trainer.max_steps=1"]},
            {"run_dir": str(dirs["bad/split"]), "overrides": [*common(data), *CONFIGS["zero3"],
                                                            "trainer.micro_batch_size=3",
                                                            "trainer.grad_accum_steps=1"]},
            {"run_dir": str(dirs["bad/model"]), "overrides": [*common(data), *CONFIGS["zero3"], *two_rank_args,
                                                            "+model.overrides.n_layer=3"]},
        ]
    before = {key: files_of(dirs[key]) for key in ("bad/odd", "bad/split") if key in dirs}
    results["2b"] = run_jobs(run_ranks, root / "launch_2b", runs, world=2)
    return dirs, results, before


@pytest.fixture(scope="module")
def elastic(run_ranks, tmp_path_factory):
    return train_elastic(run_ranks, tmp_path_factory.mktemp("elastic"), CONFIGS, bad_input=True)


@pytest.fixture(scope="module")
def elastic_more(run_ranks, tmp_path_factory):
    return train_elastic(run_ranks, tmp_path_factory.mktemp("elastic_more"), MORE_CONFIGS, bad_input=False)


def outputs(results: dict) -> str:
    return "\n".join(r["output"] for launch in results.values() for r in launch)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_on_another_number_of_ranks_steps_4_to_6_equal_the_uninterrupted_run(elastic, name):
    check_resumed_runs(*elastic[:2], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MORE_CONFIGS))
def test_resumed_on_another_number_of_ranks_other_zero_configs_and_lora(elastic_more, name):
    check_resumed_runs(*elastic_more[:2], name)


def check_resumed_runs(dirs: dict, results: dict, name: str) -> None:
    trained = [r for launch in ("2", "1") for r in results[launch] if r["run_dir"] != str(dirs.get("odd"))]
    assert all(r["ok"] for r in trained), outputs(results)[-5000:]
    two, one = train_losses(dirs[f"{name}/2"]), train_losses(dirs[f"{name}/1"])
    assert sorted(two) == sorted(one) == [1, 2, 3, 4, 5, 6]
    for step in two:  # the two uninterrupted layouts agree (the same global batch)
        assert one[step] == pytest.approx(two[step], rel=LOSS_RTOL), (name, one, two)
    for resumed, reference in ((f"{name}/2->1", f"{name}/2"), (f"{name}/1->2", f"{name}/1")):
        losses, expected = train_losses(dirs[resumed]), train_losses(dirs[reference])
        assert sorted(losses) == [4, 5, 6], (resumed, losses)
        for step in (4, 5, 6):
            assert losses[step] == pytest.approx(expected[step], rel=LOSS_RTOL), (resumed, losses, expected)
        resumed_lrs = {step: lr for step, lr in train_lrs(dirs[reference]).items() if step > 3}
        assert weight_disagreements(final_weights(dirs[resumed]), final_weights(dirs[reference]), lrs=resumed_lrs,
                                    weight_decay=WEIGHT_DECAY) == [], resumed
        checkpoints = dirs[resumed] / "checkpoints"
        assert (checkpoints / "global_step3_universal" / "complete.json").is_file()  # converted, committed
        assert (checkpoints / "global_step3" / "complete.json").is_file()  # the original kept
        marker = json.loads((checkpoints / "global_step6" / "complete.json").read_text())
        assert marker["layout"]["world_size"] == (1 if resumed.endswith("->1") else 2)


def test_the_relaunch_says_what_it_changed(elastic):
    dirs, results, _ = elastic
    resumed = results["1"][len(CONFIGS):2 * len(CONFIGS)]  # the 2 -> 1 relaunches with the 2-rank command
    for result in resumed:
        assert result["ok"], result
        text = result["output"]
        assert "keeping its global batch of 4 with trainer.micro_batch_size=2 and trainer.grad_accum_steps=2" in text
        assert "converting" in text and "universal" in text and "Resuming at step 3" in text
        assert "Automatic adjustment of ZeRO's optimizer state partitioning" not in text


def test_a_global_batch_that_cannot_be_kept_is_refused_with_what_works(elastic):
    dirs, results, before = elastic
    odd, split, _ = results["2b"][len(CONFIGS):]
    assert not odd["ok"] and odd["type"] == "ConfigError"
    assert "3 rows cannot be split evenly over 2 ranks" in odd["error"] and "(1, 3)" in odd["error"]
    assert not split["ok"] and "(2, 1), (1, 2)" in split["error"] and "global batch 4" in split["error"]
    for key in ("bad/odd", "bad/split"):  # refused before anything was converted or written
        assert not list((dirs[key] / "checkpoints").glob("*_universal"))
        assert files_of(dirs[key]) == before[key], key


def test_a_checkpoint_of_another_model_is_refused_naming_the_difference(elastic):
    dirs, results, _ = elastic
    model = results["2b"][-1]
    assert not model["ok"] and model["type"] == "ConfigError"
    assert "n_layer: 2 in the checkpoint, 3 now" in model["error"] and "\n" not in model["error"]
    assert sorted(p.name for p in (dirs["bad/model"] / "checkpoints").iterdir() if p.is_dir()) == ["global_step3"]
