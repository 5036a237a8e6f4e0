"""cls and clm train on the bundled data under real DeepSpeed (2 CPU ranks): each reaches its metric under one
ZeRO configuration (cls: ZeRO-3 with CPU offload and DeepSpeed's CPU Adam; clm: ZeRO-2) and lowers its loss under
the other (clm under ZeRO-3 with LoRA, exporting adapter + merged weights). One process with 2 accumulation steps
gives the losses of 2 ranks (clm: packed rows, no padding, so the loss does not depend on how rows are grouped
into micro batches). The qa task is in test_train_qa.py."""
from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLS_SHORT = 30  # cls starts to separate its classes after ~20 steps
CLM_LORA_STEPS = 12
# clm steps are the costly ones (logits over 50400 tokens for every position): short rows keep them cheap
CLM_SEQ = "data.max_seq_len=64"
# A random-init base: in 12 steps only a trained head lowers the loss visibly (clm's default freezes lm_head).
CLM_LORA = ("task=clm", CLM_SEQ, f"trainer.max_steps={CLM_LORA_STEPS}", "trainer.log_every=1", "trainer.seed=3",
            "trainer.micro_batch_size=8", "lora=lora", "lora.dropout=0.0", "lora.train_head=true")


def mean_loss(losses: dict[int, float], steps) -> float:
    return sum(losses[s] for s in steps) / len(steps)


def test_cls_zero3_offload_reaches_accuracy(launch, tmp_path):
    run = launch(tmp_path / "run", "task=cls", "deepspeed=zero3_offload", "trainer.max_steps=60", "trainer.eval_every=0",
                 "trainer.log_every=5")
    assert "DeepSpeedCPUAdam" in run.output and "offload: cpu" in run.output
    results = run.eval_results
    # three balanced classes: chance is ~0.33
    assert results["accuracy"] >= 0.8, results
    assert results["macro_f1"] >= 0.75, results
    assert (run.run_dir / "final" / "model.safetensors").is_file()


def test_cls_zero2_loss_falls(launch, tmp_path):
    run = launch(tmp_path / "run", "task=cls", "deepspeed=zero2", "trainer.max_steps=60", "trainer.log_every=1",
                 f"trainer.stop_after_steps={CLS_SHORT}")
    losses = run.train_losses()
    assert mean_loss(losses, range(CLS_SHORT - 2, CLS_SHORT + 1)) < 0.5 * mean_loss(losses, range(1, 4)), losses


def test_clm_zero2_perplexity_falls_far_below_its_start(launch, tmp_path):
    run = launch(tmp_path / "run", "task=clm", CLM_SEQ, "deepspeed=zero2", "trainer.max_steps=30",
                 "trainer.eval_every=0", "trainer.log_every=1")
    start_perplexity = math.exp(run.train_losses()[1])  # ~vocabulary size for a random init
    results = run.eval_results
    assert results["perplexity"] < start_perplexity / 100, (start_perplexity, results)
    assert results["loss"] == pytest.approx(math.log(results["perplexity"]), rel=1e-6)


@pytest.fixture(scope="module")
def clm_zero3_lora(launch, tmp_path_factory):
    return launch(tmp_path_factory.mktemp("clm_zero3_lora") / "run", *CLM_LORA, "deepspeed=zero3")


def test_clm_zero3_lora_loss_falls_and_exports(clm_zero3_lora):
    transformers = pytest.importorskip("transformers")
    import torch

    from finetune.model.hf_weights import load_pretrained

    losses = clm_zero3_lora.train_losses()
    n = CLM_LORA_STEPS
    assert mean_loss(losses, range(n - 2, n + 1)) < 0.8 * mean_loss(losses, range(1, 4)), losses
    final = clm_zero3_lora.run_dir / "final"
    # a random-init base: merged full weights in final/, the adapter beside them in final/adapter/ (not in final/
    # itself, where transformers would apply it on top of the merged weights a second time)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "adapter_config.json").exists()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (final / "adapter").iterdir()}
    ours = load_pretrained(final, task="clm", dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    input_ids = torch.randint(0, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, rtol=1e-4, atol=1e-4)


def test_one_process_with_accumulation_matches_two_ranks(launch, tmp_path, clm_zero3_lora):
    one = launch(tmp_path / "run", *CLM_LORA, "deepspeed=none", "trainer.grad_accum_steps=2",
                 "trainer.stop_after_steps=5", nprocs=1)
    assert "world 1" in one.output and "ZeRO-0" in one.output and "batch 16" in one.output
    reference, losses = clm_zero3_lora.train_losses(), one.train_losses()
    for step in range(1, 6):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step
