"""data.on_bad_row: bad rows are reported by file, line, field and reason (error) or dropped and counted (skip)."""
import json

import pytest

from finetune.config import ConfigError
from finetune.data import DataError, load_task_data


def write_lines(path, lines) -> str:
    """A JSON Lines file from raw lines: dicts are dumped, strings written as they are (to plant broken lines)."""
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return str(path)


def both_policies(task, make_cfg, tokenizer, **cfg):
    """(the DataError of the default policy, the TaskData of on_bad_row=skip)."""
    with pytest.raises(DataError) as error:
        load_task_data(task, make_cfg(**cfg), tokenizer)
    return str(error.value), load_task_data(task, make_cfg(on_bad_row="skip", **cfg), tokenizer)


# ------------------------------------------------------------------------------------------------------ cls
CLS_TRAIN = [
    {"text": "good film", "label": "pos"},  # line 1
    "",  # line 2: blank, holds no row
    {"text": None, "label": "neg"},  # line 3: missing text
    {"text": 7, "label": "neg"},  # line 4: not text
    {"text": "", "label": "pos"},  # line 5: empty text
    {"text": "awful", "label": "neg"},  # line 6
    {"text": "fine", "label": None},  # line 7: missing label
]


def test_cls_bad_rows_under_both_policies(tmp_path, make_cfg, tokenizer, capsys):
    train = write_lines(tmp_path / "train.jsonl", CLS_TRAIN)
    validation = write_lines(tmp_path / "validation.jsonl",
                             [{"text": "ok", "label": "pos"}, {"text": "hm", "label": "meh"}])
    message, data = both_policies("cls", make_cfg, tokenizer, train_file=train, validation_file=validation)

    assert message.startswith("4 bad train examples (empty: 1, missing: 2, wrong_type: 1) (showing the first 3)")
    assert f"(1) at file {train}, line 3, field 'text': the value is missing (null)" in message
    assert f"(2) at file {train}, line 4, field 'text': expected text, got int 7" in message
    assert f"(3) at file {train}, line 5, field 'text': the text is empty" in message
    assert "line 7" not in message and "data.on_bad_row=skip" in message

    assert data.skipped_rows == {"train": {"missing": 2, "wrong_type": 1, "empty": 1}, "validation": {"bad_label": 1}}
    assert data.id2label == {0: "neg", 1: "pos"}
    assert data.train["input_ids"] == [tokenizer.encode("good film"), tokenizer.encode("awful")]
    assert data.train["labels"] == [1, 0] and data.validation["labels"] == [1]
    assert data.skipped_row_metrics() == {
        "skipped_rows_train": 4, "skipped_rows_train_empty": 1, "skipped_rows_train_missing": 2,
        "skipped_rows_train_wrong_type": 1, "skipped_rows_validation": 1, "skipped_rows_validation_bad_label": 1,
    }  # fmt: skip
    printed = capsys.readouterr().err
    assert (f"dropped 4 of 6 train rows (empty: 1, missing: 2, wrong_type: 1); first: file {train}, line 3 "
            "(text: missing)") in printed
    assert f"dropped 1 of 2 validation rows (bad_label: 1); first: file {validation}, line 2 (label: bad_label)" \
        in printed


def test_cls_label_problems_and_length_with_truncation_off(tmp_path, make_cfg, tokenizer):
    rows = [{"text": "a b", "label": 0}, {"text": "c", "label": 1}, {"text": "d", "label": 5},
            {"text": "e f g h i j", "label": 1}]  # fmt: skip
    train = write_lines(tmp_path / "train.jsonl", rows)
    message, data = both_policies("cls", make_cfg, tokenizer, train_file=train, validation_fraction=0, num_labels=2,
                                  truncation=False, max_seq_len=4)  # fmt: skip
    assert "2 bad train examples (bad_label: 1, too_long: 1)" in message
    assert "line 3, field 'label': label 5 is outside 0..1" in message
    assert "line 4, field 'text': the text has 6 tokens, more than data.max_seq_len=4" in message
    assert data.train["labels"] == [0, 1] and data.skipped_rows == {"train": {"bad_label": 1, "too_long": 1}}


# ------------------------------------------------------------------------------------------------------ clm
def test_clm_instruction_rows_missing_prompt_or_response(tmp_path, make_cfg, tokenizer):
    rows = [{"q": "Hi?", "a": " Hello."}, {"q": None, "a": " x"}, {"q": "Empty?", "a": ""}, {"q": "Fine?", "a": None},
            {"q": "Bye?", "a": " Bye."}]  # fmt: skip
    train = write_lines(tmp_path / "train.jsonl", rows)
    message, data = both_policies("clm", make_cfg, tokenizer, train_file=train, validation_fraction=0, packing=False,
                                  prompt_template="Q: {q}\nA:", response_column="a")  # fmt: skip
    assert "3 bad train examples (empty: 1, missing: 2)" in message
    assert "line 2, field 'q': the value is missing" in message and "line 4, field 'a'" in message
    assert data.skipped_rows == {"train": {"missing": 2, "empty": 1}}
    eos = tokenizer.eos_token_id
    assert data.train["input_ids"] == [tokenizer.encode(f"Q: {q}\nA:") + tokenizer.encode(a) + [eos]
                                       for q, a in (("Hi?", " Hello."), ("Bye?", " Bye."))]  # fmt: skip


