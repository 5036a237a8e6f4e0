"""GPU cases of the chunked loss, padding-free packing, fused projections and torch.compile (runnable alone).

Both run GPT-J 6B layer shapes (width 4096, 16 heads, rotary 64, vocab 50400) with fewer layers, bf16, on one GPU,
plain forward + backward steps (no optimizer: what changes between the variants is the activations' memory and
the step's compute):

- `chunked_loss`: one causal-LM step at micro batch x seq_len with the full fp32 logits (transformers' way) and
  with the chunked loss (default chunk, and --chunk): peak torch.cuda.max_memory_allocated above the weights, the
  step time (median of --repeats), the planner's "logits and loss" line for the same shapes, and the loss and
  lm_head / last-layer gradients of the chunked step relative to the full one.
- `packing`: a length-skewed micro batch (most examples short, a few long, up to seq_len) as padded rows vs one
  packed row (flash-attn's varlen kernel when installed, else SDPA per example): step time, real tokens/s, peak
  memory, and the largest difference of any example's logits between the two layouts (qa head: per-token logits).
- `fused`: one causal-LM step with q/k/v_proj and fc_in as four matrix products (unfused) and as one of width
  3d + 4d (`model.fused_projections=true`), the same weights (loaded by their Hugging Face names): step time,
  tokens/s, peak memory, and the loss and gradient differences. Needs build_model(fused_projections=...); a build
  without it records the unfused row and says so.
- `compile`: the same step eager and with each GPT-J block compiled in place with dynamic shapes, as
  `trainer.compile=true` does (`--compile-backend`, inductor on a GPU): the first call's time (compiling), the
  steady step time, the first step at half the sequence length (no recompile expected) and the loss difference.

    python bench/gpu_performance.py --case all --json performance.json     # on a GPU
    python bench/gpu_performance.py --case all --dry-run                   # CPU, tiny shapes: checks the script
    python bench/gpu_performance.py --case fused,compile --layers 4        # 4 GPT-J 6B layers, seq 2048

Prints one JSON object per case (a line starting with '{"case"'), and a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPTJ_LAYER = dict(n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)
TINY_LAYER = dict(n_embd=64, n_head=4, rotary_dim=8, vocab_size=50400, n_positions=2048)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", help="comma-separated cases among %s, or all" % ", ".join(CASES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="chunked_loss: rows of seq_len tokens")
    p.add_argument("--examples", type=int, default=32, help="packing: examples per micro batch")
    p.add_argument("--chunk", type=int, default=2048, help="a second chunk size to measure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="compile: torch.compile's backend")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny width, short sequences (compile: eager backend)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.cases = list(CASES) if args.case == "all" else [c for c in args.case.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        p.error(f"--case {args.case!r}: choose among {', '.join(CASES)} or all")
    if args.dry_run:
        args.layers, args.seq_len, args.micro_batch, args.examples, args.chunk, args.repeats = 1, 128, 2, 6, 64, 1
        args.compile_backend = "eager"  # checks the capture; inductor would compile C++ for minutes on a busy CPU
    return args


class Device:
    def __init__(self, dry_run: bool):
        import torch

        self.torch = torch
        self.cuda = not dry_run
        if self.cuda and not torch.cuda.is_available():
            sys.exit("No GPU: run with --dry-run on a CPU.")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> int:
        if not self.cuda:
            return 0
        self.sync()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def peak_above(self, baseline: int) -> int:
        return (self.torch.cuda.max_memory_allocated() - baseline) if self.cuda else 0


def build(task: str, args, dev: Device, **kwargs):
    import torch

    from finetune.model import GPTJConfig, build_model

    layer = TINY_LAYER if args.dry_run else GPTJ_LAYER
    torch.manual_seed(0)
    with torch.device(dev.device):
        model = build_model(GPTJConfig(**layer, n_layer=args.layers, num_labels=2), task=task, **kwargs)
    return model.to(dev.dtype).train()


def supports_fused_projections() -> bool:
    import inspect

    from finetune.model import build_model

    return "fused_projections" in inspect.signature(build_model).parameters


def clm_step(model, ids):
    """One forward + backward of the causal-LM loss; the loss and the gradients of lm_head and the last fc_out."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        last = model.transformer.h[-1].mlp.fc_out.weight
        return loss.detach().float(), {"lm_head.weight": model.lm_head.weight.grad.detach().clone(),
                                       "last_layer.fc_out": last.grad.detach().clone()}
    return step


