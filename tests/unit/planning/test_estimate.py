"""The memory planner: parameter counts against transformers/peft, formulas against DeepSpeed's own
estimators and autograd's saved tensors, the choice logic, and launch/plan.py end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from finetune.config import ConfigError
from finetune.planning.estimate import (
    CPU_ACCELERATOR_PROCESS_BYTES,
    CUDA_CONTEXT_BYTES,
    LAUNCHER_BYTES,
    PINNED_SLACK,
    PRESET_SHAPES,
    Cluster,
    GiB,
    ModelShape,
    Option,
    RunShape,
    activation_bytes_per_layer,
    count_parameters,
    estimate,
    format_table,
    largest_sub_group,
    parameter_tensors,
    plan,
    plan_to_json,
    stored_parameters,
    trainable_parameters,
    zero2_gradient_partition,
    zero_buffers_from_ds_config,
)

ROOT = Path(__file__).resolve().parents[3]
GPTJ_6B = PRESET_SHAPES["gptj-6b"]
SMALL = ModelShape(n_layer=2, n_embd=64, n_head=4, vocab_size=512)


def hf_model(shape: ModelShape):
    import transformers

    config = transformers.GPTJConfig(
        n_layer=shape.n_layer, n_embd=shape.n_embd, n_inner=shape.n_inner, n_head=shape.n_head,
        vocab_size=shape.vocab_size, rotary_dim=8, num_labels=shape.num_labels, attn_implementation="sdpa",
    )
    cls = {"clm": transformers.GPTJForCausalLM, "cls": transformers.GPTJForSequenceClassification,
           "qa": transformers.GPTJForQuestionAnswering}[shape.head]
    return cls(config)


# --- parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["clm", "cls", "qa"])
@pytest.mark.parametrize("n_inner", [None, 96])
def test_parameter_tensors_match_transformers_in_order(head, n_inner):
    shape = replace(SMALL, head=head, n_inner=n_inner, num_labels=3)
    model = hf_model(shape)
    assert [t.numel for t in parameter_tensors(shape)] == [p.numel() for p in model.parameters()]
    assert count_parameters(shape) == sum(p.numel() for p in model.parameters())


def test_gptj_6b_count_matches_transformers_on_meta():
    import transformers

    with torch.device("meta"):
        model = transformers.GPTJForCausalLM(transformers.GPTJConfig())
    assert count_parameters(GPTJ_6B) == sum(p.numel() for p in model.parameters()) == 6_050_882_784


@pytest.mark.parametrize("head", ["clm", "cls"])
def test_lora_counts_match_peft(head):
    import peft

    shape = replace(SMALL, head=head)
    task_type = {"clm": "CAUSAL_LM", "cls": "SEQ_CLS"}[head]
    model = peft.get_peft_model(hf_model(shape), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type=task_type))
    trainable, total = model.get_nb_trainable_parameters()
    # peft's SEQ_CLS trains `score` in full (modules_to_save); plain CAUSAL_LM leaves lm_head frozen.
    run = RunShape(lora_rank=4, lora_targets=("q_proj", "v_proj"), lora_train_head=head == "cls")
    assert trainable_parameters(shape, run) == trainable
    assert stored_parameters(shape, run) == total
    # HF declares k, v, q; the project q, k, v: same sizes, so compare without the order.
    ours = sorted((t.numel, t.trainable) for t in parameter_tensors(shape, run))
    assert ours == sorted((p.numel(), p.requires_grad) for p in model.parameters())


# --- model states ---------------------------------------------------------------------------------
def test_issue_case_6b_on_8_gpus_zero3_is_about_12gb_of_model_states():
    est = estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=8), Option(stage=3))
    expected = 16 * 6.05e9 / 8  # 2 (bf16 weights) + 2 (grads) + 4 (master) + 8 (moments) bytes per parameter
    assert est.component_bytes("gpu", "model_states") == pytest.approx(expected, rel=0.01)
    assert est.component_bytes("cpu", "model_states") == 0


def _ds_states(est, device="gpu"):
    # The lines DeepSpeed's estimators cover: model states, plus (on the GPU) the optimizer step's fp32
    # gradient copy, which DeepSpeed's "18 bytes" includes as 4_grads_32bit.
    extra = sum(i.bytes for i in est.items if i.device == device and i.name.startswith("fp32 gradient copy"))
    return est.component_bytes(device, "model_states") + extra


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2), (1, 1)])
def test_zero2_matches_deepspeed_estimator(gpus, nodes):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P = count_parameters(GPTJ_6B)
    cluster = Cluster(nodes=nodes, gpus_per_node=gpus)
    # No offload: DeepSpeed counts 2·P + 18·P/N. Ours adds the whole gradients of parameters straddling a
    # partition edge (DeepSpeed's grads_in_partition keeps them): at most two block matrices.
    _, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=False)
    ours = _ds_states(estimate(GPTJ_6B, RunShape(), cluster, Option(stage=2)))
    straddle = 2 * 2 * (GPTJ_6B.n_embd * GPTJ_6B.inner + GPTJ_6B.inner) if gpus * nodes > 1 else 0
    assert ds_gpu <= ours <= ds_gpu + straddle
    # CPU optimizer offload: the GPU keeps the bf16 weights; the host 16·P/node with DeepSpeed's 1.5 factor
    # (our pinned-allocation slack). DeepSpeed's max(4·N, 16) term is a non-zero.Init model load, not counted here.
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=True)
    est = estimate(GPTJ_6B, RunShape(), cluster, Option(stage=2, offload_optimizer="cpu"))
    assert est.component_bytes("gpu", "model_states") == ds_gpu
    if 4 * gpus * nodes <= 16:
        host = est.component_bytes("cpu", "model_states") * (1 + PINNED_SLACK)
        assert host == pytest.approx(ds_cpu, rel=1e-6)


def test_zero3_brackets_deepspeed_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    P = count_parameters(GPTJ_6B)
    largest_layer = GPTJ_6B.vocab_size * GPTJ_6B.n_embd + GPTJ_6B.vocab_size  # lm_head
    cluster = Cluster(gpus_per_node=8)
    # No offload: DeepSpeed says 4·largest_layer + 18·P/N. Our model states (16·P/N) are below it; with the
    # step's fp32 gradient copy (4·P/N) and the gathered module and its gradient we are above it.
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(P, largest_layer, 8, 1, cpu_offload=False)
    est = estimate(GPTJ_6B, RunShape(), cluster, Option(stage=3))
    buffers = sum(i.bytes for i in est.items if i.name.startswith(("gathered", "largest gradient")))
    assert est.component_bytes("gpu", "model_states") < ds_gpu < _ds_states(est) + buffers
    # Offload: DeepSpeed's host figures (16 / 18 bytes per parameter per node, x1.5) leave out the bf16
    # gradient partitions that stage 3 keeps on the host with the optimizer (grad_partitions_flat_buffer).
    for option, params in [(Option(stage=3, offload_optimizer="cpu"), False),
                           (Option(stage=3, offload_optimizer="cpu", offload_params="cpu"), True)]:
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(P, largest_layer, 8, 1, True, params)
        est = estimate(GPTJ_6B, RunShape(), cluster, option)
        host = est.component_bytes("cpu", "model_states") * (1 + PINNED_SLACK)
        assert host == pytest.approx(ds_cpu + 2 * P * (1 + PINNED_SLACK), rel=1e-6)
        assert est.component_bytes("gpu", "model_states") == (0 if params else 2 * P / 8)


def test_zero2_gradient_partition_keeps_straddling_parameters():
    assert zero2_gradient_partition([10, 10, 10, 10], 2) == 20
    assert zero2_gradient_partition([15, 10, 15], 2) == 25  # the middle tensor crosses the edge at 20
    assert zero2_gradient_partition([100], 4) == 100


def test_lora_shrinks_optimizer_states_but_not_weights():
    cluster = Cluster(gpus_per_node=1)
    full = estimate(GPTJ_6B, RunShape(), cluster, Option(stage=0))
    lora = estimate(GPTJ_6B, RunShape(lora_rank=8), cluster, Option(stage=0))
    weights = lambda e: next(i.bytes for i in e.items if i.name == "parameters")
    assert weights(lora) >= weights(full)
    assert lora.component_bytes("gpu", "model_states") < 0.2 * full.component_bytes("gpu", "model_states")


# --- activations ----------------------------------------------------------------------------------
def _saved_bytes(shape: ModelShape, run: RunShape, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd saves in a forward of transformers' GPT-J blocks (+ ln_f)."""
    import peft

    torch.manual_seed(0)
    model = hf_model(shape).transformer.to(dtype)
    if run.lora:
        config = peft.LoraConfig(r=run.lora_rank, target_modules=list(run.lora_targets), lora_dropout=run.lora_dropout)
        model = peft.get_peft_model(model, config)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, shape.vocab_size, (run.micro_batch_size, run.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize(
    "precision,lora",
    [("fp32", {}), ("bf16", {}), ("fp32", dict(lora_rank=8, lora_targets=("q_proj", "v_proj"), lora_dropout=0.1)),
     ("fp32", dict(lora_rank=4, lora_targets=("k_proj", "out_proj", "fc_in", "fc_out"), lora_dropout=0.0))],
)
def test_activation_formula_matches_autograd_saved_tensors(precision, lora):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    shape = ModelShape(n_layer=2, n_embd=128, n_head=4, vocab_size=512)
    run = RunShape(micro_batch_size=2, seq_len=64, precision=precision, activation_checkpointing=False, **lora)
    # One more block adds one block's saved tensors (the first block under LoRA keeps less, see the docstring).
    one_block = _saved_bytes(replace(shape, n_layer=3), run, dtype) - _saved_bytes(shape, run, dtype)
    expected = activation_bytes_per_layer(shape, run)
    if run.lora and run.lora_dropout > 0:
        # CPU dropout keeps its mask in the input dtype; the formula counts CUDA's fused dropout (bool mask).
        expected += len(run.lora_targets) * run.micro_batch_size * run.seq_len * shape.n_embd * (4 - 1)
    assert one_block == pytest.approx(expected, rel=0.02)


def test_checkpointing_and_logits():
    cluster = Cluster(gpus_per_node=8)
    run = RunShape(micro_batch_size=4, seq_len=2048, activation_checkpointing=False)
    acts = lambda s, r: estimate(s, r, cluster, Option(stage=3)).component_bytes("gpu", "activations")
    assert acts(GPTJ_6B, replace(run, activation_checkpointing=True)) < 0.25 * acts(GPTJ_6B, run)
    logits = lambda s: next(i.bytes for i in estimate(s, run, cluster, Option(stage=3)).items if i.name.startswith("logits"))
    assert logits(GPTJ_6B) == 4 * 2048 * 50400 * 4 * 4  # B·S·V fp32, four copies
    assert logits(replace(GPTJ_6B, head="cls")) < 1e-4 * logits(GPTJ_6B)


# --- the plan -------------------------------------------------------------------------------------
def test_big_cluster_picks_zero1_or_2_without_offload():
    p = plan(GPTJ_6B, RunShape(micro_batch_size=1, seq_len=2048), Cluster(gpus_per_node=8, gpu_memory_gb=80, cpu_memory_gb=1000))
    assert p.recommended is not None
    assert p.recommended.option.stage in (1, 2) and p.recommended.option.offload_optimizer == "none"
    assert not p.options[0].fits  # 6B full fine-tuning does not fit plain data parallel on 80 GB
    assert [e.option for e in p.options][:4] == [Option(stage=s) for s in range(4)]


def test_single_24gb_gpu_needs_offload_or_nothing_fits():
    run = RunShape(micro_batch_size=1, seq_len=512)
    roomy = plan(GPTJ_6B, run, Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=512))
    assert all(not e.fits for e in roomy.options if e.option.offload_optimizer == "none")
    assert roomy.recommended is not None and roomy.recommended.option.offload_optimizer == "cpu"
    tight = plan(GPTJ_6B, run, Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=64))
    assert tight.recommended is None
    assert "Nothing fits" in tight.reason and "Nothing fits" in format_table(tight)


