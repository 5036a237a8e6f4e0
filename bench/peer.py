"""This project vs the stack users would pick instead: transformers' `Trainer` with its DeepSpeed integration.

Same task, same initial weights, same global batch, steps, learning rate, schedule and ZeRO config, in one run; CPU
ranks (DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1 each), fp32.

- Ours: `deepspeed --num_gpus R launch/train.py task=<task> model.path=<init> ...` (the product as a user runs it:
  chunked causal-LM loss, padding-free packed batches by default), plus any `--ours-overrides`.
- Peer: `Trainer(args=TrainingArguments(deepspeed=<the same ZeRO config>))` on transformers' GPTJFor* loaded from
  the same initial checkpoint, in two settings (`--peer-settings`):
  - `best` (the baseline every claim is made against): what a transformers user who tuned their setup runs:
    features tokenized without padding, each batch padded to its longest row (DataCollatorWithPadding; for clm
    DataCollatorForSeq2Seq, which pads the labels with -100), and rows grouped by length
    (`train_sampling_strategy="group_by_length"`). `--peer-compile` adds `torch_compile=True` (off by default:
    see docs/performance.md, "Against transformers' Trainer").
  - `defaults`: the example recipes at their defaults, padded to max_length: run_qa.py (max_seq_length 384,
    doc_stride 128, pad_to_max_length), run_glue.py (max_seq_length 128, pad_to_max_length), and for instruction
    data (no example recipe masks prompts) the same prompt-masked labels as ours, padded to max_length.
  Both use run_qa.py's features (question + context pairs, answers labelled by offsets, impossible spans at the
  CLS/BOS index) and run_glue.py's sorted label list. Our side uses the same window (384 / 128) and length limits,
  each stack with its own input format.

Sizes (`--size`): `tiny` (2 layers x width 64) is an overhead check: at that width a step costs per operation more
than per token. `wide` (4 layers x width 1024, 16 heads, rotary 64: 102M parameters with the qa head) is the
realistic width; `--n-layer/--n-embd/--n-head/--rotary-dim` change either.

Tasks: qa on the bundled SQuAD-style data, cls on the bundled sentiment data, instruction clm on the bundled
"Counting from N: ..." lines split into prompt and response. Metrics are computed by the same code for both
(finetune.metrics; QA answers via finetune.data.postprocess_qa_predictions on each side's features and logits):
QA exact match / F1, accuracy, perplexity over response tokens.

The stacks run interleaved, `--repeats` times (ours, peer-best, peer-defaults, then the reverse order, ...), so
that a machine whose load drifts favours neither. Reported per (task, ranks, stack): the median and the range
(min-max) over repeats of examples/s, real (non-padding) tokens/s, both per CPU second too (user + system time of
the rank processes, steadier than the wall clock on a shared machine), the padding fraction, the training-only
peak RSS (max over rank processes, sampled until the last training step; each stack's final evaluation is left
out), and the final metric; and the ratios ours / peer per repeat.

    python bench/peer.py                                              # tiny width, clm/cls/qa, 1 rank
    python bench/peer.py --size wide --tasks qa,clm --steps qa=8,clm=8 --warmup 2 --repeats 2 --json peer_wide.json
    python bench/peer.py --tasks qa --ours-overrides "data.packing=none data.group_by_length=true"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUNDLED = ROOT / "finetune" / "assets" / "data"
DEFAULT_STEPS = {"qa": 150, "cls": 60, "clm": 60}
MAX_LEN = {"qa": 384, "cls": 128, "clm": 128}  # run_qa / run_glue defaults; instruction examples fit 128
SIZES = {  # GPTJConfig fields of the two model sizes, and the learning rate each learns the bundled tasks at
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8},
    "wide": {"n_layer": 4, "n_embd": 1024, "n_head": 16, "rotary_dim": 64},
}
SIZE_LR = {"tiny": 1e-2, "wide": 3e-4}  # tiny: conf/lr_for_model/tiny.yaml; a random-init width 1024 diverges at 1e-2
SIZE_LABEL = {"tiny": "overhead check", "wide": "realistic width"}
# best-heap: best, with the glibc setting our loop applies on CPU (finetune/training/host_memory.py) done for the
# peer too, so that a comparison can tell that allocator setting apart from the rest of the stack.
PEER_SETTINGS = ("best", "defaults", "best-heap")
WARMUP_RATIO = 0.05
SEED = 7


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="clm,cls,qa")
    p.add_argument("--ranks", default="1", help="rank counts, comma-separated (e.g. 1,2)")
    p.add_argument("--steps", default="", help="optimizer steps per task, e.g. qa=300,cls=60 (defaults: %s)"
                   % ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()))
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: 2 x 64, an overhead check; wide: 4 x 1024, 16 heads, rotary 64, the realistic width")
    for field in ("n_layer", "n_embd", "n_head", "rotary_dim"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"GPT-J {field} (default: the --size's)")
    p.add_argument("--max-len", default="", help="max tokens per row per task, e.g. clm=512 (defaults: %s)"
                   % ",".join(f"{k}={v}" for k, v in MAX_LEN.items()))
    p.add_argument("--lr", type=float, help="learning rate of both stacks (default: tiny 1e-2, wide 3e-4)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage of both stacks")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--stacks", default="ours,peer")
    p.add_argument("--peer-settings", default="best,defaults",
                   help="best: per-batch padding + group_by_length; defaults: the recipes' padding to max_length; "
                        "best-heap: best with freed host memory kept for reuse (as our loop does on CPU)")
    p.add_argument("--peer-compile", action="store_true", help="the best peer with TrainingArguments(torch_compile=True)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each stack, interleaved")
    p.add_argument("--defaults-repeats", type=int, default=1,
                   help="repeats that include the peer's defaults setting (the first N; it is the secondary baseline)")
    p.add_argument("--ours-overrides", default="",
                   help='extra Hydra overrides for our side, e.g. "model.fused_projections=true trainer.compile=true"')
    p.add_argument("--workdir", help="keep runs here (default: a temporary directory, removed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--peer-worker", help=argparse.SUPPRESS)  # a JSON spec: run one peer rank in this process
    args = p.parse_args(argv)
    args.step_counts = {**DEFAULT_STEPS, **_task_ints(args.steps, "--steps")}
    args.max_lens = {**MAX_LEN, **_task_ints(args.max_len, "--max-len")}
    args.model_fields = {**SIZES[args.size], **{f: getattr(args, f) for f in SIZES["tiny"] if getattr(args, f)}}
    args.learning_rate = args.lr if args.lr is not None else SIZE_LR[args.size]
    args.ours_extra = shlex.split(args.ours_overrides)
    settings = [s for s in args.peer_settings.split(",") if s]
    unknown = set(settings) - set(PEER_SETTINGS)
    if unknown or not settings:
        p.error(f"--peer-settings {args.peer_settings!r}: use a comma-separated subset of {','.join(PEER_SETTINGS)}")
    args.stack_labels = []
    for stack in args.stacks.split(","):
        if stack not in ("ours", "peer"):
            p.error(f"--stacks {args.stacks!r}: use ours, peer or ours,peer")
        args.stack_labels += ["ours"] if stack == "ours" else [f"peer-{s}" for s in settings]
    if args.repeats < 1 or args.defaults_repeats < 0:
        p.error("--repeats must be >= 1 and --defaults-repeats >= 0")
    short = {task: n for task, n in args.step_counts.items() if task in args.tasks.split(",") and n <= args.warmup}
    if short:
        p.error(f"--steps {short} leave no step to time after --warmup {args.warmup}: raise the steps or lower --warmup")
    return args


def _task_ints(text: str, option: str) -> dict[str, int]:
    values = {}
    for item in (kv for kv in text.split(",") if kv):
        task, _, value = item.partition("=")
        if task not in DEFAULT_STEPS or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"{option} {text!r}: write task=N pairs, e.g. qa=150,clm=60 (tasks: clm, cls, qa)")
        values[task] = int(value)
    return values


def run_order(labels: list[str], repeats: int, defaults_repeats: int) -> list[tuple[int, str]]:
    """(repeat, stack) in the order they run: each repeat runs every stack once, odd repeats in reverse order, so a
    load that rises or falls during the benchmark favours neither side; the peer's defaults setting (a secondary
    baseline) only in the first `defaults_repeats` repeats."""
    order = []
    for repeat in range(repeats):
        row = [s for s in labels if s != "peer-defaults" or repeat < defaults_repeats]
        order += [(repeat, s) for s in (row if repeat % 2 == 0 else row[::-1])]
    return order


# ------------------------------------------------------------------------------------------------ shared inputs
def write_instruction_data(directory: Path) -> dict[str, str]:
    """The bundled clm lines 'Counting from N: N N+1 ...' (and the others, after 'Describe:') as prompt/response."""
    files = {}
    for split in ("train", "validation"):
        rows = []
        for line in (BUNDLED / "clm" / f"{split}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            prompt, response = text.split(":", 1) if ":" in text else ("Describe", " " + text)
            rows.append({"prompt": prompt + ":", "response": response})
        files[split] = str(directory / f"instructions_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def data_overrides(task: str, files: dict[str, str], max_len: int) -> list[str]:
    # `++`: set the key whether or not conf/data/<task>.yaml lists it
    if task == "clm":
        return [f"++data.train_file={files['train']}", f"++data.validation_file={files['validation']}",
                "++data.prompt_column=prompt", "++data.response_column=response", f"++data.max_seq_len={max_len}"]
    if task == "qa":
        return [f"++data.max_seq_len={max_len}", "++data.doc_stride=128"]
    return [f"++data.max_seq_len={max_len}"]


def write_initial_checkpoint(task: str, directory: Path, files: dict[str, str], model_fields: dict) -> Path:
    """Our GPT-J at the chosen size, seeded random init, with the task's head, as an HF checkpoint both stacks load."""
    import torch

    from finetune.config import DataConfig
    from finetune.model import GPTJConfig, build_model
    from finetune.model.hf_weights import save_pretrained
    from finetune.model.tokenizer import GPTJTokenizer
    from finetune.tasks import get_task

    tokenizer = GPTJTokenizer.from_pretrained(None)
    task_plugin = get_task(task)
    cfg = DataConfig(cache_dir=str(directory / "cache"))
    if task == "clm":
        cfg = DataConfig(train_file=files["train"], validation_file=files["validation"], prompt_column="prompt",
                         response_column="response", cache_dir=cfg.cache_dir)
    data = task_plugin.load_data(cfg, tokenizer)
    config = GPTJConfig.preset("tiny", **model_fields, **task_plugin.model_overrides(data, tokenizer))
    torch.manual_seed(SEED)
    model = build_model(config, task=task)
    out = directory / f"init_{task}"
    save_pretrained(model, out, config=config, task=task, extra_writer=tokenizer.save_pretrained, overwrite=True)
    return out


