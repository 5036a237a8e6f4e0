"""Does DeepSpeed ZeRO-3 partition a QLoRA base? One launch trains the same tiny 4-bit GPT-J + LoRA under ZeRO-2
and ZeRO-3 on 2 CPU ranks and prints both runs' losses.

The base's block linears are bitsandbytes NF4 with their packed bytes stored in the model's float dtype
(`quant_storage`, as transformers' `BitsAndBytesConfig(bnb_4bit_quant_storage=...)` does for ZeRO-3), so that
ZeRO-3 can flatten, partition and gather them like any other float parameter; the quantization constants stay on
the parameter object. The model is built whole on every rank (same seed) and `deepspeed.initialize` partitions it.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 bench/qlora_zero3_probe.py [--storage uint8|float32|bfloat16]
        [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.model.quantized import NF4Settings, quantize_linears  # noqa: E402,I001 -- before peft

TINY = dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=4)
STEPS = 4


def ds_config(stage: int, precision: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}


def train(stage: int, storage: torch.dtype, precision: str) -> dict:
    import deepspeed

    from finetune.model import GPTJConfig, build_model
    from finetune.training.lora import LoraConfig, apply_lora

    rank = torch.distributed.get_rank()
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model = quantize_linears(build_model(GPTJConfig(**TINY), task="clm"),
                             NF4Settings(compute_dtype=compute, quant_storage=storage))
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0,
                                         target_modules=["all-linear"]))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(stage, precision),
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    batch = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(rank))
    losses = []
    engine.train()
    for _ in range(STEPS):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    base = [p for n, p in engine.module.named_parameters() if n.endswith("base_layer.weight")]
    partitioned = [hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in base]
    engine.destroy()
    return {"losses": losses, "base_weights": len(base), "base_partitioned": sum(partitioned),
            "base_dtype": str(base[0].dtype)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--storage", default="float32", choices=["uint8", "float32", "bfloat16"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    from finetune.distributed import init_distributed

    init_distributed()
    storage = getattr(torch, args.storage)
    result = {}
    for stage in (2, 3):
        try:
            result[f"zero{stage}"] = train(stage, storage, args.precision)
        except Exception as error:  # the probe reports what fails, with its type
            result[f"zero{stage}"] = f"{type(error).__name__}: {error}"
            import traceback

            traceback.print_exc()
        torch.distributed.barrier()
    print(f"RANK{torch.distributed.get_rank()} " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
