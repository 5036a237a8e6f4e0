"""Fused vs unfused projections: forward + backward of one GPT-J block (`model.fused_projections`).

One GPTJBlock with q/k/v_proj and fc_in as four matrix products (unfused) and one with them as a single product of
width 3 * width + inner (fused), holding the same weights. Each repeat times `--iters` forward + backward passes of
each, the two alternated (A B, then B A in the next repeat) so that load drift on a shared machine hits both alike.
Reported: the median time per pass of each, and the fused/unfused ratio of every repeat (median, min, max).
A ratio below 1 means fused is faster.

    .venv/bin/python bench/fused_projections.py                      # width 1024, 16 heads, 512 tokens
    .venv/bin/python bench/fused_projections.py --width 4096 --heads 16 --rotary-dim 64 --tokens 256
    .venv/bin/python bench/fused_projections.py --device cuda --dtype bf16 --width 4096 --tokens 2048

The threads are torch's default unless --threads is given. The result is printed as JSON (and written to --out).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.model import GPTJConfig  # noqa: E402
from finetune.model.gptj import GPTJBlock, rotary_sin_cos  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rotary-dim", type=int, default=32)
    p.add_argument("--tokens", type=int, default=512, help="sequence length (one row)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--iters", type=int, default=3, help="forward + backward passes per timed block")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = GPTJConfig(n_embd=args.width, n_head=args.heads, rotary_dim=args.rotary_dim, n_layer=1)
    torch.manual_seed(0)
    unfused = GPTJBlock(config).to(device=device, dtype=dtype)
    fused = GPTJBlock(config, fused=True).to(device=device, dtype=dtype)
    fused.load_state_dict(unfused.state_dict(), strict=True)
    x = torch.randn(args.batch, args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(args.tokens, device=device).expand(args.batch, -1)
    sin, cos = (t.to(dtype) for t in rotary_sin_cos(positions, args.rotary_dim))
    upstream = torch.randn_like(x)

    def step(block: GPTJBlock) -> None:
        out, _ = block(x, sin, cos, None)
        out.backward(upstream)

    def timed(block: GPTJBlock) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step(block)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters

    for _ in range(args.warmup):
        step(unfused), step(fused)
    times = {"unfused": [], "fused": []}
    for repeat in range(args.repeats):
        order = ("unfused", "fused") if repeat % 2 == 0 else ("fused", "unfused")
        for name in order:
            times[name].append(timed(unfused if name == "unfused" else fused))
    ratios = [f / u for f, u in zip(times["fused"], times["unfused"])]
    result = {
        "width": args.width, "heads": args.heads, "inner": config.inner_dim, "tokens": args.tokens,
        "batch": args.batch, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "iters": args.iters,
        "unfused_s": statistics.median(times["unfused"]), "fused_s": statistics.median(times["fused"]),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
