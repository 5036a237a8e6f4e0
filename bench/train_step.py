"""Training step time: this project's GPT-J (`finetune.model.build_model`) vs transformers' `GPTJForCausalLM`.

Same config, same weights (ours loads the HF model's state_dict; the names are identical), same DeepSpeed
config, same batch, in one run. Both engines of a stage live side by side and are stepped alternately
(A B A B ...), one step per measured block, so machine-load drift hits both equally; the table gives the
median step time over `--steps` measured steps after `--warmup` steps of each, on rank 0.

Launch: run it as a plain script; it re-executes itself as the rank processes.
  * `--device cpu` (default): two rank processes started directly (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*),
    DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1 each -- the same way tests/integration/test_lora_zero.py
    launches DeepSpeed on CPU; fp32; torch's AdamW (`torch_adam: true`, no offload).
  * `--device cuda`: `deepspeed --num_gpus N bench/train_step.py --worker ...`; bf16; DeepSpeed's FusedAdam,
    or CPU Adam with `--offload` (ZeRO optimizer offload to CPU); `--lora` wraps ours with
    `finetune.training.lora.apply_lora` and HF's with the same peft LoraConfig (q_proj, v_proj; lm_head frozen).

    python bench/train_step.py                                   # CPU, 2 ranks, ZeRO-2 and ZeRO-3
    python bench/train_step.py --steps 6 --warmup 2 --stages 3   # shorter
    python bench/train_step.py --device cuda --num-gpus 1 --stages 3 --offload   # GPU (not yet run)

Attention: transformers' GPT-J is run with its "eager" attention (it has no SDPA path); ours with its own.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

# CPU defaults: a small GPT-J that two loaded CPU cores step in seconds (full vocab: the head matters).
CPU_DEFAULTS = dict(layers=4, width=512, heads=8, rotary_dim=32, vocab=50400, seq_len=256, micro_batch=2)
# CUDA defaults: GPT-J 6B layer shapes (width 4096, 16 heads, rotary 64, vocab 50400) at seq 2048, but 4 of
# the 28 layers so that both engines (weights + fp32 Adam states, ~1.2B params each) fit one 80 GB GPU side
# by side. The full 6B (--layers 28) needs --offload or --lora to fit, twice over.
CUDA_DEFAULTS = dict(layers=4, width=4096, heads=16, rotary_dim=64, vocab=50400, seq_len=2048, micro_batch=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--stages", default="2,3", help="comma-separated ZeRO stages")
    p.add_argument("--layers", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--rotary-dim", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--steps", type=int, default=10, help="measured steps per model")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per model first")
    p.add_argument("--ranks", type=int, default=2, help="CPU rank processes")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs for --device cuda")
    p.add_argument("--offload", action="store_true", help="ZeRO optimizer offload to CPU (cuda)")
    p.add_argument("--lora", action="store_true", help="LoRA r=8 on q_proj,v_proj for both models")
    p.add_argument("--out", help="write rank 0's results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    defaults = CUDA_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.stage_list = [int(s) for s in args.stages.split(",") if s]
    return args


def ds_config(args, stage: int) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    zero: dict = {"stage": stage}
    optimizer = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}
    if args.device == "cpu":
        optimizer["params"]["torch_adam"] = True  # as finetune.training.engine does on CPU without offload
    elif args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch * world,
        "optimizer": optimizer,
        "zero_optimization": zero,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.device == "cuda":
        config["bf16"] = {"enabled": True}
    return config


def build_pair(args):
    """(ours, transformers') with identical weights, fp32, on the host."""
    import torch
    import transformers

    from finetune.model import GPTJConfig, build_model

    shape = dict(vocab_size=args.vocab, n_positions=max(args.seq_len, 2048), n_embd=args.width,
                 n_layer=args.layers, n_head=args.heads, rotary_dim=args.rotary_dim)
    torch.manual_seed(0)  # same weights on every rank (DeepSpeed broadcasts rank 0's anyway)
    hf_config = transformers.GPTJConfig(**shape, use_cache=False)
    hf_config._attn_implementation = "eager"
    hf = transformers.GPTJForCausalLM(hf_config)
    ours = build_model(GPTJConfig(**shape, use_cache=False), task="clm", init=False)
    ours.load_state_dict(hf.state_dict(), strict=True)
    if args.lora:
        import peft

        from finetune.config import LoraConfig
        from finetune.training.lora import apply_lora

        cfg = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
        ours = apply_lora(ours, cfg)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                     target_modules=["q_proj", "v_proj"]))  # lm_head frozen, as ours
    return ours, hf


