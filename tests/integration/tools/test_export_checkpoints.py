"""Export of real DeepSpeed checkpoints written by 2 CPU ranks (gloo) under ZeRO-2 and ZeRO-3.

A real `launch/train.py` run (ZeRO-3, conftest's `qa_run`) gives the bit-for-bit check against its final/.
Setups the shipped training configs make slow to reach are written by one launch of two rank processes (this file
run as a script), saving as the runner does: ZeRO-2 with only `.hydra/config.yaml` next to the checkpoints, and
LoRA under ZeRO-3 with and without the frozen base weights in the checkpoint.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.model.hf_weights import CheckpointError, load_pretrained
from finetune.tools.export import export_checkpoint

SCRIPT = Path(__file__).resolve().parents[3] / "launch" / "export.py"
TINY = {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8}  # the `tiny` preset
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
STEPS = 3


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
    }


def hydra_yaml(task: str, *, model_path=None, lora=False) -> str:
    from omegaconf import OmegaConf

    cfg = {"task": {"name": task}, "model": {"name": "tiny", "path": model_path, "dtype": "fp32", "overrides": {}},
           "lora": {"enabled": lora, **LORA}}
    return OmegaConf.to_yaml(cfg)


def worker(root: Path) -> None:
    import deepspeed

    from finetune.config import LoraConfig
    from finetune.distributed import init_distributed
    from finetune.model import GPTJConfig, build_model
    from finetune.model.hf_weights import save_pretrained
    from finetune.model.tokenizer import GPTJTokenizer
    from finetune.training.lora import apply_lora, merged_state_dict, save_adapter

    init_distributed()  # its atexit teardown keeps gloo from aborting the exit
    rank = torch.distributed.get_rank()
    tokenizer = GPTJTokenizer.from_pretrained(None)
    lora_cfg = LoraConfig(enabled=True, **LORA)

    def build(stage, config, task, *, base_dir=None):
        from finetune.model.gptj import init_module_weights
        from finetune.model.hf_weights import load_state_into

        torch.manual_seed(0)
        ds = ds_config(stage)
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=ds):
                model = build_model(config, task=task, init=False)
            for module in model.modules():  # the same weights on every rank, as the runner does
                params = list(module.parameters(recurse=False))
                if params and base_dir is None:
                    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                        if rank == 0:
                            init_module_weights(module, config.initializer_range)
        else:
            model = build_model(config, task=task)
        if base_dir is not None:
            load_state_into(model, base_dir)  # each rank its own partition
            model = apply_lora(model, lora_cfg)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds)
        return engine

    def train(engine):
        g = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            ids = torch.randint(0, 50000, (2, 12), generator=g)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()

    def gathered(engine, stage):
        if stage == 3:
            return engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None

    # ZeRO-2, causal LM, no final/: export must rebuild the config from .hydra/config.yaml.
    run = root / "zero2_clm"
    config = GPTJConfig.preset("tiny", pad_token_id=50256)
    engine = build(2, config, "clm")
    train(engine)
    engine.save_checkpoint(str(run / "checkpoints"), tag=f"global_step{STEPS}")
    state = gathered(engine, 2)
    if rank == 0:
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(hydra_yaml("clm"))
        save_pretrained(state, root / "zero2_clm_expected", config=config, task="clm")
    engine.destroy()

    # ZeRO-3 LoRA on a saved base, saved twice: with the frozen base in the checkpoint, and without it.
    base_dir = root / "base"
    if rank == 0:
        torch.manual_seed(0)
        save_pretrained(build_model(config, task="clm"), base_dir, config=config, task="clm",
                        extra_writer=tokenizer.save_pretrained)
    torch.distributed.barrier()
    engine = build(3, config, "clm", base_dir=base_dir)
    train(engine)
    for name, exclude_frozen in (("zero3_lora", False), ("zero3_lora_nobase", True)):
        run = root / name
        engine.save_checkpoint(str(run / "checkpoints"), tag=f"global_step{STEPS}",
                               exclude_frozen_parameters=exclude_frozen)
        if rank == 0:
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "config.yaml").write_text(hydra_yaml("clm", model_path=str(base_dir), lora=True))
    state = gathered(engine, 3)
    if rank == 0:  # final/ as runner.export_final writes it (adapter; merged weights with lora.merge_into_final)
        save_adapter(engine.module, root / "zero3_lora" / "final", gathered_state_dict=state,
                     base_model_name_or_path=str(base_dir))
        save_pretrained(merged_state_dict(dict(state), lora_cfg), root / "zero3_lora" / "final_merged", config=config,
                        task="clm")
    engine.destroy()
    torch.distributed.barrier()



@pytest.fixture(scope="module")
def runs(tmp_path_factory, run_ranks) -> Path:
    root = tmp_path_factory.mktemp("export_runs")
    run_ranks(__file__, str(root), timeout=300)
    return root


def export(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


@pytest.mark.integration
def test_export_of_a_zero3_training_run_equals_its_final_bit_for_bit(qa_run, tmp_path):
    run = qa_run.run_dir
    # As a user runs it; a small shard limit forces several shards and an index, as for GPT-J 6B.
    result = export(f"checkpoint={run}/checkpoints", f"out={tmp_path}/hf", "max_shard_size=4MB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert_bitwise_equal(weights(out), weights(run / "final"))
    assert json.loads((out / "config.json").read_text()) == json.loads((run / "final" / "config.json").read_text())
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (run / "final" / name).read_bytes()

    # Another dtype: final/'s numbers cast once. An older tag: other weights.
    export_checkpoint(run / "checkpoints", tmp_path / "bf16", dtype="bf16")
    assert_bitwise_equal(weights(tmp_path / "bf16"), {k: v.to(torch.bfloat16) for k, v in weights(run / "final").items()})
    export_checkpoint(run / "checkpoints" / "global_step2", tmp_path / "step2")
    step2, final = weights(tmp_path / "step2"), weights(run / "final")
    assert step2.keys() == final.keys() and not all(torch.equal(step2[k], final[k]) for k in final)


@pytest.mark.integration
def test_zero2_export_from_hydra_config(runs, tmp_path):
    run = runs / "zero2_clm"
    export_checkpoint(run, tmp_path / "hf")  # the run dir works too
    assert_bitwise_equal(weights(tmp_path / "hf"), weights(runs / "zero2_clm_expected"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPTJForCausalLM"]


@pytest.mark.integration
def test_lora_merged_export_equals_final_and_base_plus_adapter(runs, tmp_path):
    import peft

    run = runs / "zero3_lora"
    export_checkpoint(run / "checkpoints", tmp_path / "merged", merge_lora=True)
    export_checkpoint(run / "checkpoints", tmp_path / "adapter", merge_lora=False)
    assert_bitwise_equal(weights(tmp_path / "merged"), weights(run / "final_merged"))
    assert_bitwise_equal(load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
                         load_file(run / "final" / "adapter_model.safetensors"))

    # Merged weights give the logits of the base model with the adapter applied by peft.
    probe = torch.randint(0, 50000, (2, 10), generator=torch.Generator().manual_seed(3))
    base = load_pretrained(runs / "base", task="clm", dtype=torch.float32)
    adapter_config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    adapter_config.task_type = None  # a plain PeftModel: PeftModelForCausalLM expects transformers' generation API
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=adapter_config).eval()
    merged_model = load_pretrained(tmp_path / "merged", task="clm", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged_model(input_ids=probe).logits, with_adapter(input_ids=probe).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_lora_checkpoint_without_base_weights(runs, tmp_path):
    run = runs / "zero3_lora_nobase"
    moved_base = tmp_path / "moved_base"  # the run's model.path is gone: export must ask for the base
    (runs / "base").rename(moved_base)
    try:
        with pytest.raises(CheckpointError, match="base_model=DIR"):
            export_checkpoint(run / "checkpoints", tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        export_checkpoint(run / "checkpoints", tmp_path / "merged", base_model=str(moved_base))
    finally:
        moved_base.rename(runs / "base")
    # The same model as zero3_lora's: the same merged weights.
    assert_bitwise_equal(weights(tmp_path / "merged"), weights(runs / "zero3_lora" / "final_merged"))


@pytest.mark.integration
def test_bad_input_is_one_clear_error(runs, tmp_path):
    no_latest = tmp_path / "copy" / "checkpoints"
    no_latest.mkdir(parents=True)
    (no_latest / f"global_step{STEPS}").symlink_to(runs / "zero2_clm" / "checkpoints" / f"global_step{STEPS}")
    cases = {
        "no 'latest' file": [f"checkpoint={no_latest}", f"out={tmp_path}/a"],
        "dtype='int8' is not a supported dtype": [f"checkpoint={runs / 'zero2_clm'}", f"out={tmp_path}/b", "dtype=int8"],
        "is not a directory": [f"checkpoint={tmp_path}/nowhere", f"out={tmp_path}/c"],
    }
    for expected, overrides in cases.items():
        result = export(*overrides, cwd=tmp_path)
        assert result.returncode == 2, (overrides, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        if expected.startswith("no 'latest'"):
            assert f"global_step{STEPS}" in result.stderr  # names the tag to pass instead

if __name__ == "__main__":
    worker(Path(sys.argv[1]))
