"""Task plug-ins: per-row eval records and the metrics computed from them, on hand-made model outputs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F

from finetune.config import ConfigError, DataConfig
from finetune.data import TaskData
from finetune.model.tokenizer import GPTJTokenizer
from finetune.tasks import TASKS, get_task


def test_registry_and_unknown_task():
    assert set(TASKS) == {"clm", "cls", "qa"}
    assert all(TASKS[name].name == name for name in TASKS)
    with pytest.raises(ConfigError, match="task='ner'"):
        get_task("ner")


def test_model_overrides():
    tokenizer = GPTJTokenizer.from_pretrained()
    data = TaskData(train=None, validation=None, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                    problem_type="single_label_classification")
    cls = get_task("cls").model_overrides(data, tokenizer)
    assert cls == {"pad_token_id": tokenizer.pad_token_id, "num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"},
                   "problem_type": "single_label_classification"}
    assert get_task("qa").model_overrides(data, tokenizer) == {"pad_token_id": tokenizer.pad_token_id}


def test_clm_perplexity_weighs_tokens_not_rows():
    task = get_task("clm")
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, -100, -100, -100]])  # 4 and 1 predicted tokens
    records = task.eval_records(SimpleNamespace(logits=logits), {"labels": labels})
    assert [r[1] for r in records] == [4, 1]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100).item()
    result = task.compute_eval_metrics(records, TaskData(train=None, validation=None), DataConfig())
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_cls_accuracy_from_logits():
    task = get_task("cls")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1, 1, 1])
    records = task.eval_records(SimpleNamespace(logits=logits, loss=torch.tensor(0.5)), {"labels": labels})
    data = TaskData(train=None, validation=None, num_labels=2, problem_type="single_label_classification")
    result = task.compute_eval_metrics(records, data, DataConfig())
    assert result["accuracy"] == pytest.approx(0.75)
    # class 0: tp 1, predicted 2, gold 1 -> F1 2/3; class 1: tp 2, predicted 2, gold 3 -> F1 0.8
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["loss"] == pytest.approx(0.5)


def test_cls_regression_reports_mse():
    task = get_task("cls")
    records = task.eval_records(SimpleNamespace(logits=torch.tensor([[1.0], [3.0]]), loss=None),
                                {"labels": torch.tensor([2.0, 3.0])})
    data = TaskData(train=None, validation=None, num_labels=1, problem_type="regression")
    assert task.compute_eval_metrics(records, data, DataConfig())["mse"] == pytest.approx(0.5)


def test_qa_records_trim_padding_and_metrics_use_the_span():
    task = get_task("qa")
    context = "Paris is the capital of France."
    examples = datasets.Dataset.from_list([
        {"id": "q1", "context": context, "question": "?", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "q2", "context": context, "question": "?", "answers": {"text": ["France"], "answer_start": [24]}},
    ])
    # 4 tokens: question token (no offsets), "Paris", " capital", " France"
    offsets = [None, [0, 5], [13, 20], [24, 30]]
    features = datasets.Dataset.from_list([
        {"example_id": "q1", "offset_mapping": offsets, "input_ids": [1, 2, 3, 4]},
        {"example_id": "q2", "offset_mapping": offsets[:3], "input_ids": [1, 2, 3]},
    ])
    start = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 4.0, 9.0]])  # row 2's last column is padding
    end = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 4.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    records = task.eval_records(SimpleNamespace(start_logits=start, end_logits=end, loss=torch.tensor(1.0)),
                                {"attention_mask": mask})
    assert [len(r[1]) for r in records] == [4, 3]
    data = TaskData(train=None, validation=features, validation_examples=examples)
    result = task.compute_eval_metrics(records, data, DataConfig())
    # q1 -> "Paris" (right); q2 -> " capital" since the padded position 3 is cut off (wrong)
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["total"] == 2
