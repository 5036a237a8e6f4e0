"""Evaluation metrics: perplexity, classification accuracy/F1, regression MSE, SQuAD exact match and F1.

Classification scores are fractions in [0, 1]; SQuAD scores are percentages in [0, 100], as in the official
SQuAD evaluation scripts, whose answer normalization `normalize_answer` reproduces.
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Any, Mapping, Optional, Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), inf when that overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def accuracy_and_macro_f1(predictions: Any, labels: Any, *, num_labels: Optional[int] = None) -> dict[str, float]:
    """Accuracy and macro-averaged F1 of class ids; F1 averages over `range(num_labels)`, or else the classes seen."""
    predictions, labels = _flat(predictions).astype(np.int64), _flat(labels).astype(np.int64)
    _check_sizes(predictions, labels)
    classes = range(num_labels) if num_labels is not None else np.union1d(predictions, labels)
    f1s = [_f1(np.sum((predictions == c) & (labels == c)), np.sum(predictions == c), np.sum(labels == c))
           for c in classes]  # fmt: skip
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


def multilabel_metrics(scores: Any, labels: Any, *, threshold: float = 0.0) -> dict[str, float]:
    """Multi-label scores (logits: a label is predicted when its score > `threshold`; 0 = probability 0.5)
    against multi-hot labels: exact-set accuracy, micro F1 and macro F1 (over labels)."""
    predicted = np.asarray(scores, dtype=np.float64) > threshold
    gold = np.asarray(labels, dtype=np.float64) > 0.5
    if predicted.shape != gold.shape or predicted.ndim != 2:
        raise ValueError(f"scores {predicted.shape} and labels {gold.shape} must both be (examples, num_labels).")
    true_positive, pred_count, gold_count = (predicted & gold).sum(0), predicted.sum(0), gold.sum(0)
    return {
        "exact_set_accuracy": float(np.mean(np.all(predicted == gold, axis=1))),
        "micro_f1": _f1(true_positive.sum(), pred_count.sum(), gold_count.sum()),
        "macro_f1": float(np.mean([_f1(*counts) for counts in zip(true_positive, pred_count, gold_count)])),
    }


def mse(predictions: Any, labels: Any) -> float:
    """Mean squared error."""
    predictions, labels = _flat(predictions).astype(np.float64), _flat(labels).astype(np.float64)
    _check_sizes(predictions, labels)
    return float(np.mean((predictions - labels) ** 2))


# ------------------------------------------------------------------------------------------------ SQuAD
def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 after normalization; when either side is empty, 1 if both are, else 0 (SQuAD v2 rule)."""
    prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    return _f1(common, len(prediction_tokens), len(gold_tokens))


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (0..100), each the max over an example's gold answers, averaged over `references`.

    An empty gold list marks an unanswerable question (SQuAD v2), answered correctly only by "". When some
    exist, HasAns_* and NoAns_* break the scores down. A missing prediction counts as "".
    """
    exact, f1, has_answer = [], [], []
    for example_id, golds in references.items():
        prediction = predictions.get(example_id, "")
        golds = [g for g in golds if normalize_answer(g)] or [""]
        exact.append(max(exact_match_score(prediction, g) for g in golds))
        f1.append(max(f1_score(prediction, g) for g in golds))
        has_answer.append(golds != [""])
    if not exact:
        raise ValueError("squad_metrics got no references.")
    exact_arr, f1_arr, has = np.array(exact), np.array(f1), np.array(has_answer)
    result = {"exact_match": 100.0 * exact_arr.mean(), "f1": 100.0 * f1_arr.mean(), "total": float(len(exact))}
    if not has.all():
        for name, mask in (("HasAns", has), ("NoAns", ~has)):
            if mask.any():
                result[f"{name}_exact"] = 100.0 * exact_arr[mask].mean()
                result[f"{name}_f1"] = 100.0 * f1_arr[mask].mean()
            result[f"{name}_total"] = float(mask.sum())
    return {key: float(value) for key, value in result.items()}


def _f1(true_positive: float, predicted: float, gold: float) -> float:
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / predicted, true_positive / gold
    return float(2 * precision * recall / (precision + recall))


def _flat(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def _check_sizes(predictions: np.ndarray, labels: np.ndarray) -> None:
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions but {labels.size} labels.")
