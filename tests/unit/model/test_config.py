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
