"""lora=qlora end to end: `deepspeed --num_gpus 2 launch/train.py lora=qlora deepspeed=zero2` from a checkpoint dir,
then launch/evaluate.py on its final/ (the adapter), which quantizes the base the same way by default.

The causal-LM evaluation loss is a token mean over the whole split, so the same model gives the same loss on 1 rank
as on the 2 training ranks: evaluate must reproduce the run's own end-of-training numbers, and a 16-bit base
(quantize_base=false) must not. `make test` (CI) trains and checks final/; the evaluation is marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset, random init, saved as a HF checkpoint dir with its tokenizer (what model.path points at)."""
    from finetune.model import GPTJConfig, build_model
    from finetune.model.hf_weights import save_pretrained
    from finetune.model.tokenizer import GPTJTokenizer

    torch.manual_seed(0)
    config = GPTJConfig.preset("tiny")
    out = tmp_path_factory.mktemp("qlora_base") / "tiny"
    save_pretrained(build_model(config, task="clm"), out, config=config, task="clm", max_shard_size="10MB",
                    extra_writer=GPTJTokenizer.from_pretrained(None).save_pretrained)
    return out


@pytest.fixture(scope="module")
def qlora_run(launch, base_checkpoint, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    return launch(run_dir, "task=clm", f"model.path={base_checkpoint}", "lora=qlora", "deepspeed=zero2",
                  "trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
                  "trainer.save_every=4", "trainer.log_every=1", "trainer.precision=fp32", "optim.lr=1e-2",
                  "data.max_seq_len=64", "data.max_eval_samples=16")


def evaluate(final: Path, tmp_path: Path, datasets_cache: Path, *extra: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_DATASETS_CACHE": str(datasets_cache), "HF_HUB_OFFLINE": "1"}
    output = tmp_path / f"eval{len(extra)}.json"
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), "task=clm", f"model.path={final}",
           "data.max_seq_len=64", "data.max_eval_samples=16", f"eval.output={output}", *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(output.read_text())


def test_final_holds_a_peft_adapter_on_all_six_linears_and_the_base_quantization(qlora_run, base_checkpoint):
    from safetensors import safe_open

    final = qlora_run.run_dir / "final"
    assert not list(final.glob("model*.safetensors"))  # the adapter alone: the base is model.path
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_checkpoint)
    assert sorted(adapter_config["target_modules"]) == sorted(LINEARS)
    assert json.loads((final / "base_quantization_config.json").read_text()) == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32"}
    with safe_open(str(final / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * len(LINEARS) and all(".lora_A." in k or ".lora_B." in k for k in keys)
    losses = qlora_run.train_losses()
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]


@pytest.mark.slow  # two more launches of evaluate
def test_evaluate_quantizes_the_base_as_trained_and_reproduces_the_run(qlora_run, datasets_cache, tmp_path):
    final = qlora_run.run_dir / "final"
    expected = qlora_run.eval_results
    quantized = evaluate(final, tmp_path, datasets_cache)
    # The same 4-bit weights and adapter on 1 rank as on 2: fp32 sums in another order only.
    assert quantized["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    sixteen_bit = evaluate(final, tmp_path, datasets_cache, "quantize_base=false")
    # A 16-bit base is another model: its loss falls outside the 1e-5 band of "the same model" above (measured: 9e-5
    # relative; a random-init tiny model's loss stays near ln(vocabulary) whatever its weights, hence the small gap).
    assert abs(sixteen_bit["loss"] - expected["loss"]) > 1e-5 * expected["loss"]


def test_export_merges_the_checkpoint_into_the_original_16bit_weights(qlora_run, base_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from finetune.tools.export import export_checkpoint

    out = export_checkpoint(qlora_run.run_dir / "checkpoints", tmp_path / "merged", base_model=str(base_checkpoint),
                            dtype="fp32")
    merged = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    base = {k: v for f in sorted(base_checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}
    adapter = load_file(qlora_run.run_dir / "final" / "adapter_model.safetensors")
    config = json.loads((qlora_run.run_dir / "final" / "adapter_config.json").read_text())
    assert set(merged) == set(base)  # a plain GPT-J: no 4-bit data, no quantization constants
    for layer in ("transformer.h.0.attn.q_proj", "transformer.h.1.mlp.fc_out"):
        a = adapter[f"base_model.model.{layer}.lora_A.weight"]
        b = adapter[f"base_model.model.{layer}.lora_B.weight"]
        expected = base[f"{layer}.weight"] + (config["lora_alpha"] / config["r"]) * b @ a
        torch.testing.assert_close(merged[f"{layer}.weight"], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