def random_ids(args, dev: Device, seq_len: int):
    import torch

    return torch.randint(0, 50400, (args.micro_batch, seq_len), device=dev.device,
                         generator=torch.Generator(dev.device).manual_seed(1))


def fused_case(args, dev: Device) -> dict:
    """Unfused (four products) vs fused (one product of width 3d + 4d) input projections, the same weights."""
    from finetune.model import default_chunk_tokens

    ids = random_ids(args, dev, args.seq_len)
    out = {"case": "fused", "layers": args.layers, "tokens": ids.numel(), "rows": {}}
    variants = (False, True) if supports_fused_projections() else (False,)
    if len(variants) == 1:
        out["note"] = "build_model has no fused_projections in this build: unfused only"
    reference_state, results = None, {}
    for fused in variants:
        kwargs = {"fused_projections": fused} if len(variants) == 2 else {}
        model = build("clm", args, dev, loss_chunk_tokens=default_chunk_tokens(50400), **kwargs)
        if reference_state is None:
            reference_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:  # Hugging Face names in both layouts: the same weights
            model.load_state_dict(reference_state)
        baseline = dev.reset_peak()
        seconds, (loss, grads) = timed(dev, clm_step(model, ids), args.repeats)
        name = "fused" if fused else "unfused"
        results[name] = (loss, grads)
        out["rows"][name] = {"s_per_step": seconds, "tokens_per_s": ids.numel() / seconds,
                             "peak_above_weights": dev.peak_above(baseline), "loss": float(loss)}
        del model
    if "fused" in results:
        (loss_u, grads_u), (loss_f, grads_f) = results["unfused"], results["fused"]
        out["loss_rel_diff"] = abs(float(loss_f) - float(loss_u)) / abs(float(loss_u))
        out["grad_rel_diff"] = {k: rel(g, grads_u[k]) for k, g in grads_f.items()}
        out["speedup"] = out["rows"]["unfused"]["s_per_step"] / out["rows"]["fused"]["s_per_step"]
    return out


