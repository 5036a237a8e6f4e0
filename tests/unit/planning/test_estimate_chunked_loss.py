"""The planner's logits line under the chunked causal-LM loss (model.chunked_loss)."""
from dataclasses import replace

import pytest
import torch

from finetune.model import GPTJConfig, build_model
from finetune.planning.estimate import PRESET_SHAPES, Cluster, ModelShape, Option, RunShape, estimate, logits_item

GPTJ_6B = PRESET_SHAPES["gptj-6b"]


def line(shape, run):
    return next(i for i in estimate(shape, run, Cluster(gpus_per_node=8), Option(stage=3)).items
                if i.name.startswith("logits"))


def test_chunked_line_replaces_the_four_logits_copies():
    full_run = RunShape(micro_batch_size=4, seq_len=2048)
    full = line(GPTJ_6B, full_run)
    assert full.name == "logits and loss (fp32)" and full.bytes == 4 * 2048 * 50400 * 4 * 4  # 6.6 GB
    chunked = line(GPTJ_6B, replace(full_run, chunked_loss=True))
    B, S, C, V, d = 4, 2048, 512, 50400, 4096
    assert chunked.name == "logits and loss (chunked)" and "C = 512" in chunked.formula
    assert chunked.bytes == B * S * (d * 2 + 13) + C * V * (2 * 2 + 4) + V * d * 4
    assert chunked.bytes < full.bytes / 5
    # LoRA keeps the head frozen by default: no fp32 weight-gradient buffer
    frozen = line(GPTJ_6B, replace(full_run, chunked_loss=True, lora_rank=8, lora_train_head=False))
    assert frozen.bytes == B * S * (d * 2 + 13) + C * V * (2 + 8)
    smaller_chunk = line(GPTJ_6B, replace(full_run, chunked_loss=True, loss_chunk_tokens=128))
    assert smaller_chunk.bytes < chunked.bytes and "C = 128" in smaller_chunk.formula
    # other heads have no such option
    assert line(replace(GPTJ_6B, head="qa"), replace(full_run, chunked_loss=True)).name == "logits and loss (fp32)"


def test_saved_part_matches_autograd():
    # What the chunked head keeps for backward, counted by autograd's saved-tensor hooks (parameters excluded).
    shape = ModelShape(n_layer=1, n_embd=128, n_head=4, vocab_size=512)
    run = RunShape(micro_batch_size=2, seq_len=64, precision="fp32", chunked_loss=True, loss_chunk_tokens=32)
    model = build_model(GPTJConfig(vocab_size=512, n_embd=128, n_layer=1, n_head=4, rotary_dim=8), task="clm",
                        loss_chunk_tokens=32)
    hidden = torch.randn(2, 64, 128, requires_grad=True)
    skip = {p.data_ptr() for p in model.parameters()} | {hidden.data_ptr()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in skip:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model._chunked_loss(hidden, torch.randint(0, 512, (2, 64)), "mean")
    # the formula counts B·S positions, the head sees B·(S - 1) (the last one predicts nothing)
    formula_saved = logits_item(shape, run).bytes - 32 * 512 * (2 * 4 + 4) - 512 * 128 * 4
    assert sum(saved.values()) == pytest.approx(formula_saved * 63 / 64, rel=0.01)
