"""The cases of bench/gpu_suite.sh: GPT-J 6B training and generation on one GPU, this project vs transformers.

Each run of a case is one process (bench/gpu_suite.py starts it with a timeout), so a hang or an out-of-memory
loses that run only, and each 6B model gets a clean GPU. A run appends its figures to the suite's results file as
JSON lines the moment it has them, so a run killed at its timeout keeps what it measured.

    python bench/gpu_cases.py RUN --case CASE --results results.jsonl [--dry-run] [--deadline EPOCH] ...

Adding a case (e.g. #13's chunked loss or packed data): write a run function `fn(ctx, **kwargs)` that calls
`ctx.record(kind, ...)` (or reuse `train` with other `model_overrides` / `inputs`), then add a `Case` to `CASES`.
docs/gpu.md ("Adding a case") has the details.

Weights: random, made where they live (on the GPU; through deepspeed.zero.Init for ZeRO-3) by `init_by_name`, which
seeds each tensor from its name: this project's model and transformers' (same parameter names) get the same
weights without a checkpoint and without ever holding two copies.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train_step import timed_step  # noqa: E402 -- bench/ is sys.path[0] when this file runs as a script

# Dense bf16 peak of an H100 / H200 SXM (datasheet), the denominator of MFU.
PEAK_BF16_FLOPS = 989e12
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]  # attention and MLP projections
WEIGHT_SEED = 1234
BATCH_CANDIDATES = (8, 4, 2, 1)  # micro batches the planner may pick from, largest first


@dataclass(frozen=True)
class Shapes:
    """Model and workload sizes of one suite mode."""

    n_layer: int
    n_embd: int
    n_head: int
    rotary_dim: int
    vocab_size: int
    seq_len: int  # training and parity
    prompt_len: int  # generation
    new_tokens: int
    gen_batches: tuple[int, ...]
    warmup: int  # training steps before the measured ones
    steps: int
    gen_repeats: int  # timed generate() calls per (implementation, batch); the fastest counts
    precision: str  # bf16 | fp32: weights, DeepSpeed's precision section, generation

    @property
    def dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]


GPU_SHAPES = Shapes(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400, seq_len=2048,
                    prompt_len=512, new_tokens=128, gen_batches=(1, 8), warmup=2, steps=5, gen_repeats=2,
                    precision="bf16")
# --dry-run: the same code on CPU at tiny width (full vocabulary: the head's shapes matter), in fp32: CPUs without
# bf16 matrix instructions run bf16 products ~1000x slower (`--set precision=bf16` where they have them).
DRY_SHAPES = Shapes(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, vocab_size=50400, seq_len=64,
                    prompt_len=16, new_tokens=8, gen_batches=(1, 2), warmup=1, steps=2, gen_repeats=1,
                    precision="fp32")


@dataclass
class Context:
    """What a run knows: where to write, its shapes, its deadline, and options from the suite's --set."""

    case: str
    run: str
    dry: bool
    results: Path
    profiles: Path
    deadline: float  # time.time() at which the suite kills this run
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def shapes(self) -> Shapes:
        shapes = DRY_SHAPES if self.dry else GPU_SHAPES
        known = {k: v for k, v in self.options.items() if k in Shapes.__dataclass_fields__}
        return Shapes(**{**shapes.__dict__, **known}) if known else shapes

    def time_left(self) -> float:
        return self.deadline - time.time()

    def record(self, kind: str, **fields: Any) -> None:
        row = {"case": self.case, "run": self.run, "kind": kind, **fields}
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"[{self.case}/{self.run}] {kind}: " + ", ".join(f"{k}={_short(v)}" for k, v in fields.items()),
              flush=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 6:
        return f"[{len(value)} values]"
    return str(value)


# --- FLOPs -----------------------------------------------------------------------------------------
def matmul_params(s: Shapes) -> int:
    """Weights that take part in a matrix product per token: the blocks' projections and the LM head (not wte)."""
    d, f = s.n_embd, 4 * s.n_embd
    return s.n_layer * (4 * d * d + 2 * d * f) + d * s.vocab_size