def compile_case(args, dev: Device) -> dict:
    """Eager vs each block compiled: compile time, steady step time, a second sequence length, loss agreement."""
    import torch

    from finetune.model import default_chunk_tokens

    ids, other = random_ids(args, dev, args.seq_len), random_ids(args, dev, args.seq_len // 2)
    out = {"case": "compile", "layers": args.layers, "tokens": ids.numel(), "backend": args.compile_backend,
           "rows": {}}
    losses = {}
    for name in ("eager", "compiled"):
        torch._dynamo.reset()
        model = build("clm", args, dev, loss_chunk_tokens=default_chunk_tokens(50400))
        if name == "compiled":
            for block in model.transformer.h:
                block.compile(backend=args.compile_backend, dynamic=True)  # as trainer.compile does
        step = clm_step(model, ids)
        dev.sync()
        t0 = time.perf_counter()
        step()  # compiles (once for every block: they share one graph)
        dev.sync()
        first = time.perf_counter() - t0
        baseline = dev.reset_peak()
        seconds, (loss, _) = timed(dev, step, args.repeats)
        dev.sync()
        t0 = time.perf_counter()
        clm_step(model, other)()  # another length: dynamic shapes should not recompile
        dev.sync()
        losses[name] = float(loss)
        out["rows"][name] = {"first_step_s": first, "s_per_step": seconds, "tokens_per_s": ids.numel() / seconds,
                             "other_length_first_step_s": time.perf_counter() - t0,
                             "peak_above_weights": dev.peak_above(baseline), "loss": float(loss)}
        del model
    out["compile_s"] = out["rows"]["compiled"]["first_step_s"] - out["rows"]["eager"]["s_per_step"]
    out["loss_rel_diff"] = abs(losses["compiled"] - losses["eager"]) / abs(losses["eager"])
    out["speedup"] = out["rows"]["eager"]["s_per_step"] / out["rows"]["compiled"]["s_per_step"]
    return out


def timed(dev: Device, fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats + 1):  # the first call warms up kernels and the allocator
        dev.sync()
        t0 = time.perf_counter()
        out = fn()
        dev.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), out


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def chunked_loss_case(args, dev: Device) -> dict:
    """Full fp32 logits vs the chunked loss on one GPT-J-shaped causal-LM step."""
    import torch

    from finetune.model import default_chunk_tokens
    from finetune.planning.estimate import ModelShape, RunShape, logits_item

    model = build("clm", args, dev)
    ids = torch.randint(0, 50400, (args.micro_batch, args.seq_len), device=dev.device,
                        generator=torch.Generator(dev.device).manual_seed(1))
    watched = {"lm_head.weight": model.lm_head.weight, "last_layer.fc_out": model.transformer.h[-1].mlp.fc_out.weight}
    rows = {}
    variants = (("full", None), ("chunked", default_chunk_tokens(50400)), (f"chunked_{args.chunk}", args.chunk))
    for name, chunk in variants:
        model.loss_chunk_tokens = chunk

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            return loss.detach().float(), {k: p.grad.detach().clone() for k, p in watched.items()}

        model.zero_grad(set_to_none=True)
        baseline = dev.reset_peak()
        seconds, (loss, grads) = timed(dev, step, args.repeats)
        shape = ModelShape(n_layer=args.layers, n_embd=model.config.n_embd, n_head=model.config.n_head)
        run = RunShape(micro_batch_size=args.micro_batch, seq_len=args.seq_len,
                       precision="bf16" if dev.cuda else "fp32", activation_checkpointing=False,
                       chunked_loss=chunk is not None, loss_chunk_tokens=chunk)
        rows[name] = {"chunk": chunk, "s_per_step": seconds, "peak_above_weights": dev.peak_above(baseline),
                      "planner_logits_line": logits_item(shape, run).bytes, "loss": float(loss), "grads": grads}
    reference = rows["full"]
    out = {"case": "chunked_loss", "layers": args.layers, "tokens": args.micro_batch * args.seq_len, "rows": {}}
    for name, row in rows.items():
        out["rows"][name] = {k: v for k, v in row.items() if k != "grads"}
        out["rows"][name]["loss_rel_diff"] = abs(row["loss"] - reference["loss"]) / abs(reference["loss"])
        out["rows"][name]["grad_rel_diff"] = {k: rel(g, reference["grads"][k]) for k, g in row["grads"].items()}
    return out


