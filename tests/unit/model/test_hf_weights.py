"""HF-format checkpoints: transformers <-> here in both directions, dtypes, fresh heads, bad input, low memory."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import safetensors.torch
import torch
import transformers

from finetune.model import GPTJConfig, build_model
from finetune.model.hf_weights import (
    CheckpointError,
    load_pretrained,
    load_state_into,
    read_config,
    resolve_model_dir,
    save_pretrained,
)

TINY = dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, pad_token_id=999)
HF_CLASSES = {
    "clm": transformers.GPTJForCausalLM,
    "cls": transformers.GPTJForSequenceClassification,
    "qa": transformers.GPTJForQuestionAnswering,
}
AUTO_CLASSES = {
    "clm": transformers.AutoModelForCausalLM,
    "cls": transformers.AutoModelForSequenceClassification,
    "qa": transformers.AutoModelForQuestionAnswering,
}
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def hf_model(task, **overrides):
    torch.manual_seed(0)
    config = transformers.GPTJConfig(**{**TINY, **overrides}, num_labels=3)
    config._attn_implementation = "eager"
    return HF_CLASSES[task](config).eval()


def our_model(task, **overrides):
    torch.manual_seed(0)
    return build_model(GPTJConfig(**{**TINY, **overrides}, num_labels=3, id2label=LABELS), task=task).eval()


def batch():
    torch.manual_seed(1)
    return torch.randint(0, 999, (2, 9))


def logits(model, task, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return [out.start_logits, out.end_logits] if task == "qa" else [out.logits]


def save_hf(model, path, fmt):
    """A checkpoint in one of the layouts HF writes: (sharded) safetensors or (sharded) pytorch_model.bin."""
    shard = "20KB" if fmt.startswith("sharded") else "5GB"
    model.config.save_pretrained(path)
    huggingface_hub.save_torch_state_dict(
        model.state_dict(), path, safe_serialization=fmt.endswith("safetensors"), max_shard_size=shard
    )


def tensors_of(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


# --- transformers -> here -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, task, fmt):
    hf = hf_model(task)
    save_hf(hf, tmp_path, fmt)
    if fmt.startswith("sharded"):
        assert len(list(tmp_path.glob("*-of-*"))) > 1
    ours = load_pretrained(tmp_path, task=task, dtype=torch.float32)
    ids = batch()
    for a, b in zip(logits(ours, task, ids), logits(hf, task, ids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_transformers_save_pretrained_dir_loads(tmp_path):
    # transformers' own writer (config.json with its own keys + model.safetensors).
    hf = hf_model("clm")
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, task="clm", dtype=torch.float32)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_hub_mask_buffers_and_bare_backbone_names_are_accepted(tmp_path):
    hf = hf_model("clm")
    # Old hub checkpoints carry the attention mask buffers; a bare GPTJModel has no `transformer.` prefix.
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    hf.config.save_pretrained(tmp_path)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    ours = load_pretrained(tmp_path, task="cls", dtype=torch.float32)
    assert torch.equal(ours.transformer.h[1].mlp.fc_in.weight, hf.transformer.h[1].mlp.fc_in.weight)


# --- here -> transformers / here ------------------------------------------------------------------
@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, task):
    ours = our_model(task)
    save_pretrained(ours, tmp_path / "final", config=ours.config, task=task, max_shard_size="20KB")
    index = json.loads((tmp_path / "final" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ours.state_dict().values())
    raw = json.loads((tmp_path / "final" / "config.json").read_text())
    assert raw["model_type"] == "gptj" and raw["architectures"] == [type(ours).__name__]
    assert raw["torch_dtype"] == "float32"

    hf = AUTO_CLASSES[task].from_pretrained(tmp_path / "final", attn_implementation="eager").eval()
    assert type(hf) is HF_CLASSES[task]
    ids = batch()
    for a, b in zip(logits(ours, task, ids), logits(hf, task, ids)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if task == "cls":
        assert hf.config.id2label == LABELS and hf.config.label2id == {v: k for k, v in LABELS.items()}


@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_round_trip_is_bit_exact_and_keeps_labels(tmp_path, shard):
    ours = our_model("cls")
    save_pretrained(ours, tmp_path / "out", config=ours.config, task="cls", max_shard_size=shard)
    back = load_pretrained(tmp_path / "out", task="cls", dtype=torch.float32)
    assert back.config.id2label == LABELS
    saved, loaded = tensors_of(ours), tensors_of(back)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


def test_bin_save_and_bf16_save(tmp_path):
    ours = our_model("qa")
    save_pretrained(ours, tmp_path / "bin", config=ours.config, task="qa", safe_serialization=False,
                    max_shard_size="20KB")
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    back = load_pretrained(tmp_path / "bin", task="qa", dtype=torch.float32)
    assert all(torch.equal(tensors_of(ours)[k], v) for k, v in tensors_of(back).items())

    save_pretrained(ours, tmp_path / "bf16", config=ours.config, task="qa", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = safetensors.torch.load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert torch.equal(stored["qa_outputs.weight"], ours.qa_outputs.weight.to(torch.bfloat16))


# --- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fp16_checkpoint_loads_in_requested_dtype(tmp_path, dtype):
    hf = hf_model("clm").half()  # the layout of GPT-J's "float16" revision
    save_hf(hf, tmp_path, "safetensors")
    ours = load_pretrained(tmp_path, task="clm", dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    expected = hf.transformer.h[0].attn.q_proj.weight.to(dtype)
    assert torch.equal(ours.transformer.h[0].attn.q_proj.weight, expected)


# --- heads ----------------------------------------------------------------------------------------
def test_causal_lm_checkpoint_into_classifier_gets_fresh_head(tmp_path, caplog):
    hf = hf_model("clm")
    save_hf(hf, tmp_path, "safetensors")
    with caplog.at_level(logging.INFO, logger="finetune.model.hf_weights"):
        ours = load_pretrained(tmp_path, task="cls", dtype=torch.float32, config_overrides={"id2label": LABELS})
    fresh = [r.getMessage() for r in caplog.records if "score.weight" in r.getMessage()]
    unused = [r.getMessage() for r in caplog.records if "lm_head.weight" in r.getMessage()]
    assert len(fresh) == 1 and "Initialized new weights" in fresh[0]
    assert len(unused) == 1 and "unused" in unused[0]
    assert ours.score.weight.shape == (3, TINY["n_embd"]) and ours.config.num_labels == 3
    std = ours.score.weight.std().item()
    assert 0.005 < std < 0.05  # HF's normal(0, initializer_range=0.02), not zeros, not kaiming
    for name, tensor in hf.transformer.state_dict().items():
        assert torch.equal(ours.transformer.state_dict()[name], tensor), name


def test_classifier_with_new_label_count_reinitializes_only_the_head(tmp_path, caplog):
    ours = our_model("cls")
    save_pretrained(ours, tmp_path, config=ours.config, task="cls", overwrite=True)
    with caplog.at_level(logging.WARNING, logger="finetune.model.hf_weights"):
        back = load_pretrained(tmp_path, task="cls", dtype=torch.float32, config_overrides={"num_labels": 5})
    assert back.score.weight.shape == (5, TINY["n_embd"]) and back.config.id2label is None
    assert "score.weight" in caplog.text
    assert torch.equal(back.transformer.wte.weight, ours.transformer.wte.weight)


def test_load_state_into_materialized_model_replaces_every_tensor(tmp_path):
    source = our_model("clm")
    save_pretrained(source, tmp_path, config=source.config, task="clm", overwrite=True)
    target = build_model(source.config, task="clm")
    report = load_state_into(target, tmp_path, dtype=torch.bfloat16)
    assert sorted(report.loaded) == sorted(source.state_dict()) and not report.initialized and not report.unused
    assert torch.equal(target.lm_head.bias, source.lm_head.bias.to(torch.bfloat16))


# --- bad input ------------------------------------------------------------------------------------
def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*local directory"):
        load_pretrained(tmp_path / "nowhere", task="clm", dtype=torch.float32)


def test_dir_without_config_or_weights_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(GPTJConfig(**TINY).to_hf_dict()))
    with pytest.raises(CheckpointError, match="holds no weights.*model.safetensors"):
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)


def test_other_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config.json.*model_type 'llama'.*GPT-J"):
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    hf = hf_model("clm")
    state = hf.state_dict()
    del state["transformer.h.1.mlp.fc_out.weight"]
    state["transformer.ln_f.bias"] = torch.zeros(7)
    hf.config.save_pretrained(tmp_path)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)
    message = str(err.value)
    assert "missing tensors: transformer.h.1.mlp.fc_out.weight" in message
    assert "transformer.ln_f.bias (checkpoint [7], model [32])" in message
    assert str(tmp_path) in message


def test_index_naming_a_missing_shard_is_a_clear_error(tmp_path):
    save_hf(hf_model("clm"), tmp_path, "sharded-safetensors")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shards that are missing.*{victim.name}"):
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)


def test_interrupted_save_leaves_no_partial_dir(tmp_path, monkeypatch):
    ours = our_model("clm")
    real_save = safetensors.torch.save_file
    calls = []

    def dies_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(ours, tmp_path / "final", config=ours.config, task="clm", max_shard_size="20KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither final/ nor the staging dir


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    ours = our_model("clm")
    out = tmp_path / "final"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(CheckpointError, match="not empty.*overwrite=True"):
        save_pretrained(ours, out, config=ours.config, task="clm")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    save_pretrained(ours, out, config=ours.config, task="clm", overwrite=True,
                    extra_writer=lambda d: (d / "tokenizer.json").write_text("{}"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_state_dict_of_another_head_is_refused(tmp_path):
    ours = our_model("clm")
    with pytest.raises(CheckpointError, match="missing score.weight; unexpected lm_head.bias, lm_head.weight"):
        save_pretrained(ours.state_dict(), tmp_path / "x", config=ours.config, task="cls")
    assert not (tmp_path / "x").exists()


def test_offline_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"model.path 'EleutherAI/gpt-j-6b'.*offline.*set model.path=DIR"):
        resolve_model_dir("EleutherAI/gpt-j-6b")


# --- low memory -----------------------------------------------------------------------------------
LOW_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from finetune.model.hf_weights import load_pretrained, load_state_into, read_config
    from finetune.model import GPTJConfig, build_model

    def status_bytes(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    build_model(GPTJConfig.preset("tiny"), device="meta")  # one-time imports torch does on first meta build
    # ru_maxrss would carry the parent's (pytest's) peak across exec; VmHWM is this process's, reset here.
    open("/proc/self/clear_refs", "w").write("5")
    base = status_bytes("VmRSS:")
    dtype = getattr(torch, sys.argv[2])
    if sys.argv[3] == "training":  # the runner's path: tensors copied into memory of their own
        model = build_model(read_config(sys.argv[1]), task="clm", device="meta")
        load_state_into(model, sys.argv[1], dtype=dtype)
    else:
        model = load_pretrained(sys.argv[1], task="clm", dtype=dtype)
    weights = sum(p.nbytes for p in model.parameters())
    loaded = (status_bytes("VmHWM:") - base) / weights
    for p in model.parameters():  # read every weight once, as a forward pass does
        p.detach().max()
    print(json.dumps({"loaded": loaded, "read": (status_bytes("VmHWM:") - base) / weights}))
""")


