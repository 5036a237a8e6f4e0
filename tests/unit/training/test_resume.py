"""Elastic resume decisions without a launch: the batch split kept on another world size, the refusals, the model
signature, and when a checkpoint needs DeepSpeed's universal form."""
from __future__ import annotations

import dataclasses

import pytest

from finetune.config import ConfigError, LoraConfig, TrainerConfig
from finetune.model import GPTJConfig
from finetune.training.resume import (
    RunLayout,
    check_convertible,
    check_same_model,
    model_signature,
    needs_conversion,
    plan_batch_layout,
    splits_of,
)

CKPT = "/runs/a/checkpoints/global_step3"


def saved(world=2, micro=2, accum=1, stage=2, offload=()) -> RunLayout:
    return RunLayout(world_size=world, micro_batch_size=micro, grad_accum_steps=accum, zero_stage=stage,
                     offload=offload, config_file=f"ds_configs/zero{stage}.json")


def test_splits_of_a_global_batch():
    assert splits_of(8, 2) == [(4, 1), (2, 2), (1, 4)]
    assert splits_of(4, 1) == [(4, 1), (2, 2), (1, 4)]
    assert splits_of(6, 4) == []


def test_same_world_and_split_changes_nothing():
    trainer = TrainerConfig(micro_batch_size=2, grad_accum_steps=1)
    assert plan_batch_layout(saved(), trainer, 2, checkpoint=CKPT) == (trainer, None)


def test_fewer_ranks_keep_the_global_batch_by_accumulating_more():
    trainer = TrainerConfig(micro_batch_size=2, grad_accum_steps=1)  # the launch config of the 2-rank run
    planned, notice = plan_batch_layout(saved(), trainer, 1, checkpoint=CKPT)
    assert (planned.micro_batch_size, planned.grad_accum_steps) == (2, 2)
    assert "global batch of 4" in notice and "trainer.grad_accum_steps=2" in notice and CKPT in notice
    assert dataclasses.replace(planned, grad_accum_steps=1) == trainer  # nothing else changed


def test_more_ranks_lower_the_accumulation_then_the_micro_batch():
    trainer = TrainerConfig(micro_batch_size=2, grad_accum_steps=2)
    planned, _ = plan_batch_layout(saved(world=1, micro=2, accum=2), trainer, 2, checkpoint=CKPT)
    assert (planned.micro_batch_size, planned.grad_accum_steps) == (2, 1)
    # global 4 on 4 ranks: one row each, so the micro batch must come down to 1
    planned, notice = plan_batch_layout(saved(world=1, micro=2, accum=2), trainer, 4, checkpoint=CKPT)
    assert (planned.micro_batch_size, planned.grad_accum_steps) == (1, 1)
    assert "micro batch lowered from 2" in notice


def test_an_explicit_split_of_the_same_global_batch_is_taken_as_asked():
    trainer = TrainerConfig(micro_batch_size=1, grad_accum_steps=4)
    assert plan_batch_layout(saved(), trainer, 1, checkpoint=CKPT) == (trainer, None)


def test_an_explicit_split_of_another_global_batch_is_refused_with_the_splits_that_work():
    trainer = TrainerConfig(micro_batch_size=3, grad_accum_steps=1)
    with pytest.raises(ConfigError) as err:
        plan_batch_layout(saved(), trainer, 1, checkpoint=CKPT)
    message = str(err.value)
    assert "global batch 4 = micro batch 2 x accumulation 1 x 2 rank(s)" in message
    assert "trainer.micro_batch_size=3 x trainer.grad_accum_steps=1 x 1 rank(s) = 3" in message
    assert "(4, 1), (2, 2), (1, 4)" in message and "hydra.run.dir" in message and "\n" not in message


def test_a_global_batch_that_cannot_be_split_over_the_ranks_is_refused_naming_rank_counts_that_work():
    trainer = TrainerConfig(micro_batch_size=3, grad_accum_steps=1)
    with pytest.raises(ConfigError) as err:  # global 6 written on 2 ranks, relaunched on 4
        plan_batch_layout(saved(world=2, micro=3, accum=1), trainer, 4, checkpoint=CKPT)
    message = str(err.value)
    assert "6 rows cannot be split evenly over 4 ranks" in message and "(1, 2, 3, 6)" in message


def test_an_old_checkpoint_without_a_recorded_split_keeps_the_asked_one():
    trainer = TrainerConfig(micro_batch_size=3)
    assert plan_batch_layout(RunLayout(world_size=2), trainer, 1, checkpoint=CKPT) == (trainer, None)


