"""LoRA under real DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo).

One launch of two rank processes (this file run as a script) trains a LoRA model for a few steps under
each stage and writes what it saw; the test then checks, in this process: the loss fell, only adapter
and head weights moved, both ranks hold the same model, and the saved adapter loads with peft onto
transformers' GPT-J with the engine's logits.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
STAGES = (2, 3)
STEPS = 6


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }


def plain_hf_state(full_state: dict) -> dict:
    """A PeftModel state dict (before training) -> the base GPT-J's state dict."""
    out = {}
    for key, value in full_state.items():
        key = key.removeprefix("base_model.model.")
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def worker(out_dir: Path) -> None:
    import deepspeed
    from safetensors.torch import save_file

    from finetune.distributed import init_distributed
    from finetune.model import GPTJConfig, build_model
    from finetune.training.lora import LoraConfig, apply_lora, save_adapter

    init_distributed()  # its atexit teardown keeps gloo from aborting the exit
    rank = torch.distributed.get_rank()
    batch = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(rank))
    probe = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(99))

    for stage in STAGES:
        # Different seeds per rank on purpose: DeepSpeed must broadcast rank 0's base and adapter weights.
        torch.manual_seed(100 + rank)
        config = ds_config(stage)
        if stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = build_model(GPTJConfig(**TINY), task="clm", init=False)
        else:
            model = build_model(GPTJConfig(**TINY), task="clm")
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, train_head=True))
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
        )

        def full_state():
            if stage == 3:
                return engine._zero3_consolidated_16bit_state_dict()
            return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

        before = full_state()
        losses = []
        engine.train()
        for _ in range(STEPS):
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=probe).logits
        after = full_state()
        # ZeRO-3 saves from a gathered dict (trainable-only here; the runner passes a full one).
        gathered = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True) if stage == 3 else None

        stage_dir = out_dir / f"zero{stage}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        torch.save(logits, stage_dir / f"logits_rank{rank}.pt")
        if rank == 0:
            save_file(before, stage_dir / "before.safetensors")
            save_file(after, stage_dir / "after.safetensors")
            save_adapter(engine.module, stage_dir / "adapter", gathered_state_dict=gathered)
            lora_params = [p for n, p in engine.module.named_parameters() if ".lora_" in n]
            report = {"losses": losses, "lora_partitioned": all(hasattr(p, "ds_id") for p in lora_params)}
            (stage_dir / "report.json").write_text(json.dumps(report))
        engine.destroy()
        torch.distributed.barrier()



@pytest.fixture(scope="module")
def results(tmp_path_factory, run_ranks) -> Path:
    out_dir = tmp_path_factory.mktemp("lora_zero")
    run_ranks(__file__, str(out_dir), timeout=240)
    return out_dir


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_lora_trains_only_adapter_and_head_and_loads_in_transformers(results, stage):
    import peft
    import transformers
    from safetensors.torch import load_file

    stage_dir = results / f"zero{stage}"
    report = json.loads((stage_dir / "report.json").read_text())
    assert report["losses"][-1] < report["losses"][0] * 0.9, report["losses"]
    if stage == 3:
        assert report["lora_partitioned"], "deepspeed.initialize left peft's LoRA layers unpartitioned"

    before, after = load_file(stage_dir / "before.safetensors"), load_file(stage_dir / "after.safetensors")
    assert before.keys() == after.keys()
    trainable = [k for k in before if ".lora_" in k or ".modules_to_save." in k]
    assert {k.split(".")[-3] for k in trainable if ".lora_" in k} == {"lora_A", "lora_B"}
    for key in before:
        if key in trainable:
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"

    rank_logits = [torch.load(stage_dir / f"logits_rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(rank_logits[1], rank_logits[0], atol=0, rtol=0)

    hf_config = transformers.GPTJConfig(**TINY)
    hf_config._attn_implementation = "eager"
    hf = transformers.GPTJForCausalLM(hf_config)
    hf.load_state_dict(plain_hf_state(before), strict=True)
    hf_peft = peft.PeftModel.from_pretrained(hf, stage_dir / "adapter").eval()
    probe = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        torch.testing.assert_close(hf_peft(input_ids=probe).logits, rank_logits[0], atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