@pytest.mark.parametrize(("dtype", "path", "mapped"), [
    ("float32", "inference", True),  # same dtype: memory-mapped from the file, resident only once read
    ("bfloat16", "inference", False),  # converted: one copy in the new dtype
    ("float32", "training", False),  # training always copies
])
def test_loading_peak_memory_stays_near_the_weights_size(tmp_path, dtype, path, mapped):
    # ~100M fp32 parameters in 24 similar tensors: two copies would show as a ratio near 2.
    config = GPTJConfig(vocab_size=1024, n_embd=1024, n_layer=8, n_head=8, rotary_dim=16, n_positions=64)
    model = build_model(config, task="clm", init=False)
    save_pretrained(model, tmp_path / "ckpt", config=config, task="clm")
    del model
    out = subprocess.run([sys.executable, "-c", LOW_MEMORY_SCRIPT, str(tmp_path / "ckpt"), dtype, path],
                         capture_output=True, text=True, check=True)
    ratios = json.loads(out.stdout.strip().splitlines()[-1])
    assert ratios["read"] < 1.25, f"peak RSS was {ratios['read']:.2f}x the weights"
    if mapped:
        assert ratios["loaded"] < 0.1, f"loading alone took {ratios['loaded']:.2f}x the weights: they were copied"
    else:
        assert ratios["loaded"] > 0.9, ratios


