"""Peak host memory of causal-LM training steps: the chunked loss vs full logits vs transformers' GPT-J.

Each case runs in a fresh process: build the model (tiny width, GPT-J's 50400-token vocabulary), wrap it in a
DeepSpeed ZeRO-0 engine (one CPU rank, torch AdamW; what `deepspeed=none` runs), then train `--steps` steps on one
batch of `--batch` x `--seq-len` random tokens (labels = input_ids). The process's peak RSS (ru_maxrss) is read at
the end, and the RSS just before the first step is the baseline: "step peak" = peak - baseline is what the steps
themselves add (logits, activations, gradients, optimizer states created at the first step).

Cases: `transformers` (GPTJForCausalLM, eager attention, its own loss: full fp32 logits), `ours_full`
(finetune.model with model.chunked_loss=false: full fp32 logits), `ours_chunked` (the default chunk for the
vocabulary: 512 tokens), and `ours_chunked_<N>` for each --chunks N.

    python bench/chunked_loss_memory.py                       # batch 2 x 2048, 3 steps
    python bench/chunked_loss_memory.py --chunks 128,2048 --json memory.json

Also usable on a GPU (`--device cuda`): peaks then come from torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=50400, n_positions=2048, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)  # model=tiny


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chunks", default="", help="extra chunk sizes to measure, comma-separated")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)  # run one case in this process
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(args) -> dict:
    import deepspeed
    import torch

    torch.manual_seed(0)
    if args.case == "transformers":
        import transformers

        config = transformers.GPTJConfig(**SHAPE, use_cache=False)
        config._attn_implementation = "eager"
        model = transformers.GPTJForCausalLM(config)
    else:
        from finetune.model import GPTJConfig, build_model, default_chunk_tokens

        chunk = None
        if args.case.startswith("ours_chunked"):
            chunk = int(args.case.rsplit("_", 1)[1]) if args.case.count("_") == 2 else default_chunk_tokens(50400)
        model = build_model(GPTJConfig(**SHAPE), task="clm", loss_chunk_tokens=chunk)
    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                 "train_batch_size": args.batch, "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
                 "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batch = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq_len),
                          generator=torch.Generator().manual_seed(1)).to(engine.device)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes()
    losses = []
    for _ in range(args.steps):
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": args.case, "baseline": baseline, "peak": peak, "step_peak": peak - baseline, "losses": losses}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args) -> None:
    cases = ["transformers", "ours_full", "ours_chunked"] + [f"ours_chunked_{c}" for c in args.chunks.split(",") if c]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    rows = []
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--case", case, "--batch", str(args.batch), "--seq-len",
                              str(args.seq_len), "--steps", str(args.steps), "--device", args.device],
                             env={**env, "MASTER_PORT": str(free_port())}, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            sys.exit(f"case {case} failed ({out.returncode}):\n{out.stderr[-4000:]}")
        rows.append(json.loads(lines[-1]))
        print(f"[bench] {case}: peak {rows[-1]['peak'] / 2**30:.2f} GiB, step peak "
              f"{rows[-1]['step_peak'] / 2**30:.2f} GiB", flush=True)
    reference = rows[0]
    what = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n{args.steps} clm steps, batch {args.batch} x {args.seq_len} tokens, {SHAPE['n_layer']} layers x width "
          f"{SHAPE['n_embd']}, vocab {SHAPE['vocab_size']}, fp32, DeepSpeed ZeRO-0, {args.device}; {what}\n")
    print("| case | peak GiB | step peak GiB (above the pre-step baseline) | peak / transformers' | "
          "step peak / transformers' | first loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['peak'] / 2**30:.2f} | {r['step_peak'] / 2**30:.2f} | "
              f"{r['peak'] / reference['peak']:.2f} | {r['step_peak'] / reference['step_peak']:.2f} | "
              f"{r['losses'][0]:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "shape": SHAPE, "rows": rows}, indent=1))


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.case:
        print(json.dumps(run_case(arguments)), flush=True)
    else:
        main(arguments)