def training_flops_per_token(s: Shapes, *, lora_params: int = 0) -> float:
    """Model FLOPs one training token needs, activation recomputation not counted (so MFU, not HFU).

    Full fine-tuning: 6·N (forward 2·N, backward 4·N) + 12·L·d·S for attention scores and their use (PaLM's
    convention, causal masking not subtracted). LoRA: the frozen weights need no weight gradients, so 4·N, plus the
    same attention term, plus 6 FLOPs per adapter parameter.
    """
    attention = 12 * s.n_layer * s.n_embd * s.seq_len
    if lora_params:
        return 4 * matmul_params(s) + attention + 6 * lora_params
    return 6 * matmul_params(s) + attention


# --- models ----------------------------------------------------------------------------------------
def init_by_name(model, *, seed: int = WEIGHT_SEED, std: float = 0.02, partitioned: bool = False) -> None:
    """HF GPT-J's init (normal(0, std) weights, zero biases, unit LayerNorm gains), each tensor drawn from a generator
    seeded by its name, on the tensor's own device. Two models with the same parameter names, shapes and dtype get
    the same weights, whatever order they create their modules in (transformers builds k_proj before q_proj).
    `partitioned`: ZeRO-3 parameters, gathered one at a time."""
    import torch

    def gathered(param):
        if not partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0)

    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            with gathered(param):
                module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
                if name.endswith(".bias"):
                    param.data.zero_()
                elif module_name in ("ln_1", "ln_f"):
                    param.data.fill_(1.0)
                else:
                    gen = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
                    param.data.normal_(0.0, std, generator=gen)


@contextlib.contextmanager
def materialized(device, dtype):
    """Create parameters directly on `device` in `dtype` (no fp32 copy on the host first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(impl: str, task: str, s: Shapes, *, device, dtype, zero3_config: Optional[dict] = None,
          checkpointing: bool = False, lora: bool = False, use_cache: bool = False,
          model_overrides: Optional[dict] = None, quantized: bool = False):
    """This project's GPT-J (`impl="ours"`) or transformers' (`"transformers"`, clm only) with random weights by name.

    `zero3_config`: build under deepspeed.zero.Init with that DeepSpeed config (each parameter partitioned as it is
    made); else materialized on `device`. `lora`: r 16 on every attention and MLP projection, through
    finetune.training.lora for ours and peft for transformers' (the head trained in full for cls/qa, as ours does).
    `quantized` (QLoRA): the block linears then become 4-bit NF4 with double quantization, computing in `dtype`.
    """
    import torch

    shape = dict(vocab_size=s.vocab_size, n_positions=max(2048, s.seq_len, s.prompt_len + s.new_tokens),
                 n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head, rotary_dim=s.rotary_dim,
                 tie_word_embeddings=False, use_cache=use_cache)
    if impl == "transformers":
        if task != "clm":
            raise ValueError("the transformers side of the suite is GPTJForCausalLM only")
        # Import before zero.Init: it patches torch's tensor constructors, and importing transformers' modelling code
        # (which imports torch._dynamo) inside it fails.
        from transformers import GPTJConfig as HFConfig
        from transformers import GPTJForCausalLM

        def make():
            return GPTJForCausalLM(HFConfig(**shape, attn_implementation="sdpa", **(model_overrides or {})))
    else:
        from finetune.model import GPTJConfig, build_model

        def make():
            return build_model(GPTJConfig(**shape, **(model_overrides or {})), task=task, init=False)

    if zero3_config:
        import deepspeed

        where = deepspeed.zero.Init(config_dict_or_path=zero3_config)
    else:
        where = materialized(device, dtype)
    with where:
        model = make()
    if zero3_config:  # buffers (transformers' rotary table) are not partitioned: put them where the compute is
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != torch.device(device):
                    module._buffers[key] = buffer.to(device)
    init_by_name(model, partitioned=zero3_config is not None)
    if quantized:
        quantize_base(model, impl, dtype)
    if checkpointing:
        if impl == "transformers":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(True)
    if lora:
        model = with_lora(model, impl, task)
    return model


def quantize_base(model, impl: str, dtype) -> None:
    """The block linears to 4-bit NF4 with double quantization, one layer at a time: ours through
    finetune.model.quantized (what lora=qlora trains), transformers' the way bitsandbytes documents (a Linear4bit
    holding the 16-bit weight, quantized when moved to its device), which is what BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) does to each layer it loads."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("the qlora case needs bitsandbytes, which this machine lacks; its wheel (~60 MiB with its "
                         "CUDA libraries) does not fit the 64 MiB working tree bench/gpu_wheels.sh carries: install "
                         "it there with pip where an index is reachable") from None
    if impl != "transformers":
        from finetune.model.quantized import NF4Settings, quantize_linears

        quantize_linears(model, NF4Settings(compute_dtype=dtype))
        return
    for name, module in list(model.named_modules()):
        if name.startswith("transformer.h.") and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            device = module.weight.device
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=layer)
            if module.bias is not None:
                layer.bias = module.bias
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to(device))  # quantizes on the move
            del module
    model.is_loaded_in_4bit = True  # as transformers' bitsandbytes loader sets it: peft's 4-bit LoRA layers