def skewed_lengths(n: int, longest: int) -> list[int]:
    import random

    rng = random.Random(3)
    return [max(8, min(longest, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(n)]  # median ~150 tokens


def packing_case(args, dev: Device) -> dict:
    """Padded rows vs one packed row for the same examples: speed, memory, per-example logits agreement."""
    import torch

    from finetune.data import DataCollator
    from finetune.model.gptj import _flash_varlen

    model = build("qa", args, dev)
    lengths = skewed_lengths(args.examples, args.seq_len)
    g = torch.Generator().manual_seed(2)
    features = [{"input_ids": torch.randint(0, 50000, (n,), generator=g).tolist(), "start_positions": 1,
                 "end_positions": min(3, n - 1)} for n in lengths]
    out = {"case": "packing", "layers": args.layers, "examples": len(lengths), "real_tokens": sum(lengths),
           "padded_slots": len(lengths) * max(lengths), "attention": "flash-attn varlen" if (
               dev.cuda and _flash_varlen() is not None) else "SDPA per example", "rows": {}}
    logits = {}
    for layout in ("padded", "packed"):
        batch = {k: v.to(dev.device) for k, v in DataCollator(50256, packed=layout == "packed")(features).items()}

        def step():
            model.zero_grad(set_to_none=True)
            result = model(**batch)
            result.loss.backward()
            return result

        baseline = dev.reset_peak()
        seconds, result = timed(dev, step, args.repeats)
        out["rows"][layout] = {"s_per_step": seconds, "real_tokens_per_s": sum(lengths) / seconds,
                               "peak_above_weights": dev.peak_above(baseline), "loss": float(result.loss.detach())}
        starts = result.start_logits.detach().float()
        if layout == "packed":
            bounds = batch["cu_seq_lens"].tolist()
            logits[layout] = [starts[0, a:b] for a, b in zip(bounds, bounds[1:])]
        else:
            logits[layout] = [starts[i, :n] for i, n in enumerate(lengths)]
    out["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(logits["packed"], logits["padded"]))
    out["speedup"] = out["rows"]["padded"]["s_per_step"] / out["rows"]["packed"]["s_per_step"]
    return out


def main(args) -> None:
    dev = Device(args.dry_run)
    results = []
    for case in args.cases:
        results.append(CASES[case](args, dev))
        print(json.dumps(results[-1]), flush=True)
    for r in results:
        if r["case"] == "chunked_loss":
            print(f"\nchunked loss: {r['layers']} GPT-J layers, {r['tokens']} tokens per step")
            print("| loss | chunk | s/step | peak above weights GiB | planner's logits line GiB | loss rel. diff | "
                  "lm_head grad rel. diff |")
            print("|---|---|---|---|---|---|---|")
            for name, row in r["rows"].items():
                print(f"| {name} | {row['chunk']} | {row['s_per_step']:.3f} | "
                      f"{row['peak_above_weights'] / 2**30:.2f} | {row['planner_logits_line'] / 2**30:.2f} | "
                      f"{row['loss_rel_diff']:.1e} | "
                      f"{row['grad_rel_diff']['lm_head.weight']:.1e} |")
        elif r["case"] in ("fused", "compile"):
            extra = (f", backend {r['backend']}, compile {r['compile_s']:.1f} s" if r["case"] == "compile" else "")
            diff = (f"; loss rel. diff {r['loss_rel_diff']:.1e}, speedup {r['speedup']:.2f}x"
                    if "speedup" in r else f"; {r.get('note', '')}")
            print(f"\n{r['case']}: {r['layers']} GPT-J layers, {r['tokens']} tokens per step{extra}{diff}")
            print("| variant | s/step | tokens/s | peak above weights GiB |")
            print("|---|---|---|---|")
            for name, row in r["rows"].items():
                print(f"| {name} | {row['s_per_step']:.3f} | {row['tokens_per_s']:.0f} | "
                      f"{row['peak_above_weights'] / 2**30:.2f} |")
        else:
            print(f"\npacking: {r['examples']} examples, {r['real_tokens']} real tokens ({r['padded_slots']} padded "
                  f"slots), attention: {r['attention']}; max |logit diff| {r['max_abs_logit_diff']:.2e}")
            print("| layout | s/step | real tokens/s | peak above weights GiB |")
            print("|---|---|---|---|")
            for name, row in r["rows"].items():
                print(f"| {name} | {row['s_per_step']:.3f} | {row['real_tokens_per_s']:.0f} | "
                      f"{row['peak_above_weights'] / 2**30:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


CASES = {"chunked_loss": chunked_loss_case, "packing": packing_case, "fused": fused_case, "compile": compile_case}


if __name__ == "__main__":
    main(parse_args())
