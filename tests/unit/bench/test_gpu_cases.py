"""bench/gpu_cases.py's pieces that decide the GPU figures: the FLOP count behind MFU, identical weights for both
implementations, the planner's choice of micro batch and checkpointing, and the DeepSpeed config each case runs."""
from __future__ import annotations

import dataclasses
import inspect

import gpu_cases
import pytest
import torch
from torch import nn

from finetune.model import GPTJConfig, build_model
from finetune.planning.estimate import Cluster

GPTJ_6B = gpu_cases.GPU_SHAPES


def test_matmul_parameters_are_the_linear_weights_of_the_model():
    shapes = dataclasses.replace(GPTJ_6B, n_layer=3, n_embd=64, n_head=4, rotary_dim=8, vocab_size=1000)
    config = GPTJConfig(n_layer=3, n_embd=64, n_head=4, rotary_dim=8, vocab_size=1000)
    model = build_model(config, task="clm", init=False)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert gpu_cases.matmul_params(shapes) == linear_weights


def test_training_flops_full_and_lora():
    n = gpu_cases.matmul_params(GPTJ_6B)
    attention = 12 * 28 * 4096 * 2048
    assert gpu_cases.training_flops_per_token(GPTJ_6B) == 6 * n + attention
    # LoRA: no weight gradients for the frozen base (2·N less), plus 6 FLOPs per adapter parameter.
    adapters = 1_000_000
    assert gpu_cases.training_flops_per_token(GPTJ_6B, lora_params=adapters) == 4 * n + attention + 6 * adapters
    # The attention term is what makes a longer sequence cost more per token.
    longer = dataclasses.replace(GPTJ_6B, seq_len=4096)
    assert gpu_cases.training_flops_per_token(longer) - gpu_cases.training_flops_per_token(GPTJ_6B) == attention


def test_init_by_name_gives_ours_and_transformers_the_same_weights():
    transformers = pytest.importorskip("transformers")
    shape = dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
    ours = build_model(GPTJConfig(**shape), task="clm", init=False)
    theirs = transformers.GPTJForCausalLM(transformers.GPTJConfig(**shape, tie_word_embeddings=False))
    gpu_cases.init_by_name(ours)
    gpu_cases.init_by_name(theirs)
    mine, other = ours.state_dict(), dict(theirs.named_parameters())
    assert set(mine) == set(other)
    assert all(torch.equal(mine[name], other[name]) for name in mine)  # though HF makes k_proj before q_proj
    assert torch.equal(mine["transformer.h.1.ln_1.weight"], torch.ones(32))
    assert torch.equal(mine["transformer.h.0.mlp.fc_in.bias"], torch.zeros(128))
    assert abs(mine["lm_head.weight"].std().item() - 0.02) < 0.002
    assert not torch.equal(mine["transformer.h.0.attn.q_proj.weight"], mine["transformer.h.1.attn.q_proj.weight"])
    gpu_cases.init_by_name(theirs, seed=7)
    assert not torch.equal(mine["lm_head.weight"], dict(theirs.named_parameters())["lm_head.weight"])


H200 = Cluster(gpu_memory_gb=140.0, cpu_memory_gb=128.0)


@pytest.mark.parametrize("config,lora", [(gpu_cases.ZERO3, False), ("auto", True)])
def test_the_planner_picks_the_largest_batch_that_fits_without_checkpointing(config, lora):
    pick = gpu_cases.pick_run("clm", GPTJ_6B, config=config, lora=lora, offload=False, cluster=H200)
    assert not pick.checkpointing
    assert pick.estimate.headroom("gpu") >= 0.1
    larger = [b for b in gpu_cases.BATCH_CANDIDATES if b > pick.micro_batch]
    for batch in larger:  # every larger candidate would leave less than 10% free
        other = gpu_cases.pick_run("clm", GPTJ_6B, config=config, lora=lora, offload=False, cluster=H200,
                                   micro_batch=batch, checkpointing=False)
        assert other.estimate.headroom("gpu") < 0.1
    if config == "auto":
        assert pick.config_file.startswith("ds_configs/")


def test_the_planner_turns_checkpointing_on_where_nothing_fits_without():
    # Full fine-tuning on 100 GiB: the ~90 GiB of model states leave too little for activations without it.
    small = Cluster(gpu_memory_gb=112.0, cpu_memory_gb=128.0)
    pick = gpu_cases.pick_run("clm", GPTJ_6B, config=gpu_cases.ZERO3, lora=False, offload=False, cluster=small)
    assert pick.checkpointing and pick.estimate.headroom("gpu") >= 0.1
    # Nothing fits at all (an 80 GiB card): the last resort is micro batch 1 with checkpointing, and it says so.
    pick = gpu_cases.pick_run("clm", GPTJ_6B, config=gpu_cases.ZERO3, lora=False, offload=False,
                              cluster=Cluster(gpu_memory_gb=80.0))
    assert (pick.micro_batch, pick.checkpointing) == (1, True) and "nothing fits" in pick.why


def test_explicit_micro_batch_and_checkpointing_win():
    pick = gpu_cases.pick_run("clm", GPTJ_6B, config=gpu_cases.ZERO3, lora=False, offload=True, cluster=H200,
                              micro_batch=4, checkpointing=True)
    assert (pick.micro_batch, pick.checkpointing) == (4, True)
    assert pick.estimate.option.offload_optimizer == "cpu"


def test_ds_config_optimizer_per_device_and_offload():
    gpu = gpu_cases.ds_config(gpu_cases.ZERO3, micro_batch=2, on_gpu=True, precision="bf16")
    assert gpu["optimizer"]["params"]["torch_adam"] and gpu["optimizer"]["params"]["fused"]
    assert gpu["bf16"]["enabled"] and gpu["train_micro_batch_size_per_gpu"] == 2 and gpu["train_batch_size"] == 2
    assert "offload_optimizer" not in gpu["zero_optimization"]
    offload = gpu_cases.ds_config(gpu_cases.ZERO3, micro_batch=2, on_gpu=True, precision="bf16", offload=False)
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "torch_adam" not in offload["optimizer"]["params"]  # DeepSpeedCPUAdam
    cpu = gpu_cases.ds_config(gpu_cases.ZERO3, micro_batch=2, on_gpu=False, precision="fp32")
    assert cpu["optimizer"]["params"]["torch_adam"] and "fused" not in cpu["optimizer"]["params"]
    assert not cpu["bf16"]["enabled"]


def test_every_registered_run_accepts_its_arguments():
    ctx = gpu_cases.Context(case="x", run="y", dry=True, results=None, profiles=None, deadline=0.0)
    names = set()
    for case in gpu_cases.CASES.values():
        assert case.runs and case.min_s <= case.timeout_s
        for run in case.runs:
            inspect.signature(run.fn).bind(ctx, **run.kwargs)
            names.add((case.name, run.name))
    assert len(names) == sum(len(c.runs) for c in gpu_cases.CASES.values())


def test_options_override_the_shapes():
    ctx = gpu_cases.Context(case="x", run="y", dry=False, results=None, profiles=None, deadline=0.0,
                            options={"steps": 9, "seq_len": 1024, "micro_batch": 2})
    assert (ctx.shapes.steps, ctx.shapes.seq_len, ctx.shapes.n_layer) == (9, 1024, 28)
