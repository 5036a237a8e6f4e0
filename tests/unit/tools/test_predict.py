"""finetune.tools.predict on tiny random models: per-task predictions, the resumable writer, adapter loading, bad input."""
from __future__ import annotations

import json

import datasets
import pytest
import torch

from finetune.config import DataConfig, GenerationConfig, LoraConfig
from finetune.model import GPTJConfig, build_model
from finetune.model.generation import generate_text
from finetune.model.hf_weights import CheckpointError, save_pretrained
from finetune.model.tokenizer import GPTJTokenizer
from finetune.tools.predict import (
    PredictionInputError,
    answer_score,
    check_columns,
    completed_rows,
    load_model_for_inference,
    make_predictor,
    predict_file,
    read_input,
)


@pytest.fixture(scope="module")
def tokenizer():
    return GPTJTokenizer.from_pretrained(None)


def tiny(task, **overrides):
    torch.manual_seed(0)
    return build_model(GPTJConfig.preset("tiny", pad_token_id=50256, **overrides), task=task).eval()


def fake_predict(rows, first):
    return [{"echo": row["text"], "first": first} for row in rows]


def rows_of(n):
    return datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(n)], "id": [f"r{i}" for i in range(n)]})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_file_writes_one_line_per_row_in_order(tmp_path):
    output = tmp_path / "out" / "preds.jsonl"
    assert predict_file(rows_of(7), output, fake_predict, batch_size=3, id_column="id", progress=False) == (0, 7)
    lines = read_jsonl(output)
    assert [line["index"] for line in lines] == list(range(7))
    assert [line["id"] for line in lines] == [f"r{i}" for i in range(7)]
    assert [line["echo"] for line in lines] == [f"row {i}" for i in range(7)]
    assert [line["first"] for line in lines] == [0, 0, 0, 3, 3, 3, 6]


def test_resume_skips_written_rows_and_rewrites_a_half_line(tmp_path):
    output = tmp_path / "preds.jsonl"
    predict_file(rows_of(10), output, fake_predict, batch_size=4, progress=False)
    complete = read_jsonl(output)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:5]) + lines[5][:9])  # a crash in the middle of row 5
    assert completed_rows(output) == 5
    assert output.read_text() == "".join(lines[:5])  # the partial line is gone
    assert predict_file(rows_of(10), output, fake_predict, batch_size=4, progress=False) == (5, 5)
    resumed = read_jsonl(output)
    assert [r["index"] for r in resumed] == list(range(10))
    assert [r["echo"] for r in resumed] == [r["echo"] for r in complete]
    assert resumed[5]["first"] == 5  # prediction restarted at the first missing row
    assert predict_file(rows_of(10), output, fake_predict, batch_size=4, progress=False) == (10, 0)


def test_an_unrelated_output_file_is_refused(tmp_path):
    output = tmp_path / "preds.jsonl"
    output.write_text('{"index": 0}\n{"index": 5}\n')
    with pytest.raises(PredictionInputError, match="line 2 is not the prediction of input row 2"):
        predict_file(rows_of(3), output, fake_predict, batch_size=2, progress=False)
    output.write_text("".join(json.dumps({"index": i}) + "\n" for i in range(4)))
    with pytest.raises(PredictionInputError, match="already has 4 rows but the input has 3"):
        predict_file(rows_of(3), output, fake_predict, batch_size=2, progress=False)


def test_cls_predictions_follow_the_model_logits(tokenizer):
    model = tiny("cls", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    cfg = DataConfig(max_seq_len=16)
    texts = ["a fine day", "worst service ever, really, truly awful and long"]
    predictions = make_predictor("cls", model, tokenizer, cfg)([{"text": t} for t in texts], 0)
    assert len(predictions) == 2
    for text, prediction in zip(texts, predictions):
        ids = tokenizer.encode(text)[: cfg.max_seq_len]  # truncation to max_seq_len, as in training
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0]
        assert prediction["label"] == ["neg", "neu", "pos"][int(probs.argmax())]
        assert prediction["scores"] == pytest.approx(dict(zip(["neg", "neu", "pos"], probs.tolist())), rel=1e-5)


@pytest.mark.parametrize("task, row, field", [("cls", {"text": None}, "text"),
                                               ("qa", {"question": "why?", "context": 7}, "context")])
def test_a_bad_input_row_is_named_with_its_field(tokenizer, task, row, field):
    model = tiny(task, num_labels=2) if task == "cls" else tiny(task)
    good = {"text": "fine"} if task == "cls" else {"question": "who?", "context": "Ann did."}
    predict = make_predictor(task, model, tokenizer, DataConfig(max_seq_len=32), input_name="in.jsonl")
    with pytest.raises(PredictionInputError, match=rf"in.jsonl, row 12, field '{field}'"):
        predict([good, row], 10)


def test_cls_regression_gives_a_score(tokenizer):
    model = tiny("cls", num_labels=1)
    predictions = make_predictor("cls", model, tokenizer, DataConfig())([{"text": "x"}, {"text": "y z"}], 0)
    assert [set(p) for p in predictions] == [{"score"}, {"score"}]


def test_clm_generates_from_the_prompt_template(tokenizer):
    model = tiny("clm")
    cfg = DataConfig(prompt_template="Q: {question}\nA:", response_column="answer")
    generation = GenerationConfig(max_new_tokens=4)
    rows = [{"question": "Who?"}, {"question": "Where is it?"}]
    predictions = make_predictor("clm", model, tokenizer, cfg, generation=generation)(rows, 0)
    expected = generate_text(model, tokenizer, ["Q: Who?\nA:", "Q: Where is it?\nA:"], generation)
    assert [p["generated_text"] for p in predictions] == [c.text for c in expected]