def ds_config(stage: int) -> dict:
    """The ZeRO config of both stacks (transformers fills the "auto" fields from its TrainingArguments)."""
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
    }


# ------------------------------------------------------------------------------------------------ running
class RankSampler:
    """Every `interval` s: the RSS and CPU time (user + system, all threads) of the rank processes (`roots` and the
    processes below them whose command line contains `marker`, not a launcher or a compiler building a DeepSpeed
    op), and how many optimizer steps `progress` (a file the stack appends a line to per step) shows.

    CPU seconds per step come out of it too: on a shared machine the wall clock of a step depends on the other
    jobs, while the CPU time a rank spends on it mostly does not (each rank runs one thread of compute).

    Peak RSS is kept twice: while training (until `progress` shows `train_steps` steps: what training needs) and
    over the whole run (the final evaluation included, which each stack does its own way).
    """

    def __init__(self, roots: list[int], *, marker: str, progress: Path, step_marker: str, train_steps: int,
                 interval: float = 0.2):
        import psutil

        self.roots = [psutil.Process(pid) for pid in roots]
        self.marker, self.progress, self.step_marker, self.interval = marker, progress, step_marker, interval
        self.train_steps = train_steps
        self.peaks: dict[int, int] = {}
        self.training_peaks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.samples: list[tuple[int, float]] = []  # (steps done, CPU seconds of all ranks so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _ranks(self):
        import psutil

        procs = []
        for root in self.roots:
            try:
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            try:
                command = " ".join(proc.cmdline())
                if self.marker in command and "deepspeed.launcher" not in command:
                    yield proc
            except psutil.NoSuchProcess:
                pass

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            # Steps first: an RSS read after the last step's marker may belong to the evaluation.
            try:
                steps = self.progress.read_text().count(self.step_marker)
            except FileNotFoundError:
                steps = 0
            for proc in self._ranks():
                try:
                    rss = proc.memory_info().rss
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
                    if steps < self.train_steps:
                        self.training_peaks[proc.pid] = max(self.training_peaks.get(proc.pid, 0), rss)
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            self.samples.append((steps, sum(self.cpu.values())))
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss": max(self.training_peaks.values(), default=0),
                "peak_rss_with_eval": max(self.peaks.values(), default=0)}

    def cpu_seconds(self, first_step: int, last_step: int) -> float:
        """CPU seconds of all ranks from the end of step `first_step` to the end of `last_step` (to the sampling
        interval)."""
        def at(step: int) -> float:
            return next(cpu for done, cpu in self.samples if done >= step)

        return at(last_step) - at(first_step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def ours_command(task: str, ranks: int, steps: int, init: Path, files: dict, run_dir: Path, args) -> list[str]:
    accum = args.global_batch // (args.micro_batch * ranks)
    return ["deepspeed", "--master_port", str(free_port()), "--num_gpus", str(ranks),
            str(ROOT / "launch" / "train.py"), f"hydra.run.dir={run_dir}", f"task={task}", "model=tiny",
            f"model.path={init}", "model.dtype=fp32", f"deepspeed=zero{args.stage}", "deepspeed.check_memory=false",
            "logger=none", f"trainer.max_steps={steps}", f"trainer.micro_batch_size={args.micro_batch}",
            f"trainer.grad_accum_steps={accum}", "trainer.precision=fp32", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.save_every=0", f"trainer.seed={SEED}", f"optim.lr={args.learning_rate}",
            "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0", "scheduler=cosine",
            f"scheduler.warmup_ratio={WARMUP_RATIO}", "scheduler.min_lr_ratio=0.0",
            *data_overrides(task, files, args.max_lens[task]), *args.ours_extra]  # the user's overrides win


def run_ours(task: str, ranks: int, steps: int, init: Path, files: dict, run_dir: Path, args) -> dict:
    cmd = ours_command(task, ranks, steps, init, files, run_dir, args)
    env = {**base_env(), "HF_DATASETS_CACHE": str(run_dir.parent / "cache")}
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RankSampler([proc.pid], marker="launch/train.py", progress=run_dir / "metrics.jsonl",
                          step_marker='"split": "train"', train_steps=steps)
    output, _ = proc.communicate()
    peaks = sampler.stop()
    if proc.returncode:
        sys.exit(f"ours ({task}, {ranks} ranks) failed:\n{output[-5000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and r["step"] > args.warmup]
    seconds = [r["step_time"] for r in train]
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in train)  # real tokens of all ranks (attention mask)
    examples = args.global_batch * len(train)  # rows (QA: features) of the measured steps
    results = json.loads((run_dir / "eval_results.json").read_text())
    cpu = sampler.cpu_seconds(args.warmup, steps)
    return {"s_per_step": statistics.median(seconds), "real_tokens_per_s": tokens / sum(seconds),
            "slots_per_s": tokens / sum(seconds), "padding": 0.0, **peaks, "metrics": results,
            "examples_per_s": examples / sum(seconds), "examples_per_cpu_s": examples / cpu,
            "cpu_s_per_step": cpu / (steps - args.warmup), "real_tokens_per_cpu_s": tokens / cpu,
            "first_loss": [r["loss"] for r in records if r["split"] == "train"][0]}


def run_peer(task: str, ranks: int, steps: int, init: Path, files: dict, run_dir: Path, args, *,
             setting: str) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"task": task, "init": str(init), "files": files, "steps": steps, "micro_batch": args.micro_batch,
            "accum": args.global_batch // (args.micro_batch * ranks), "stage": args.stage, "warmup": args.warmup,
            "out": str(run_dir / "result.json"), "output_dir": str(run_dir), "setting": setting,
            "max_len": args.max_lens[task], "lr": args.learning_rate,
            "compile": setting.startswith("best") and args.peer_compile}
    env = {**base_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks),
           "HF_DATASETS_CACHE": str(run_dir / "cache")}
    logs = [open(run_dir / f"rank{r}.log", "w") for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, __file__, "--peer-worker", json.dumps(spec)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(ranks)]
    sampler = RankSampler([p.pid for p in procs], marker="--peer-worker", progress=run_dir / "progress.txt",
                          step_marker="step", train_steps=steps)
    codes = [p.wait() for p in procs]
    peaks = sampler.stop()
    for log in logs:
        log.close()
    if any(codes):
        sys.exit(f"peer ({task}, {ranks} ranks) failed:\n{(run_dir / 'rank0.log').read_text()[-5000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    cpu = sampler.cpu_seconds(args.warmup, steps)
    real_tokens = result["real_tokens_per_s"] * result["measured_s"]
    examples = args.global_batch * (steps - args.warmup)
    return {**result, **peaks, "cpu_s_per_step": cpu / (steps - args.warmup), "real_tokens_per_cpu_s": real_tokens / cpu,
            "examples_per_s": examples / result["measured_s"], "examples_per_cpu_s": examples / cpu}


# ------------------------------------------------------------------------------------------------ the peer
def peer_collator(task: str, setting: str, tokenizer):
    """The batch collator of the peer's setting: `best` pads each batch to its longest row (labels with -100),
    `defaults` stacks rows the features already padded to max_length (the recipes' default_data_collator)."""
    import transformers

    if setting == "defaults":
        return transformers.default_data_collator
    if task == "clm":  # the transformers collator that pads `labels` too (DataCollatorWithPadding leaves them)
        return transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    return transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt")


def peer_training_arguments(spec: dict):
    import transformers

    best = spec["setting"].startswith("best")
    return transformers.TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"], learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO, weight_decay=0.0, max_grad_norm=1.0,
        deepspeed=ds_config(spec["stage"]), seed=SEED, data_seed=SEED, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if best else "random", torch_compile=bool(spec.get("compile")))


