"""QLoRA vs LoRA at GPT-J width: peak host memory, bytes of the base's linear weights, and training step time.

Writes a random GPT-J-shaped checkpoint (width 4096, vocabulary 50400, `--layers` blocks) as 2 GB safetensors
shards, then, in a fresh process per cell, builds the training model exactly as the trainer does
(`finetune.runner.build_training_model` + `apply_lora` from the composed config, model.path = that checkpoint,
model.dtype = trainer.precision = bf16) and trains `--steps` steps with torch's AdamW on the adapters
(micro batch 1 x `--seq-len` tokens, causal LM). lora=lora loads the 16-bit base; lora=qlora quantizes each linear
weight to 4-bit NF4 as it is read. Both use the same adapters (r=16 on all six linears), so only the base differs.

Reported per cell: peak RSS above the post-import baseline (loading included; QLoRA's load peak on its own shows
whether loading or the step sets it), the bytes of the block linears'
weights (16-bit vs packed 4-bit + quantization constants), and the mean time of the steps after the first.
Goals (issue 23): the base linears <= 0.3x their 16-bit bytes, and QLoRA's peak <= half of LoRA's at 8 layers.

    python bench/qlora_memory.py --layers 4 8        # GPT-J width; ~4 GB of checkpoint per 8 layers in /tmp
    python bench/qlora_memory.py --layers 2 --out -  # smaller, print only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_memory import _status_bytes, write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ADAPTER = ["lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.target_modules=[all-linear]"]


def measure(variant: str, model_dir: str, seq_len: int, steps: int) -> dict:
    from hydra import compose, initialize_config_dir

    from finetune.config import parse_config
    from finetune.distributed import DistInfo
    from finetune.model.quantized import _bnb, linear_weight_bytes
    from finetune.runner import build_training_model, model_config
    from finetune.training.lora import apply_lora

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "task=clm", f"lora={variant}", *ADAPTER, f"model.path={model_dir}", "model.dtype=bf16",
            "trainer.precision=bf16", "model.gradient_checkpointing=true", f"data.max_seq_len={seq_len}"])
    run = parse_config(cfg)
    config = model_config(run, {})
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len))
    _bnb()  # both variants import bitsandbytes (peft does); its libraries load before the baseline
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the imports are left out
    base = _status_bytes("VmRSS:")
    start = time.perf_counter()
    model = apply_lora(build_training_model(run, config, ds_config={}, info=DistInfo(0, 1, 0)), run.lora)
    load_seconds = time.perf_counter() - start
    load_peak = _status_bytes("VmHWM:") - base
    loaded = _status_bytes("VmRSS:") - base  # what the model holds once built, transients freed
    if variant == "qlora":
        linear = linear_weight_bytes(model)
    else:
        numel = sum(m.weight.numel() for n, m in model.named_modules()
                    if n.endswith("base_layer") and isinstance(m, torch.nn.Linear))
        linear = {"quantized": None, "bf16": 2 * numel}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": _status_bytes("VmHWM:") - base, "load_peak_bytes": load_peak, "loaded_bytes": loaded,
            "load_seconds": load_seconds,
            "linear_bytes_16bit": linear["bf16"], "linear_bytes_stored": linear["quantized"] or linear["bf16"],
            "step_seconds": sum(times[1:]) / max(1, len(times) - 1), "loss": float(loss)}


def run_isolated(variant: str, model_dir: Path, seq_len: int, steps: int) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, __file__, "--measure", variant, str(model_dir), str(seq_len), str(steps)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50400)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="docs/bench_qlora_memory.md", help="markdown file for the table; - to skip")
    parser.add_argument("--measure", nargs=4, metavar=("VARIANT", "DIR", "SEQ_LEN", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        variant, model_dir, seq_len, steps = args.measure
        print(json.dumps(measure(variant, model_dir, int(seq_len), int(steps))))
        return

    from finetune.model.quantized import _bnb  # noqa: I001 -- before peft, which imports bitsandbytes

    import peft

    bitsandbytes = _bnb()

    command = "python bench/qlora_memory.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="qlora-memory-") as tmp:
            model_dir = Path(tmp) / "ckpt"
            params = write_checkpoint(model_dir, layers=layers, width=args.width, vocab=args.vocab,
                                      dtype=torch.bfloat16)
            lora = run_isolated("lora", model_dir, args.seq_len, args.steps)
            qlora = run_isolated("qlora", model_dir, args.seq_len, args.steps)
        rows.append((layers, params, lora, qlora))
        print(f"{layers} layers: lora {lora}\n  qlora {qlora}", flush=True)
    load_after = os.getloadavg()

    gb = 1e9
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        f"GPT-J-width checkpoints (width {args.width}, vocab {args.vocab}), random bf16 weights in 2 GB safetensors "
        f"shards; one training step = micro batch 1 x {args.seq_len} tokens, causal LM, activation checkpointing, "
        f"torch AdamW on the adapters (r=16 on all six linears), bf16, {args.steps} steps (time: mean of all but "
        "the first). Peak = peak RSS above the post-import baseline, loading included; fresh process per cell.",
        "",
        "| layers | params (B) | base linears lora (GB) | qlora (GB) | ratio (goal <= 0.3) | peak lora (GB) "
        "| peak qlora (GB) | ratio (goal <= 0.5 at 8) | qlora load peak (GB) | load lora s | load qlora s "
        "| step lora s | step qlora s | step time qlora / lora |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layers, params, lora, qlora in rows:
        lines.append(
            f"| {layers} | {params / 1e9:.2f} | {lora['linear_bytes_stored'] / gb:.2f} "
            f"| {qlora['linear_bytes_stored'] / gb:.2f} "
            f"| {qlora['linear_bytes_stored'] / lora['linear_bytes_stored']:.3f}x "
            f"| {lora['peak_bytes'] / gb:.2f} | {qlora['peak_bytes'] / gb:.2f} "
            f"| {qlora['peak_bytes'] / lora['peak_bytes']:.3f}x | {qlora['load_peak_bytes'] / gb:.2f} "
            f"| {lora['load_seconds']:.1f} "
            f"| {qlora['load_seconds']:.1f} | {lora['step_seconds']:.2f} | {qlora['step_seconds']:.2f} "
            f"| {qlora['step_seconds'] / lora['step_seconds']:.2f}x |")
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {ram_gib:.0f} GiB RAM (shared), no GPU; load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after; torch {torch.__version__}, bitsandbytes "
        f"{bitsandbytes.__version__}, peft {peft.__version__}, Python {platform.python_version()}.",
        f"Command: `{command.strip()}`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# QLoRA vs LoRA: host memory and step time\n\n" + table + "\n")


if __name__ == "__main__":
    main()