def with_lora(model, impl: str, task: str):
    if impl == "transformers":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, bias="none",
                                                          lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS))
    from finetune.config import LoraConfig
    from finetune.training.lora import apply_lora

    return apply_lora(model, LoraConfig(enabled=True, r=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT,
                                        target_modules=list(LORA_TARGETS)))


def make_inputs(task: str, batch: int, s: Shapes, device) -> dict:
    """A fixed random batch (the same for every implementation): the model's keyword arguments."""
    import torch

    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, s.vocab_size, (batch, s.seq_len), generator=gen)
    inputs = {"input_ids": ids}
    if task == "clm":
        inputs["labels"] = ids
    elif task == "cls":
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    elif task == "qa":
        inputs["attention_mask"] = torch.ones_like(ids)
        inputs["start_positions"] = torch.randint(0, s.seq_len, (batch,), generator=gen)
        inputs["end_positions"] = torch.randint(0, s.seq_len, (batch,), generator=gen)
    return {k: v.to(device) for k, v in inputs.items()}


# --- DeepSpeed config and the planner --------------------------------------------------------------
def ds_config(config_file: str, *, micro_batch: int, on_gpu: bool, precision: str,
              offload: Optional[bool] = None) -> dict:
    """A shipped DeepSpeed JSON filled the way the trainer fills it (finetune.training.engine.build_ds_config).

    `offload`: None keeps the JSON's own; True/False adds ZeRO optimizer offload to CPU with/without pinned memory.
    Optimizer: torch's fused AdamW on the GPU without offload (DeepSpeed's FusedAdam would JIT-build for a minute),
    DeepSpeedCPUAdam under offload, torch's AdamW on CPU.
    """
    from finetune.config import OptimConfig, SchedulerConfig, TrainerConfig
    from finetune.training.engine import build_ds_config, load_ds_json

    base, source = load_ds_json(config_file)
    if offload is not None:
        base.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu", "pin_memory": offload}
    ds = build_ds_config(
        base, source=source, world_size=1, total_steps=1000, accelerator="cuda" if on_gpu else "cpu",
        trainer=TrainerConfig(micro_batch_size=micro_batch, grad_accum_steps=1, precision=precision, grad_clip=1.0),
        optim=OptimConfig(lr=1e-5), scheduler=SchedulerConfig(name="constant", warmup_steps=0),
    )
    if on_gpu and offload is None:
        ds["optimizer"]["params"].update(torch_adam=True, fused=True)
    return ds


@dataclass
class Pick:
    micro_batch: int
    checkpointing: bool
    config_file: str
    estimate: Any  # finetune.planning.estimate.Estimate
    why: str


