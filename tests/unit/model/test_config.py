"""GPTJConfig <-> HF config.json: round trip, unknown keys kept, clear errors."""
import json

import pytest
import transformers

from finetune.model import GPTJConfig, ModelConfigError


def test_json_round_trip_keeps_fields_labels_and_unknown_keys(tmp_path):
    config = GPTJConfig(n_layer=3, n_embd=64, n_head=4, rotary_dim=8, num_labels=2, id2label={0: "no", 1: "yes"},
                        pad_token_id=50256, extra={"custom_flag": True, "task_specific_params": {"a": 1}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf_dict()))
    back = GPTJConfig.from_json_file(path)
    assert back == config
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "gptj" and raw["custom_flag"] is True
    assert raw["id2label"] == {"0": "no", "1": "yes"} and raw["label2id"] == {"no": 0, "yes": 1}


def test_reads_transformers_config_json(tmp_path):
    hf = transformers.GPTJConfig(n_layer=5, n_embd=128, n_head=8, rotary_dim=16, num_labels=3)
    hf.save_pretrained(tmp_path)
    ours = GPTJConfig.from_json_file(tmp_path / "config.json")
    assert (ours.n_layer, ours.n_embd, ours.n_head, ours.rotary_dim) == (5, 128, 8, 16)
    assert ours.num_labels == 3 and ours.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    # HF-written bookkeeping keys are derived, not carried as unknown extras.
    assert "transformers_version" not in ours.extra and "label2id" not in ours.extra


def test_written_config_reads_in_transformers():
    ours = GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, id2label={0: "neg", 1: "pos"})
    hf = transformers.GPTJConfig.from_dict(ours.to_hf_dict())
    assert (hf.n_layer, hf.n_embd, hf.n_head, hf.rotary_dim) == (2, 64, 4, 8)
    assert hf.id2label == {0: "neg", 1: "pos"} and hf.num_labels == 2


def test_other_model_type_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 64}))
    with pytest.raises(ModelConfigError, match="model_type 'gpt_neox'.*GPT-J"):
        GPTJConfig.from_json_file(path)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json is not valid JSON"):
        GPTJConfig.from_json_file(path)


def test_inconsistent_shape_is_refused():
    with pytest.raises(ModelConfigError, match=r"n_embd \(100\) must be divisible by n_head \(16\)"):
        GPTJConfig(n_embd=100)


# --- bad config.json values: one paragraph naming the file, the field and the fix ------------------------------
TINY_JSON = {"model_type": "gptj", "vocab_size": 512, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
             "rotary_dim": 8}


@pytest.mark.parametrize("field, value, expected", [
    ("n_head", 0, r"field 'n_head' must be a positive integer, got 0"),
    ("n_layer", "28", r"field 'n_layer' must be a positive integer, got the string '28'; write numbers without quotes"),
    ("n_layer", -2, r"field 'n_layer' must be a positive integer, got -2"),
    ("vocab_size", 0, r"field 'vocab_size' must be a positive integer, got 0"),
    ("n_embd", 4.5, r"field 'n_embd' must be a positive integer, got 4.5"),
    ("n_embd", 66, r"n_embd \(66\) must be divisible by n_head \(4\)"),
    ("rotary_dim", 32, r"rotary_dim \(32\) must be even and at most the head dim n_embd / n_head = 16"),
    ("num_labels", True, r"field 'num_labels' must be a positive integer, got True"),
    ("resid_pdrop", 1.5, r"field 'resid_pdrop' must be a probability in \[0, 1\), got 1.5"),
    ("layer_norm_epsilon", 0, r"field 'layer_norm_epsilon' must be a positive number"),
    ("use_cache", "yes", r"field 'use_cache' must be true or false"),
    ("problem_type", "ranking", r"field 'problem_type' must be one of regression, "),
    ("id2label", ["a", "b"], r"field 'id2label' must map label ids to names"),
])
def test_bad_config_json_values_are_one_paragraph_errors(tmp_path, field, value, expected):
    from finetune.model.hf_weights import CheckpointError, read_config

    (tmp_path / "config.json").write_text(json.dumps({**TINY_JSON, field: value}))
    with pytest.raises(CheckpointError) as err:
        read_config(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message and "\n" not in message
    assert __import__("re").search(expected, message), message


def test_bad_model_overrides_name_the_field():
    with pytest.raises(ModelConfigError, match="field 'n_head' must be a positive integer, got 0"):
        GPTJConfig.preset("tiny", n_head=0)
