"""What layout invariance costs (#15): the global target count per step, and the universal checkpoint conversion.

1. `count`: the step time of the real training loop (`finetune.runner.run`, instruction clm data with responses
   of 1 to 60 words) with the loss normalised over the global batch (the default: the targets of every micro
   batch counted before the backward passes, one all-reduce) against `trainer.loss_normalization=micro_batch`
   (each micro batch's own mean, DeepSpeed's averaging: the behaviour before #15) in the same process group.
   The two modes alternate run by run (`--repeats` pairs); the table gives the median `step_time` of each
   (metrics.jsonl, steps after `--warmup`) and their ratio.
2. `convert`: for each model, one step of real training writes a checkpoint (ZeRO-`--stage` on `--ranks` ranks),
   then `finetune.training.universal.convert_to_universal` (DeepSpeed's ds_to_universal in a child process,
   committed atomically) converts it; the table gives checkpoint size, seconds and GiB/s. Models: `tiny` and
   GPT-J width (4096, 16 heads, rotary 64) with `--gptj-layers` layers and vocabulary `--gptj-vocab`.

    python bench/layout_invariance.py                                 # CPU, 2 ranks: both parts
    python bench/layout_invariance.py --part count --repeats 5 --steps 12
    python bench/layout_invariance.py --part convert --gptj-layers 1,2 --gptj-vocab 1024
    python bench/layout_invariance.py --device cuda --ranks 8         # GPU (deepspeed launcher)

On CPU the ranks are plain processes (gloo, OMP_NUM_THREADS=1 each) and the models fp32; on CUDA bf16.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPTJ_WIDTH = {"n_embd": 4096, "n_head": 16, "rotary_dim": 64}
# The count benchmark's model: large enough that a step is not all overhead on CPU; GPT-J's shape on CUDA.
COUNT_MODEL = {"cpu": {"n_embd": 256, "n_head": 8, "rotary_dim": 16, "n_layer": 4},
               "cuda": {**GPTJ_WIDTH, "n_layer": 4}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("count", "convert", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage of the checkpoints to convert")
    p.add_argument("--repeats", type=int, default=3, help="count: runs per mode, alternating")
    p.add_argument("--steps", type=int, default=10, help="count: optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="count: steps of each run left out of the median")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--accum", type=int, default=4, help="count: accumulation steps (the look-ahead spans them)")
    p.add_argument("--gptj-layers", default="1", help="convert: comma-separated layer counts at GPT-J width")
    p.add_argument("--gptj-vocab", type=int, default=50400, help="convert: vocabulary of the GPT-J-width models")
    p.add_argument("--workdir", help="keep run dirs and checkpoints here (default: a temporary dir, removed)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def instruction_rows(path: Path, rows: int = 512) -> None:
    """The tests' instruction data (responses of 1 to 60 words), more rows."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from train_worker import instruction_data

    instruction_data(path, rows=rows)


def overrides_for(model: dict, *, device: str, data: Path) -> list[str]:
    shape = [f"+model.overrides.{key}={value}" for key, value in model.items()]
    return ["logger=none", "task=clm", "model=tiny", *shape,
            f"data.train_file={data}", f"data.validation_file={data}", "data.prompt_column=prompt",
            "data.response_column=response", "data.packing=false", "data.max_seq_len=128",
            f"trainer.precision={'bf16' if device == 'cuda' else 'fp32'}", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0",
            "deepspeed.check_memory=false", "scheduler=constant", "scheduler.warmup_steps=1"]


def worker(jobs_file: str) -> None:
    """One rank: every job of jobs_file through finetune.runner.run, in one process group."""
    from hydra import compose, initialize_config_dir

    from finetune import runner

    jobs = json.loads(Path(jobs_file).read_text())
    runner.register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for job in jobs:
            runner.run(compose("train", overrides=job["overrides"]), run_dir=Path(job["run_dir"]))


