"""This project vs the stack users would pick instead: transformers' `Trainer` with its DeepSpeed integration.

Same task, same initial weights, same global batch, steps, learning rate, schedule and ZeRO config, in one run; CPU
ranks (DS_ACCELERATOR=cpu, gloo, OMP_NUM_THREADS=1 each), fp32, 1 and 2 ranks.

- Ours: `deepspeed --num_gpus R launch/train.py task=<task> model.path=<init> ...` (the product as a user runs it:
  chunked causal-LM loss, padding-free packed batches by default).
- Peer: `Trainer(args=TrainingArguments(deepspeed=<the same ZeRO config>))` on transformers' GPTJFor* loaded from
  the same initial checkpoint, with the preprocessing of transformers' example recipes at their defaults:
  run_qa.py (max_seq_length 384, doc_stride 128, pad_to_max_length: question + context pairs, answers labelled by
  offsets, impossible spans at the CLS/BOS index), run_glue.py (max_seq_length 128, pad_to_max_length, sorted label
  list), and for instruction data (no example recipe masks prompts) the same prompt-masked labels as ours, padded
  to max_length as those recipes pad. Our side uses the same window (384 / 128) and length limits.

Tasks: qa on the bundled SQuAD-style data, cls on the bundled sentiment data, instruction clm on the bundled
"Counting from N: ..." lines split into prompt and response. Metrics are computed by the same code for both
(finetune.metrics; QA answers via finetune.data.postprocess_qa_predictions on each side's features and logits):
QA exact match / F1, accuracy, perplexity over response tokens.

Reported per (task, ranks, stack): median time per optimizer step (steps after the first `--warmup`), real
(non-padding) tokens/s and token slots/s (padding included) over those steps, the padding fraction, peak RSS
(max over rank processes, sampled), and the final metric.

    python bench/peer.py                                  # all tasks, 1 and 2 ranks (~1 h on 2 busy cores)
    python bench/peer.py --tasks cls --ranks 2 --steps cls=30 --json peer.json
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUNDLED = ROOT / "finetune" / "assets" / "data"
DEFAULT_STEPS = {"qa": 150, "cls": 60, "clm": 60}
MAX_LEN = {"qa": 384, "cls": 128, "clm": 128}  # run_qa / run_glue defaults; instruction examples fit 128
LR = 1e-2  # conf/lr_for_model/tiny.yaml: the tiny random-init model learns the bundled tasks at this rate
WARMUP_RATIO = 0.05
SEED = 7


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="clm,cls,qa")
    p.add_argument("--ranks", default="1,2", help="rank counts, comma-separated")
    p.add_argument("--steps", default="", help="optimizer steps per task, e.g. qa=300,cls=60 (defaults: %s)"
                   % ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()))
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage of both stacks")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--stacks", default="ours,peer")
    p.add_argument("--workdir", help="keep runs here (default: a temporary directory, removed)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--peer-worker", help=argparse.SUPPRESS)  # a JSON spec: run one peer rank in this process
    args = p.parse_args(argv)
    given = (kv.split("=") for kv in args.steps.split(",") if kv)
    args.step_counts = {**DEFAULT_STEPS, **{task: int(steps) for task, steps in given}}
    return args


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


def data_overrides(task: str, files: dict[str, str]) -> list[str]:
    # `++`: set the key whether or not conf/data/<task>.yaml lists it
    if task == "clm":
        return [f"++data.train_file={files['train']}", f"++data.validation_file={files['validation']}",
                "++data.prompt_column=prompt", "++data.response_column=response",
                f"++data.max_seq_len={MAX_LEN['clm']}"]
    if task == "qa":
        return [f"++data.max_seq_len={MAX_LEN['qa']}", "++data.doc_stride=128"]
    return [f"++data.max_seq_len={MAX_LEN['cls']}"]


def write_initial_checkpoint(task: str, directory: Path, files: dict[str, str]) -> Path:
    """Our tiny GPT-J, seeded random init, with the task's head, as an HF checkpoint both stacks load."""
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
    config = GPTJConfig.preset("tiny", **task_plugin.model_overrides(data, tokenizer))
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
    """

    def __init__(self, roots: list[int], *, marker: str, progress: Path, step_marker: str, interval: float = 0.2):
        import psutil

        self.roots = [psutil.Process(pid) for pid in roots]
        self.marker, self.progress, self.step_marker, self.interval = marker, progress, step_marker, interval
        self.peaks: dict[int, int] = {}
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
            for proc in self._ranks():
                try:
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), proc.memory_info().rss)
                    times = proc.cpu_times()
                    self.cpu[proc.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            try:
                steps = self.progress.read_text().count(self.step_marker)
            except FileNotFoundError:
                steps = 0
            self.samples.append((steps, sum(self.cpu.values())))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0)

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


def run_ours(task: str, ranks: int, steps: int, init: Path, files: dict, run_dir: Path, args) -> dict:
    accum = args.global_batch // (args.micro_batch * ranks)
    cmd = ["deepspeed", "--master_port", str(free_port()), "--num_gpus", str(ranks), str(ROOT / "launch" / "train.py"),
           f"hydra.run.dir={run_dir}", f"task={task}", "model=tiny", f"model.path={init}", "model.dtype=fp32",
           f"deepspeed=zero{args.stage}", "deepspeed.check_memory=false", "logger=none", f"trainer.max_steps={steps}",
           f"trainer.micro_batch_size={args.micro_batch}", f"trainer.grad_accum_steps={accum}",
           "trainer.precision=fp32", "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
           f"trainer.seed={SEED}", f"optim.lr={LR}", "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0",
           "scheduler=cosine", f"scheduler.warmup_ratio={WARMUP_RATIO}", "scheduler.min_lr_ratio=0.0",
           *data_overrides(task, files)]
    env = {**base_env(), "HF_DATASETS_CACHE": str(run_dir.parent / "cache")}
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RankSampler([proc.pid], marker="launch/train.py", progress=run_dir / "metrics.jsonl",
                          step_marker='"split": "train"')
    output, _ = proc.communicate()
    peak = sampler.stop()
    if proc.returncode:
        sys.exit(f"ours ({task}, {ranks} ranks) failed:\n{output[-5000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and r["step"] > args.warmup]
    seconds = [r["step_time"] for r in train]
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in train)  # real tokens of all ranks (attention mask)
    results = json.loads((run_dir / "eval_results.json").read_text())
    cpu = sampler.cpu_seconds(args.warmup, steps)
    return {"s_per_step": statistics.median(seconds), "real_tokens_per_s": tokens / sum(seconds),
            "slots_per_s": tokens / sum(seconds), "padding": 0.0, "peak_rss": peak, "metrics": results,
            "cpu_s_per_step": cpu / (steps - args.warmup), "real_tokens_per_cpu_s": tokens / cpu,
            "first_loss": [r["loss"] for r in records if r["split"] == "train"][0]}


def run_peer(task: str, ranks: int, steps: int, init: Path, files: dict, run_dir: Path, args) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"task": task, "init": str(init), "files": files, "steps": steps, "micro_batch": args.micro_batch,
            "accum": args.global_batch // (args.micro_batch * ranks), "stage": args.stage, "warmup": args.warmup,
            "out": str(run_dir / "result.json"), "output_dir": str(run_dir)}
    env = {**base_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks),
           "HF_DATASETS_CACHE": str(run_dir / "cache")}
    logs = [open(run_dir / f"rank{r}.log", "w") for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, __file__, "--peer-worker", json.dumps(spec)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(ranks)]
    sampler = RankSampler([p.pid for p in procs], marker="--peer-worker", progress=run_dir / "progress.txt",
                          step_marker="step")
    codes = [p.wait() for p in procs]
    peak = sampler.stop()
    for log in logs:
        log.close()
    if any(codes):
        sys.exit(f"peer ({task}, {ranks} ranks) failed:\n{(run_dir / 'rank0.log').read_text()[-5000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    cpu = sampler.cpu_seconds(args.warmup, steps)
    real_tokens = result["real_tokens_per_s"] * result["measured_s"]
    return {**result, "peak_rss": peak, "cpu_s_per_step": cpu / (steps - args.warmup),
            "real_tokens_per_cpu_s": real_tokens / cpu}


# ------------------------------------------------------------------------------------------------ the peer
def peer_worker(spec: dict) -> None:
    import numpy as np
    import torch
    import transformers
    from datasets import load_dataset

    task, init = spec["task"], spec["init"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(init)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = MAX_LEN[task]
    if task == "qa":
        raw = load_dataset("json", data_files={s: str(BUNDLED / "qa" / f"{s}.jsonl") for s in ("train", "validation")})
        train = raw["train"].map(lambda b: qa_train_features(b, tokenizer, max_len), batched=True,
                                 remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(init, dtype=torch.float32)
    elif task == "cls":
        raw = load_dataset("json", data_files={s: str(BUNDLED / "cls" / f"{s}.jsonl") for s in ("train", "validation")})
        label_list = sorted(set(raw["train"]["label"]))  # run_glue.py: sorted label names
        label_to_id = {name: i for i, name in enumerate(label_list)}

        def glue(batch):
            out = tokenizer(batch["text"], padding="max_length", max_length=max_len, truncation=True)
            out["label"] = [label_to_id[name] for name in batch["label"]]
            return out

        train = raw["train"].map(glue, batched=True, remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(init, dtype=torch.float32)
    else:
        raw = load_dataset("json", data_files=spec["files"])
        train = raw["train"].map(lambda b: clm_features(b, tokenizer, max_len), batched=True,
                                 remove_columns=raw["train"].column_names)
        model = transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id

    counted = {"real": 0, "slots": 0}

    def collate(features):  # the recipes' default_data_collator, counting real and padded tokens
        batch = transformers.default_data_collator(features)
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

    args = transformers.TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["accum"], max_steps=spec["steps"], learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO, weight_decay=0.0, max_grad_norm=1.0,
        deepspeed=ds_config(spec["stage"]), seed=SEED, data_seed=SEED, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
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
        validation = raw["validation"].map(glue, batched=True, remove_columns=raw["validation"].column_names)
        logits = predict(model, validation, lambda out: out.logits)
        labels = np.array(validation["label"])
        from finetune import metrics as project_metrics

        metrics = project_metrics.accuracy_and_macro_f1(logits.argmax(-1), labels, num_labels=len(label_list))
    else:
        validation = raw["validation"].map(lambda b: clm_features(b, tokenizer, max_len), batched=True,
                                           remove_columns=raw["validation"].column_names)
        metrics = clm_perplexity(model, validation)
    Path(spec["out"]).write_text(json.dumps({
        "s_per_step": statistics.median(gathered[0]["durations"]),
        "real_tokens_per_s": real / seconds, "slots_per_s": slots / seconds, "padding": 1 - real / slots,
        "measured_s": seconds,
        "metrics": metrics, "first_loss": first_loss}))


def qa_train_features(examples, tokenizer, max_len, stride=128):
    """run_qa.py's prepare_train_features (question first: GPT-J's tokenizer pads on the right)."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_len,
                          stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                          padding="max_length")
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
    """run_qa.py's prepare_validation_features, then the same post-processing and SQuAD metrics as ours."""
    import datasets

    from finetune import metrics as project_metrics
    from finetune.data import postprocess_qa_predictions, qa_references

    def features(batch):
        questions = [q.lstrip() for q in batch["question"]]
        tokenized = tokenizer(questions, batch["context"], truncation="only_second", max_length=max_len,
                              stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                              padding="max_length")
        mapping = tokenized.pop("overflow_to_sample_mapping")
        tokenized["example_id"] = [batch["id"][m] for m in mapping]
        tokenized["offset_mapping"] = [
            [list(o) if tokenized.sequence_ids(i)[k] == 1 else None for k, o in enumerate(offsets)]
            for i, offsets in enumerate(tokenized["offset_mapping"])]
        return tokenized

    feats = examples.map(features, batched=True, remove_columns=examples.column_names)
    model_inputs = datasets.Dataset.from_dict({key: feats[key] for key in ("input_ids", "attention_mask")})
    starts, ends = predict(model, model_inputs, lambda out: (out.start_logits, out.end_logits))
    predictions = postprocess_qa_predictions(examples, feats, list(starts), list(ends))
    return project_metrics.squad_metrics(predictions, qa_references(examples))