def peer_worker(spec: dict) -> None:
    import numpy as np
    import torch
    import transformers
    from datasets import load_dataset

    task, init, max_len = spec["task"], spec["init"], spec["max_len"]
    if spec["setting"] == "best-heap":
        from finetune.training.host_memory import keep_freed_memory

        keep_freed_memory()
    padding = "max_length" if spec["setting"] == "defaults" else False
    tokenizer = transformers.AutoTokenizer.from_pretrained(init)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "qa":
        raw = load_dataset("json", data_files={s: str(BUNDLED / "qa" / f"{s}.jsonl") for s in ("train", "validation")})
        train = raw["train"].map(lambda b: qa_train_features(b, tokenizer, max_len, padding=padding), batched=True,
                                 remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(init, dtype=torch.float32)
    elif task == "cls":
        raw = load_dataset("json", data_files={s: str(BUNDLED / "cls" / f"{s}.jsonl") for s in ("train", "validation")})
        label_list = sorted(set(raw["train"]["label"]))  # run_glue.py: sorted label names
        label_to_id = {name: i for i, name in enumerate(label_list)}

        def glue(batch, padding=padding):
            out = tokenizer(batch["text"], padding=padding, max_length=max_len, truncation=True)
            out["label"] = [label_to_id[name] for name in batch["label"]]
            return out

        train = raw["train"].map(glue, batched=True, remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(init, dtype=torch.float32)
    else:
        raw = load_dataset("json", data_files=spec["files"])
        train = raw["train"].map(lambda b: clm_features(b, tokenizer, max_len, pad=bool(padding)), batched=True,
                                 remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id

    counted = {"real": 0, "slots": 0}
    collator = peer_collator(task, spec["setting"], tokenizer)

    def collate(features):  # the setting's collator, counting real and padded tokens
        batch = collator(features)
        counted["real"] += int(batch["attention_mask"].sum())
        counted["slots"] += batch["input_ids"].numel()
        return batch

    marks = []

    progress = Path(spec["output_dir"]) / "progress.txt"

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), counted["real"], counted["slots"]))
            if int(os.environ["RANK"]) == 0:
                with progress.open("a") as f:
                    f.write("step\n")

    args = peer_training_arguments(spec)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collate,
                                   callbacks=[StepTimes()])
    trainer.train()
    first_loss = next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)

    w = spec["warmup"]
    durations = [b[0] - a[0] for a, b in zip(marks[w - 1 :], marks[w:])] if w > 0 else []
    local = {"seconds": marks[-1][0] - marks[w - 1][0], "real": marks[-1][1] - marks[w - 1][1],
             "slots": marks[-1][2] - marks[w - 1][2], "durations": durations}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # rank 0 evaluates alone below
    if rank != 0:
        return
    seconds = max(g["seconds"] for g in gathered)
    real, slots = sum(g["real"] for g in gathered), sum(g["slots"] for g in gathered)
    model = trainer.model_wrapped.module if hasattr(trainer.model_wrapped, "module") else trainer.model
    model.eval()
    if task == "qa":
        metrics = qa_metrics(model, tokenizer, raw["validation"], max_len)
    elif task == "cls":
        validation = raw["validation"].map(lambda b: glue(b, padding=False), batched=True,
                                           remove_columns=raw["validation"].column_names)
        logits = predict(model, validation, lambda out: out.logits, pad_id=tokenizer.pad_token_id, per_row=False)
        labels = np.array(validation["label"])
        from finetune import metrics as project_metrics

        metrics = project_metrics.accuracy_and_macro_f1(logits.argmax(-1), labels, num_labels=len(label_list))
    else:
        validation = raw["validation"].map(lambda b: clm_features(b, tokenizer, max_len, pad=False), batched=True,
                                           remove_columns=raw["validation"].column_names)
        metrics = clm_perplexity(model, validation, pad_id=tokenizer.pad_token_id)
    Path(spec["out"]).write_text(json.dumps({
        "s_per_step": statistics.median(gathered[0]["durations"]),
        "real_tokens_per_s": real / seconds, "slots_per_s": slots / seconds, "padding": 1 - real / slots,
        "measured_s": seconds, "setting": spec["setting"], "torch_compile": bool(spec.get("compile")),
        "metrics": metrics, "first_loss": first_loss}))


