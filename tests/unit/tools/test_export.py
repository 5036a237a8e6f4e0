"""finetune.tools.export without launching DeepSpeed: locating checkpoints, lazy tensors, a stage-0 export end to end."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.training.checkpoint_trust import UntrustedCheckpointError

from finetune.config import ConfigError
from finetune.model import GPTJConfig, build_model
from finetune.model.hf_weights import CheckpointError, load_pretrained, save_pretrained
from finetune.tools.export import _LazyTensor, export_checkpoint, locate_checkpoint

TINY = GPTJConfig.preset("tiny", vocab_size=512, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})


def fake_tag(directory, tag):
    (directory / tag).mkdir(parents=True)
    (directory / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    return directory / tag


def test_locate_reads_latest_and_accepts_tag_dirs_and_run_dirs(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    fake_tag(checkpoints, "global_step2")
    fake_tag(checkpoints, "global_step4")
    (checkpoints / "latest").write_text("global_step4\n")
    (tmp_path / "run" / "final").mkdir()

    for path in (checkpoints, tmp_path / "run"):
        found = locate_checkpoint(path)
        assert (found.directory, found.tag) == (checkpoints, "global_step4")
    assert locate_checkpoint(checkpoints, tag="global_step2").path == checkpoints / "global_step2"
    found = locate_checkpoint(checkpoints / "global_step2")
    assert (found.tag, found.run_dir) == ("global_step2", tmp_path / "run")


def test_locate_errors_name_the_fix(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    fake_tag(checkpoints, "global_step7")
    with pytest.raises(CheckpointError, match=r"no 'latest' file.*global_step7.*checkpoint=.*global_stepN"):
        locate_checkpoint(checkpoints)
    (checkpoints / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match=r"global_step9 is not a DeepSpeed checkpoint.*global_step7"):
        locate_checkpoint(checkpoints)
    with pytest.raises(CheckpointError, match="is not a directory"):
        locate_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="drop tag"):
        locate_checkpoint(checkpoints / "global_step7", tag="global_step1")


class CountingGathered:
    """Stands in for DeepSpeed's GatheredTensor: assembles its tensor on .contiguous()."""

    def __init__(self, tensor, counter):
        self.tensor, self.counter = tensor, counter
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def contiguous(self):
        self.counter.append(1)
        return self.tensor.clone()


def test_save_pretrained_materializes_each_lazy_tensor_once(tmp_path):
    model = build_model(TINY, task="cls")
    counter = []
    lazy = {k: _LazyTensor(CountingGathered(v.detach(), counter)) for k, v in model.state_dict().items()}
    save_pretrained(lazy, tmp_path / "out", config=TINY, task="cls", dtype=torch.bfloat16, max_shard_size="200KB")
    assert len(counter) == len(lazy)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    loaded = load_pretrained(tmp_path / "out", task="cls", dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16)), key


def stage0_checkpoint(tmp_path, model):
    """What DeepSpeed writes without ZeRO: the module's state dict in mp_rank_00_model_states.pt."""
    tag = tmp_path / "checkpoints" / "global_step1"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "checkpoints" / "latest").write_text("global_step1")
    return tmp_path / "checkpoints"


def test_stage0_export_with_explicit_config(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY, task="cls")
    checkpoints = stage0_checkpoint(tmp_path, model)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), "architectures": ["GPTJForSequenceClassification"]}))

    with pytest.raises(ConfigError, match="config=PATH"):  # no run dir around it: the config is unknown
        export_checkpoint(checkpoints, tmp_path / "out")
    export_checkpoint(checkpoints, tmp_path / "out", config_path=config_dir, dtype="fp32")
    loaded = load_pretrained(tmp_path / "out", task="cls", dtype=torch.float32)
    assert loaded.config.id2label == TINY.id2label
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    with pytest.raises(CheckpointError, match="not empty"):  # never replaces a model by accident
        export_checkpoint(checkpoints, tmp_path / "out", config_path=config_dir)


def test_unknown_dtype_fails_before_reading(tmp_path):
    with pytest.raises(ConfigError, match=r"dtype='int8'.*bf16, fp16, fp32"):
        export_checkpoint(tmp_path / "does-not-matter", tmp_path / "out", dtype="int8")


# --- export never destroys its source; overwrite swaps ------------------------------------------------------
def run_dir_with_stage0_checkpoint(tmp_path):
    """A run dir as training leaves it: .hydra/ (here a stand-in), checkpoints/, and a config for export."""
    torch.manual_seed(0)
    model = build_model(TINY, task="cls")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    stage0_checkpoint(run, model)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    architectures = ["GPTJForSequenceClassification"]
    (config_dir / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), "architectures": architectures}))
    return run, config_dir


@pytest.mark.parametrize("where", ["run dir", "inside run dir", "checkpoints dir", "parent of run dir", "symlink"])
def test_export_into_its_own_run_dir_is_refused(tmp_path, where):
    run, config_dir = run_dir_with_stage0_checkpoint(tmp_path)
    (tmp_path / "link").symlink_to(run)
    out = {"run dir": run, "inside run dir": run / "export", "checkpoints dir": run / "checkpoints",
           "parent of run dir": tmp_path, "symlink": tmp_path / "link"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"that export reads: writing it .* would destroy the source"):
        export_checkpoint(run / "checkpoints", out, config_path=config_dir, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    export_checkpoint(run / "checkpoints", tmp_path / "exported", config_path=config_dir)  # beside it: fine


def test_export_overwrite_replaces_the_old_output_in_one_swap(tmp_path, monkeypatch):
    run, config_dir = run_dir_with_stage0_checkpoint(tmp_path)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "old-model.txt").write_text("the previous export")
    from finetune import files

    exchanged = []
    real_exchange = files._exchange
    monkeypatch.setattr(files, "_exchange", lambda a, b: (exchanged.append((a, b)), real_exchange(a, b))[1])
    export_checkpoint(run / "checkpoints", out, config_path=config_dir, overwrite=True, private=True)
    assert len(exchanged) == 1 and exchanged[0][1] == out
    assert not (out / "old-model.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "exported", "run"]
    assert out.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o600}


def test_a_stage0_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    run, config_dir = run_dir_with_stage0_checkpoint(tmp_path)
    model_file = run / "checkpoints" / "global_step1" / "mp_rank_00_model_states.pt"
    saved = torch.load(model_file, weights_only=True)
    torch.save({**saved, "client_state": Payload()}, model_file)
    with pytest.raises(UntrustedCheckpointError, match="client_state|could run code"):
        export_checkpoint(run / "checkpoints", tmp_path / "exported", config_path=config_dir)
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()


def test_a_stage0_checkpoint_with_numpy_rng_state_exports(tmp_path):
    import random

    import numpy as np

    run, config_dir = run_dir_with_stage0_checkpoint(tmp_path)
    model_file = run / "checkpoints" / "global_step1" / "mp_rank_00_model_states.pt"
    saved = torch.load(model_file, weights_only=True)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({**saved, "rng": [rng], "ds_version": "0.19", "global_steps": 1}, model_file)  # as the checkpointer does
    export_checkpoint(run / "checkpoints", tmp_path / "exported", config_path=config_dir)
    assert (tmp_path / "exported" / "model.safetensors").is_file()