def test_model_signature_names_what_differs():
    lora = LoraConfig(enabled=True, r=8)
    tiny = GPTJConfig.preset("tiny")
    signature = model_signature(tiny, task="cls", lora=lora)
    check_same_model(signature, model_signature(tiny, task="cls", lora=lora), checkpoint=CKPT)
    check_same_model(None, signature, checkpoint=CKPT)  # an old checkpoint: DeepSpeed's loader checks
    deeper = dataclasses.replace(tiny, n_layer=tiny.n_layer + 1)
    with pytest.raises(ConfigError) as err:
        check_same_model(signature, model_signature(deeper, task="cls", lora=dataclasses.replace(lora, r=4)),
                         checkpoint=CKPT)
    message = str(err.value)
    assert f"n_layer: {tiny.n_layer} in the checkpoint, {tiny.n_layer + 1} now" in message
    assert "'r': 8" in message and "'r': 4" in message and CKPT in message
    with pytest.raises(ConfigError, match="task: 'cls' in the checkpoint, 'qa' now"):
        check_same_model(signature, model_signature(tiny, task="qa", lora=lora), checkpoint=CKPT)
    # lora=lora's signature is as before; a 4-bit base (lora=qlora) is another model, in both directions
    assert "quantize_base" not in signature["lora"]
    qlora = model_signature(tiny, task="cls", lora=dataclasses.replace(lora, quantize_base="nf4"))
    with pytest.raises(ConfigError, match="'quantize_base': 'nf4'"):
        check_same_model(signature, qlora, checkpoint=CKPT)
    with pytest.raises(ConfigError, match="'quantize_base': 'nf4'"):
        check_same_model(qlora, signature, checkpoint=CKPT)


def test_conversion_is_needed_when_the_partitioning_changes():
    assert not needs_conversion(saved(), saved())
    assert not needs_conversion(saved(), saved(micro=1, accum=2))  # another split, same partitions
    assert needs_conversion(saved(world=2), saved(world=1))
    assert needs_conversion(saved(stage=3), saved(stage=3, offload=("cpu",)))
    assert not needs_conversion(saved(stage=0, world=2), saved(stage=0, world=1))  # whole states, any world
    assert needs_conversion(RunLayout(world_size=2), saved(world=1))  # an old checkpoint on another world


def test_conversions_deepspeed_cannot_do_are_refused_before_anything_is_converted():
    check_convertible(saved(stage=3), saved(stage=3, world=1, offload=("cpu",)), checkpoint=CKPT)
    for before, after, reason in [
        (saved(stage=3, offload=("nvme",)), saved(stage=3, world=1, offload=("nvme",)), "NVMe offload"),
        (saved(stage=2), saved(stage=3, world=1), "ZeRO-2 here, ZeRO-3 now"),
        (saved(stage=0), saved(stage=2, world=1), "ZeRO-0"),
    ]:
        with pytest.raises(ConfigError, match=reason) as err:
            check_convertible(before, after, checkpoint=CKPT)
        assert f"deepspeed.config_file={before.config_file} on 2 rank(s)" in str(err.value)


def test_layout_record_round_trips_through_json():
    layout = saved(stage=3, offload=("cpu",))
    assert RunLayout.from_dict(layout.to_dict()) == layout
    assert layout.to_dict()["offload"] == ["cpu"]
    assert RunLayout.from_dict({"world_size": 2, "from_a_newer_version": 1}) == RunLayout(world_size=2)


def test_an_old_checkpoint_of_unknown_stage_is_converted_not_refused():
    old = RunLayout(world_size=2)
    assert needs_conversion(old, saved(world=1, stage=3))
    check_convertible(old, saved(world=1, stage=3), checkpoint=CKPT)


def test_deepspeed_auto_replans_on_another_world_size_but_keeps_the_stage_a_checkpoint_needs(tmp_path, capsys):
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from finetune.config import parse_config
    from finetune.runner import AUTO_CHOICE_FILE, deepspeed_json
    from finetune.training.engine import zero_stage

    with initialize_config_dir(str(Path(__file__).resolve().parents[3] / "conf"), version_base="1.3"):
        run = parse_config(compose("train", overrides=["deepspeed=auto", "model=tiny"]))
    record = tmp_path / AUTO_CHOICE_FILE
    base, fresh = deepspeed_json(run, run_dir=tmp_path, world_size=1)  # the first launch plans and records
    recorded = json.loads(record.read_text())
    assert recorded["world_size"] == 1 and fresh.endswith(recorded["config_file"])
    capsys.readouterr()
    assert deepspeed_json(run, run_dir=tmp_path, world_size=1)[1] == fresh  # same world: kept, not planned again
    assert "deepspeed=auto: keeping" in capsys.readouterr().out
    # Written on 2 ranks with another ZeRO stage than this machine's pick: DeepSpeed cannot load across stages,
    # and that config fits here, so it is kept.
    other = "ds_configs/zero3.json" if zero_stage(base) != 3 else "ds_configs/zero2.json"
    record.write_text(json.dumps({"config_file": other, "world_size": 2}))
    checkpoint = RunLayout(world_size=2, micro_batch_size=8, grad_accum_steps=1, zero_stage=3 if "3" in other else 2)
    _, source = deepspeed_json(run, run_dir=tmp_path, world_size=1, resuming=checkpoint)
    assert source.endswith(other) and json.loads(record.read_text()) == {"config_file": other, "world_size": 1}
    assert "another ZeRO stage, into which DeepSpeed cannot load" in capsys.readouterr().out
    # No checkpoint to carry over: the new pick.
    record.write_text(json.dumps({"config_file": other, "world_size": 2}))
    assert deepspeed_json(run, run_dir=tmp_path, world_size=1)[1] == fresh
    assert "re-planned for 1 rank(s)" in capsys.readouterr().out