def worker(args) -> None:
    import deepspeed
    import torch

    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    tokens_per_step = args.micro_batch * args.seq_len * world  # global tokens per optimizer step

    results = []
    for stage in args.stage_list:
        ours, hf = build_pair(args)
        engines = {}
        for name, model in (("ours", ours), ("transformers", hf)):
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=ds_config(args, stage))
            engine.train()
            engines[name] = engine
        del ours, hf
        device = engines["ours"].device
        gen = torch.Generator().manual_seed(1000 + rank)
        batch = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=gen).to(device)

        times = {name: [] for name in engines}
        losses = {name: [] for name in engines}
        for i in range(args.warmup + args.steps):
            # A B, then B A: alternating which goes first too, so neither always follows the other.
            order = list(engines) if i % 2 == 0 else list(engines)[::-1]
            for name in order:
                dt, loss = timed_step(engines[name], {"input_ids": batch, "labels": batch}, sync)
                losses[name].append(loss)
                if i >= args.warmup:
                    times[name].append(dt)
        row = {"stage": stage, "tokens_per_step": tokens_per_step}
        for name in engines:
            med = statistics.median(times[name])
            row[name] = {"s_per_step": med, "tokens_per_s": tokens_per_step / med, "times": times[name],
                         "loss_first": losses[name][0], "loss_last": losses[name][-1]}
        row["ratio"] = row["ours"]["s_per_step"] / row["transformers"]["s_per_step"]
        results.append(row)
        if rank == 0:
            print(f"[bench] ZeRO-{stage}: ours {row['ours']['s_per_step']:.3f} s/step, transformers "
                  f"{row['transformers']['s_per_step']:.3f} s/step, ratio {row['ratio']:.3f}; first losses "
                  f"{row['ours']['loss_first']:.4f} / {row['transformers']['loss_first']:.4f}", flush=True)
        for engine in engines.values():
            engine.destroy()
        del engines
        torch.distributed.barrier()

    if rank == 0:
        print(table(args, results, world), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                           if k not in ("worker", "local_rank")},
                                                  "world_size": world, "results": results}, indent=1))


def timed_step(engine, inputs: dict, sync: Callable[[], None]) -> tuple[float, float]:
    """One optimizer step of a DeepSpeed engine on `inputs` (the model's keyword arguments): (seconds, loss).

    `sync` waits for the device (torch.cuda.synchronize; a no-op on CPU) on both ends, so the time is the step's.
    Shared with bench/gpu_cases.py.
    """
    sync()
    t0 = time.perf_counter()
    loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    sync()
    return time.perf_counter() - t0, loss.item()


def table(args, results, world) -> str:
    lines = [
        f"{args.layers} layers, width {args.width}, {args.heads} heads, rotary {args.rotary_dim}, vocab {args.vocab}, "
        f"seq {args.seq_len}, micro batch {args.micro_batch} x {world} ranks, "
        f"{'bf16' if args.device == 'cuda' else 'fp32'}{', LoRA' if args.lora else ''}"
        f"{', optimizer offload' if args.offload else ''}; median of {args.steps} steps after {args.warmup} warmup",
        "",
        "| ZeRO | ours s/step | transformers s/step | ratio (ours/transformers) | ours tokens/s | transformers tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['stage']} | {r['ours']['s_per_step']:.3f} | {r['transformers']['s_per_step']:.3f} | "
                     f"{r['ratio']:.3f} | {r['ours']['tokens_per_s']:.0f} | {r['transformers']['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], args) -> int:
    script = str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.device == "cuda":
        cmd = ["deepspeed", "--num_gpus", str(args.num_gpus), script, "--worker", *argv]
        return subprocess.call(cmd, env=env)
    env.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(args.ranks), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    logs = [None] + [tempfile.TemporaryFile() for _ in range(1, args.ranks)]  # rank 0 prints; others kept
    procs = [subprocess.Popen([sys.executable, script, "--worker", *argv],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=logs[r], stderr=subprocess.STDOUT if r else None)
             for r in range(args.ranks)]
    codes = [p.wait() for p in procs]
    for r, code in enumerate(codes):
        if code and r:
            logs[r].seek(0)
            sys.stderr.write(f"rank {r} failed ({code}):\n{logs[r].read().decode()[-4000:]}\n")
    return max(codes)


if __name__ == "__main__":
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        sys.exit(launch([a for a in argv if a != "--worker"], args))