def clm_features(batch, tokenizer, max_len):
    """Prompt + response + <|endoftext|>, labels -100 on the prompt and the padding; padded to max_len."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(batch["prompt"], batch["response"]):
        p, r = tokenizer(prompt)["input_ids"], tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = (p + r)[:max_len], ([-100] * len(p) + r)[:max_len]
        pad = max_len - len(ids)
        out["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["labels"].append(labels + [-100] * pad)
    return out


def predict(model, dataset, pick, batch_size=32):
    import numpy as np
    import torch

    outputs = []
    columns = [c for c in ("input_ids", "attention_mask") if c in dataset.column_names]
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            rows = dataset[i : i + batch_size]
            out = pick(model(**{c: torch.tensor(rows[c]) for c in columns}))
            outputs.append(tuple(t.float().numpy() for t in out) if isinstance(out, tuple) else out.float().numpy())
    if isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs))
    return np.concatenate(outputs)


def clm_perplexity(model, dataset) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(dataset), 32):
            rows = dataset[i : i + 32]
            ids, mask = torch.tensor(rows["input_ids"]), torch.tensor(rows["attention_mask"])
            labels = torch.tensor(rows["labels"])[:, 1:]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
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
            init = write_initial_checkpoint(task, work, files)
            steps = args.step_counts[task]
            for ranks in (int(r) for r in args.ranks.split(",")):
                row = {"task": task, "ranks": ranks, "steps": steps}
                for stack in args.stacks.split(","):
                    run = run_ours if stack == "ours" else run_peer
                    t0 = time.perf_counter()
                    row[stack] = run(task, ranks, steps, init, files, work / f"{task}_{ranks}_{stack}", args)
                    row[stack]["wall_s"] = time.perf_counter() - t0
                    print(f"[bench] {task} {ranks} rank(s) {stack}: {row[stack]['s_per_step']:.3f} s/step "
                          f"({row[stack]['cpu_s_per_step']:.3f} CPU s), {row[stack]['real_tokens_per_s']:.0f} real "
                          f"tokens/s, padding {row[stack]['padding']:.0%}, "
                          f"peak RSS {row[stack]['peak_rss'] / 2**30:.2f} GiB, "
                          f"{ {k: round(row[stack]['metrics'][k], 3) for k in MAIN_METRIC[task]} }", flush=True)
                results.append(row)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "peer_worker"},
                                               "results": results}, indent=1))


def print_table(results, args) -> None:
    print(f"\nGPT-J tiny (2 layers x width 64, vocab 50400), fp32, CPU ranks, ZeRO-{args.stage}, global batch "
          f"{args.global_batch} (micro {args.micro_batch}); timing over the steps after the first {args.warmup}. "
          "Wall-clock figures depend on the machine's other load; CPU figures (user + system time of the rank "
          "processes) much less.\n")
    print("| task | ranks | steps | stack | s/step | CPU s/step | real tokens/s | real tokens per CPU s | slots/s | "
          "padding | peak RSS GiB | metric | ours / peer: real tokens/s | per CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for stack in ("ours", "peer"):
            if stack not in r:
                continue
            s = r[stack]
            metric = ", ".join(f"{k} {s['metrics'][k]:.3f}" for k in MAIN_METRIC[r["task"]])
            ratios = " | "
            if stack == "ours" and "peer" in r:
                p = r["peer"]
                ratios = (f"{s['real_tokens_per_s'] / p['real_tokens_per_s']:.1f}x | "
                          f"{s['real_tokens_per_cpu_s'] / p['real_tokens_per_cpu_s']:.1f}x")
            print(f"| {r['task']} | {r['ranks']} | {r['steps']} | {stack} | {s['s_per_step']:.3f} | "
                  f"{s['cpu_s_per_step']:.3f} | {s['real_tokens_per_s']:.0f} | {s['real_tokens_per_cpu_s']:.0f} | "
                  f"{s['slots_per_s']:.0f} | {s['padding']:.0%} | {s['peak_rss'] / 2**30:.2f} | {metric} | {ratios} |")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.peer_worker:
        peer_worker(json.loads(arguments.peer_worker))
    else:
        main(arguments)
