"""Data pipeline throughput: tokenize + pack (clm) and QA feature building, with 1 and 2 processes.

Generates synthetic data in a temporary directory, then times `load_task_data` with an empty cache (the cost
rank 0 pays once) and again with the cache filled (what every later call and every other rank pays).
Prints a markdown table. Usage:

    python bench/data_throughput.py [--clm-docs 20000] [--qa-examples 4000] [--num-proc 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import datasets

from finetune.config import DataConfig
from finetune.data import load_task_data
from finetune.model.tokenizer import GPTJTokenizer

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "river city music paper garden engine market winter light stone report energy").split()  # fmt: skip


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_clm(path: Path, docs: int, rng: random.Random) -> None:
    with path.open("w") as handle:
        for _ in range(docs):
            text = " ".join(sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(3, 12)))
            handle.write(json.dumps({"text": text}) + "\n")


def write_qa(path: Path, examples: int, rng: random.Random) -> None:
    with path.open("w") as handle:
        for i in range(examples):
            sentences = [sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(10, 40))]
            context = " ".join(sentences)
            answer = rng.choice(sentences)
            record = {"id": str(i), "context": context, "question": "Which sentence is it?",
                      "answers": {"text": [answer], "answer_start": [context.index(answer)]}}  # fmt: skip
            handle.write(json.dumps(record) + "\n")


def timed_load(task: str, cfg: DataConfig, tokenizer: GPTJTokenizer) -> tuple[float, int, int]:
    start = time.perf_counter()
    data = load_task_data(task, cfg, tokenizer)
    seconds = time.perf_counter() - start
    lengths = [len(ids) for ids in data.train["input_ids"]]
    return seconds, sum(lengths), len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clm-docs", type=int, default=20000)
    parser.add_argument("--qa-examples", type=int, default=4000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-seq-len", type=int, default=256)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    tokenizer = GPTJTokenizer.from_pretrained(None)
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_clm(tmp_path / "clm.jsonl", args.clm_docs, rng)
        write_qa(tmp_path / "qa.jsonl", args.qa_examples, rng)
        rows = []
        for task, size in (("clm", args.clm_docs), ("qa", args.qa_examples)):
            for num_proc in args.num_proc:
                cfg = DataConfig(
                    train_file=str(tmp_path / f"{task}.jsonl"),
                    validation_fraction=0,
                    max_seq_len=args.max_seq_len,
                    num_proc=num_proc,
                    cache_dir=str(tmp_path / f"cache-{task}-{num_proc}"),
                )
                cold, tokens, features = timed_load(task, cfg, tokenizer)
                warm, _, _ = timed_load(task, cfg, tokenizer)
                rows.append((task, size, num_proc, features, tokens, cold, tokens / cold, warm))
    print(f"CPU: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; max_seq_len={args.max_seq_len}\n")
    print("| task | input rows | num_proc | features | feature tokens | cold s | tokens/s (cold) | cached s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task, size, num_proc, features, tokens, cold, rate, warm in rows:
        print(f"| {task} | {size} | {num_proc} | {features} | {tokens} | {cold:.2f} | {rate:,.0f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
