import pytest

import finetune.data.pipeline as pipeline
from finetune.config import ConfigError
from finetune.data import DataError, load_task_data

DOCS = [
    "The first document is short.",
    "",  # blank lines are skipped
    "Counting: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30.",
    "A third one, with punctuation; and more words after it.",
    "Four.",
]


def expected_stream(tokenizer, docs):
    stream = []
    for doc in docs:
        if doc.strip():
            stream += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    return stream


def test_packing_keeps_every_token_once_with_eos_between_documents(tmp_path, make_cfg, write_jsonl, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS])
    data = load_task_data("clm", make_cfg(train_file=train, validation_fraction=0, max_seq_len=16), tokenizer)
    assert data.validation is None
    blocks = data.train["input_ids"]
    assert [token for block in blocks for token in block] == expected_stream(tokenizer, DOCS)
    assert all(len(block) == 16 for block in blocks[:-1]) and 0 < len(blocks[-1]) <= 16
    assert data.train["labels"] == blocks
    assert all(mask == [1] * len(block) for mask, block in zip(data.train["attention_mask"], blocks))


def test_packing_groups_keep_their_last_partial_block(tmp_path, make_cfg, write_jsonl, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "MAP_BATCH_SIZE", 2)  # groups of 2 documents
    docs = [f"Document number {i} has some words in it." for i in range(7)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in docs])
    blocks = load_task_data("clm", make_cfg(train_file=train, validation_fraction=0, max_seq_len=8), tokenizer).train
    ids = blocks["input_ids"]
    assert [t for block in ids for t in block] == expected_stream(tokenizer, docs)
    # Each group of two documents is packed on its own: a block never spans two groups.
    per_group = [expected_stream(tokenizer, docs[i : i + 2]) for i in range(0, 7, 2)]
    expected_lengths = [min(8, len(g) - s) for g in per_group for s in range(0, len(g), 8)]
    assert [len(block) for block in ids] == expected_lengths


def test_unpacked_documents_are_truncated_or_rejected(tmp_path, make_cfg, write_jsonl, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"body": d} for d in DOCS])
    cfg = make_cfg(train_file=train, validation_fraction=0, packing=False, max_seq_len=12, text_column="body")
    data = load_task_data("clm", cfg, tokenizer)
    kept = [d for d in DOCS if d.strip()]
    assert data.train["input_ids"] == [(tokenizer.encode(d) + [tokenizer.eos_token_id])[:12] for d in kept]
    assert data.train["labels"] == data.train["input_ids"]

    cfg = make_cfg(train_file=train, validation_fraction=0, packing=False, max_seq_len=12, text_column="body",
                   truncation=False)  # fmt: skip
    with pytest.raises(DataError, match=r"train\.jsonl, line 3, field 'body'.*more than data\.max_seq_len=12"):
        load_task_data("clm", cfg, tokenizer)


def test_response_only_loss_with_template_padded(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"question": "Where is Paris?", "answer": " In France."}, {"question": "2+2?", "answer": " 4"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(train_file=train, validation_fraction=0, packing=False, response_column="answer",
                   prompt_template="Question: {question}\nAnswer:")  # fmt: skip
    data = load_task_data("clm", cfg, tokenizer)
    eos = tokenizer.eos_token_id
    for row, ids, labels in zip(rows, data.train["input_ids"], data.train["labels"]):
        prompt = tokenizer.encode(f"Question: {row['question']}\nAnswer:")
        response = tokenizer.encode(row["answer"]) + [eos]
        assert ids == prompt + response
        assert labels == [-100] * len(prompt) + response


def test_response_only_loss_stream_packed(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"prompt": f"Say {i} twice:", "response": f" {i} {i}"} for i in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(train_file=train, validation_fraction=0, max_seq_len=32, prompt_column="prompt",
                   response_column="response", packing="stream")  # fmt: skip
    data = load_task_data("clm", cfg, tokenizer)
    ids = [t for block in data.train["input_ids"] for t in block]
    labels = [t for block in data.train["labels"] for t in block]
    expected_ids, expected_labels = [], []
    for row in rows:
        prompt, response = tokenizer.encode(row["prompt"]), tokenizer.encode(row["response"]) + [tokenizer.eos_token_id]
        expected_ids += prompt + response
        expected_labels += [-100] * len(prompt) + response
    assert ids == expected_ids and labels == expected_labels
    assert all(len(block) == 32 for block in data.train["input_ids"][:-1])


def test_plain_text_files_by_line_and_by_file(tmp_path, make_cfg, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "docs" / "b.txt").write_text("other file\n")
    eos = tokenizer.eos_token_id
    by_line = load_task_data("clm", make_cfg(train_file=str(tmp_path / "docs"), validation_fraction=0,
                                             packing=False), tokenizer)  # fmt: skip
    assert tokenizer.batch_decode(by_line.train["input_ids"]) == [f"{t}<|endoftext|>" for t in
                                                                  ("line one", "line two", "other file")]  # fmt: skip
    by_file = load_task_data("clm", make_cfg(train_file=str(tmp_path / "docs" / "*.txt"), validation_fraction=0,
                                             packing=False, text_unit="file"), tokenizer)  # fmt: skip
    assert [ids[-1] for ids in by_file.train["input_ids"]] == [eos, eos]
    assert tokenizer.decode(by_file.train["input_ids"][0]).startswith("line one\nline two")


def test_config_errors(make_cfg, tokenizer):
    with pytest.raises(ConfigError, match="response_column"):
        load_task_data("clm", make_cfg(prompt_column="prompt"), tokenizer)
    with pytest.raises(ConfigError, match="Unknown task"):
        load_task_data("summarize", make_cfg(), tokenizer)