def pick_run(task: str, s: Shapes, *, config: str, lora: bool, offload: bool, cluster,
             micro_batch: Optional[int] = None, checkpointing: Optional[bool] = None, quantized: bool = False) -> Pick:
    """Micro batch, activation checkpointing and (config="auto") the shipped DeepSpeed config, from the planner.

    The largest micro batch of BATCH_CANDIDATES that the planner says fits with the trainer's 10% margin without
    activation checkpointing, else the largest that fits with it: checkpointing only where needed. `config` is a
    ds_configs/ JSON, or "auto" for what `deepspeed=auto` would choose for that run. Explicit `micro_batch` /
    `checkpointing` (the suite's --set) win.
    """
    from finetune.config import ConfigError
    from finetune.planning.choice import AUTO_MARGIN, choose, option_of
    from finetune.planning.estimate import LORA_TARGETS as ALL_TARGETS
    from finetune.planning.estimate import ModelShape, Option, RunShape, estimate, zero_buffers_from_ds_config

    shape = ModelShape(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, vocab_size=s.vocab_size, head=task)

    def run_shape(batch: int, ckpt: bool) -> RunShape:
        return RunShape(micro_batch_size=batch, seq_len=s.seq_len, precision=s.precision, activation_checkpointing=ckpt,
                        lora_rank=LORA_RANK if lora else None, lora_targets=ALL_TARGETS,
                        lora_train_head=task != "clm", lora_dropout=LORA_DROPOUT, quantized_base=quantized)

    def evaluate(batch: int, ckpt: bool) -> tuple[str, Any]:
        if config == "auto":
            choice = choose(shape, run_shape(batch, ckpt), cluster)
            return choice.config_file, choice.estimate
        ds = json.loads((ROOT / config).read_text())
        option = option_of(ds)
        if offload:
            option = Option(stage=option.stage, offload_optimizer="cpu", offload_params=option.offload_params)
        return config, estimate(shape, run_shape(batch, ckpt), cluster, option,
                                buffers=zero_buffers_from_ds_config(ds))

    batches = [micro_batch] if micro_batch else list(BATCH_CANDIDATES)
    ckpts = [checkpointing] if checkpointing is not None else [False, True]
    for ckpt in ckpts:
        for batch in batches:
            try:
                config_file, est = evaluate(batch, ckpt)
            except ConfigError:  # choose() found nothing that fits: try the next candidate
                continue
            gpu_margin = est.headroom("gpu")
            if gpu_margin >= AUTO_MARGIN or micro_batch:
                why = (f"planner: {est.gpu_bytes / 2**30:.1f} GiB of {est.capacity['gpu'] / 2**30:.1f} GiB per GPU "
                       f"({gpu_margin:.0%} free)")
                return Pick(batch, ckpt, config_file, est, why + ("" if micro_batch else ", the largest that fits"))
    config_file, est = evaluate(1, True)
    return Pick(1, True, config_file, est, "planner: nothing fits with 10% free; trying micro batch 1, checkpointing")


def cluster_here():
    from finetune.planning.choice import cluster_from_ranks, local_resources

    return cluster_from_ranks([local_resources(nvme_path=None)])[0]