def test_mapped_weights_are_copy_on_write(tmp_path):
    config = GPTJConfig(**TINY)
    save_pretrained(our_model("clm"), tmp_path / "ckpt", config=config, task="clm")
    on_disk = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    model = load_pretrained(tmp_path / "ckpt", task="clm", dtype=torch.float32)
    reference = our_model("clm")
    torch.testing.assert_close(logits(model, "clm", batch()), logits(reference, "clm", batch()), rtol=0, atol=0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # writable, like any weight (LoRA merge, fine-tuning the loaded model)
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == on_disk
    again = load_pretrained(tmp_path / "ckpt", task="clm", dtype=torch.float32)
    torch.testing.assert_close(logits(again, "clm", batch()), logits(reference, "clm", batch()), rtol=0, atol=0)


# --- damaged files, local paths and the Hub, permissions ----------------------------------------------------
def test_malformed_safetensors_header_names_the_file(tmp_path):
    save_hf(hf_model("clm"), tmp_path, "safetensors")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((2**40).to_bytes(8, "little") + b"{not json")  # a header length no file has
    with pytest.raises(CheckpointError, match=rf"{weights} is not a readable safetensors file.*again"):
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)


def test_corrupt_bin_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPTJConfig(**TINY).to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be read as torch weights"):
        load_pretrained(tmp_path, task="clm", dtype=torch.float32)


