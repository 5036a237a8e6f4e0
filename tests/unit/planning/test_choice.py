"""`deepspeed=auto` and the refusal of configs that cannot fit: choice logic on made-up clusters, cluster detection,
the planner inputs taken from the training config, and the runner's `deepspeed_json` on this machine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from finetune.config import ConfigError, parse_config
from finetune.model import PRESETS, GPTJConfig
from finetune.planning.choice import (
    AUTO_CONFIGS,
    AUTO_MARGIN,
    RankResources,
    auto_candidates,
    check_memory,
    choose,
    choose_config_file,
    cluster_from_ranks,
    option_of,
    refuse_unless_fits,
    run_shape,
    shape_of,
)
from finetune.planning.estimate import LORA_TARGETS, PRESET_SHAPES, SPEED_ORDER, Cluster, GiB, Option, RunShape

ROOT = Path(__file__).resolve().parents[3]
GPTJ_QA = shape_of(GPTJConfig.preset("gptj-6b"), task="qa")
BF16_RUN = RunShape(micro_batch_size=4, seq_len=2048, precision="bf16", activation_checkpointing=True)
EIGHT_80GB = Cluster(gpus_per_node=8, gpu_memory_gb=80, cpu_memory_gb=1000)
ONE_24GB = Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=256)


def ds_json(name: str) -> dict:
    return json.loads((ROOT / AUTO_CONFIGS[name]).read_text())


def compose_train(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# --- the choice ------------------------------------------------------------------------------------
def test_shipped_configs_map_to_the_options_they_hold():
    options = {name: option for name, option, _ in auto_candidates()}
    assert set(options) == set(AUTO_CONFIGS) == {p.stem for p in (ROOT / "conf" / "deepspeed").glob("*.yaml")} - {"auto"}
    assert options["none"] == Option(stage=0) and options["zero2"] == Option(stage=2)
    assert options["zero3_offload"] == Option(stage=3, offload_optimizer="cpu", offload_params="cpu")
    order = [SPEED_ORDER.index(option) for _, option, _ in auto_candidates()]
    assert order == sorted(order)  # fastest first


def test_option_of_drops_offloads_deepspeed_ignores_at_that_stage():
    zero2 = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}}
    assert option_of(zero2) == Option(stage=2, offload_optimizer="cpu")
    assert option_of({}) == Option(stage=0)


def _assert_fastest_with_margin(choice) -> None:
    options = choice.plan.options
    assert choice.estimate.margin >= AUTO_MARGIN
    assert all(e.margin < AUTO_MARGIN for e in options[: options.index(choice.estimate)])


def test_6b_on_8x80gb_keeps_everything_on_the_gpus():
    choice = choose(GPTJ_QA, BF16_RUN, EIGHT_80GB)
    # 16 bytes x 6B parameters = 97 GB of model states: ZeRO-0 cannot hold them on one 80 GB GPU, ZeRO-2/3 can.
    assert choice.name in ("zero2", "zero3")
    assert (choice.estimate.option.offload_optimizer, choice.estimate.option.offload_params) == ("none", "none")
    _assert_fastest_with_margin(choice)
    assert option_of(ds_json(choice.name)) == choice.estimate.option and choice.config_file == AUTO_CONFIGS[choice.name]
    assert "ZeRO-0 (plain data parallel) needs" in choice.message  # why the faster one was not taken
    assert f"{choice.estimate.gpu_bytes / GiB:.1f} of 80.0 GiB per GPU" in choice.message


def test_6b_on_one_24gb_gpu_offloads_or_is_refused():
    choice = choose(GPTJ_QA, BF16_RUN, ONE_24GB)
    assert choice.name == "zero3_offload"  # 2 bytes x 6B weights alone are 12 GB; the optimizer must leave the GPU
    _assert_fastest_with_margin(choice)
    # 16 bytes x 6B parameters of host RAM needed by the offloaded optimizer: 64 GB cannot hold them.
    with pytest.raises(ConfigError, match="deepspeed=auto found no DeepSpeed config that fits") as err:
        choose(GPTJ_QA, BF16_RUN, Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=64))
    text = str(err.value)
    assert "deepspeed.check_memory=false" in text and "deepspeed.cpu_memory_gb" in text
    assert "option (fastest first)" in text and "Recommendation: none" in text  # the plan's table


def test_thin_headroom_still_picks_what_fits_and_says_so():
    offload = choose(GPTJ_QA, BF16_RUN, ONE_24GB).estimate
    # Host RAM just 5% above what CPU offload needs (the options that keep all on the GPU cannot fit 24 GB):
    # it fits, but nothing keeps 10% free.
    cluster = Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=offload.cpu_bytes / GiB * 1.05)
    choice = choose(GPTJ_QA, BF16_RUN, cluster)
    assert choice.estimate.fits and choice.estimate.margin < AUTO_MARGIN
    assert all(not e.fits for e in choice.plan.options[: choice.plan.options.index(choice.estimate)])
    assert f"less than {AUTO_MARGIN:.0%} left free" in choice.message


# --- the refusal -----------------------------------------------------------------------------------
def test_manual_config_that_fits_passes():
    estimate = refuse_unless_fits(GPTJ_QA, BF16_RUN, EIGHT_80GB, ds_json("zero3"), source="ds_configs/zero3.json")
    assert estimate.option == Option(stage=3) and estimate.fits


def test_manual_config_that_cannot_fit_is_refused_with_the_options_that_would():
    with pytest.raises(ConfigError) as err:
        refuse_unless_fits(GPTJ_QA, BF16_RUN, ONE_24GB, ds_json("zero2"), source="ds_configs/zero2.json")
    text = str(err.value)
    first, _, table = text.partition("\n\n")
    assert "ds_configs/zero2.json (ZeRO-2) does not fit" in first and "GPU memory per GPU" in first
    assert "deepspeed=zero3_offload" in first and "deepspeed=zero3)" not in first  # ZeRO-3 keeps 16 B/param on 1 GPU
    assert "deepspeed.check_memory=false" in first and "deepspeed.device_memory_gb" in first
    assert "\n" not in first  # one paragraph, then the table
    assert "ZeRO-2 " in table and "fits" in table and "Breakdown of" in table
    with pytest.raises(ConfigError) as short:
        refuse_unless_fits(GPTJ_QA, BF16_RUN, ONE_24GB, ds_json("zero2"), source="zero2.json", detail=False)
    assert "\n" not in str(short.value) and "deepspeed=zero3_offload" in str(short.value)


def test_user_json_with_an_option_outside_the_shipped_set_is_estimated_with_its_own_buffers():
    own = ds_json("zero2")
    own["zero_optimization"].update(stage=1, reduce_bucket_size=2_000_000_000)
    ok = refuse_unless_fits(GPTJ_QA, BF16_RUN, EIGHT_80GB, own, source="mine.json")
    default = refuse_unless_fits(GPTJ_QA, BF16_RUN, EIGHT_80GB, ds_json("zero2") | {"zero_optimization": {"stage": 1}},
                                 source="mine.json")
    assert ok.option == Option(stage=1) and ok.gpu_bytes > default.gpu_bytes  # the bigger bucket is counted


# --- the hardware ----------------------------------------------------------------------------------
def _ranks(per_host: dict[str, int], *, device_gib=80, ram_gib=1000, nvme_gib=None) -> list[RankResources]:
    nvme = None if nvme_gib is None else int(nvme_gib * GiB)
    dev = None if device_gib is None else int(device_gib * GiB)
    return [RankResources(host, dev, int(ram_gib * GiB), nvme) for host, n in per_host.items() for _ in range(n)]


def test_cluster_from_ranks_counts_nodes_and_gpus_per_node():
    cluster, where = cluster_from_ranks(_ranks({"a": 8, "b": 8}, nvme_gib=3000))
    assert cluster == Cluster(nodes=2, gpus_per_node=8, gpu_memory_gb=80, cpu_memory_gb=1000, nvme_gb=3000)
    assert "accelerator" in where
    # Hosts of 8 and 4 ranks: 3 "nodes" of 4 keep N = 12 right; RAM per node is the tighter host's 4-rank share.
    uneven, _ = cluster_from_ranks(_ranks({"a": 8, "b": 4}, ram_gib=800))
    assert (uneven.nodes, uneven.gpus_per_node, uneven.world, uneven.cpu_memory_gb) == (3, 4, 12, 400)
    mixed = _ranks({"a": 2}) + [RankResources("a", 40 * GiB, 1000 * GiB, None)]
    assert cluster_from_ranks(mixed)[0].gpu_memory_gb == 40  # the smallest GPU decides
    assert cluster_from_ranks(_ranks({"a": 1}, nvme_gib=10) + _ranks({"b": 1}))[0].nvme_gb is None  # not on every node


def test_cpu_accelerator_gives_each_rank_its_share_of_host_ram_and_overrides_win():
    cluster, where = cluster_from_ranks(_ranks({"a": 2}, device_gib=None, ram_gib=24))
    assert (cluster.gpu_memory_gb, cluster.cpu_memory_gb) == (12, 24) and "host RAM / ranks" in where
    stated, where = cluster_from_ranks(_ranks({"a": 2}), device_memory_gb=16, cpu_memory_gb=64)
    assert (stated.gpu_memory_gb, stated.cpu_memory_gb) == (16, 64)
    assert "deepspeed.device_memory_gb" in where and "deepspeed.cpu_memory_gb" in where


# --- planner inputs from the training config -------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_planner_presets_match_the_model_presets(preset):
    assert shape_of(GPTJConfig.preset(preset), task="clm") == PRESET_SHAPES[preset]


def test_run_shape_from_the_training_config():
    run = parse_config(compose_train("lora=lora", "lora.target_modules=[all-linear]", "trainer.micro_batch_size=3",
                                     "trainer.precision=bf16", "data.max_seq_len=128", "model.gradient_checkpointing=true"))
    assert run_shape(run) == RunShape(micro_batch_size=3, seq_len=128, precision="bf16", activation_checkpointing=True,
                                      lora_rank=8, lora_targets=LORA_TARGETS, lora_dropout=0.05, lora_train_head=True,
                                      chunked_loss=True)
    assert not run_shape(parse_config(compose_train("task=clm", "model.chunked_loss=false"))).chunked_loss
    assert run_shape(parse_config(compose_train())).lora_rank is None
    clm = run_shape(parse_config(compose_train("task=clm", "lora=lora")))
    assert not clm.lora_train_head  # lora.train_head=null: GPT-J's lm_head stays frozen for clm
    assert run_shape(parse_config(compose_train("task=clm", "lora=lora", "lora.train_head=true"))).lora_train_head


def test_memory_overrides_are_validated():
    with pytest.raises(ConfigError, match="deepspeed.device_memory_gb"):
        parse_config(compose_train("deepspeed.device_memory_gb=0"))


# --- what the runner calls, on this machine (CPU accelerator, no process group) ----------------------
def test_auto_in_the_runner_picks_a_shipped_json_and_logs_why(capsys):
    from finetune.runner import deepspeed_json

    base, source = deepspeed_json(parse_config(compose_train("deepspeed=auto", "model=tiny")))
    out = capsys.readouterr().out
    assert "deepspeed=auto chose" in out and "CPU accelerator: host RAM / ranks on the host" in out
    chosen = next(name for name, path in AUTO_CONFIGS.items() if source.endswith(path))
    assert f"chose deepspeed={chosen} (" in out and base == ds_json(chosen)
    # Not rank 0: same choice, nothing printed.
    run = parse_config(compose_train("deepspeed=auto", "model=tiny"))
    assert choose_config_file(run, GPTJConfig.preset("tiny"), is_main=False).endswith(AUTO_CONFIGS[chosen])
    assert capsys.readouterr().out == ""


def test_manual_config_is_refused_by_the_runner_unless_the_check_is_off():
    from finetune.runner import deepspeed_json

    small = ("deepspeed=zero2", "deepspeed.device_memory_gb=0.5")  # less than the fixed CUDA/NCCL overhead alone
    with pytest.raises(ConfigError, match="does not fit"):
        deepspeed_json(parse_config(compose_train(*small)))
    base, _ = deepspeed_json(parse_config(compose_train(*small, "deepspeed.check_memory=false")))
    assert base == ds_json("zero2")
    deepspeed_json(parse_config(compose_train("deepspeed=zero2")))  # the tiny model fits this machine


def test_nvme_without_a_path_is_left_to_the_engines_error():
    no_drive = Cluster(gpu_memory_gb=80, cpu_memory_gb=256)  # NVMe capacity 0: ZeRO-Infinity cannot fit
    args = dict(source="zero3_nvme.json", is_main=True, cluster=no_drive)
    run = parse_config(compose_train("deepspeed=zero3_nvme"))
    check_memory(run, GPTJConfig.preset("tiny"), ds_json("zero3_nvme"), **args)  # the engine names nvme_path
    with_path = parse_config(compose_train("deepspeed=zero3_nvme", "deepspeed.nvme_path=/nonexistent/nvme"))
    with pytest.raises(ConfigError, match="of NVMe per node"):
        check_memory(with_path, GPTJConfig.preset("tiny"), ds_json("zero3_nvme"), **args)


@pytest.mark.parametrize("key, value", [("n_head", 0), ("n_layer", -2), ("vocab_size", 0), ("n_embd", "4096"),
                                        ("n_layer", True), ("n_embd", None)])
def test_plan_refuses_a_config_json_with_a_bad_size_naming_the_file_and_field(tmp_path, key, value):
    from finetune.config import ModelConfig
    from finetune.planning.choice import model_shape

    dims = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 50400, key: value}
    (tmp_path / "config.json").write_text(json.dumps(dims))
    with pytest.raises(ConfigError) as err:
        model_shape(ModelConfig(path=str(tmp_path)), task="qa")
    assert str(tmp_path / "config.json") in str(err.value) and f"{key}={value!r}" in str(err.value)
    assert "\n" not in str(err.value)
