"""Training step time with `trainer.compile=true` (the GPT-J blocks through torch.compile) against eager, in one run.

Two DeepSpeed engines (ZeRO-2, 1 rank, fp32 on CPU / bf16 on a GPU, torch's AdamW) hold the same weights; one has
its blocks compiled by `finetune.training.engine.initialize(..., compile=True)`, the path `trainer.compile=true`
takes. They are stepped alternately (A B A B ...) on the same batches, so that machine-load drift hits both
alike. Every step draws new lengths (causal LM rows of 32-256 tokens), packed into one row per micro batch as
`data.packing=auto` does, or padded to the longest row with `--padded`: the compiled engine must reuse its graphs
across them. Reported: the compile time (the compiled engine's first step; Dynamo + inductor + g++), median step
times after `--warmup` steps, the speedup with the spread of per-pair ratios, the same in process CPU seconds
(what other jobs on a shared machine move least), graphs compiled after warmup
(should be 0), and the largest relative loss difference between the two engines.

    python bench/compile_speed.py                      # width 1024, 4 layers, packed rows of ~512 tokens, CPU
    python bench/compile_speed.py --padded             # 4 padded rows per micro batch instead
    python bench/compile_speed.py --device cuda        # one GPU, bf16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rotary-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=50400)
    p.add_argument("--tokens", type=int, default=512, help="tokens per micro batch (packed row length, about)")
    p.add_argument("--padded", action="store_true", help="4 padded rows per micro batch instead of one packed row")
    p.add_argument("--steps", type=int, default=6, help="measured steps per engine")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per engine first (the first compiles)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def batches(args, vocab: int, count: int):
    import torch

    rng = random.Random(args.seed)
    for _ in range(count):
        lengths = []
        while sum(lengths) < args.tokens - 32:
            lengths.append(min(rng.randint(32, 256), args.tokens - sum(lengths)))
        if args.padded:
            lengths = lengths[:4] + [32] * max(0, 4 - len(lengths))
            width = max(lengths)
            generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
            ids = torch.randint(0, vocab, (len(lengths), width), generator=generator)
            mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
            yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        else:
            generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
            ids = torch.randint(0, vocab, (1, sum(lengths)), generator=generator)
            labels = ids.clone()
            starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
            labels[0, starts] = -100  # no prediction across examples, as DataCollator(packed=True) does
            yield {"input_ids": ids, "labels": labels,
                   "cu_seq_lens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    import deepspeed
    import torch

    from finetune.model.gptj import GPTJConfig
    from finetune.model.heads import GPTJForCausalLM
    from finetune.training.compile import CompileWatch
    from finetune.training.engine import initialize

    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    config = GPTJConfig(n_layer=args.layers, n_embd=args.width, n_head=args.heads, rotary_dim=args.rotary_dim,
                        vocab_size=args.vocab)
    torch.manual_seed(args.seed)
    reference = GPTJForCausalLM(config)
    precision = "bf16" if args.device == "cuda" else "fp32"
    ds_config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, precision: {"enabled": True},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    if precision == "fp32":
        del ds_config["fp32"]
    engines, watch = {}, CompileWatch()
    for name in ("eager", "compiled"):
        model = GPTJForCausalLM(config)
        model.load_state_dict(reference.state_dict())
        model.gradient_checkpointing_enable(args.checkpointing)
        engines[name] = initialize(model, ds_config, weight_decay=0.0, compile=name == "compiled")
    del reference

    times = {name: [] for name in engines}
    cpu_times = {name: [] for name in engines}  # process CPU seconds: less moved by other jobs on a shared machine
    losses = {name: [] for name in engines}
    compile_s = compiles_after_warmup = None
    for step, batch in enumerate(batches(args, config.vocab_size, args.warmup + args.steps)):
        if step == args.warmup:
            compiled_so_far = watch.compiles
        for name, engine in engines.items():
            batch_on = {k: v.to(engine.device) for k, v in batch.items()}
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = engine(**batch_on).loss
            engine.backward(loss)
            engine.step()
            losses[name].append(loss.item())
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            if name == "compiled" and step == 0:
                compile_s = watch.seconds
            if step >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)
        print(f"step {step}: " + ", ".join(f"{n} {times[n][-1] if step >= args.warmup else float('nan'):.3f} s"
                                          for n in engines), flush=True)
    compiles_after_warmup = watch.compiles - compiled_so_far
    ratios = sorted(e / c for e, c in zip(times["eager"], times["compiled"]))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "device": str(engines["eager"].device),
        "compile_s": round(compile_s, 2), "compiles_after_warmup": compiles_after_warmup,
        "eager_step_s": round(statistics.median(times["eager"]), 4),
        "compiled_step_s": round(statistics.median(times["compiled"]), 4),
        "speedup": round(statistics.median(times["eager"]) / statistics.median(times["compiled"]), 3),
        "speedup_spread": [round(ratios[0], 3), round(ratios[-1], 3)],
        "eager_step_cpu_s": round(statistics.median(cpu_times["eager"]), 4),
        "compiled_step_cpu_s": round(statistics.median(cpu_times["compiled"]), 4),
        "speedup_cpu_time": round(statistics.median(cpu_times["eager"]) / statistics.median(cpu_times["compiled"]), 3),
        "max_rel_loss_diff": max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"])),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