@pytest.fixture
def hub_forbidden(monkeypatch):
    def snapshot_download(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("path", ["./models/gptj", "../gptj", "/nonexistent/models/gptj", "~/no-such-dir/gptj",
                                  "outputs/missing-run", "final", "EleutherAI/gpt-j-6b/final"])
def test_a_local_looking_path_is_never_sent_to_the_hub(tmp_path, monkeypatch, hub_forbidden, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # `outputs/missing-run` has an existing parent: a local path with a typo
    with pytest.raises(CheckpointError, match=rf"model.path '{path}': no such local model dir .* working directory"):
        resolve_model_dir(path)


def test_a_hub_fetch_logs_its_repo_and_revision(tmp_path, monkeypatch, caplog):
    snapshot = tmp_path / "hub" / "snapshots" / "0123abcd"
    save_hf(hf_model("clm"), snapshot, "safetensors")
    calls = []

    def snapshot_download(repo_id, *, revision, allow_patterns, local_files_only):
        calls.append((repo_id, revision))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="finetune.model.hf_weights"):
        assert resolve_model_dir("some-org/some-model@v1.0") == snapshot
    assert calls == [("some-org/some-model", "v1.0")]
    assert "Hugging Face Hub repo some-org/some-model at revision v1.0" in caplog.text
    assert "is commit 0123abcd" in caplog.text


def test_save_leaves_the_umask_alone_and_offers_private_outputs(tmp_path, monkeypatch):
    mask = os.umask(0o022)
    os.umask(mask)

    def forbidden(value):
        raise AssertionError("os.umask is process-wide: another thread creating a file meanwhile gets it")

    monkeypatch.setattr(os, "umask", forbidden)
    ours = our_model("clm")
    save_pretrained(ours, tmp_path / "shared", config=ours.config, task="clm")
    assert (tmp_path / "shared" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    save_pretrained(ours, tmp_path / "private", config=ours.config, task="clm", private=True,
                    extra_writer=lambda d: (d / "tokenizer.json").write_text("{}"))
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {
        "config.json": 0o600, "model.safetensors": 0o600, "tokenizer.json": 0o600}


def test_an_overwrite_that_fails_at_the_swap_keeps_the_old_model(tmp_path, monkeypatch):
    from pathlib import Path

    from finetune import files

    ours = our_model("clm")
    out = tmp_path / "final"
    save_pretrained(ours, out, config=ours.config, task="clm")
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:
            raise OSError("the file system went read-only")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="read-only"):
        save_pretrained(our_model("clm", n_layer=1), out, config=GPTJConfig(**{**TINY, "n_layer": 1}, num_labels=3,
                        id2label=LABELS), task="clm", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