# --- runs ------------------------------------------------------------------------------------------
def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def setup(ctx: Context) -> None:
    """The machine and the software: versions, `pip check`, a process group (NCCL on the GPU; on the CPU this also
    JIT-builds DeepSpeed's shared-memory op once for the runs after it), the GPU, and its measured matmul rate."""
    import importlib.metadata as metadata

    import torch

    from finetune.distributed import init_distributed

    t0 = time.perf_counter()
    init_distributed()
    process_group_s = time.perf_counter() - t0

    versions = {}
    for name in ("torch", "deepspeed", "transformers", "peft", "datasets", "hydra-core", "omegaconf", "tokenizers",
                 "safetensors", "pydantic", "huggingface-hub", "pyarrow", "fsspec", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    imports = {}
    for module in ("deepspeed", "hydra", "omegaconf", "datasets", "finetune.runner"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as err:  # noqa: BLE001 -- report what does not import, go on
            imports[module] = f"{type(err).__name__}: {err}"[:300]
    on_gpu = torch.cuda.is_available() and not ctx.dry
    device = torch.device("cuda" if on_gpu else "cpu")
    n = 8192 if on_gpu else 256
    a, b = (torch.randn(n, n, device=device, dtype=ctx.shapes.dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 10
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    matmul_tflops = 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12
    gpu = None
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": props.total_memory / 2**30,
               "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}
        try:
            gpu["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    import psutil

    # Requirement conflicts of what is installed (the carried wheels against the machine's own packages).
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=60)
    ctx.record("environment", python=sys.version.split()[0], versions=versions, imports=imports, gpu=gpu,
               cpus=os.cpu_count(), host_memory_gib=psutil.virtual_memory().total / 2**30,
               matmul_tflops=matmul_tflops, matmul_size=n, matmul_dtype=ctx.shapes.precision,
               process_group_s=process_group_s, pip_check=(check.stdout + check.stderr).strip().splitlines()[:20])
    failed = {m: e for m, e in imports.items() if e != "ok"}
    if failed:
        raise SystemExit(f"these modules do not import: {failed}")


def train(ctx: Context, *, impl: str, task: str = "clm", config: str = "ds_configs/zero3.json",
          offload: bool = False, lora: bool = False, model_overrides: Optional[dict] = None,
          inputs: Optional[Callable[[str, int, Shapes, Any], dict]] = None, profile: bool = False,
          kind: str = "training", watch: Optional[str] = None, quantized: bool = False) -> dict:
    """Train `warmup + steps` steps of one implementation under one DeepSpeed config; record time, MFU and memory.

    A step that runs out of memory without activation checkpointing is retried once with it (time permitting),
    and the row says so. `inputs(task, micro_batch, shapes, device)` makes the batch (default: `make_inputs`);
    `watch`: a parameter-name substring whose trainable tensors must change in the steps (row["watched_changed"]).
    `quantized` (QLoRA): a 4-bit NF4 base; the option gpu_memory_gb plans for a smaller card than this one.
    Returns the recorded row.
    """
    from finetune.distributed import init_distributed
    from finetune.planning.estimate import CUDA_CONTEXT_BYTES

    init_distributed()
    import torch

    from finetune.training.engine import initialize

    accel = accelerator()
    on_gpu = accel.device_name() != "cpu"
    s = ctx.shapes
    cluster = cluster_here()
    if ctx.options.get("gpu_memory_gb"):
        cluster = dataclasses.replace(cluster, gpu_memory_gb=float(ctx.options["gpu_memory_gb"]))
    pick = pick_run(task, s, config=config, lora=lora, offload=offload, cluster=cluster,
                    micro_batch=ctx.options.get("micro_batch"), checkpointing=ctx.options.get("checkpointing"),
                    quantized=quantized)
    pin = None
    if offload:
        # Pinned host buffers round up to powers of two (the planner's 50% slack): pin only when that fits the host.
        pin = bool(ctx.options.get("pin_memory", pick.estimate.cpu_bytes <= 0.9 * pick.estimate.capacity["cpu"]))
    ds = ds_config(pick.config_file, micro_batch=pick.micro_batch, on_gpu=on_gpu, precision=s.precision,
                   offload=pin if offload else None)
    zero_stage = ds["zero_optimization"].get("stage", 0)
    row: dict[str, Any] = {
        "impl": impl, "task": task, "config": pick.config_file, "zero_stage": zero_stage, "offload": offload,
        "pin_memory": pin, "lora": lora, "quantized": quantized, "micro_batch": pick.micro_batch, "seq_len": s.seq_len,
        "precision": s.precision,
        "checkpointing": pick.checkpointing, "why": pick.why, "device": accel.device_name(),
        "estimate_bytes": pick.estimate.gpu_bytes - CUDA_CONTEXT_BYTES,
        "estimate_cpu_bytes": pick.estimate.cpu_bytes,
        "optimizer": "DeepSpeedCPUAdam" if offload else ("torch AdamW (fused)" if on_gpu else "torch AdamW"),
    }
    if offload:
        t0 = time.perf_counter()
        accel.create_op_builder("CPUAdamBuilder").load()  # JIT build (or load from the extension cache)
        row["cpu_adam_build_s"] = time.perf_counter() - t0
        print(f"[{ctx.case}/{ctx.run}] DeepSpeedCPUAdam built/loaded in {row['cpu_adam_build_s']:.1f} s", flush=True)

    checkpointing = pick.checkpointing
    while True:
        t0 = time.perf_counter()
        model = build(impl, task, s, device=accel.current_device_name(), dtype=s.dtype,
                      zero3_config=ds if zero_stage == 3 else None, checkpointing=checkpointing, lora=lora,
                      model_overrides=model_overrides, quantized=quantized)
        row["trainable_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        engine = initialize(model, ds, weight_decay=0.0)
        engine.train()
        row["init_s"] = time.perf_counter() - t0
        batch = (inputs or make_inputs)(task, pick.micro_batch, s, engine.device)
        before = trainable_snapshot(engine.module, watch) if watch else {}
        torch.manual_seed(WEIGHT_SEED)  # the same dropout masks (LoRA) for every implementation
        times, losses = [], []
        try:
            for i in range(s.warmup + s.steps):
                if i == s.warmup:
                    accel.reset_peak_memory_stats()
                seconds, loss = timed_step(engine, batch, accel.synchronize)
                losses.append(loss)
                if i >= s.warmup:
                    times.append(seconds)
            break
        except torch.OutOfMemoryError as err:
            oom = f"out of memory with micro batch {pick.micro_batch}, checkpointing {checkpointing}: {str(err)[:300]}"
        # Out of the except block, so that the failed step's frames (and the activations they hold) are gone.
        row.setdefault("notes", []).append(oom)
        engine.destroy()
        del engine, model, batch
        gc.collect()
        accel.empty_cache()
        if checkpointing or ctx.time_left() < 2 * row["init_s"] + 30:
            ctx.record(kind, **row, status="out of memory")
            raise SystemExit(oom)
        checkpointing = True
        # The planner's figure for what runs now (same DeepSpeed JSON, with checkpointing).
        pick = pick_run(task, s, config=pick.config_file, lora=lora, offload=offload, cluster=cluster,
                        micro_batch=pick.micro_batch, checkpointing=True, quantized=quantized)
        row.update(estimate_bytes=pick.estimate.gpu_bytes - CUDA_CONTEXT_BYTES,
                   estimate_cpu_bytes=pick.estimate.cpu_bytes,
                   why=row["why"] + "; retried with activation checkpointing after running out of memory")
    row["checkpointing"] = checkpointing
    if watch:
        after = trainable_snapshot(engine.module, watch)
        row["watched"] = sorted(before)
        row["watched_changed"] = bool(before) and all(not after[n].equal(before[n]) for n in before)
    tokens = pick.micro_batch * s.seq_len
    step_s = statistics.median(times)
    lora_params = row["trainable_params"] if lora else 0
    flops = training_flops_per_token(s, lora_params=lora_params) * tokens
    row.update(
        tokens_per_step=tokens, step_s=step_s, step_times=times, tokens_per_s=tokens / step_s,
        flops_per_step=flops, mfu=flops / step_s / PEAK_BF16_FLOPS if on_gpu else None,
        peak_bytes=accel.max_memory_allocated(), reserved_bytes=accel.max_memory_reserved(), losses=losses,
        attention="sdpa",
    )
    # The planner models GPU memory; on the CPU accelerator the "peak" is the process's RSS: no comparison there.
    row["estimate_error"] = row["estimate_bytes"] / row["peak_bytes"] - 1 if on_gpu else None
    if profile and ctx.time_left() > 4 * step_s + 10:  # the profiled step costs a few steps
        profile_step(ctx, engine, batch, on_gpu)
    ctx.record(kind, **row)
    engine.destroy()
    return row


def profile_step(ctx: Context, engine, batch: dict, on_gpu: bool) -> None:
    """One more step under torch.profiler; its top operators go to the suite's profiles file."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        timed_step(engine, batch, accelerator().synchronize)
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
    with open(ctx.profiles, "a") as f:
        f.write(f"=== {ctx.case}/{ctx.run}: one training step, top operators by {sort} (torch {torch.__version__})\n")
        f.write(table + "\n\n")


def heads(ctx: Context, *, tasks: tuple[str, ...] = ("cls", "qa")) -> None:
    """One LoRA training step of each task head at full shapes: the head runs there, trains, and its loss is finite.

    The head is trained in full (peft's modules_to_save, as `lora=lora` does for cls/qa); the DeepSpeed config is the
    one `deepspeed=auto` picks.
    """
    import math

    one_step = Context(**{**ctx.__dict__, "options": {**ctx.options, "warmup": 0, "steps": 1}})
    for task in tasks:
        head = {"cls": "score", "qa": "qa_outputs"}[task]
        row = train(one_step, impl="ours", task=task, config="auto", lora=True, kind="heads", watch=head)
        if not all(math.isfinite(loss) for loss in row["losses"]) or not row["watched_changed"]:
            raise SystemExit(f"{task}: the step did not train the head (losses {row['losses']}, "
                             f"head changed: {row['watched_changed']})")


def trainable_snapshot(model, substring: str) -> dict:
    """CPU copies of the trainable parameters whose name contains `substring` (gathered under ZeRO-3)."""
    import deepspeed

    copies = {}
    for name, param in model.named_parameters():
        if param.requires_grad and substring in name:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                copies[name] = param.data.detach().float().cpu().clone()
    return copies


def generation(ctx: Context) -> None:
    """Logit parity (bf16 on the GPU) and greedy decoding with KV cache vs transformers' generate(), same weights."""
    import torch

    from finetune.model.generation import generate

    on_gpu = torch.cuda.is_available() and not ctx.dry
    device = torch.device("cuda" if on_gpu else "cpu")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    s = ctx.shapes
    ours = build("ours", "clm", s, device=device, dtype=s.dtype, use_cache=True).eval()
    hf = build("transformers", "clm", s, device=device, dtype=s.dtype, use_cache=True).eval()
    hf_params = dict(hf.named_parameters())
    same = all(torch.equal(p, hf_params[name]) for name, p in ours.named_parameters())
    if not same:
        raise SystemExit("init_by_name gave the two implementations different weights")

    # Parity: one forward of seq_len tokens; transformers' in fp32 (a cast copy) as the reference.
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, s.vocab_size, (1, s.seq_len), generator=gen).to(device)
    with torch.inference_mode():
        ours_logits = ours(ids).logits.float()
        hf_logits = hf(ids).logits.float()
        reference = copy.deepcopy(hf).float()
        ref_logits = reference(ids).logits.float()
        del reference
    ctx.record(
        "parity", tokens=s.seq_len, dtype=s.precision,
        max_abs_diff=(ours_logits - hf_logits).abs().max().item(),
        mean_abs_diff=(ours_logits - hf_logits).abs().mean().item(),
        ours_vs_fp32_max=(ours_logits - ref_logits).abs().max().item(),
        transformers_vs_fp32_max=(hf_logits - ref_logits).abs().max().item(),
        argmax_agreement=(ours_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
    )
    del ours_logits, hf_logits, ref_logits
    if on_gpu:
        torch.cuda.empty_cache()

    hf.generation_config.eos_token_id = None  # always generate new_tokens: equal work for both
    hf.generation_config.pad_token_id = 50256

    def run_ours(prompt, n):
        return generate(ours, prompt, max_new_tokens=n, eos_token_id=None, pad_token_id=50256)

    def run_hf(prompt, n):
        with torch.inference_mode():
            return hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                               do_sample=False, num_beams=1)

    for batch in s.gen_batches:
        prompt = torch.randint(0, s.vocab_size, (batch, s.prompt_len), generator=gen).to(device)
        outputs = {}
        for impl, fn in (("ours", run_ours), ("transformers", run_hf)):
            fn(prompt, 4)  # warm-up: kernels, allocator, cuBLAS handles
            best, sequences = float("inf"), None
            for _ in range(s.gen_repeats):
                sync()
                t0 = time.perf_counter()
                sequences = fn(prompt, s.new_tokens)
                sync()
                best = min(best, time.perf_counter() - t0)
            new = sequences[:, s.prompt_len:]
            if new.shape[1] != s.new_tokens:
                raise SystemExit(f"{impl} generated {new.shape[1]} tokens, not {s.new_tokens}")
            outputs[impl] = new
            ctx.record("generation", impl=impl, batch=batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens,
                       seconds=best, tokens_per_s=batch * s.new_tokens / best)
        equal_rows = (outputs["ours"] == outputs["transformers"]).all(dim=1)
        mismatch = (outputs["ours"] != outputs["transformers"]).int()
        first = [int(row.argmax()) if row.any() else None for row in mismatch]
        ctx.record("greedy", batch=batch, rows_equal=int(equal_rows.sum()), rows=batch,
                   token_agreement=(outputs["ours"] == outputs["transformers"]).float().mean().item(),
                   first_divergence=min((f for f in first if f is not None), default=None))


# --- the case list ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    name: str  # shown in the tables ("ours", "transformers", "ours-chunked", ...)
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    runs: tuple[Run, ...]
    timeout_s: float  # GPU: the whole case, its runs sharing it (the suite's budget may cut it shorter)
    dry_timeout_s: float = 240.0  # --dry-run: tiny shapes, but a loaded CI machine imports slowly
    min_s: float = 30.0  # not started with less time left than this
    options: dict = field(default_factory=dict)  # defaults of the runs' options (the suite's --set overrides them)


ZERO3 = "ds_configs/zero3.json"
# In the order they run: most informative first, the slowest and riskiest (host-memory-heavy offload) last.
CASES: dict[str, Case] = {c.name: c for c in (
    Case("setup", "versions, GPU, matmul ceiling; every needed module imports",
         (Run("probe", setup),), timeout_s=60, dry_timeout_s=300, min_s=10),
    Case("full", "full fine-tune, ZeRO-3, no offload",
         (Run("ours", train, dict(impl="ours", config=ZERO3, profile=True)),
          Run("transformers", train, dict(impl="transformers", config=ZERO3))), timeout_s=180),
    Case("lora", "LoRA r16 on attention and MLP projections, config as deepspeed=auto picks",
         (Run("ours", train, dict(impl="ours", config="auto", lora=True, profile=True)),
          Run("transformers", train, dict(impl="transformers", config="auto", lora=True))), timeout_s=100),
    Case("qlora", "QLoRA: 4-bit NF4 base (double quantization), LoRA r16 on all six linears, planned for a 16 GB card",
         (Run("ours", train, dict(impl="ours", config="auto", lora=True, quantized=True)),
          Run("transformers", train, dict(impl="transformers", config="auto", lora=True, quantized=True))),
         timeout_s=100, options={"gpu_memory_gb": 16}),
    Case("generate", "logit parity; greedy generation with KV cache vs transformers' generate()",
         (Run("both", generation),), timeout_s=80),
    Case("heads", "cls and qa heads: one LoRA step each at full shapes",
         (Run("ours", heads),), timeout_s=60),
    Case("offload", "full fine-tune, ZeRO-3, optimizer offloaded to CPU (DeepSpeedCPUAdam)",
         (Run("ours", train, dict(impl="ours", config=ZERO3, offload=True)),), timeout_s=150, min_s=90,
         dry_timeout_s=600,  # a cold, loaded CPU builds cpu_adam for minutes
         options={"warmup": 1, "steps": 2}),  # a step is seconds: the host-side Adam over 6B parameters
)}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run's name within its case")
    p.add_argument("--case", required=True, choices=list(CASES))
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--profiles", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--deadline", type=float, default=None, help="time.time() at which the suite stops this run")
    p.add_argument("--options", default="{}", help="JSON: overrides for this case (micro_batch, steps, ...)")
    args = p.parse_args(argv)
    case = CASES[args.case]
    run = next((r for r in case.runs if r.name == args.run), None)
    if run is None:
        p.error(f"case {case.name} has no run {args.run!r}; it has {[r.name for r in case.runs]}")
    ctx = Context(case=case.name, run=run.name, dry=args.dry_run, results=args.results,
                  profiles=args.profiles or args.results.with_name("profiles.txt"),
                  deadline=args.deadline or time.time() + 3600, options=json.loads(args.options))
    run.fn(ctx, **run.kwargs)


if __name__ == "__main__":
    main()