def test_lora_fits_a_single_24gb_gpu_without_zero():
    run = RunShape(micro_batch_size=1, seq_len=512, lora_rank=8)
    p = plan(GPTJ_6B, run, Cluster(gpus_per_node=1, gpu_memory_gb=24, cpu_memory_gb=64))
    assert p.recommended is not None and p.recommended.option == Option(stage=0)


def test_plan_over_a_subset_of_options_with_buffers_per_option():
    from finetune.planning.estimate import ZeroBuffers

    run, cluster = RunShape(micro_batch_size=1, seq_len=512), Cluster(gpus_per_node=8, gpu_memory_gb=80)
    zero3, offload = Option(stage=3), Option(stage=3, offload_optimizer="cpu", offload_params="cpu")
    big = ZeroBuffers(reduce_bucket_size=4_000_000_000)
    p = plan(GPTJ_6B, run, cluster, options=[offload, zero3], buffers={zero3: big, 3: ZeroBuffers()})
    assert [e.option for e in p.options] == [offload, zero3]  # the given order is the speed order
    assert p.recommended.option == offload
    assert p.options[1].gpu_bytes == estimate(GPTJ_6B, run, cluster, zero3, buffers=big).gpu_bytes  # own entry wins
    assert p.options[0].gpu_bytes == estimate(GPTJ_6B, run, cluster, offload).gpu_bytes  # the stage's entry


