"""Where one training step's time goes beyond the model's matrix products: torch.profiler over real steps of the
product (finetune.runner.run: DeepSpeed engine, the one loop, the task's collator and loss), one CPU rank.

Default: width 1024 (4 layers, 16 heads, rotary 64; GPT-J's vocabulary), fp32, ZeRO-2, packed rows, the bundled
data of the task. The script runs `--warmup` steps, profiles the next `--steps`, and prints the operators by self
CPU time (the time inside each one, not its callees), with the matrix-product share, and the host syncs the
profiler saw (aten::item / aten::_local_scalar_dense: a device->host read; on a GPU each one waits for the queue).

    python bench/step_profile.py --task qa                  # width 1024, qa, packed
    python bench/step_profile.py --task clm --steps 3       # clm (instruction data as bench/peer.py)
    python bench/step_profile.py --task qa --width 64 --layers 2 --heads 4 --rotary-dim 16   # tiny: overheads
    python bench/step_profile.py --task qa --glibc-default  # before the loop kept freed host memory

`--trace FILE` also writes a Chrome trace (chrome://tracing, https://ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# operators that are the model's arithmetic proper (matrix products and attention); everything else is overhead
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
          "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("qa", "clm", "cls"), default="qa")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--rotary-dim", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--packing", default="auto", help="data.packing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="write a Chrome trace here")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's malloc as it is (the loop's keep_freed_memory off): the profile before that fix")
    p.add_argument("--shapes", action="store_true", help="group the operators by input shapes too")
    p.add_argument("--json", help="write the table here")
    return p.parse_args(argv)


def instruction_file(directory: Path) -> str:
    """The bundled clm lines as prompt/response pairs (as bench/peer.py and bench/packing.py)."""
    rows = []
    for line in (ROOT / "finetune/assets/data/clm/train.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        prompt, response = text.split(":", 1) if ":" in text else ("Describe", " " + text)
        rows.append({"prompt": prompt + ":", "response": response})
    path = directory / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def overrides(args, directory: Path) -> list[str]:
    out = [f"task={args.task}", "model=tiny", f"+model.overrides.n_embd={args.width}",
           f"+model.overrides.n_layer={args.layers}", f"+model.overrides.n_head={args.heads}",
           f"+model.overrides.rotary_dim={args.rotary_dim}", "deepspeed=zero2", "deepspeed.check_memory=false",
           "trainer.precision=fp32", "logger=none", f"trainer.max_steps={args.warmup + args.steps}",
           f"trainer.micro_batch_size={args.micro_batch}", f"trainer.grad_accum_steps={args.grad_accum}",
           "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0",
           f"++data.packing={args.packing}", f"++data.cache_dir={directory / 'cache'}"]
    if args.task == "clm":
        file = instruction_file(directory)
        out += [f"++data.train_file={file}", f"++data.validation_file={file}", "++data.prompt_column=prompt",
                "++data.response_column=response"]
    return out


def profile(args) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from finetune import runner
    from finetune.training import loop

    started, seconds = [], []
    profiler = torch_profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes)
    meter_start, meter_end = loop._Meter.start, loop._Meter.end_step

    def start(meter):  # the step begins: collation, transfer, forward/backward per micro batch, optimizer step
        started.append(time.perf_counter())
        if len(started) == args.warmup + 1:
            profiler.start()
        meter_start(meter)

    def end_step(meter, *a):
        meter_end(meter, *a)
        if len(started) > args.warmup:
            seconds.append(time.perf_counter() - started[-1])
        if len(started) == args.warmup + args.steps:
            profiler.stop()

    loop._Meter.start, loop._Meter.end_step = start, end_step
    if args.glibc_default:
        loop.keep_freed_memory = lambda: False
    with tempfile.TemporaryDirectory() as tmp:
        runner.register_resolvers()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            runner.run(compose("train", overrides=overrides(args, Path(tmp))), run_dir=Path(tmp) / "run")
    if args.trace:
        profiler.export_chrome_trace(args.trace)
    events = profiler.key_averages(group_by_input_shape=args.shapes)
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(({"op": e.key + (f" {e.input_shapes}" if args.shapes else ""), "calls": e.count / args.steps, "self_ms": e.self_cpu_time_total / 1e3 / args.steps,
                    "share": e.self_cpu_time_total / total} for e in events), key=lambda r: -r["self_ms"])
    syncs = sum(r["calls"] for r in rows if r["op"].split(" ")[0] == "aten::_local_scalar_dense")
    matmul = sum(r["share"] for r in rows if r["op"].split(" ")[0] in MATMUL)
    return {"args": vars(args), "step_s": seconds, "profiled_ms_per_step": total / 1e3 / args.steps,
            "matmul_share": matmul, "host_syncs_per_step": syncs, "torch_version": torch.__version__, "top": rows}


def main(args) -> None:
    os.environ.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    result = profile(args)
    print(f"\n{args.task}, width {args.width}, {args.layers} layers, micro batch {args.micro_batch} x "
          f"{args.grad_accum}, packing={args.packing}, fp32, ZeRO-2, 1 CPU rank; {args.steps} profiled steps: "
          f"{result['profiled_ms_per_step']:.0f} ms of operator self time per step (wall "
          f"{', '.join(f'{s:.2f}' for s in result['step_s'])} s); matrix products and attention "
          f"{result['matmul_share']:.1%}; host syncs (aten::_local_scalar_dense) {result['host_syncs_per_step']:.0f} "
          f"per step\n")
    print("| operator (self CPU time) | calls / step | ms / step | share |")
    print("|---|---|---|---|")
    for r in result["top"][:args.top]:
        print(f"| {r['op']} | {r['calls']:.0f} | {r['self_ms']:.1f} | {r['share']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(parse_args())
