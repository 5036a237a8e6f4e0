"""Padding and real-token throughput: padded batches vs length-grouped padded batches vs packed (padding-free) ones.

For each task (cls, qa, instruction clm) and data set (the bundled data, and a length-skewed set this script writes:
most examples short, a few long), the script
1. goes through one epoch of micro batches in the training order (finetune.training.data_order) and counts the
   padding fraction: padding / (rows x longest row) per micro batch, summed. Packed batches have none.
2. trains a small GPT-J (`--layers`, `--width`; GPT-J's vocabulary) for `--steps` steps per layout in one process
   (torch AdamW, fp32, CPU) and reports real (non-padding) tokens per second. The layouts see the same rows in the
   same steps; their losses agree (printed), only the layout differs. The layouts are stepped alternately, so
   machine-load drift hits all of them alike.

    python bench/packing.py                          # both data sets, all three tasks
    python bench/packing.py --tasks qa --steps 10    # shorter
    python bench/packing.py --tasks qa --datasets bundled --packed-loop   # one attention call vs per example

The bundled clm data is plain text (packed as a token stream already, nothing to compare), so clm here is
instruction data: the bundled "Counting from N:" lines split into a prompt and a response, and the skewed set.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = ("padded", "grouped", "packed")  # packing none; none + group_by_length; packing examples
# --packed-loop adds "packed_loop": packed rows with the per-example attention loop this project used before
# (one SDPA call per example), to measure what one call per row saves.
WORDS = ("alpha beta gamma delta river stone cloud market garden yellow quiet rapid silver orange window "
         "people paper music winter summer forest number letter simple moment").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="cls,qa,clm")
    p.add_argument("--datasets", default="bundled,skewed")
    p.add_argument("--steps", type=int, default=12, help="measured steps per layout")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4, help="micro batches per step (length grouping's window)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--packed-loop", action="store_true", help="also time packed rows with per-example attention")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def skewed_lengths(n: int, rng: random.Random, longest: int) -> list[int]:
    """Mostly short, a long tail: a log-normal clipped to [4, longest] words."""
    return [max(4, min(longest, int(rng.lognormvariate(3.0, 0.9)))) for _ in range(n)]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_skewed(directory: Path, task: str, longest_words: int) -> str:
    rng = random.Random(7)
    rows = []
    for i, n in enumerate(skewed_lengths(1000, rng, longest_words)):
        if task == "cls":
            rows.append({"text": sentence(rng, n), "label": i % 3})
        elif task == "clm":
            rows.append({"prompt": f"Write {n} words:", "response": " " + sentence(rng, n)})
        else:
            words = sentence(rng, n).split()
            answer_at = rng.randrange(len(words))
            context = " ".join(words[:answer_at] + ["Zanzibar"] + words[answer_at:])
            rows.append({"id": str(i), "context": context, "question": "Which word is a place?",
                         "answers": {"text": ["Zanzibar"], "answer_start": [context.index("Zanzibar")]}})
    path = directory / f"skewed_{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_bundled_instructions(directory: Path) -> str:
    """The bundled clm lines of the form 'Counting from N: N N+1 ...' as prompt/response pairs."""
    rows = []
    for line in (ROOT / "finetune/assets/data/clm/train.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        if ":" in text:
            prompt, response = text.split(":", 1)
            rows.append({"prompt": prompt + ":", "response": response})
        else:
            rows.append({"prompt": "Describe:", "response": " " + text})
    path = directory / "bundled_instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_config(task: str, dataset: str, directory: Path, args, packing) -> "DataConfig":  # noqa: F821
    from finetune.config import DataConfig

    kwargs = dict(validation_fraction=0, max_seq_len=args.max_seq_len, packing=packing,
                  cache_dir=str(directory / "cache"))
    if task == "clm":
        kwargs.update(prompt_column="prompt", response_column="response")
        kwargs["train_file"] = (write_bundled_instructions(directory) if dataset == "bundled"
                                else write_skewed(directory, "clm", args.max_seq_len - 16))
    elif dataset == "skewed":
        kwargs["train_file"] = write_skewed(directory, task, args.max_seq_len - 24)
    if task == "qa":
        kwargs["doc_stride"] = 64
    return DataConfig(**kwargs)


def per_example_attention(q, k, v, packed, *, dropout_p=0.0):
    """The former CPU packed attention: one SDPA call per example of the row (the reference for --packed-loop)."""
    import torch
    import torch.nn.functional as F

    outputs, start = [], 0
    for length in packed.lengths:
        q_i, k_i, v_i = (t[None, start:start + length].transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q_i, k_i, v_i, dropout_p=dropout_p, is_causal=length > 1)
        outputs.append(y[0].transpose(0, 1))
        start += length
    return torch.cat(outputs)


def measure(task_name: str, dataset: str, directory: Path, args) -> dict:
    import torch

    from finetune.distributed import DistInfo
    from finetune.model import GPTJConfig, build_model
    from finetune.model.tokenizer import GPTJTokenizer
    from finetune.model import gptj
    from finetune.tasks import get_task
    from finetune.training.data_order import BatchLayout, DataPosition, train_steps

    layouts = LAYOUTS + (("packed_loop",) if args.packed_loop else ())
    one_call_attention = gptj.packed_attention

    tokenizer = GPTJTokenizer.from_pretrained(None)
    task = get_task(task_name)
    info = DistInfo(0, 1, 0)
    configs = {"padded": data_config(task_name, dataset, directory, args, "none"),
               "packed": data_config(task_name, dataset, directory, args, "examples")}
    configs["grouped"] = configs["padded"]
    configs["packed_loop"] = configs["packed"]
    data = task.load_data(configs["padded"], tokenizer)
    from finetune.data.length_grouping import example_lengths

    lengths = example_lengths(data.train)

    def stream(layout):  # micro batches one by one, each with the position after its step
        steps = train_steps(data.train, task.collator(tokenizer, configs[layout]), info=info,
                            layout=BatchLayout(args.micro_batch, args.grad_accum, 1), seed=3, start=DataPosition(),
                            lengths=lengths if layout == "grouped" else None)
        for position, micro_batches in steps:
            for batch in micro_batches:
                yield position, batch

    # 1. padding over one epoch
    per_epoch = len(data.train) // args.micro_batch
    padding = {}
    for layout in layouts:
        batches = stream(layout)
        real = slots = 0
        for _ in range(per_epoch):
            _, batch = next(batches)
            real += int(batch["attention_mask"].sum())
            slots += batch["input_ids"].numel()
        padding[layout] = {"padding_fraction": 1 - real / slots, "real_tokens": real, "slots": slots}

    # 2. real tokens/s, the layouts stepped alternately on identical initial weights
    overrides = task.model_overrides(data, tokenizer)
    config = GPTJConfig.preset("tiny", n_layer=args.layers, n_embd=args.width, n_head=max(4, args.width // 64),
                               rotary_dim=min(64, args.width // max(4, args.width // 64)), **overrides)
    models, optimizers, streams = {}, {}, {}
    for layout in layouts:
        torch.manual_seed(0)
        models[layout] = build_model(config, task=task_name, loss_chunk_tokens=512 if task_name == "clm" else None)
        optimizers[layout] = torch.optim.AdamW(models[layout].parameters(), lr=1e-4)
        streams[layout] = stream(layout)
    seconds = {layout: [] for layout in layouts}
    cpu_seconds = {layout: [] for layout in layouts}  # this process's CPU time: what a loaded machine perturbs least
    tokens = {layout: 0 for layout in layouts}
    examples = {layout: 0 for layout in layouts}
    losses = {layout: [] for layout in layouts}
    for step in range(args.warmup + args.steps):
        for layout in (layouts if step % 2 == 0 else layouts[::-1]):
            model, optimizer = models[layout], optimizers[layout]
            gptj.packed_attention = per_example_attention if layout == "packed_loop" else one_call_attention
            t0, c0 = time.perf_counter(), time.process_time()
            step_loss, step_tokens, step_examples = 0.0, 0, 0
            for _ in range(args.grad_accum):
                _, batch = next(streams[layout])
                loss = model(**batch).loss / args.grad_accum
                loss.backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
                step_examples += batch["cu_seq_lens"].numel() - 1 if "cu_seq_lens" in batch else len(batch["input_ids"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                seconds[layout].append(time.perf_counter() - t0)
                cpu_seconds[layout].append(time.process_time() - c0)
                tokens[layout] += step_tokens
                examples[layout] += step_examples
            losses[layout].append(step_loss)
    gptj.packed_attention = one_call_attention
    throughput = {layout: {"real_tokens_per_s": tokens[layout] / sum(seconds[layout]),
                           "examples_per_s": examples[layout] / sum(seconds[layout]),
                           "real_tokens_per_cpu_s": tokens[layout] / sum(cpu_seconds[layout]),
                           "examples_per_cpu_s": examples[layout] / sum(cpu_seconds[layout]),
                           "s_per_step": statistics.median(seconds[layout]),
                           "spread": [min(seconds[layout]), max(seconds[layout])], "losses": losses[layout][:3]}
                  for layout in layouts}
    return {"task": task_name, "dataset": dataset, "rows": len(data.train),
            "mean_length": float(lengths.mean()), "max_length": int(lengths.max()),
            "padding": padding, "throughput": throughput}


def main(args) -> None:
    import datasets

    datasets.disable_progress_bars()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets.split(","):
            for task in args.tasks.split(","):
                row = measure(task, dataset, Path(tmp), args)
                results.append(row)
                t = row["throughput"]
                print(f"[bench] {task}/{dataset}: padding {row['padding']['padded']['padding_fraction']:.1%} -> "
                      f"{row['padding']['grouped']['padding_fraction']:.1%} grouped -> 0 packed; real tokens/s "
                      f"{t['padded']['real_tokens_per_s']:.0f} / {t['grouped']['real_tokens_per_s']:.0f} / "
                      f"{t['packed']['real_tokens_per_s']:.0f}; first losses "
                      f"{[round(t[x]['losses'][0], 4) for x in LAYOUTS]}", flush=True)
    print(f"\n{args.layers} layers x width {args.width}, vocab 50400, fp32, CPU, micro batch {args.micro_batch} x "
          f"{args.grad_accum} accumulation, max_seq_len {args.max_seq_len}; {args.steps} steps per layout\n")
    loop = ["packed_loop"] if args.packed_loop else []
    print("| task | data | rows | mean / max tokens | padding: padded | grouped | packed | real tokens/s: padded | "
          "grouped | packed | " + "".join(f"{x} | " for x in loop) + "packed / padded | packed / grouped | "
          + "".join("packed / packed_loop | " for _ in loop) + "examples/s: padded | packed |")
    print("|---" * (14 + 2 * len(loop)) + "|")
    for r in results:
        p, t = r["padding"], r["throughput"]
        speed = {x: t[x]["real_tokens_per_s"] for x in t}
        print(f"| {r['task']} | {r['dataset']} | {r['rows']} | {r['mean_length']:.0f} / {r['max_length']} | "
              f"{p['padded']['padding_fraction']:.1%} | {p['grouped']['padding_fraction']:.1%} | "
              f"{p['packed']['padding_fraction']:.1%} | {speed['padded']:.0f} | {speed['grouped']:.0f} | "
              f"{speed['packed']:.0f} | " + "".join(f"{speed[x]:.0f} | " for x in loop)
              + f"{speed['packed'] / speed['padded']:.2f} | {speed['packed'] / speed['grouped']:.2f} | "
              + "".join(f"{speed['packed'] / speed[x]:.2f} | " for x in loop)
              + f"{t['padded']['examples_per_s']:.1f} | {t['packed']['examples_per_s']:.1f} |")
    print("\nPer CPU second of this process (run with OMP_NUM_THREADS=1: the same work whatever the machine's load):\n")
    print("| task | data | real tokens per CPU s: padded | grouped | packed | " + "".join(f"{x} | " for x in loop)
          + "packed / padded | packed / grouped | " + "".join("packed / packed_loop | " for _ in loop)
          + "examples per CPU s: padded | packed |")
    print("|---" * (9 + 2 * len(loop)) + "|")
    for r in results:
        t = r["throughput"]
        cpu = {x: t[x]["real_tokens_per_cpu_s"] for x in t}
        print(f"| {r['task']} | {r['dataset']} | {cpu['padded']:.0f} | {cpu['grouped']:.0f} | {cpu['packed']:.0f} | "
              + "".join(f"{cpu[x]:.0f} | " for x in loop)
              + f"{cpu['packed'] / cpu['padded']:.2f} | {cpu['packed'] / cpu['grouped']:.2f} | "
              + "".join(f"{cpu['packed'] / cpu[x]:.2f} | " for x in loop)
              + f"{t['padded']['examples_per_cpu_s']:.1f} | {t['packed']['examples_per_cpu_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main(parse_args())
