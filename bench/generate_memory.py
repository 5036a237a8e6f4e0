"""Peak host memory of generating one token from a GPT-J-shaped bf16 checkpoint on the CPU:
`launch/generate.py` (the real command line, Hydra and all) against transformers' `from_pretrained` + `generate`.

Writes a random GPT-J-shaped safetensors checkpoint (full width 4096 and vocab 50400, fewer layers), then runs
each side in a fresh process and reads its peak RSS (VmHWM) at exit, and its RSS after the imports alone. The
ratio ours / transformers is the figure; absolute sizes depend on the layer count.

    python bench/generate_memory.py                # 4 layers: 1.22B parameters, 2.4 GB of bf16 weights
    python bench/generate_memory.py --layers 8     # 2.0B parameters, 3.8 GB (the size the issue measured)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley."

# Runs inside the measured process: report RSS after the imports and the peak at exit (after the work).
_REPORT = """
import atexit, json, sys
def _kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
def _report():
    print("MEMORY " + json.dumps({"baseline_kib": BASELINE, "peak_kib": _kib("VmHWM:")}), file=sys.stderr, flush=True)
atexit.register(_report)
"""
# Ours: exactly what `python launch/generate.py ...` runs; the imports are measured by loading the script's module
# without running it, in the same process just before.
OURS = """
import runpy
sys.argv = [{script!r}, "model.path=" + {model_dir!r}, "model.dtype=bf16", "prompt=" + {prompt!r},
            "generation.max_new_tokens=1", "device=cpu"]
runpy.run_path({script!r}, run_name="bench_imports")
BASELINE = _kib("VmRSS:")
runpy.run_path({script!r}, run_name="__main__")
"""
THEIRS = """
import torch, transformers
from tokenizers import Tokenizer
BASELINE = _kib("VmRSS:")
ids = Tokenizer.from_file({tokenizer!r}).encode({prompt!r}).ids  # as launch/generate.py, after the imports
model = transformers.GPTJForCausalLM.from_pretrained({model_dir!r}, dtype=torch.bfloat16)
input_ids = torch.tensor([ids])
out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False,
                     pad_token_id=50256)
assert out.shape[1] == len(ids) + 1
"""


def run_measured(code: str) -> dict:
    """Run `code` in a fresh Python; its peak RSS at exit and its RSS after the imports, in GiB."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _REPORT + code], cwd=REPO, env=env, capture_output=True, text=True)
    line = next((l for l in out.stderr.splitlines() if l.startswith("MEMORY ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"measured process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(line[len("MEMORY "):])
    return {"peak_gib": result["peak_kib"] / 2**20, "baseline_gib": result["baseline_kib"] / 2**20,
            "seconds": time.perf_counter() - start}


def checkpoint_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="measure each side this many times (alternating)")
    parser.add_argument("--checkpoint-dir", help="keep the checkpoint here (written when missing) to rerun quickly")
    args = parser.parse_args()

    import torch
    import transformers

    sys.path.insert(0, str(REPO / "bench"))
    from load_memory import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="generate-memory-") as tmp:
        model_dir = args.checkpoint_dir or str(Path(tmp) / "ckpt")
        if not (Path(model_dir) / "config.json").is_file():
            write_checkpoint(Path(model_dir), layers=args.layers, width=4096, vocab=50400, dtype=torch.bfloat16)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if config["n_layer"] != args.layers:
            raise SystemExit(f"{model_dir} has {config['n_layer']} layers, not --layers {args.layers}")
        params = checkpoint_parameters(Path(model_dir))
        weights_gib = 2 * params / 2**30
        ours_code = OURS.format(script=str(REPO / "launch" / "generate.py"), model_dir=model_dir, prompt=PROMPT)
        theirs_code = THEIRS.format(tokenizer=str(REPO / "finetune" / "assets" / "gpt2-tokenizer.json"),
                                    model_dir=model_dir, prompt=PROMPT)
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(run_measured(ours_code))
            theirs.append(run_measured(theirs_code))

    def best(runs: list[dict], key: str) -> float:
        return min(r[key] for r in runs)

    o_peak, t_peak = best(ours, "peak_gib"), best(theirs, "peak_gib")
    o_work = min(r["peak_gib"] - r["baseline_gib"] for r in ours)
    t_work = min(r["peak_gib"] - r["baseline_gib"] for r in theirs)
    print(f"GPT-J-shaped bf16 checkpoint: {args.layers} layers x 4096, vocab 50400, {params / 1e9:.2f}B parameters, "
          f"{weights_gib:.2f} GiB of weights. One greedy token from a {len(PROMPT)}-character prompt on the CPU.")
    print("| | peak RSS (GiB) | RSS after imports (GiB) | peak above imports (GiB) |")
    print("|---|---|---|---|")
    print(f"| launch/generate.py | {o_peak:.2f} | {best(ours, 'baseline_gib'):.2f} | {o_work:.2f} |")
    print(f"| transformers from_pretrained + generate | {t_peak:.2f} | {best(theirs, 'baseline_gib'):.2f} "
          f"| {t_work:.2f} |")
    print(f"| ratio ours / transformers | {o_peak / t_peak:.3f} | | {o_work / t_work:.3f} |")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPU cores "
          f"({platform.machine()}); command: python bench/generate_memory.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