def qa_train_features(examples, tokenizer, max_len, stride=128, padding="max_length"):
    """run_qa.py's prepare_train_features (question first: GPT-J's tokenizer pads on the right); `padding=False`:
    run_qa.py with pad_to_max_length false."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_len,
                          stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding=padding)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = 0
        while sequence_ids[token_start] != 1:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != 1:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        tokenized["start_positions"].append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        tokenized["end_positions"].append(token_end + 1)
    return tokenized


def qa_metrics(model, tokenizer, examples, max_len, stride=128) -> dict:
    """run_qa.py's prepare_validation_features (unpadded: evaluation pads per batch, which gives the same logits
    on every real token), then the same post-processing and SQuAD metrics as ours."""
    import datasets

    from finetune import metrics as project_metrics
    from finetune.data import postprocess_qa_predictions, qa_references

    def features(batch):
        questions = [q.lstrip() for q in batch["question"]]
        tokenized = tokenizer(questions, batch["context"], truncation="only_second", max_length=max_len,
                              stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        mapping = tokenized.pop("overflow_to_sample_mapping")
        tokenized["example_id"] = [batch["id"][m] for m in mapping]
        tokenized["offset_mapping"] = [
            [list(o) if tokenized.sequence_ids(i)[k] == 1 else None for k, o in enumerate(offsets)]
            for i, offsets in enumerate(tokenized["offset_mapping"])]
        return tokenized

    feats = examples.map(features, batched=True, remove_columns=examples.column_names)
    model_inputs = datasets.Dataset.from_dict({key: feats[key] for key in ("input_ids", "attention_mask")})
    starts, ends = predict(model, model_inputs, lambda out: (out.start_logits, out.end_logits),
                           pad_id=tokenizer.pad_token_id)
    predictions = postprocess_qa_predictions(examples, feats, starts, ends)
    return project_metrics.squad_metrics(predictions, qa_references(examples))


def clm_features(batch, tokenizer, max_len, pad=True):
    """Prompt + response + <|endoftext|>, labels -100 on the prompt (and the padding); padded to max_len if `pad`."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(batch["prompt"], batch["response"]):
        p, r = tokenizer(prompt)["input_ids"], tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = (p + r)[:max_len], ([-100] * len(p) + r)[:max_len]
        pad_len = max_len - len(ids) if pad else 0
        out["input_ids"].append(ids + [tokenizer.pad_token_id] * pad_len)
        out["attention_mask"].append([1] * len(ids) + [0] * pad_len)
        out["labels"].append(labels + [-100] * pad_len)
    return out


