"""data.packing: the modes, the padding-free collator, document blocks, and the errors of bad settings."""
import pytest
import torch

from finetune.config import ConfigError, DataConfig
from finetune.data import DataCollator, DataError, load_task_data
from finetune.data.packing import cut_blocks, fit_whole, packing_mode, packs_batches
from finetune.model import GPTJConfig, build_model

PAD = 50256
DOCS = [
    "The first document is short.",
    "Counting: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30.",
    "A third one, with punctuation; and more words after it.",
    "Four.",
    "Five is the fifth document of this small set.",
]


@pytest.mark.parametrize("task,packing,instruction,expected", [
    ("clm", "auto", False, "stream"), ("clm", "auto", True, "examples"), ("clm", True, False, "stream"),
    ("clm", False, True, "none"), ("clm", "documents", True, "documents"), ("cls", "auto", False, "examples"),
    ("qa", True, False, "examples"), ("qa", False, False, "none"), ("cls", "examples", False, "examples"),
])
def test_modes(task, packing, instruction, expected):
    cfg = DataConfig(packing=packing, response_column="answer" if instruction else None,
                     prompt_column="question" if instruction else None)
    assert packing_mode(cfg, task) == expected
    assert packs_batches(cfg, task) == (expected in ("documents", "examples"))


def test_bad_modes_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data\.packing='pack' is invalid: use one of auto, stream, documents"):
        packing_mode(DataConfig(packing="pack"), "clm")
    with pytest.raises(ConfigError, match=r"data\.packing=stream .* for task=qa use data\.packing=examples"):
        packing_mode(DataConfig(packing="stream"), "qa")


def test_packed_collator_concatenates_with_restarting_positions():
    features = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]},
    ]
    batch = DataCollator(PAD, packed=True)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 4, 6] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["attention_mask"].tolist() == [[1] * 6]
    # each example's first token is predicted by nothing (it would be predicted from the previous example)
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100, 6]]


def test_packed_collator_keeps_example_labels_and_document_pieces():
    cls = DataCollator(PAD, packed=True)([{"input_ids": [1, 2], "labels": 2}, {"input_ids": [3], "labels": 0}])
    assert cls["labels"].tolist() == [2, 0] and cls["cu_seq_lens"].tolist() == [0, 2, 3]
    multi = DataCollator(PAD, packed=True)([{"input_ids": [1, 2], "labels": [1.0, 0.0]},
                                             {"input_ids": [3, 4], "labels": [0.0, 1.0]}])
    assert multi["labels"].dtype == torch.float and multi["labels"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    qa = DataCollator(PAD, packed=True)([{"input_ids": [5, 6, 7], "start_positions": 1, "end_positions": 2,
                                          "example_id": "a"}, {"input_ids": [8, 9], "start_positions": 1,
                                                                "end_positions": 1, "example_id": "b"}])
    assert set(qa) == {"input_ids", "attention_mask", "position_ids", "cu_seq_lens", "start_positions",
                       "end_positions"}
    assert qa["start_positions"].tolist() == [1, 1]  # relative to each feature, as unpacked
    blocks = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lens": [2, 3]},
              {"input_ids": [6, 7], "labels": [6, 7], "seq_lens": [2]}]
    docs = DataCollator(PAD, packed=True)(blocks)
    assert docs["cu_seq_lens"].tolist() == [0, 5, 7]  # features, for per-row results
    assert docs["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]  # documents, for attention
    assert docs["labels"].tolist() == [[-100, 2, -100, 4, 5, -100, 7]]
    with pytest.raises(ValueError, match="packed=True"):
        DataCollator(PAD)(blocks)


def test_blocks_of_pieces_and_of_whole_documents():
    seqs = [([1] * 5, [1] * 5), ([2] * 3, [2] * 3), ([3] * 6, [3] * 6)]
    cut = cut_blocks(seqs, 4)
    assert [ids for ids, _, _ in cut] == [[1, 1, 1, 1], [1, 2, 2, 2], [3, 3, 3, 3], [3, 3]]
    assert [pieces for _, _, pieces in cut] == [[4], [1, 3], [4], [2]]
    whole = fit_whole(seqs, 8)
    assert [pieces for _, _, pieces in whole] == [[5, 3], [6]]
    assert [ids for ids, _, _ in whole] == [[1] * 5 + [2] * 3, [3] * 6]


def stream(tokenizer, docs):
    out = []
    for doc in docs:
        out += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    return out


def test_documents_mode_keeps_the_stream_and_marks_documents(tmp_path, make_cfg, write_jsonl, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS])
    data = load_task_data("clm", make_cfg(train_file=train, validation_fraction=0, max_seq_len=16,
                                          packing="documents"), tokenizer).train
    assert [t for block in data["input_ids"] for t in block] == stream(tokenizer, DOCS)
    assert all(sum(p) == len(ids) for p, ids in zip(data["seq_lens"], data["input_ids"]))
    # every document boundary and every block edge is a piece boundary, and there are no others
    piece_ends = set(torch.tensor([n for block in data["seq_lens"] for n in block]).cumsum(0).tolist())
    doc_ends = set(torch.tensor([len(tokenizer.encode(d)) + 1 for d in DOCS]).cumsum(0).tolist())
    block_ends = set(torch.tensor([len(ids) for ids in data["input_ids"]]).cumsum(0).tolist())
    assert piece_ends == doc_ends | block_ends