def test_margin_is_respected():
    run, cluster = RunShape(micro_batch_size=8, seq_len=2048), Cluster(gpus_per_node=8, gpu_memory_gb=80)
    for margin in (0.0, 0.3, 0.6):
        p = plan(GPTJ_6B, run, cluster, margin=margin)
        if p.recommended is not None:
            assert p.recommended.margin >= margin
            assert all(e.margin < margin for e in p.options[: p.options.index(p.recommended)])


def test_peak_is_persistent_plus_largest_phase():
    est = estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=8), Option(stage=2))
    gpu = [i for i in est.items if i.device == "gpu"]
    persistent = sum(i.bytes for i in gpu if i.phase == "persistent")
    phases = {ph: sum(i.bytes for i in gpu if i.phase == ph) for ph in ("forward_backward", "optimizer_step")}
    assert est.gpu_bytes == persistent + max(phases.values()) < sum(i.bytes for i in gpu)
    assert all(i.formula for i in est.items)


NVME = Option(stage=3, offload_optimizer="nvme", offload_params="nvme")
NVME_JSON = zero_buffers_from_ds_config(json.loads((ROOT / "ds_configs" / "zero3_nvme.json").read_text()))


def test_nvme_needs_a_drive():
    assert not estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=8), NVME, buffers=NVME_JSON).fits
    with_drive = estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=8, nvme_gb=4000), NVME, buffers=NVME_JSON)
    # bf16 weights, fp32 master + moments + the fp32 gradients DeepSpeed swaps out with them: 18 bytes/param.
    assert with_drive.nvme_bytes == pytest.approx(8 * (2 * 6.05e9 + 16 * 6.05e9) / 8, rel=0.01)


