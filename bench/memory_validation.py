"""Check the memory planner (finetune/planning/estimate.py) against what DeepSpeed really allocates.

CPU, 2 gloo ranks on DeepSpeed's CPU accelerator: after one training step, each rank's parameter
partitions, gradient partitions and optimizer states (fp32 master + exp_avg + exp_avg_sq), against the
estimate's lines for that configuration (tolerance 10%):

    python bench/memory_validation.py --device cpu --world 2 --sizes tiny,mid --stages 2,3 --precision fp32,bf16

CUDA, one process per GPU: the same, plus peak torch.cuda.max_memory_allocated() over a few steps
against the estimate's GPU peak without the fixed CUDA-context line (tolerance 15%):

    deepspeed --num_gpus 1 bench/memory_validation.py --device cuda --sizes gptj-4l --stages 2,3 \
        --precision bf16 --micro-batch 1 --seq-len 2048 --steps 3 --checkpointing

Prints a table (and --json PATH writes the rows); the exit status is 1 when a row is off by more than
the tolerance. Without RANK in the environment the script launches its own ranks (--world of them).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from finetune.planning.estimate import (
    CUDA_CONTEXT_BYTES,
    Cluster,
    ModelShape,
    Option,
    RunShape,
    estimate,
    zero_buffers_from_ds_config,
)

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": ModelShape(n_layer=2, n_embd=64, n_head=4),
    "mid": ModelShape(n_layer=4, n_embd=256, n_head=8),
    "gptj-4l": ModelShape(n_layer=4, n_embd=4096, n_head=16),
    "gptj-8l": ModelShape(n_layer=8, n_embd=4096, n_head=16),
    "gptj-6b": ModelShape(n_layer=28, n_embd=4096, n_head=16),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(shape: ModelShape, *, dtype: torch.dtype, checkpointing: bool, impl: str) -> torch.nn.Module:
    """GPT-J with an LM head: transformers' (--model hf) or this project's (--model project)."""
    fields = dict(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head, vocab_size=shape.vocab_size,
                  rotary_dim=min(64, shape.n_embd // shape.n_head))
    if impl == "project":
        from finetune.model import GPTJConfig
        from finetune.model import build_model as build

        model = build(GPTJConfig(**fields), task="clm")
        model.transformer.gradient_checkpointing = checkpointing
    else:
        import transformers

        model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**fields, attn_implementation="sdpa"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(dtype)


def ds_config(stage: int, precision: str, args: argparse.Namespace) -> dict:
    # The project's bucket settings on GPUs; small buckets on the CPU, where they would only cost RAM.
    zero = {"stage": stage}
    project = ROOT / "ds_configs" / f"zero{stage}.json"
    if args.device == "cuda" and project.is_file():
        zero = {**json.loads(project.read_text())["zero_optimization"], "stage": stage}
    elif args.device == "cpu":
        zero.update(reduce_bucket_size=5_000_000, allgather_bucket_size=5_000_000)
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": optimizer_params(args)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def optimizer_params(args: argparse.Namespace) -> dict:
    # CUDA: DeepSpeed's FusedAdam as in training (a JIT-built op: needs nvcc), or torch's fused AdamW with
    # --torch-adam; both step without full-size temporaries. CPU: torch's AdamW (FusedAdam is CUDA-only).
    if args.device == "cpu":
        return {"lr": 1e-4, "torch_adam": True}
    return {"lr": 1e-4, "torch_adam": True, "fused": True} if args.torch_adam else {"lr": 1e-4}


def _nbytes(tensors) -> int:
    # Whole storages, each once: DeepSpeed hands out views into flat buffers that hold more than the views
    # (a ZeRO-2 gradient partition keeps the full gradient of a parameter straddling its edge).
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def measure(engine, stage: int) -> dict[str, int]:
    """Bytes this rank holds for model states, read from DeepSpeed's ZeRO optimizer."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    if stage == 3:
        partitions = _nbytes(p.ds_tensor for p in params)
        persistent = _nbytes(p.data for p in params if getattr(p, "ds_persist", False))
        masters = opt.fp32_partitioned_groups_flat
    else:
        partitions, persistent = _nbytes(params), 0
        masters = opt.single_partition_of_fp32_groups
    moments = _nbytes(opt.optimizer.state[m][k] for m in masters for k in ("exp_avg", "exp_avg_sq") if m in opt.optimizer.state)
    return {"parameters": partitions, "persistent small parameters": persistent,
            "optimizer states": _nbytes(masters) + moments}


def gradient_bytes(engine, stage: int) -> int:
    """Bytes of this rank's gradient partition after backward (before the step frees it)."""
    opt = engine.optimizer
    if stage == 3:
        return _nbytes([opt.grad_partitions_flat_buffer])
    return _nbytes(g for group in opt.averaged_gradients.values() for g in group)