def test_documents_mode_without_truncation_keeps_documents_whole(tmp_path, make_cfg, write_jsonl, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS])
    lengths = [len(tokenizer.encode(d)) + 1 for d in DOCS]
    cfg = make_cfg(train_file=train, validation_fraction=0, max_seq_len=max(lengths), packing="documents",
                   truncation=False)
    data = load_task_data("clm", cfg, tokenizer).train
    assert [n for block in data["seq_lens"] for n in block] == lengths
    assert all(len(ids) <= max(lengths) for ids in data["input_ids"])
    too_short = make_cfg(train_file=train, validation_fraction=0, max_seq_len=max(lengths) - 1, packing="documents",
                         truncation=False)
    with pytest.raises(DataError, match=r"line 2, field 'text'.*more than data\.max_seq_len=\d+, and data\.truncation "
                                        r"is false \(data\.packing=documents keeps every example whole\)"):
        load_task_data("clm", too_short, tokenizer)


def test_examples_mode_for_instruction_data(tmp_path, make_cfg, write_jsonl, tokenizer):
    rows = [{"prompt": f"Say {i} twice:", "response": f" {i} {i}" * (1 + i % 3)} for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(train_file=train, validation_fraction=0, max_seq_len=32, prompt_column="prompt",
                   response_column="response")
    data = load_task_data("clm", cfg, tokenizer).train  # auto: one example per row
    eos = tokenizer.eos_token_id
    assert data["input_ids"] == [tokenizer.encode(r["prompt"]) + tokenizer.encode(r["response"]) + [eos] for r in rows]
    with pytest.raises(DataError, match=r"more than data\.max_seq_len=8, and data\.truncation is false \(data\.packing"
                                        r"=examples keeps every example whole\)"):
        load_task_data("clm", make_cfg(train_file=train, validation_fraction=0, max_seq_len=8, prompt_column="prompt",
                                       response_column="response", truncation=False), tokenizer)


def test_collated_document_blocks_attend_within_each_document(tmp_path, make_cfg, write_jsonl, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS])
    cfg = make_cfg(train_file=train, validation_fraction=0, max_seq_len=40, packing="documents", truncation=False)
    data = load_task_data("clm", cfg, tokenizer).train
    batch = DataCollator(PAD, packed=True)(list(data))
    torch.manual_seed(0)
    model = build_model(GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, vocab_size=50400), task="clm").eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens=batch["cu_seq_lens"]).logits
        start = 0
        for doc in DOCS:
            ids = tokenizer.encode(doc) + [tokenizer.eos_token_id]
            alone = model(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[0, start : start + len(ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(ids)
