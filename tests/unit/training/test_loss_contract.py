"""The loss contract between heads, tasks and the loop: `loss_reduction="sum"` and `Task.num_loss_targets`.

The loop divides the summed loss of a whole global batch by its target count, so for every head "sum" must add up
over any split of a batch and equal "mean" times the task's count on the whole one.
"""
from __future__ import annotations

import pytest
import torch

from finetune.model import GPTJConfig, build_model
from finetune.tasks import get_task

TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
PAD = 0


def clm_batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 4:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :7] = -100  # a long prompt: few response tokens
    labels[2, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cls_batch(problem_type: str, num_labels: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(1, 97, (5, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    if problem_type == "single_label_classification":
        labels = torch.randint(0, num_labels, (5,))
    elif problem_type == "multi_label_classification":
        labels = torch.randint(0, 2, (5, num_labels)).float()
    else:
        labels = torch.randn(5, num_labels).squeeze(-1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def qa_batch(padded: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, 97, (5, 10))
    mask = torch.ones_like(ids)
    if padded:  # right padding: rows of 10, 6, 9, 3 and 10 tokens
        for row, length in enumerate((10, 6, 9, 3, 10)):
            mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([0, 3, 5, 2, 9]),
            "end_positions": torch.tensor([0, 4, 8, 2, 9])}


CASES = {
    "clm": lambda: (GPTJConfig(**TINY, pad_token_id=PAD), clm_batch()),
    "cls": lambda: (GPTJConfig(**TINY, num_labels=3, pad_token_id=PAD), cls_batch("single_label_classification", 3)),
    "cls-multi-label": lambda: (GPTJConfig(**TINY, num_labels=3, pad_token_id=PAD,
                                           problem_type="multi_label_classification"),
                                cls_batch("multi_label_classification", 3)),
    "cls-regression": lambda: (GPTJConfig(**TINY, num_labels=1, pad_token_id=PAD), cls_batch("regression", 1)),
    "cls-regression-2": lambda: (GPTJConfig(**TINY, num_labels=2, pad_token_id=PAD, problem_type="regression"),
                                 cls_batch("regression", 2)),
    "qa": lambda: (GPTJConfig(**TINY, pad_token_id=PAD), qa_batch()),
}


def split(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in batch.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sum_over_any_split_divided_by_the_count_is_the_mean_of_the_whole_batch(case):
    config, batch = CASES[case]()
    task_name = case.split("-")[0]
    task = get_task(task_name)
    torch.manual_seed(0)
    model = build_model(config, task=task_name).eval()
    mean = model(**batch).loss
    total = model(**batch, loss_reduction="sum").loss
    count = task.num_loss_targets(batch)
    assert count.dtype == torch.int64 and count.dim() == 0
    torch.testing.assert_close(total / count, mean, rtol=1e-6, atol=0)
    # Micro batches of 1 + the rest, and two halves: the sums add up (the means of the parts would not).
    rows = list(range(batch["input_ids"].shape[0]))
    for parts in ([rows[:1], rows[1:]], [rows[: len(rows) // 2], rows[len(rows) // 2 :]]):
        sums = [model(**split(batch, part), loss_reduction="sum").loss for part in parts]
        counts = [task.num_loss_targets(split(batch, part)) for part in parts]
        assert int(sum(counts)) == int(count)
        torch.testing.assert_close(sum(sums) / sum(counts), mean, rtol=1e-6, atol=0)


def test_clm_counts_shifted_labels_that_are_not_ignored():
    batch = clm_batch()
    # row 0: 11 shifted positions, of which labels[0, 1:7] are -100 (6) -> 5; row 1: 8; row 2: 10; row 3: 3
    assert int(get_task("clm").num_loss_targets(batch)) == 5 + 8 + 10 + 3
    assert int(get_task("qa").num_loss_targets(qa_batch())) == 5
    assert int(get_task("cls").num_loss_targets(cls_batch("single_label_classification", 3))) == 5


def test_clm_sum_of_a_batch_without_targets_is_zero_and_unknown_reductions_are_refused():
    config, batch = CASES["clm"]()
    model = build_model(config, task="clm")
    batch["labels"][:] = -100
    assert float(model(**batch, loss_reduction="sum").loss.detach()) == 0.0
    with pytest.raises(ValueError, match="loss_reduction='none'"):
        model(**batch, loss_reduction="none")


def test_qa_sum_does_not_depend_on_the_padding_of_the_other_rows():
    """A feature's "sum" loss is the same in a padded batch and alone (its softmax spans its own tokens); HF's
    "mean" spans the padding too, so it depends on the longest row of the batch."""
    config, _ = CASES["qa"]()
    torch.manual_seed(0)
    model = build_model(config, task="qa").eval()
    batch = qa_batch(padded=True)
    together = model(**batch, loss_reduction="sum").loss
    singles = []
    for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
        single = {key: value[row : row + 1] for key, value in batch.items()}
        single["input_ids"] = single["input_ids"][:, :length]
        single["attention_mask"] = single["attention_mask"][:, :length]
        singles.append(single)
    torch.testing.assert_close(together, sum(model(**s, loss_reduction="sum").loss for s in singles), rtol=1e-5,
                               atol=0)
    mean_alone = sum(model(**single).loss for single in singles) / len(singles)
    assert not torch.allclose(model(**batch).loss, mean_alone, rtol=1e-3)  # unmasked: the padding counts