def padded_batches(dataset, pad_id: int, batch_size: int = 32):
    """(rows, tensors) per batch, each column right-padded to the batch's longest row (labels with -100)."""
    import torch

    for i in range(0, len(dataset), batch_size):
        rows = dataset[i : i + batch_size]
        longest = max(map(len, rows["input_ids"]))
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
        yield rows, {c: torch.tensor([row + [fill[c]] * (longest - len(row)) for row in rows[c]])
                     for c in fill if c in rows}


def predict(model, dataset, pick, *, pad_id: int, per_row: bool = True):
    """The picked outputs of every row: per token (`per_row`: one array per row, cut to its length; a tuple of such
    lists when `pick` gives a tuple) or per row (the batches' arrays concatenated)."""
    import numpy as np
    import torch

    outputs = []
    with torch.no_grad():
        for rows, tensors in padded_batches(dataset, pad_id):
            inputs = {c: tensors[c] for c in ("input_ids", "attention_mask")}
            out = pick(model(**inputs))
            parts = tuple(t.float().numpy() for t in (out if isinstance(out, tuple) else (out,)))
            if per_row:
                lengths = [len(ids) for ids in rows["input_ids"]]
                parts = tuple([part[j, :n] for j, n in enumerate(lengths)] for part in parts)
            outputs.append(parts)
    joined = tuple([x for batch in outputs for x in batch[k]] if per_row else np.concatenate([b[k] for b in outputs])
                   for k in range(len(outputs[0])))
    return joined if len(joined) > 1 else joined[0]