def test_nvme_keeps_small_partitions_and_max_in_cpu_in_host_memory():
    P = count_parameters(GPTJ_6B)
    cluster = Cluster(gpus_per_node=8, nvme_gb=4000)
    all_out = estimate(GPTJ_6B, RunShape(), cluster, NVME, buffers=NVME_JSON)  # max_in_cpu 0
    params = {i.name: i for i in all_out.items if i.name.startswith("parameters")}
    # LayerNorm gains and biases (partitions under 1 MiB) stay in RAM: a few MB of GPT-J's 12 GB of weights.
    assert params["parameters"].device == "nvme" and params["parameters kept in host memory"].bytes < 20e6
    assert params["parameters"].bytes + params["parameters kept in host memory"].bytes == pytest.approx(2 * P, rel=1e-6)
    # DeepSpeed's default max_in_cpu (1e9 elements per rank) keeps all of a 756M-parameter partition in RAM.
    default = estimate(GPTJ_6B, RunShape(), cluster, NVME, buffers=replace(NVME_JSON, param_max_in_cpu=10**9))
    assert not [i for i in default.items if i.name == "parameters" and i.device == "nvme"]
    assert default.nvme_bytes == pytest.approx(16 * P, rel=1e-6)


def test_nvme_host_buffers_for_gptj_on_one_gpu():
    """The page-locked buffers DeepSpeed allocates for ZeRO-Infinity, with ds_configs/zero3_nvme.json's settings."""
    est = estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=1, nvme_gb=4000), NVME, buffers=NVME_JSON)
    items = {i.name: i.bytes for i in est.items if i.device == "cpu"}
    embedding = GPTJ_6B.vocab_size * GPTJ_6B.n_embd  # the largest partition on one GPU
    assert items["NVMe swap buffers: parameters (pinned)"] == 5 * embedding * 2
    # Sub-groups of 1e8 elements close once reached: the one the LM head closes is the largest.
    group = largest_sub_group([t.numel for t in parameter_tensors(GPTJ_6B)], NVME_JSON.sub_group_size)
    assert embedding < group < embedding + NVME_JSON.sub_group_size
    assert items["NVMe swap buffers: optimizer states (pinned)"] == 4 * 4 * group
    assert items["NVMe swap buffers: 16-bit staging (pinned)"] == 2 * group
    P = count_parameters(GPTJ_6B)
    assert items["gradients"] == 4 * P  # accumulated in fp32 (data_types.grad_accum_dtype) in host memory
    assert "fp32 gradient copies before their swap-out" not in items
    pinned = items["gradients"] + items["parameters kept in host memory"]
    assert items["pinned-allocation slack"] == PINNED_SLACK * pinned
    # Accumulated in bf16, DeepSpeed casts every partition to fp32 at once before swapping them out: 2 + 4 bytes.
    bf16 = estimate(GPTJ_6B, RunShape(), Cluster(gpus_per_node=1, nvme_gb=4000), NVME,
                    buffers=replace(NVME_JSON, grad_accum_dtype=None))
    items = {i.name: i for i in bf16.items if i.device == "cpu"}
    assert items["gradients"].bytes == 2 * P
    copies = items["fp32 gradient copies before their swap-out"]
    assert (copies.bytes, copies.phase) == (4 * P, "optimizer_step")