def test_qa_answers_come_from_the_context_with_their_span_score(tokenizer):
    model = tiny("qa")
    cfg = DataConfig(max_seq_len=32, doc_stride=8)
    rows = [{"id": "q1", "question": "What is red?", "context": "The apple is red. " * 6},
            {"question": "Who?", "context": "Nobody knows."}]
    predictions = make_predictor("qa", model, tokenizer, cfg)(rows, 0)
    assert len(predictions) == 2
    for row, prediction in zip(rows, predictions):
        assert prediction["answer"] in row["context"]
        assert isinstance(prediction["score"], float)


def test_answer_score_is_the_best_start_plus_end_of_the_answer():
    context = "ab cd ab"
    offsets = [None, [0, 2], [3, 5], [6, 8], None]
    starts = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.5])
    ends = torch.tensor([0.0, 2.0, 0.0, 0.5, 0.25])
    assert answer_score("ab", context, [(offsets, starts, ends)]) == pytest.approx(3.5)  # second "ab": 3 + 0.5
    assert answer_score("ab cd", context, [(offsets, starts, ends)]) == pytest.approx(1.0)
    assert answer_score("", context, [(offsets, starts, ends)]) == pytest.approx(0.75)  # the no-answer slot


def test_input_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(PredictionInputError, match="does not exist"):
        read_input(tmp_path / "none.jsonl", task="cls", cfg=DataConfig())
    (tmp_path / "rows.xyz").write_text("x")
    with pytest.raises(PredictionInputError, match="data.format"):
        read_input(tmp_path / "rows.xyz", task="cls", cfg=DataConfig())
    (tmp_path / "rows.csv").write_text("review,stars\ngood,5\n")
    rows = read_input(tmp_path / "rows.csv", task="cls", cfg=DataConfig())
    with pytest.raises(PredictionInputError, match=r"no column 'text' \(set by data.text_column\).*'review'"):
        check_columns(rows, "cls", DataConfig(), input_name="rows.csv")
    check_columns(rows, "cls", DataConfig(text_column="review"), input_name="rows.csv")


def test_adapter_dir_loads_merged_onto_its_base(tmp_path):
    import peft

    from finetune.training.lora import apply_lora, save_adapter

    config = GPTJConfig.preset("tiny", vocab_size=512, pad_token_id=50256)
    torch.manual_seed(0)
    base = build_model(config, task="clm")
    save_pretrained(base, tmp_path / "base", config=config, task="clm")
    adapted = apply_lora(base, LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0))
    for name, param in adapted.named_parameters():
        if "lora_B" in name:  # B starts at 0; make the adapter do something
            torch.nn.init.normal_(param, std=0.5)
    save_adapter(adapted, tmp_path / "adapter")  # no base recorded

    with pytest.raises(CheckpointError, match="base_model=DIR"):
        load_model_for_inference(tmp_path / "adapter", task="clm", dtype=torch.float32)
    model = load_model_for_inference(tmp_path / "adapter", task="clm", dtype=torch.float32,
                                     base_model=str(tmp_path / "base"))
    assert not isinstance(model, peft.PeftModel)
    probe = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, adapted(input_ids=probe).logits, atol=1e-5, rtol=1e-5)


def test_a_malformed_input_line_is_named(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(PredictionInputError, match=r"rows.jsonl.*line 2"):
        read_input(tmp_path / "rows.jsonl", task="cls", cfg=DataConfig())


@pytest.mark.parametrize("content", [b"my notes, no newline at the end", b"\x89PNG\r\n\x1a\n binary", b"{}\n"])
def test_an_unrelated_output_file_is_never_truncated(tmp_path, content):
    output = tmp_path / "notes.txt"
    output.write_bytes(content)
    with pytest.raises(PredictionInputError, match="not the output of an earlier run.*left untouched"):
        predict_file(rows_of(3), output, fake_predict, batch_size=2, progress=False)
    assert output.read_bytes() == content


def test_private_predictions_are_owner_only(tmp_path):
    output = tmp_path / "preds.jsonl"
    predict_file(rows_of(3), output, fake_predict, batch_size=2, progress=False, private=True)
    assert output.stat().st_mode & 0o777 == 0o600 and len(read_jsonl(output)) == 3


def test_a_model_too_big_for_the_device_is_refused_before_it_is_built(tmp_path):
    from finetune.config import ConfigError

    config = GPTJConfig.preset("tiny", vocab_size=512, pad_token_id=50256)
    torch.manual_seed(0)
    save_pretrained(build_model(config, task="clm"), tmp_path / "model", config=config, task="clm")
    raw = json.loads((tmp_path / "model" / "config.json").read_text())
    raw.pop("id2label"), raw.pop("label2id")
    # A cls head of 10^12 labels x 64: 256 TB in fp32, beyond any machine (building it would fail or swap forever).
    (tmp_path / "model" / "config.json").write_text(json.dumps({**raw, "num_labels": 10**12}))
    with pytest.raises(ConfigError, match=r"cannot fit: its weights alone need .* GiB in fp32.*"
                                          r"num_labels=1,000,000,000,000.*check_memory=false"):
        load_model_for_inference(tmp_path / "model", task="cls", dtype=torch.float32)