def run_case(size: str, stage: int, precision: str, args: argparse.Namespace) -> list[dict]:
    import deepspeed
    import torch.distributed as dist

    shape, world = SIZES[size], dist.get_world_size()
    config = ds_config(stage, precision, args)
    torch.manual_seed(0)
    model = build_model(shape, dtype=DTYPES[precision], checkpointing=args.checkpointing, impl=args.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = torch.randint(0, shape.vocab_size, (args.micro_batch, args.seq_len), device=engine.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    grads = 0
    for step in range(args.steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        if step == 0:
            grads = gradient_bytes(engine, stage)
        engine.step()
    measured = {**measure(engine, stage), "gradients": grads}
    if args.device == "cuda":
        measured["peak (max_memory_allocated)"] = torch.cuda.max_memory_allocated()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, measured)
    engine.destroy()
    del engine, model
    gc.collect()

    run = RunShape(micro_batch_size=args.micro_batch, seq_len=args.seq_len, precision=precision,
                   activation_checkpointing=args.checkpointing)
    est = estimate(shape, run, Cluster(gpus_per_node=world), Option(stage=stage), buffers=zero_buffers_from_ds_config(config))
    line = lambda *names: sum(i.bytes for i in est.items if i.device == "gpu" and i.name in names)
    expected = {
        "parameters": line("parameters"),
        "persistent small parameters": line("persistent small parameters"),
        "gradients": line("gradients"),
        "optimizer states": line("fp32 master weights", "Adam moments (fp32 exp_avg, exp_avg_sq)"),
        "peak (max_memory_allocated)": est.gpu_bytes - CUDA_CONTEXT_BYTES,
    }
    rows = []
    for component, value in measured.items():
        worst = max(r[component] for r in per_rank)
        if worst == 0 and expected[component] == 0:
            continue
        rows.append({"size": size, "stage": stage, "precision": precision, "world": world, "component": component,
                     "measured_bytes": worst, "estimate_bytes": expected[component],
                     "error": expected[component] / worst - 1 if worst else float("inf")})
    return rows


def worker(args: argparse.Namespace) -> int:
    import deepspeed
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="gloo" if args.device == "cpu" else "nccl")
    rows = [row for precision in args.precision for size in args.sizes for stage in args.stages
            for row in run_case(size, stage, precision, args)]
    if dist.get_rank() != 0:
        return 0
    tolerance = args.tolerance if args.tolerance is not None else (0.10 if args.device == "cpu" else 0.15)
    print(table(rows, tolerance))
    if args.json:
        Path(args.json).write_text(json.dumps({"tolerance": tolerance, "rows": rows}, indent=2))
    return int(any(abs(r["error"]) > tolerance for r in rows))


def table(rows: list[dict], tolerance: float) -> str:
    lines = ["| size | stage | precision | ranks | component | measured MiB | estimate MiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if abs(r["error"]) <= tolerance else " (over)"
        lines.append(f"| {r['size']} | {r['stage']} | {r['precision']} | {r['world']} | {r['component']} | "
                     f"{r['measured_bytes'] / 2**20:.2f} | {r['estimate_bytes'] / 2**20:.2f} | {r['error']:+.1%}{flag} |")
    return "\n".join(lines)


def launch(argv: list[str], world: int, device: str) -> int:
    """Start `world` ranks of this script (the deepspeed launcher's job, without its CPU core binding)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    return max(p.wait() for p in procs)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--world", type=int, default=2, help="ranks to launch when not started by a launcher")
    p.add_argument("--sizes", default="tiny,mid", type=lambda s: s.split(","), help=f"comma list of {list(SIZES)}")
    p.add_argument("--stages", default="2,3", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--precision", default="fp32", type=lambda s: s.split(","), help=f"comma list of {list(DTYPES)}")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--model", choices=["hf", "project"], default="hf", help="transformers' GPT-J or finetune.model's")
    p.add_argument("--torch-adam", action="store_true", help="cuda: torch's fused AdamW instead of DeepSpeed's FusedAdam")
    p.add_argument("--tolerance", type=float, default=None, help="default 0.10 on cpu, 0.15 on cuda")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes if s not in SIZES] + [s for s in args.precision if s not in DTYPES]
    if unknown:
        p.error(f"unknown sizes or precisions {unknown}; choose from {list(SIZES)} and {list(DTYPES)}")
    return args


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if "RANK" in os.environ:
        sys.exit(worker(args))
    world = args.world if args.device == "cpu" else int(os.environ.get("WORLD_SIZE", 1))
    sys.exit(launch(sys.argv[1:], world, args.device))