def test_largest_sub_group_follows_deepspeed():
    assert largest_sub_group([10, 10, 10, 10], 15) == 20  # closed once it reaches the size
    assert largest_sub_group([50, 1, 1], 15) == 50  # one tensor larger than the size is a sub-group alone
    assert largest_sub_group([5, 5], 100) == 10


def test_cpu_accelerator_has_no_cuda_overheads():
    cuda = estimate(SMALL, RunShape(seq_len=64), Cluster(gpus_per_node=2), Option(stage=3, offload_optimizer="cpu"))
    cpu = estimate(SMALL, RunShape(seq_len=64), Cluster(gpus_per_node=2, accelerator="cpu"),
                   Option(stage=3, offload_optimizer="cpu"))
    assert cuda.gpu_bytes - cpu.gpu_bytes == CUDA_CONTEXT_BYTES
    host = {i.name: i.bytes for i in cpu.items if i.device == "cpu"}
    assert host["host process (Python, torch, CUDA libs)"] == 2 * CPU_ACCELERATOR_PROCESS_BYTES
    # The launchers run once per node, whatever the number of ranks on it.
    assert host["deepspeed launcher processes"] == LAUNCHER_BYTES
    assert "pinned-allocation slack" not in host
    with pytest.raises(ConfigError, match="cluster.accelerator"):
        Cluster(accelerator="tpu")


def test_bad_inputs_raise_config_errors():
    with pytest.raises(ConfigError, match="precision"):
        RunShape(precision="fp8")
    with pytest.raises(ConfigError, match="target_modules"):
        RunShape(lora_rank=8, lora_targets=("query",))
    with pytest.raises(ConfigError, match="stage 3"):
        Option(stage=2, offload_params="cpu")
    with pytest.raises(ConfigError, match="task"):
        ModelShape(n_layer=1, n_embd=8, n_head=1, head="seq2seq")


