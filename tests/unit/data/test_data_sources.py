import datasets
import huggingface_hub.constants
import pytest

from finetune.config import ConfigError
from finetune.data import DataError, load_task_data
from finetune.data.sources import load_splits, resolve_files

ROWS = [{"text": f"example {i}", "label": ["a", "b"][i % 2]} for i in range(20)]


def test_resolve_files_from_path_list_directory_and_glob(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", ROWS[2:4])
    (tmp_path / "d" / "notes.ini").write_text("not data")
    assert resolve_files(a, key="train_file") == [a]
    assert resolve_files([b, a], key="train_file") == [b, a]
    assert resolve_files(str(tmp_path / "d"), key="train_file") == [a, b]
    assert resolve_files(str(tmp_path / "d" / "**" / "*.jsonl"), key="train_file") == [a, b]
    with pytest.raises(DataError, match=r"data\.train_file: .*missing\.jsonl' does not exist"):
        resolve_files(str(tmp_path / "missing.jsonl"), key="train_file")
    with pytest.raises(DataError, match=r"data\.validation_file: .*matches no data files"):
        resolve_files(str(tmp_path / "d" / "*.csv"), key="validation_file")


def test_csv_parquet_and_format_errors(tmp_path, make_cfg, write_jsonl, tokenizer):
    datasets.Dataset.from_list(ROWS).to_csv(tmp_path / "train.csv", index=False)
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "train.parquet"))
    for name in ("train.csv", "train.parquet"):
        data = load_task_data("cls", make_cfg(train_file=str(tmp_path / name), validation_fraction=0), tokenizer)
        assert data.train["labels"] == [i % 2 for i in range(20)]
    write_jsonl(tmp_path / "more.jsonl", ROWS)
    with pytest.raises(DataError, match=r"mixes file formats: csv .*json"):
        load_task_data("cls", make_cfg(train_file=[str(tmp_path / "train.csv"), str(tmp_path / "more.jsonl")]), tokenizer)
    (tmp_path / "train.data").write_text("text,label\nx,a\ny,b\n")
    with pytest.raises(DataError, match=r"cannot tell the format of .*train\.data.*data\.format"):
        load_task_data("cls", make_cfg(train_file=str(tmp_path / "train.data")), tokenizer)
    cfg = make_cfg(train_file=str(tmp_path / "train.data"), format="csv", validation_fraction=0)
    assert load_task_data("cls", cfg, tokenizer).train["labels"] == [0, 1]


def test_validation_carved_from_train_is_deterministic_and_disjoint(tmp_path, make_cfg, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    train, validation = load_splits(make_cfg(train_file=path, validation_fraction=0.25), task="cls")
    train_texts, validation_texts = list(train.dataset["text"]), list(validation.dataset["text"])
    assert len(validation_texts) == 5 and sorted(train_texts + validation_texts) == sorted(r["text"] for r in ROWS)
    again = load_splits(make_cfg(train_file=path, validation_fraction=0.25), task="cls")[1]
    other_seed = load_splits(make_cfg(train_file=path, validation_fraction=0.25, split_seed=7), task="cls")[1]
    assert list(again.dataset["text"]) == validation_texts != list(other_seed.dataset["text"])
    limited = load_splits(make_cfg(train_file=path, validation_fraction=0.25, max_train_samples=3,
                                   max_eval_samples=2), task="cls")  # fmt: skip
    assert list(limited[0].dataset["text"]) == train_texts[:3]
    assert list(limited[1].dataset["text"]) == validation_texts[:2]
    assert load_splits(make_cfg(train_file=path, validation_fraction=0), task="cls")[1] is None


def test_errors_name_the_original_file_and_row(tmp_path, make_cfg, write_jsonl, tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", ROWS[:3])
    bad_rows = [dict(ROWS[0]), {"text": None, "label": "a"}]
    bad = write_jsonl(tmp_path / "b.jsonl", bad_rows)
    with pytest.raises(DataError, match=r"b\.jsonl, line 2, field 'text'.*missing"):
        load_task_data("cls", make_cfg(train_file=[good, bad], validation_fraction=0), tokenizer)
    # Rows carved off for validation still point at their line in the train file.
    rows = [dict(row) for row in ROWS]
    rows[13]["label"] = None
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"Bad (train|validation) example at file .*c\.jsonl, line 14, field 'label'"):
        load_task_data("cls", make_cfg(train_file=path, validation_fraction=0.5), tokenizer)


def test_invalid_json_and_csv_name_file_and_line(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
    with pytest.raises(DataError, match=r"Cannot read .*broken\.jsonl as json: line 3 is not valid JSON"):
        load_task_data("cls", make_cfg(train_file=str(path)), tokenizer)
    path = tmp_path / "broken.csv"
    path.write_text("text,label\nfine,a\nthis, has, commas,b\n")
    with pytest.raises(DataError, match=r"Cannot read .*broken\.csv as csv: line 3 has 4 fields but the header has 2"):
        load_task_data("cls", make_cfg(train_file=str(path)), tokenizer)


def test_empty_data_and_missing_column(tmp_path, make_cfg, write_jsonl, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"Cannot read .*empty\.jsonl as json: the file is empty"):
        load_task_data("cls", make_cfg(train_file=str(empty)), tokenizer)
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"train\.jsonl\) has no column 'sentence' \(set by data\.text_column\)"):
        load_task_data("cls", make_cfg(train_file=path, text_column="sentence"), tokenizer)


def test_hub_dataset_offline_says_to_pass_files(make_cfg, tokenizer, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data\.dataset_name='someone/squad-like' could not be loaded.*data\.train_file"):
        load_task_data("qa", make_cfg(dataset_name="someone/squad-like"), tokenizer)
    with pytest.raises(ConfigError, match="not both"):
        load_task_data("qa", make_cfg(dataset_name="someone/squad-like", train_file="x.jsonl"), tokenizer)