def launch(args, jobs: list[dict], workdir: Path) -> None:
    jobs_file = workdir / f"jobs_{time.time_ns()}.json"
    jobs_file.write_text(json.dumps(jobs))
    script = [str(Path(__file__).resolve()), "--worker", str(jobs_file)]
    if args.device == "cuda":
        subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), *script],
                       check=True)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(args.ranks), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *script], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE if r else None, stderr=subprocess.STDOUT if r else None)
             for r in range(args.ranks)]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


def step_times(run_dir: Path, warmup: int) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step_time"] for row in rows if row["split"] == "train" and row["step"] > warmup]


def bench_count(args, workdir: Path) -> dict:
    data = workdir / "instructions.jsonl"
    instruction_rows(data)
    base = overrides_for(COUNT_MODEL[args.device], device=args.device, data=data) + [
        f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.micro_batch}",
        f"trainer.grad_accum_steps={args.accum}", f"deepspeed=zero{args.stage}"]
    jobs, dirs = [], {"global_batch": [], "micro_batch": []}
    for repeat in range(args.repeats):
        for mode in (("global_batch", "micro_batch") if repeat % 2 == 0 else ("micro_batch", "global_batch")):
            run_dir = workdir / f"count_{mode}_{repeat}"
            dirs[mode].append(run_dir)
            jobs.append({"run_dir": str(run_dir), "overrides": [*base, f"trainer.loss_normalization={mode}"]})
    launch(args, jobs, workdir)
    times = {mode: [t for d in run_dirs for t in step_times(d, args.warmup)] for mode, run_dirs in dirs.items()}
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    result = {"s_per_step": medians, "ratio": medians["global_batch"] / medians["micro_batch"],
              "steps_measured": {mode: len(values) for mode, values in times.items()}}
    print(f"[count] {args.ranks} ranks, micro {args.micro_batch} x accum {args.accum}, model "
          f"{COUNT_MODEL[args.device]}: global-batch mean {medians['global_batch']:.4f} s/step, per-micro-batch "
          f"mean {medians['micro_batch']:.4f} s/step, ratio {result['ratio']:.3f}", flush=True)
    return result


def bench_convert(args, workdir: Path) -> list[dict]:
    from finetune.training.universal import convert_to_universal

    data = workdir / "instructions.jsonl"
    instruction_rows(data)
    models = {"tiny": {}}
    for layers in (int(n) for n in args.gptj_layers.split(",") if n):
        models[f"gptj-width-{layers}-layers"] = {**GPTJ_WIDTH, "n_layer": layers, "vocab_size": args.gptj_vocab}
    jobs = []
    for name, model in models.items():
        overrides = overrides_for(model, device=args.device, data=data) + [
            "trainer.max_steps=1", "trainer.micro_batch_size=1", f"deepspeed=zero{args.stage}"]
        jobs.append({"run_dir": str(workdir / f"convert_{name}"), "overrides": overrides})
    launch(args, jobs, workdir)
    results = []
    for name in models:
        checkpoints = workdir / f"convert_{name}" / "checkpoints"
        size = sum(f.stat().st_size for f in (checkpoints / "global_step1").rglob("*") if f.is_file())
        started = time.perf_counter()
        convert_to_universal(checkpoints, "global_step1", workers=min(4, os.cpu_count() or 1), log=lambda m: None)
        seconds = time.perf_counter() - started
        row = {"model": name, "zero_stage": args.stage, "ranks": args.ranks, "checkpoint_gib": size / 2**30,
               "seconds": seconds, "gib_per_s": size / 2**30 / seconds}
        results.append(row)
        print(f"[convert] {name}: ZeRO-{args.stage} checkpoint of {row['checkpoint_gib']:.3f} GiB from "
              f"{args.ranks} ranks -> universal in {seconds:.1f} s ({row['gib_per_s']:.3f} GiB/s)", flush=True)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the GPT-J-width ones are large
    return results


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_layout_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "local_rank")}}
    try:
        if args.part in ("count", "both"):
            results["count"] = bench_count(args, workdir)
        if args.part in ("convert", "both"):
            results["convert"] = bench_convert(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