def test_clm_text_too_long_without_truncation_is_skipped(tmp_path, make_cfg, tokenizer):
    docs = ["short one", "this document has far too many tokens for the limit", "", "also short"]
    train = write_lines(tmp_path / "train.jsonl", [{"text": d} for d in docs])
    message, data = both_policies("clm", make_cfg, tokenizer, train_file=train, validation_fraction=0, packing=False,
                                  truncation=False, max_seq_len=8)  # fmt: skip
    assert message.startswith(f"Bad train example at file {train}, line 2, field 'text': the example has 11 tokens")
    # The empty document is not a bad row: it is skipped silently, as before.
    assert data.skipped_rows == {"train": {"too_long": 1}}
    assert tokenizer.batch_decode(data.train["input_ids"]) == ["short one<|endoftext|>", "also short<|endoftext|>"]


# ------------------------------------------------------------------------------------------------------ qa
def qa_row(example_id, context="The box is red.", question="What color is the box?", answers=None):
    answers = {"text": ["red"], "answer_start": [11]} if answers is None else answers
    return {"id": example_id, "title": "t", "context": context, "question": question, "answers": answers}


def test_qa_bad_answers_and_duplicate_ids(tmp_path, make_cfg, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [
        qa_row("1"),
        qa_row("2", answers={"text": ["red"], "answer_start": [3]}),  # text not at answer_start
        qa_row("3", answers={"text": [], "answer_start": []}),  # no answer under SQuAD v1 (false below)
        qa_row("4", context=None),
        qa_row("5", answers="red"),  # malformed
    ])  # fmt: skip
    validation = write_lines(tmp_path / "validation.jsonl", [qa_row("a"), qa_row("b"), qa_row("a")])
    message, data = both_policies("qa", make_cfg, tokenizer, train_file=train, validation_file=validation,
                                  max_seq_len=64, version_2_with_negative=False)  # fmt: skip
    assert "4 bad train examples (bad_answer: 2, missing: 1, no_answer: 1)" in message
    assert "line 2, field 'answers.answer_start': answer 'red' should start at character 3" in message
    assert "line 3, field 'answers': the question has no answer" in message
    assert data.skipped_rows == {"train": {"bad_answer": 2, "no_answer": 1, "missing": 1},
                                 "validation": {"duplicate_id": 1}}  # fmt: skip
    assert len(data.train) == 1
    assert data.validation_examples["id"] == ["a", "b"] and sorted(set(data.validation["example_id"])) == ["a", "b"]

    with pytest.raises(DataError, match=rf"{validation}, line 3, field 'id': id 'a' is used twice"):
        load_task_data("qa", make_cfg(train_file=write_lines(tmp_path / "ok.jsonl", [qa_row("1")]),
                                      validation_file=validation, max_seq_len=64), tokenizer)  # fmt: skip


def test_qa_question_too_long_is_a_bad_row(tmp_path, make_cfg, tokenizer):
    long_question = "What color is the box " + "really " * 20 + "?"
    train = write_lines(tmp_path / "train.jsonl", [qa_row("1"), qa_row("2", question=long_question)])
    message, data = both_policies("qa", make_cfg, tokenizer, train_file=train, validation_fraction=0, max_seq_len=16,
                                  doc_stride=2)  # fmt: skip
    assert "line 2, field 'question': the question has" in message and "Raise data.max_seq_len" in message
    assert data.skipped_rows == {"train": {"too_long": 1}} and len(data.train) == 1


# ------------------------------------------------------------------------------------------------- unparseable lines
def test_unparseable_json_lines_are_reported_or_skipped_and_later_lines_still_located(tmp_path, make_cfg, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [
        {"text": "one", "label": "a"},
        '{"text": "two", "label": ',  # line 2: cut off
        "[1, 2]",  # line 3: not an object
        {"text": "four", "label": "b"},
        {"text": None, "label": "b"},  # line 5: found by the row checks, after the cleaned-away lines
    ])  # fmt: skip
    with pytest.raises(DataError, match=rf"Cannot read {train} as json: line 2 is not valid JSON .*\(2 lines cannot be "
                                        r"parsed\)\. Fix the file, or set data\.on_bad_row=skip"):  # fmt: skip
        load_task_data("cls", make_cfg(train_file=train, validation_fraction=0), tokenizer)
    data = load_task_data("cls", make_cfg(train_file=train, validation_fraction=0.5, on_bad_row="skip", num_labels=2),
                          tokenizer)
    # Counted once, with train, although half of train was carved off for validation.
    assert data.skipped_rows["train"].get("unparseable") == 2 and "unparseable" not in data.skipped_rows["validation"]
    other_skips = sum(sum(counts.values()) for counts in data.skipped_rows.values()) - 2
    assert len(data.train) + len(data.validation) + other_skips == 3  # the three parseable lines


