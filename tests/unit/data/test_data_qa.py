import json
import random

import pytest

from finetune.config import ConfigError
from finetune.data import DataError, load_task_data

WORDS = ["red", "blue", "tiger", "Paris", "Tokyo", "copper", "piano", "tennis", "lemon", "eagle", "Cairo", "silver"]


def long_example(index: int, rng: random.Random) -> dict:
    """A context of ~40 sentences (~300 tokens); the question asks about one of them."""
    sentences, facts = [], []
    for i in range(40):
        value = rng.choice(WORDS)
        sentence = f"Fact {i} says the thing number {i} is {value}."
        start = sum(len(s) + 1 for s in sentences) + sentence.index(f" is {value}.") + 4
        sentences.append(sentence)
        facts.append((i, value, start))
    i, value, start = facts[rng.randrange(40)]
    context = " ".join(sentences)
    assert context[start : start + len(value)] == value
    return {"id": f"q{index}", "title": "t", "context": context, "question": f"What is thing number {i}?",
            "answers": {"text": [value], "answer_start": [start]}}  # fmt: skip


def test_long_contexts_split_into_windows_that_hold_every_answer(tmp_path, make_cfg, write_jsonl, tokenizer):
    rng = random.Random(0)
    rows = [long_example(i, rng) for i in range(12)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cfg = make_cfg(train_file=path, validation_file=path, max_seq_len=64, doc_stride=16, qa_separator="\n",
                   qa_end_token=True)
    data = load_task_data("qa", cfg, tokenizer)
    features = data.validation
    assert len(features) > 3 * len(rows)  # contexts of ~300 tokens need several windows each
    assert data.train["start_positions"] == features["start_positions"]

    for row in rows:
        context, answer = row["context"], row["answers"]["text"][0]
        context_tokens = len(tokenizer.encode(context))
        windows = [f for f in features if f["example_id"] == row["id"]]
        hits = 0
        covered, previous = set(), None
        for f in windows:
            ids, offsets, start, end = f["input_ids"], f["offset_mapping"], f["start_positions"], f["end_positions"]
            assert len(ids) <= 64 and ids[-1] == tokenizer.eos_token_id
            assert ids[: len(tokenizer.encode(row["question"]))] == tokenizer.encode(row["question"])
            spans = [tuple(o) for o in offsets if o is not None]
            covered.update(spans)
            if previous is not None:  # consecutive windows overlap by doc_stride tokens
                assert len(set(previous) & set(spans)) == 16
            previous = spans
            if start == end == len(ids) - 1:
                continue  # the answer is not in this window: labels point at the final no-answer token
            hits += 1
            assert tokenizer.decode(ids[start : end + 1]).strip() == answer
            assert context[offsets[start][0] : offsets[end][1]] == answer
        assert hits >= 1
        assert len(covered) == context_tokens  # the windows together cover the whole context


def test_context_first_order(tmp_path, make_cfg, write_jsonl, tokenizer):
    row = {"id": "a", "context": "The metal of Zorvia is copper.", "question": "What is the metal?",
           "answers": {"text": ["copper"], "answer_start": [23]}}  # fmt: skip
    path = write_jsonl(tmp_path / "qa.jsonl", [row])
    cfg = make_cfg(train_file=path, validation_fraction=0, question_first=False, qa_separator="\nQ: ")
    feature = load_task_data("qa", cfg, tokenizer).train[0]
    expected = tokenizer.encode(row["context"]) + tokenizer.encode("\nQ: ") + tokenizer.encode(row["question"])
    assert feature["input_ids"] == expected  # SQuAD v1 data: no end token by default (qa_end_token=auto)
    assert feature["start_positions"] == feature["end_positions"] == tokenizer.encode(row["context"]).index(
        tokenizer.encode(" copper")[0]
    )



def test_separator_and_end_token_are_optional(tmp_path, make_cfg, write_jsonl, tokenizer):
    """qa_separator "" and qa_end_token false give exactly question + context window, labels still on the answer,
    and the end token's slot goes to the context: a window holds one more context token."""
    rng = random.Random(1)
    rows = [long_example(i, rng) for i in range(4)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    bare = load_task_data("qa", make_cfg(train_file=path, validation_file=path, max_seq_len=64, doc_stride=16,
                                         qa_separator="", qa_end_token=False), tokenizer).validation
    full = load_task_data("qa", make_cfg(train_file=path, validation_file=path, max_seq_len=64, doc_stride=16,
                                         qa_separator="\n", qa_end_token=True), tokenizer).validation
    default = load_task_data("qa", make_cfg(train_file=path, validation_file=path, max_seq_len=64, doc_stride=16),
                             tokenizer).validation
    assert default["input_ids"] == bare["input_ids"]  # SQuAD v1 data: neither by default
    newline = len(tokenizer.encode("\n"))
    for row in rows:
        question = tokenizer.encode(row["question"])
        windows = [f for f in bare if f["example_id"] == row["id"]]
        first = windows[0]
        assert len(first["input_ids"]) == 64 and first["input_ids"][-1] != tokenizer.eos_token_id
        context_ids = tokenizer.encode(row["context"])
        assert first["input_ids"] == question + context_ids[: 64 - len(question)]
        with_both = next(f for f in full if f["example_id"] == row["id"])
        assert len([o for o in first["offset_mapping"] if o is not None]) == (
            len([o for o in with_both["offset_mapping"] if o is not None]) + newline + 1)
        # windows without the answer label the question's last token, never a context token
        null = len(question) - 1
        answers = [f for f in windows if (f["start_positions"], f["end_positions"]) != (null, null)]
        assert answers and len(answers) < len(windows)
        for f in windows:
            assert f["offset_mapping"][null] is None
        for f in answers:
            offsets = f["offset_mapping"]
            assert row["context"][offsets[f["start_positions"]][0] : offsets[f["end_positions"]][1]] == (
                row["answers"]["text"][0])


def test_no_end_token_refuses_squad_v2(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "qa.jsonl", squad_rows())  # row 3 has no answer: auto turns SQuAD v2 on
    with pytest.raises(ConfigError, match="data.qa_end_token=false"):
        load_task_data("qa", make_cfg(train_file=path, validation_fraction=0, qa_end_token=False), tokenizer)
    with pytest.raises(ConfigError, match="data.qa_end_token"):
        load_task_data("qa", make_cfg(train_file=path, validation_fraction=0, qa_end_token="no"), tokenizer)
    # the default (auto) closes every feature with the end token on SQuAD v2 data: its no-answer position
    v2 = load_task_data("qa", make_cfg(train_file=path, validation_fraction=0), tokenizer).train
    assert all(ids[-1] == tokenizer.eos_token_id for ids in v2["input_ids"])


def squad_rows():
    return [
        {"id": "1", "title": "Zorvia", "context": "Zorvia's capital is Kelm. Its river is the Vasp.",
         "question": "What is the capital of Zorvia?", "answers": {"text": ["Kelm", "Kelm"], "answer_start": [20, 20]}},
        {"id": "2", "title": "Zorvia", "context": "Zorvia's capital is Kelm. Its river is the Vasp.",
         "question": "Which river?", "answers": {"text": ["the Vasp", "Vasp"], "answer_start": [39, 43]}},
        {"id": "3", "title": "Brel", "context": "Brel has no king.", "question": "Who is the king of Brel?",
         "answers": {"text": [], "answer_start": []}},
    ]  # fmt: skip


def squad_nested(rows) -> dict:
    articles: dict = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        qas = paragraphs.setdefault(row["context"], [])
        answers = [{"text": t, "answer_start": s} for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        qas.append({"id": row["id"], "question": row["question"], "answers": answers, "is_impossible": not answers})
    data = [{"title": title, "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
            for title, paragraphs in articles.items()]  # fmt: skip
    return {"version": "v2.0", "data": data}


def test_squad_json_and_flat_layouts_give_identical_features(tmp_path, make_cfg, write_jsonl, tokenizer):
    flat = write_jsonl(tmp_path / "flat" / "dev.jsonl", squad_rows())
    nested = tmp_path / "nested" / "dev-v2.0.json"
    nested.parent.mkdir()
    nested.write_text(json.dumps(squad_nested(squad_rows())))
    loaded = [
        load_task_data("qa", make_cfg(train_file=path, validation_file=path, version_2_with_negative=True), tokenizer)
        for path in (flat, str(nested))
    ]
    for split in ("train", "validation"):
        assert loaded[0].__dict__[split].to_dict() == loaded[1].__dict__[split].to_dict()
    examples = [data.validation_examples.select_columns(["id", "context", "question", "answers"]).to_dict()
                for data in loaded]  # fmt: skip
    assert examples[0] == examples[1]
    train = loaded[0].train
    assert train["start_positions"][2] == train["end_positions"][2] == len(train["input_ids"][2]) - 1  # no answer


def test_answer_start_mismatch_names_file_row_and_field(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = squad_rows()[:2]
    rows[1]["answers"]["answer_start"][1] = 44
    path = write_jsonl(tmp_path / "dev.jsonl", rows)
    with pytest.raises(DataError, match=r"dev\.jsonl, line 2, field 'answers\.answer_start'.*'Vasp' should start "
                                        r"at character 44, but the context reads 'asp\.' there"):  # fmt: skip
        load_task_data("qa", make_cfg(train_file=path, validation_fraction=0), tokenizer)


def test_unanswerable_question_is_a_bad_row_under_squad_v1(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", squad_rows())
    with pytest.raises(DataError, match=r"line 3, field 'answers'.*version_2_with_negative=false treats that as a bad "
                                        r"row.*=auto \(the default\) or true"):  # fmt: skip
        load_task_data("qa", make_cfg(train_file=path, validation_fraction=0, version_2_with_negative=False), tokenizer)


@pytest.mark.parametrize("layout", ["nested", "flat_is_impossible"])
def test_auto_detects_squad_v2_and_says_so_once(tmp_path, make_cfg, write_jsonl, tokenizer, capsys, layout):
    rows = squad_rows()
    if layout == "nested":  # SQuAD's own v2.0 JSON: is_impossible, empty answers
        path = tmp_path / "train-v2.0.json"
        path.write_text(json.dumps(squad_nested(rows)))
        path = str(path)
    else:  # flat rows that mark the question impossible but keep a (plausible) answer, as some exports do
        rows[2]["is_impossible"] = True
        rows[2]["answers"] = {"text": ["Brel"], "answer_start": [0]}
        for row in rows[:2]:
            row["is_impossible"] = False
        path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_task_data("qa", make_cfg(train_file=path, validation_file=path), tokenizer)
    assert data.version_2_with_negative is True
    notice = capsys.readouterr().err
    assert notice.count("data.version_2_with_negative=auto: 1 of 3 train and 1 of 3 validation questions have no "
                        "answer") == 1, notice
    assert len(notice.strip().splitlines()) == 1
    train = data.train
    assert train["start_positions"][2] == train["end_positions"][2] == len(train["input_ids"][2]) - 1  # no answer
    assert data.validation_examples["answers"][2]["text"] == []


def test_auto_stays_squad_v1_without_unanswerable_questions(tmp_path, make_cfg, write_jsonl, tokenizer, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", squad_rows()[:2])
    data = load_task_data("qa", make_cfg(train_file=path, validation_file=path), tokenizer)
    assert data.version_2_with_negative is False
    assert "version_2_with_negative" not in capsys.readouterr().err
    forced = load_task_data("qa", make_cfg(train_file=path, validation_file=path, version_2_with_negative=True),
                            tokenizer)
    assert forced.version_2_with_negative is True


def test_question_too_long_for_max_seq_len(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", squad_rows()[:1])
    with pytest.raises(DataError, match=r"line 1, field 'question'.*Raise data\.max_seq_len"):
        load_task_data("qa", make_cfg(train_file=path, validation_fraction=0, max_seq_len=8, doc_stride=2), tokenizer)


def test_configured_column_names(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"qid": r["id"], "passage": r["context"], "q": r["question"], "gold": r["answers"]} for r in squad_rows()[:2]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(train_file=path, validation_file=path, id_column="qid", context_column="passage",
                   question_column="q", answers_column="gold")  # fmt: skip
    data = load_task_data("qa", cfg, tokenizer)
    assert data.validation_examples.column_names == ["id", "context", "question", "answers"]
    assert data.validation["example_id"] == ["1", "2"]
    with pytest.raises(DataError, match=r"no column 'question' \(set by data\.question_column\).*'passage'"):
        cfg = make_cfg(train_file=path, validation_fraction=0, id_column="qid", context_column="passage",
                       answers_column="gold")  # fmt: skip
        load_task_data("qa", cfg, tokenizer)
