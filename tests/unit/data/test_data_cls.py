import pytest

from finetune.config import ConfigError
from finetune.data import DataError, load_task_data


def load(tmp_path, make_cfg, write_jsonl, tokenizer, train_rows, validation_rows=None, **cfg):
    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", train_rows), "validation_fraction": 0}
    if validation_rows is not None:
        files["validation_file"] = write_jsonl(tmp_path / "validation.jsonl", validation_rows)
    return load_task_data("cls", make_cfg(**files, **cfg), tokenizer)


def test_string_labels_map_to_sorted_names(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "mid"}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, [{"text": "fine", "label": "pos"}])
    assert data.id2label == {0: "mid", 1: "neg", 2: "pos"}
    assert (data.num_labels, data.problem_type) == (3, "single_label_classification")
    assert data.train["labels"] == [2, 1, 0] and data.validation["labels"] == [2]
    assert data.train["input_ids"][0] == tokenizer.encode("good")


def test_integer_labels_infer_num_labels_and_reject_out_of_range(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 3}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows)
    assert data.num_labels == 4 and data.train["labels"] == [0, 3]
    assert load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, num_labels=6).num_labels == 6

    bad_validation = [{"text": "c", "label": 1}, {"text": "d", "label": 4}]
    with pytest.raises(DataError, match=r"validation\.jsonl, line 2, field 'label'.*label 4 is outside 0\.\.3"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, bad_validation)
    with pytest.raises(DataError, match=r"train\.jsonl, line 2, field 'label'.*outside 0\.\.1"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, num_labels=2)


def test_unknown_label_name_in_validation(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    with pytest.raises(DataError, match=r"validation\.jsonl, line 1, field 'label'.*'meh' is not a training label"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, [{"text": "so so", "label": "meh"}])


def test_multi_label_lists_become_multi_hot(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "a", "label": ["sports", "news"]}, {"text": "b", "label": ["tech"]}, {"text": "c", "label": []}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows)
    assert data.problem_type == "multi_label_classification"
    assert data.id2label == {0: "news", 1: "sports", 2: "tech"}
    assert data.train["labels"] == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]

    ids = [{"text": "a", "label": [0, 2]}, {"text": "b", "label": [1]}]
    assert load(tmp_path, make_cfg, write_jsonl, tokenizer, ids).train["labels"] == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_regression_and_explicit_problem_type(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "a", "label": 0.25}, {"text": "b", "label": 3.5}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows)
    assert (data.problem_type, data.num_labels, data.id2label) == ("regression", 1, None)
    assert data.train["labels"] == [0.25, 3.5]

    ints = [{"text": "a", "label": 1}, {"text": "b", "label": 4}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, ints, problem_type="regression")
    assert data.problem_type == "regression" and data.train["labels"] == [1.0, 4.0]
    with pytest.raises(ConfigError, match="multi_label"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, ints, problem_type="multi_label")


def test_text_pairs_and_truncation(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"premise": "It rains.", "hypothesis": "The street is wet.", "y": 1},
            {"premise": "x", "hypothesis": "y", "y": 0}]
    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, text_column="premise",
                text_pair_column="hypothesis", label_column="y", pair_separator=" || ")  # fmt: skip
    assert data.train["input_ids"][0] == tokenizer.encode("It rains. || The street is wet.")

    data = load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, text_column="premise", label_column="y",
                max_seq_len=2)  # fmt: skip
    assert data.train["input_ids"][0] == tokenizer.encode("It rains.")[:2]
    with pytest.raises(DataError, match=r"train\.jsonl, line 1, field 'premise'.*data\.truncation is false"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, rows, text_column="premise", label_column="y",
             max_seq_len=2, truncation=False)  # fmt: skip


def test_missing_label_value_names_row(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": None}, {"text": "c", "label": "y"}]
    with pytest.raises(DataError, match=r"train\.jsonl, line 2, field 'label'.*missing"):
        load(tmp_path, make_cfg, write_jsonl, tokenizer, rows)