def test_json_structure():
    p = plan(GPTJ_6B, RunShape(), Cluster(gpus_per_node=8))
    data = json.loads(json.dumps(plan_to_json(p)))
    assert len(data["options"]) == len(p.options) == 8
    assert data["recommended"] == p.recommended.option.name
    assert [o["name"] for o in data["options"] if o["recommended"]] == [data["recommended"]]
    for o, e in zip(data["options"], p.options):
        assert {"stage", "offload", "gpu_per_gpu", "cpu_per_node", "nvme_per_node", "fits"} <= o.keys()
        assert o["gpu_per_gpu"]["total_bytes"] == e.gpu_bytes and o["fits"] == e.fits
        names = {c["name"] for dev in ("gpu_per_gpu", "cpu_per_node", "nvme_per_node") for c in o[dev]["components"]}
        assert {"parameters", "Adam moments (fp32 exp_avg, exp_avg_sq)", "activations saved for backward"} <= names
        assert all(c["formula"] for c in o["gpu_per_gpu"]["components"])


# --- launch/plan.py -------------------------------------------------------------------------------
def _launch_plan_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_plan", ROOT / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="plan", overrides=overrides)


def test_plan_inputs_from_the_training_config(tmp_path):
    plan_inputs = _launch_plan_module().plan_inputs
    cfg = _compose(["task=cls", "lora=lora", "lora.target_modules=[all-linear]", "trainer.micro_batch_size=4",
                    "trainer.precision=bf16", "data.max_seq_len=512", "+model.overrides.n_layer=4",
                    "cluster.gpus_per_node=2", "cluster.nvme_gb=500", "plan.margin=0.2"])
    inputs = plan_inputs(cfg)
    assert inputs.shape == replace(GPTJ_6B, n_layer=4, head="cls")
    assert inputs.run == RunShape(micro_batch_size=4, seq_len=512, precision="bf16", activation_checkpointing=True,
                                  lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
                                  lora_dropout=0.05, lora_train_head=True, chunked_loss=True)
    assert inputs.cluster == Cluster(gpus_per_node=2, gpu_memory_gb=80, cpu_memory_gb=1000, nvme_gb=500)
    assert inputs.margin == 0.2
    zero2 = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())["zero_optimization"]
    assert inputs.buffers[2].reduce_bucket_size == zero2["reduce_bucket_size"]
    assert inputs.buffers[2].overlap_comm == zero2.get("overlap_comm", False)

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    config = {"n_layer": 3, "n_embd": 256, "n_head": 8, "vocab_size": 1000, "rotary_dim": 16}
    (checkpoint / "config.json").write_text(json.dumps(config))
    inputs = plan_inputs(_compose(["task=qa", f"model.path={checkpoint}"]))
    assert inputs.shape == ModelShape(n_layer=3, n_embd=256, n_head=8, vocab_size=1000, head="qa")
    with pytest.raises(ConfigError, match="model.name"):
        plan_inputs(_compose(["model.name=gptj-20b", "model.path=null"]))


def _plan_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "plan.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_plan_cli_table_and_json():
    args = ["model=gptj-6b", "task=qa", "cluster.nodes=1", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80",
            "cluster.cpu_memory_gb=1000", "trainer.micro_batch_size=4", "trainer.precision=bf16", "data.max_seq_len=2048"]
    table = _plan_cli(*args)
    assert table.returncode == 0, table.stderr
    assert "Recommended:" in table.stdout and "ZeRO-3 + optimizer->cpu + params->cpu" in table.stdout
    data = json.loads(_plan_cli(*args, "plan.format=json").stdout)
    assert data["model"]["head"] == "qa" and data["run"]["micro_batch_size"] == 4
    # The same inputs through the library give the same plan.
    inputs = _launch_plan_module().plan_inputs(_compose(args))
    expected = plan(inputs.shape, inputs.run, inputs.cluster, margin=inputs.margin, buffers=inputs.buffers)
    assert data == json.loads(json.dumps(plan_to_json(expected)))
    assert data["recommended"] == expected.recommended.option.name
    assert f"{expected.recommended.gpu_bytes / GiB:.1f}" in table.stdout


def test_plan_cli_errors_and_nothing_fits():
    bad = _plan_cli("trainer.precision=fp8")
    assert bad.returncode == 2 and "trainer.precision" in bad.stderr and "Traceback" not in bad.stderr
    none_fit = _plan_cli("cluster.gpus_per_node=1", "cluster.gpu_memory_gb=8", "cluster.cpu_memory_gb=16")
    assert none_fit.returncode == 1 and "Nothing fits" in none_fit.stdout
