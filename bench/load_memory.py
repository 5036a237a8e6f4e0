"""Peak host memory of loading a GPT-J-shaped checkpoint: finetune.model.hf_weights vs transformers' from_pretrained.

Writes a random GPT-J-shaped safetensors checkpoint (full width 4096 and vocab 50400, fewer layers so it
fits next to other work), then loads it into bf16 and fp32, here and with transformers, each in a fresh
process, and reports peak RSS above the post-import baseline divided by the size of the loaded weights.
A ratio of 1.0 means no copy beyond the weights themselves.

    python bench/load_memory.py                       # 4 layers x 4096, bf16 checkpoint
    python bench/load_memory.py --layers 2 --out -    # smaller, print only
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_checkpoint(out_dir: Path, *, layers: int, width: int, vocab: int, dtype: torch.dtype) -> int:
    """A random checkpoint written shard by shard, so writing it needs one shard of memory, not the model."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from finetune.model import GPTJConfig, build_model

    config = GPTJConfig(n_layer=layers, n_embd=width, n_head=16, vocab_size=vocab)
    shapes = {k: torch.empty(v.shape, dtype=dtype, device="meta")
              for k, v in build_model(config, task="clm", device="meta").state_dict().items()}
    split = split_torch_state_dict_into_shards(shapes, max_shard_size="2GB")
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            shape = shapes[name].shape
            if name.endswith("bias"):
                shard[name] = torch.zeros(shape, dtype=dtype)
            elif ".ln_" in name:
                shard[name] = torch.ones(shape, dtype=dtype)
            else:
                shard[name] = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator)
        save_file(shard, out_dir / filename, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = {**config.to_hf_dict(), "architectures": ["GPTJForCausalLM"], "torch_dtype": str(dtype)[6:]}
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return sum(s.numel() for s in shapes.values())


# --- one measurement, in its own process ----------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(loader: str, model_dir: str, dtype_name: str) -> dict:
    dtype = DTYPES[dtype_name]
    if loader == "finetune":
        from finetune.model import GPTJConfig, build_model
        from finetune.model.hf_weights import load_pretrained

        build_model(GPTJConfig.preset("tiny"), device="meta")  # torch's one-time imports on first meta build
        load = lambda: load_pretrained(model_dir, task="clm", dtype=dtype)  # noqa: E731
    else:
        import transformers

        tiny = transformers.GPTJConfig(n_layer=1, n_embd=64, n_head=4, rotary_dim=8, vocab_size=64)
        transformers.GPTJForCausalLM(tiny)  # the same one-time work on the transformers side
        load = lambda: transformers.GPTJForCausalLM.from_pretrained(model_dir, dtype=dtype)  # noqa: E731
    # VmHWM is this process's peak RSS; writing 5 to clear_refs resets it, so the imports are left out.
    # (ru_maxrss would not do: Linux carries the parent's peak across exec.)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_bytes("VmRSS:")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    load_peak = _status_bytes("VmHWM:")
    # Weights left memory-mapped count in RSS only once read; a forward pass reads them all, so do it here.
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        t.detach().max()
    weights = sum(t.nbytes for t in tensors)
    assert {p.dtype for p in model.parameters()} == {dtype}
    return {"peak_bytes": _status_bytes("VmHWM:") - base, "load_peak_bytes": load_peak - base,
            "weights_bytes": weights, "seconds": seconds}


def run_isolated(loader: str, model_dir: Path, dtype_name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", loader, str(model_dir), dtype_name],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{loader} {dtype_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50400)
    parser.add_argument("--checkpoint-dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    parser.add_argument("--out", default="docs/bench_load_memory.md", help="markdown file for the table; - to skip")
    parser.add_argument("--measure", nargs=3, metavar=("LOADER", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    import transformers

    command = "python bench/load_memory.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        model_dir = Path(tmp) / "ckpt"
        params = write_checkpoint(model_dir, layers=args.layers, width=args.width, vocab=args.vocab,
                                  dtype=DTYPES[args.checkpoint_dtype])
        rows = []
        for dtype_name in args.dtypes:
            ours = run_isolated("finetune", model_dir, dtype_name)
            theirs = run_isolated("transformers", model_dir, dtype_name)
            rows.append((dtype_name, ours, theirs))
            print(f"{dtype_name}: finetune {ours}  transformers {theirs}", flush=True)

    gb = 1e9
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        f"GPT-J-shaped checkpoint: {args.layers} layers, width {args.width}, vocab {args.vocab}, "
        f"{params / 1e9:.2f}B parameters, stored as {args.checkpoint_dtype} safetensors (2 GB shards).",
        "Peak RSS above the post-import baseline while loading and then reading every weight once (as a forward "
        "pass does), in a fresh process per cell; ratio = peak / size of the loaded weights (1.0 = no copy beyond "
        "the weights). transformers leaves same-dtype weights memory-mapped from the checkpoint file, so they only "
        "become resident when read: the column before the seconds shows its peak before that, and its seconds "
        "exclude that reading.",
        "",
        "| load dtype | weights (GB) | finetune peak (GB) | ratio | transformers peak (GB) | ratio "
        "| transformers peak before weights are read (GB) | finetune s | transformers s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dtype_name, ours, theirs in rows:
        w = ours["weights_bytes"]
        lines.append(
            f"| {dtype_name} | {w / gb:.2f} | {ours['peak_bytes'] / gb:.2f} | {ours['peak_bytes'] / w:.2f}x "
            f"| {theirs['peak_bytes'] / gb:.2f} | {theirs['peak_bytes'] / theirs['weights_bytes']:.2f}x "
            f"| {theirs['load_peak_bytes'] / gb:.2f} | {ours['seconds']:.1f} | {theirs['seconds']:.1f} |"
        )
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), {ram_gib:.0f} GiB RAM, no GPU involved; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}.",
        f"Command: `{command.strip()}`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Checkpoint loading: peak host memory\n\n" + table + "\n")


if __name__ == "__main__":
    main()