def test_a_bad_row_after_skipped_lines_names_its_own_line(tmp_path, make_cfg, tokenizer, capsys):
    lines = [{"text": "one", "label": "a"}, "{oops", "", {"text": "four", "label": "b"}, {"text": 5, "label": "b"}]
    train = write_lines(tmp_path / "train.jsonl", lines)
    load_task_data("cls", make_cfg(train_file=train, validation_fraction=0, on_bad_row="skip"), tokenizer)
    printed = capsys.readouterr().err
    assert f"dropped 2 of 4 train rows (unparseable: 1, wrong_type: 1); first: file {train}, line 2 (unparseable); " \
           f"file {train}, line 5 (text: wrong_type)." in printed  # fmt: skip


def test_csv_lines_with_too_many_fields_and_multiline_records(tmp_path, make_cfg, tokenizer, capsys):
    path = tmp_path / "train.csv"
    # line 3-4: one record over two lines; line 5: too many fields; line 6: blank; line 7: empty text.
    path.write_text('text,label\nfine,a\n"two\nlines",b\nthis, has, commas,b\n\n,a\nlast,b\n')
    with pytest.raises(DataError, match=r"train\.csv as csv: line 5 has 4 fields but the header has 2.*=skip"):
        load_task_data("cls", make_cfg(train_file=str(path), validation_fraction=0), tokenizer)
    data = load_task_data("cls", make_cfg(train_file=str(path), validation_fraction=0, on_bad_row="skip"), tokenizer)
    assert data.skipped_rows == {"train": {"unparseable": 1, "missing": 1}}
    assert tokenizer.batch_decode(data.train["input_ids"]) == ["fine", "two\nlines", "last"]
    assert f"first: file {path}, line 5 (unparseable); file {path}, line 7 (text: missing)." in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- good data, config
def test_multi_file_location_and_good_data_unchanged(tmp_path, make_cfg, tokenizer):
    first = write_lines(tmp_path / "a.jsonl", [{"text": "x", "label": "a"}, "", {"text": "y", "label": "b"}])
    second = write_lines(tmp_path / "b.jsonl", ["", {"text": "z", "label": "a"}, {"text": "w", "label": None}])
    with pytest.raises(DataError, match=rf"Bad train example at file {second}, line 3, field 'label'"):
        load_task_data("cls", make_cfg(train_file=[first, second], validation_fraction=0), tokenizer)

    strict = load_task_data("cls", make_cfg(train_file=first, validation_file=first), tokenizer)
    lenient = load_task_data("cls", make_cfg(train_file=first, validation_file=first, on_bad_row="skip"), tokenizer)
    assert strict.skipped_rows == lenient.skipped_rows == {"train": {}, "validation": {}}
    assert lenient.train._fingerprint == strict.train._fingerprint
    assert lenient.skipped_row_metrics() == {"skipped_rows_train": 0, "skipped_rows_validation": 0}


def test_unknown_policy_is_a_config_error(tmp_path, make_cfg, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    with pytest.raises(ConfigError, match=r"data\.on_bad_row='drop' is invalid: use one of error, skip"):
        load_task_data("cls", make_cfg(train_file=train, on_bad_row="drop"), tokenizer)


def test_skipping_is_cached_like_the_features(tmp_path, make_cfg, tokenizer, monkeypatch):
    import finetune.data.cls as cls

    train = write_lines(tmp_path / "train.jsonl", CLS_TRAIN)
    cfg = make_cfg(train_file=train, validation_fraction=0, on_bad_row="skip")
    first = load_task_data("cls", cfg, tokenizer)

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed instead of loaded from the cache")

    for name in ("check_cls_rows", "build_cls_features"):  # the cache key names the function: keep its name
        stand_in = lambda *args, **kwargs: must_not_run()  # noqa: E731
        stand_in.__module__, stand_in.__qualname__ = cls.__name__, name
        monkeypatch.setattr(cls, name, stand_in)
    second = load_task_data("cls", cfg, tokenizer)
    assert second.train.to_dict() == first.train.to_dict() and second.skipped_rows == first.skipped_rows
