import json
import subprocess
import sys

import pytest

from finetune.model.tokenizer import BUNDLED_TOKENIZER, GPTJTokenizer, TokenizerMismatchError, trim_offsets

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x  *  2\n\n\n",
    "I'm sure they've   seen it, haven't they?",
    "Café naïve 日本語 🙂 <|endoftext|> done",
]


@pytest.fixture(scope="module")
def tok():
    return GPTJTokenizer.from_pretrained(None)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == len(tok) == 50400
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 50256
    assert tok.encode("<|endoftext|>") == [50256]


def test_extra_tokens_are_single_ids_that_round_trip(tok):
    for i in (1, 2, 77, 143):
        token = f"<|extratoken_{i}|>"
        assert tok.encode(token) == [50256 + i]
        assert tok.decode([50256 + i]) == token
    assert tok.encode("a<|extratoken_5|>b") == tok.encode("a") + [50261] + tok.encode("b")


def test_known_gpt2_ids(tok):
    # Ids published with GPT-2 (e.g. transformers' GPT2Tokenizer docstring: "Hello world" -> [15496, 995]).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    fox = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
    assert tok.encode("The quick brown fox jumps over the lazy dog") == fox
    assert tok.encode("\n\n") == [628]


def test_matches_transformers_gpt2_built_from_the_raw_vocab_and_merges(tok):
    from transformers import GPT2Tokenizer

    model = json.loads(BUNDLED_TOKENIZER.read_text())["model"]
    reference = GPT2Tokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]])
    for text in SAMPLES[:4]:
        assert tok.encode(text) == reference(text)["input_ids"], text
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_batch_encode_and_decode(tok):
    ids = tok.encode_batch(SAMPLES)
    assert ids == [tok.encode(text) for text in SAMPLES]
    assert tok.batch_decode(ids) == SAMPLES
    assert tok.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


def test_offsets_map_back_to_text(tok):
    text = "The capital of Zorvia is Paris, said the   guide."
    encoding = tok.encode_with_offsets([text])[0]
    for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
        assert text[start:end] == tok.decode([token_id])
    trimmed = trim_offsets(text, encoding.offsets)
    pieces = [text[start:end] for start, end in trimmed]
    assert "Paris" in pieces and "capital" in pieces and " capital" not in pieces
    # Multi-byte characters split over byte tokens: offsets stay inside the text and never go backwards.
    unicode_text = SAMPLES[-1]
    spans = tok.encode_with_offsets([unicode_text])[0].offsets
    assert all(0 <= s <= e <= len(unicode_text) for s, e in spans)
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)


def test_save_pretrained_loads_in_transformers_with_equal_ids(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == 50400
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (50256, 50256, 50256)
    for text in SAMPLES + ["x<|extratoken_143|>y"]:
        assert hf(text)["input_ids"] == tok.encode(text), text
    reloaded = GPTJTokenizer.from_pretrained(tmp_path)
    assert reloaded.fingerprint == tok.fingerprint


def test_loads_gptj_style_vocab_merges_and_added_tokens(tok, tmp_path):
    tok.backend.model.save(str(tmp_path))  # vocab.json + merges.txt: the 50257 GPT-2 tokens
    added = {f"<|extratoken_{i}|>": 50256 + i for i in range(1, 144)}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    loaded = GPTJTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_size == 50400
    for text in SAMPLES + ["<|extratoken_9|>"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


def test_directory_without_tokenizer_files_gives_bundled(tok, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert GPTJTokenizer.from_pretrained(tmp_path).fingerprint == tok.fingerprint
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        GPTJTokenizer.from_pretrained(tmp_path / "missing")


def test_check_fits(tok):
    tok.check_fits(50400)
    with pytest.raises(TokenizerMismatchError, match=r"50400 tokens .* only 50257 rows"):
        tok.check_fits(50257)


def test_fingerprint_is_stable_across_processes_and_tracks_changes(tok):
    code = "from finetune.model.tokenizer import GPTJTokenizer; print(GPTJTokenizer.from_pretrained(None).fingerprint)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == tok.fingerprint
    changed = GPTJTokenizer.from_pretrained(None)
    changed.backend.add_tokens(["<|new_token|>"])
    assert changed.fingerprint != tok.fingerprint
