import math

import pytest

from finetune.metrics import accuracy_and_macro_f1, mse, multilabel_metrics, normalize_answer, perplexity, squad_metrics


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf


def test_accuracy_and_macro_f1():
    scores = accuracy_and_macro_f1([0, 1, 1, 2], [0, 1, 2, 2])
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    with_unseen_class = accuracy_and_macro_f1([0, 1, 1, 2], [0, 1, 2, 2], num_labels=4)
    assert with_unseen_class["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)


def test_multilabel_metrics_threshold_logits_at_zero():
    scores = multilabel_metrics([[2.0, -1.0], [-3.0, 0.5]], [[1, 0], [1, 1]])
    assert scores["exact_set_accuracy"] == 0.5
    assert scores["micro_f1"] == pytest.approx(0.8)  # tp 2, predicted 2, gold 3
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_mse():
    assert mse([1.0, 2.0], [0.0, 4.0]) == 2.5


def test_squad_normalization():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_squad_exact_match_and_f1():
    predictions = {"1": "the Eiffel Tower", "2": "Paris", "3": "blue"}
    references = {"1": ["Eiffel Tower."], "2": ["in Paris", "France"], "3": ["red"]}
    scores = squad_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    # F1: 1; max("paris" vs "in paris" = 2/3, vs "france" = 0); 0.
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert "HasAns_exact" not in scores


def test_squad_v2_no_answer_and_missing_predictions():
    references = {"a": ["Kelm"], "b": [], "c": [], "d": ["Vasp river"]}
    predictions = {"a": "kelm", "b": "", "c": "something"}  # "d" missing: counts as ""
    scores = squad_metrics(predictions, references)
    assert scores["exact_match"] == 50.0 and scores["f1"] == 50.0
    assert (scores["HasAns_exact"], scores["HasAns_total"]) == (50.0, 2.0)
    assert (scores["NoAns_exact"], scores["NoAns_f1"], scores["NoAns_total"]) == (50.0, 50.0, 2.0)