def clm_perplexity(model, dataset, *, pad_id: int) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    total = count = 0.0
    with torch.no_grad():
        for _, tensors in padded_batches(dataset, pad_id):
            labels = tensors["labels"][:, 1:]
            logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits[:, :-1]
            total += float(F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                           reduction="sum"))
            count += int((labels != -100).sum())
    return {"loss": total / count, "perplexity": math.exp(total / count)}


# ------------------------------------------------------------------------------------------------ report
MAIN_METRIC = {"qa": ("exact_match", "f1"), "cls": ("accuracy",), "clm": ("perplexity",)}


def main(args) -> None:
    import datasets

    datasets.disable_progress_bars()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="peer_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    files = write_instruction_data(work)
    results = []
    try:
        for task in args.tasks.split(","):
            init = write_initial_checkpoint(task, work, files, args.model_fields)
            steps = args.step_counts[task]
            for ranks in (int(r) for r in args.ranks.split(",")):
                row = {"task": task, "ranks": ranks, "steps": steps, "runs": {}}
                for repeat, label in run_order(args.stack_labels, args.repeats, args.defaults_repeats):
                    run_dir = work / f"{task}_{ranks}_{label}_{repeat}"
                    t0 = time.perf_counter()
                    if label == "ours":
                        run = run_ours(task, ranks, steps, init, files, run_dir, args)
                    else:
                        run = run_peer(task, ranks, steps, init, files, run_dir, args, setting=label[len("peer-"):])
                    run.update(wall_s=time.perf_counter() - t0, repeat=repeat)
                    row["runs"].setdefault(label, []).append(run)
                    print(f"[bench] {task} {ranks} rank(s) {label} #{repeat + 1}: {run['s_per_step']:.3f} s/step "
                          f"({run['cpu_s_per_step']:.3f} CPU s), {run['examples_per_s']:.2f} examples/s, "
                          f"{run['real_tokens_per_s']:.0f} real tokens/s, padding {run['padding']:.0%}, "
                          f"training peak RSS {run['peak_rss'] / 2**30:.2f} GiB, "
                          f"{ {k: round(run['metrics'][k], 3) for k in MAIN_METRIC[task]} }, "
                          f"{run['wall_s']:.0f} s in all", flush=True)
                results.append(row)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "peer_worker"},
                                               "results": results}, indent=1))


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median, and the range when there are several values: '1.20 (1.10-1.31)'."""
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def ratios(runs: dict[str, list[dict]], peer: str, key: str) -> list[float]:
    """ours / peer of `key`, one per repeat that ran both (the runs of one repeat ran next to each other)."""
    ours = {run["repeat"]: run[key] for run in runs.get("ours", [])}
    return [ours[run["repeat"]] / run[key] for run in runs.get(peer, []) if run["repeat"] in ours]


def print_table(results, args) -> None:
    fields = args.model_fields
    print(f"\nGPT-J {args.size} ({SIZE_LABEL[args.size]}: {fields['n_layer']} layers x width {fields['n_embd']}, "
          f"{fields['n_head']} heads, rotary {fields['rotary_dim']}, vocab 50400), fp32, CPU ranks, ZeRO-{args.stage}, "
          f"global batch {args.global_batch} (micro {args.micro_batch}), lr {args.learning_rate:g}; timing over the "
          f"steps after the first {args.warmup}; {args.repeats} repeat(s), stacks interleaved; median (min-max) over "
          "repeats. Wall-clock figures depend on the machine's other load; CPU figures (user + system time of the "
          "rank processes) much less. Peak RSS: training only (the largest rank process)."
          + (f" Ours with: {' '.join(args.ours_extra)}." if args.ours_extra else "")
          + (" Peer best with torch_compile." if args.peer_compile else "") + "\n")
    print("| task | ranks | steps | stack | examples/s | examples per CPU s | real tokens/s | real tokens per CPU s | "
          "padding | peak RSS GiB | metric |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for label, runs in r["runs"].items():
            metric = ", ".join(f"{k} {spread([run['metrics'][k] for run in runs], '{:.3f}')}"
                               for k in MAIN_METRIC[r["task"]])
            column = lambda key, fmt="{:.2f}": spread([run[key] for run in runs], fmt)  # noqa: E731
            print(f"| {r['task']} | {r['ranks']} | {r['steps']} | {label} | {column('examples_per_s')} | "
                  f"{column('examples_per_cpu_s')} | {column('real_tokens_per_s', '{:.0f}')} | "
                  f"{column('real_tokens_per_cpu_s', '{:.0f}')} | {column('padding', '{:.2f}')} | "
                  f"{spread([run['peak_rss'] / 2**30 for run in runs])} | {metric} |")
    print("\n| task | ranks | ours / | examples/s | examples per CPU s | real tokens/s | real tokens per CPU s | "
          "training peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for peer in (label for label in r["runs"] if label != "ours"):
            cells = [ratios(r["runs"], peer, key) for key in ("examples_per_s", "examples_per_cpu_s",
                                                              "real_tokens_per_s", "real_tokens_per_cpu_s", "peak_rss")]
            if cells[0]:
                print(f"| {r['task']} | {r['ranks']} | {peer} | "
                      + " | ".join(spread(c, "{:.2f}x") for c in cells) + " |")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.peer_worker:
        peer_worker(json.loads(arguments.peer_worker))
    else:
        main(arguments)
