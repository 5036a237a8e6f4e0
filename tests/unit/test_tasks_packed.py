"""Task plug-ins on packed batches: one record and one loss target per example, as with padded batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.config import DataConfig
from finetune.data import DataCollator
from finetune.model import GPTJConfig, build_model
from finetune.model.tokenizer import GPTJTokenizer
from finetune.tasks import get_task

PAD = 999  # outside the random tokens
TINY = dict(vocab_size=1000, n_positions=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, num_labels=3)


def features(task: str):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, n in enumerate([9, 4, 13, 6]):
        ids = torch.randint(0, 999, (n,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * n}
        if task == "clm":
            row["labels"] = [-100] * (i % 3) + ids[i % 3 :]  # a prompt of 0-2 tokens
        elif task == "cls":
            row["labels"] = i % 3
        else:
            row["start_positions"], row["end_positions"] = 1, min(3, n - 1)
        rows.append(row)
    return rows


def both_layouts(task: str, **model_kwargs):
    torch.manual_seed(0)
    model = build_model(GPTJConfig(**TINY, pad_token_id=PAD), task=task, **model_kwargs).eval()
    rows = features(task)
    out = {}
    for packed in (False, True):
        batch = DataCollator(PAD, packed=packed)(rows)
        with torch.no_grad():
            out[packed] = (model(**batch), batch)
    return out


@pytest.mark.parametrize("chunk", [None, 5])
def test_clm_records_per_example_equal_padded(chunk):
    task = get_task("clm")
    out = both_layouts("clm", loss_chunk_tokens=chunk)
    padded, packed = (task.eval_records(*out[p]) for p in (False, True))
    assert len(packed) == len(padded) == 4
    for (nll_a, n_a), (nll_b, n_b) in zip(packed, padded):
        assert n_a == n_b and nll_a == pytest.approx(nll_b, rel=1e-5)
    assert int(task.num_loss_targets(out[True][1])) == int(task.num_loss_targets(out[False][1])) == sum(
        n for _, n in padded)


def test_qa_records_hold_each_features_own_logits():
    task = get_task("qa")
    out = both_layouts("qa")
    padded, packed = (task.eval_records(*out[p]) for p in (False, True))
    assert [len(r[1]) for r in packed] == [9, 4, 13, 6]
    for a, b in zip(packed, padded):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[2], b[2], rtol=1e-5, atol=1e-5)
    assert int(task.num_loss_targets(out[True][1])) == 4  # examples, not rows


def test_cls_records_and_targets_count_examples():
    task = get_task("cls")
    out = both_layouts("cls")
    padded, packed = (task.eval_records(*out[p]) for p in (False, True))
    for a, b in zip(packed, padded):
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)
        assert a[2] == b[2]
    assert int(task.num_loss_targets(out[True][1])) == int(task.num_loss_targets(out[False][1])) == 4
    assert out[True][1]["input_ids"].shape[0] == 1


def test_collator_follows_data_packing():
    tokenizer = GPTJTokenizer.from_pretrained(None)
    assert get_task("qa").collator(tokenizer, DataConfig()).packed
    assert not get_task("qa").collator(tokenizer, DataConfig(packing=False)).packed
    assert not get_task("clm").collator(tokenizer, DataConfig()).packed  # plain text: stream blocks, padded
    assert get_task("clm").collator(tokenizer, DataConfig(packing="documents")).packed
    assert not get_task("cls").collator(tokenizer).packed  # no data config: padded, as before
