"""Memory planner: will a fine-tuning run fit, and with which ZeRO stage and offload?

Fine-tuning GPT-J with Adam needs about 16 bytes per trainable parameter of model states
(16-bit weights and gradients, fp32 master weights, two fp32 Adam moments) plus activations.
`estimate` adds these up per GPU and per node (GPU memory, CPU RAM, NVMe) for one DeepSpeed
option; `plan` tries every option, fastest first, and recommends the fastest that fits.

Every figure is a line item with its formula, in these symbols:
  P  all parameters held (base model, plus LoRA adapters and head copies under LoRA)
  Pt trainable parameters   Pq parameters held in 4-bit NF4 (lora=qlora)   N  data-parallel GPUs (nodes x g), g GPUs per node
  b  bytes per weight / activation element (2 for bf16 and fp16, 4 for fp32)
  B  micro batch   S  sequence length   L  layers   d  width   f  MLP width   V  vocabulary   h  heads
Bytes follow DeepSpeed's own allocations (read from its ZeRO optimizers, 0.19); "GB" in inputs is GiB.

Peak per device = persistent items + the largest transient phase, because activations and
communication buckets are freed before the optimizer step allocates its fp32 gradient copy.
Pure Python: no torch, no GPU, no model import.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

from finetune.config import ConfigError

GiB = 2**30
# CUDA context (~0.5 GiB on an H100), NCCL communicators and buffers, cuBLAS workspaces and
# caching-allocator fragmentation: measured overheads land between 1 and 2 GiB, so plan with 2.
CUDA_CONTEXT_BYTES = 2 * GiB
# Resident memory of one training process on the host (Python, torch, CUDA and NCCL libraries, DeepSpeed).
HOST_PROCESS_BYTES = 3 * GiB
# The same on DeepSpeed's CPU accelerator (no CUDA libraries): measured 0.4-0.6 GiB per rank (bench/out_of_core.py).
CPU_ACCELERATOR_PROCESS_BYTES = GiB // 2
# The `deepspeed` runner and each node's launcher (deepspeed.launcher.launch) import torch and DeepSpeed too:
# measured 0.24 GiB each (bench/out_of_core.py); the first node runs both.
LAUNCHER_BYTES = GiB // 2
# PyTorch's pinned host allocator rounds each block up to a power of two (0-100% extra); DeepSpeed's
# own estimators multiply CPU figures by 1.5 for the same reason. Not for DeepSpeed's NVMe swap buffers
# (page-aligned and mlock()ed at their exact size) nor on the CPU accelerator (pinning is a no-op there).
PINNED_SLACK = 0.5
# DeepSpeed's async I/O swaps a tensor only from 1 MiB up (MIN_AIO_BYTES); smaller ones stay in host memory.
MIN_SWAP_BYTES = 2**20
# Autograd keeps these many (B, S, f)-sized tensors for the MLP's activation: fc_in's output and three
# intermediates of the elementwise tanh-GELU ("gelu_new", written out as in HF for parity).
GELU_SAVED_TENSORS = 4

# NF4 with double quantization (bitsandbytes, QLoRA): 4 bits per weight, one 8-bit absmax per block of 64 weights,
# one fp32 absmax per 256 of those blocks; the two code tables (16 and 256 fp32 values per layer) are negligible.
NF4_BLOCK, NF4_BLOCKS_PER_CONSTANT = 64, 256
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_BLOCKS_PER_CONSTANT)

HEADS = ("clm", "cls", "qa")
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
Phase = Literal["persistent", "forward_backward", "optimizer_step", "load"]
Device = Literal["gpu", "cpu", "nvme"]


# --- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The shape numbers of a GPT-J model and its task head; enough to count every parameter."""

    n_layer: int
    n_embd: int
    n_inner: Optional[int] = None  # None: 4 * n_embd
    n_head: int
    vocab_size: int = 50400
    head: str = "clm"  # clm (lm_head) | cls (score) | qa (qa_outputs)
    num_labels: int = 2  # cls only

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"task {self.head!r} is not a task head; use one of {', '.join(HEADS)}.")
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model shape field {name} is {getattr(self, name)}; it must be a positive integer.")


PRESET_SHAPES: dict[str, ModelShape] = {
    "gptj-6b": ModelShape(n_layer=28, n_embd=4096, n_head=16),
    "tiny": ModelShape(n_layer=2, n_embd=64, n_head=4),
}


@dataclass(frozen=True, kw_only=True)
class RunShape:
    """What one training step processes and how: batch, length, precision, checkpointing, LoRA."""

    micro_batch_size: int = 1
    seq_len: int = 2048
    precision: str = "bf16"  # bf16 | fp16 | fp32
    activation_checkpointing: bool = True
    lora_rank: Optional[int] = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Under LoRA, also train the task head in full, as finetune.training.lora does (peft's modules_to_save
    # keeps the frozen original and a trainable copy).
    lora_train_head: bool = True
    lora_dropout: float = 0.05  # > 0: each target keeps its dropped-out input and the mask for backward
    # QLoRA (lora=qlora): the block linears of the frozen base held in 4-bit NF4 with double quantization.
    quantized_base: bool = False
    # Causal LM: the loss chunk by chunk over tokens (model.chunked_loss), loss_chunk_tokens per chunk (None: chosen
    # from the vocabulary, finetune.model.chunked_loss.default_chunk_tokens). False: full fp32 logits, as transformers.
    chunked_loss: bool = False
    loss_chunk_tokens: Optional[int] = None
    # model.fused_projections: q/k/v_proj and fc_in as one (3d + f) x d weight per block (full fine-tuning only).
    fused_projections: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ConfigError(f"trainer.precision is {self.precision!r}; use one of {', '.join(PRECISION_BYTES)}.")
        if self.micro_batch_size < 1 or self.seq_len < 1:
            raise ConfigError(
                f"trainer.micro_batch_size ({self.micro_batch_size}) and data.max_seq_len ({self.seq_len}) must be positive."
            )
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise ConfigError(f"model.loss_chunk_tokens is {self.loss_chunk_tokens}; use a positive number of tokens.")
        if self.quantized_base and self.lora_rank is None:
            raise ConfigError("lora.quantize_base needs LoRA adapters (lora=qlora): a 4-bit base cannot be trained.")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ConfigError(f"lora.r is {self.lora_rank}; use a positive rank, or null for full fine-tuning.")
            unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
            if unknown or not self.lora_targets:
                raise ConfigError(
                    f"lora.target_modules {list(self.lora_targets)} must be a non-empty subset of {list(LORA_TARGETS)}."
                )

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The hardware: nodes x GPUs per node, memory per GPU, CPU RAM and NVMe per node (GiB).

    accelerator "cpu" is DeepSpeed's CPU accelerator (tests, CI): its "GPU" items live in the same RAM as the
    host items, processes carry no CUDA context and are lighter, and pinning is a no-op."""

    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gb: float = 80.0
    cpu_memory_gb: float = 256.0
    nvme_gb: Optional[float] = None  # None: no NVMe for ZeRO-Infinity
    accelerator: str = "cuda"  # cuda (any GPU) | cpu

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"cluster.nodes ({self.nodes}) and cluster.gpus_per_node ({self.gpus_per_node}) must be >= 1.")
        if self.gpu_memory_gb <= 0 or self.cpu_memory_gb <= 0:
            raise ConfigError("cluster.gpu_memory_gb and cluster.cpu_memory_gb must be positive (GiB).")
        if self.accelerator not in ("cuda", "cpu"):
            raise ConfigError(f"cluster.accelerator is {self.accelerator!r}; use cuda (GPUs) or cpu.")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One DeepSpeed setup: ZeRO stage and where optimizer states and parameters live."""

    stage: int
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_params: str = "none"  # none | cpu | nvme (stage 3 only)

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"ZeRO stage {self.stage} does not exist; use 0, 1, 2 or 3.")
        if self.offload_optimizer not in OFFLOAD_DEVICES or self.offload_params not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"offload devices must be one of {OFFLOAD_DEVICES}; got {self.offload_optimizer!r}, {self.offload_params!r}."
            )
        if self.offload_params != "none" and self.stage != 3:
            raise ConfigError("offload_param needs ZeRO stage 3; set stage 3 or offload_params none.")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ConfigError("offload_optimizer needs ZeRO (stage 1-3); stage 0 has no partitioned optimizer to offload.")

    @property
    def name(self) -> str:
        if self.stage == 0:
            return "ZeRO-0 (plain data parallel)"
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer != "none":
            parts.append(f"optimizer->{self.offload_optimizer}")
        if self.offload_params != "none":
            parts.append(f"params->{self.offload_params}")
        return " + ".join(parts)


@dataclass(frozen=True, kw_only=True)
class ZeroBuffers:
    """DeepSpeed's communication and swap buffer settings (element counts); defaults are DeepSpeed's."""

    reduce_bucket_size: int = 500_000_000
    overlap_comm: Optional[bool] = None  # None: DeepSpeed's default, on for stage 3 only
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000
    param_swap_buffer_count: int = 5
    # None ("auto" in ds_configs/zero3_nvme.json): the largest parameter partition, the least DeepSpeed accepts.
    param_swap_buffer_size: Optional[int] = None
    param_max_in_cpu: int = 1_000_000_000  # parameter elements per rank kept in host memory under NVMe offload
    optimizer_swap_buffer_count: int = 4
    grad_accum_dtype: Optional[str] = None  # data_types.grad_accum_dtype (fp32 | bf16 | fp16); None: the precision's


def zero_buffers_from_ds_config(ds_config: Mapping) -> ZeroBuffers:
    """The buffer settings of a DeepSpeed config (whole JSON or its zero_optimization section).

    Keys that are missing or "auto" keep DeepSpeed's defaults.
    """
    zero = ds_config.get("zero_optimization", ds_config)
    defaults = ZeroBuffers()

    def get(section: Mapping, key: str, field_name: str):
        value = section.get(key)
        return getattr(defaults, field_name) if value in (None, "auto") else value

    param, opt = zero.get("offload_param") or {}, zero.get("offload_optimizer") or {}
    return ZeroBuffers(
        reduce_bucket_size=int(get(zero, "reduce_bucket_size", "reduce_bucket_size")),
        overlap_comm=get(zero, "overlap_comm", "overlap_comm"),
        prefetch_bucket_size=int(get(zero, "stage3_prefetch_bucket_size", "prefetch_bucket_size")),
        max_live_parameters=int(get(zero, "stage3_max_live_parameters", "max_live_parameters")),
        param_persistence_threshold=int(get(zero, "stage3_param_persistence_threshold", "param_persistence_threshold")),
        sub_group_size=int(get(zero, "sub_group_size", "sub_group_size")),
        param_swap_buffer_count=int(get(param, "buffer_count", "param_swap_buffer_count")),
        param_swap_buffer_size=_int_or_none(get(param, "buffer_size", "param_swap_buffer_size")),
        param_max_in_cpu=int(get(param, "max_in_cpu", "param_max_in_cpu")),
        optimizer_swap_buffer_count=int(get(opt, "buffer_count", "optimizer_swap_buffer_count")),
        grad_accum_dtype=get(ds_config.get("data_types") or {}, "grad_accum_dtype", "grad_accum_dtype"),
    )


def _int_or_none(value) -> Optional[int]:
    return None if value is None else int(value)


# The order in which `plan` tries the options, fastest first:
# - ZeRO-0 (DeepSpeed as plain DDP): one all-reduce of the gradients, nothing else.
# - ZeRO-1 and -2 move the same bytes as that all-reduce (reduce-scatter + all-gather); stage 2
#   also drops gradients as they are reduced, with a little bucketing overhead.
# - ZeRO-3 gathers every layer's weights in forward and again in backward: 1.5x the traffic,
#   mostly hidden by prefetching on NVLink, plus per-layer gather latency.
# - Optimizer offload runs Adam on the host (memory-bandwidth bound: seconds per step for billions
#   of parameters) and copies gradients and weights over PCIe on the critical path every step, which
#   costs more than ZeRO-3's gathers; with ZeRO-3 it pays both.
# - Parameter offload also fetches every layer's weights over PCIe in forward and backward.
# - NVMe (ZeRO-Infinity) streams states at a few GB/s, far below host memory.
SPEED_ORDER: tuple[Option, ...] = (
    Option(stage=0),
    Option(stage=1),
    Option(stage=2),
    Option(stage=3),
    Option(stage=2, offload_optimizer="cpu"),
    Option(stage=3, offload_optimizer="cpu"),
    Option(stage=3, offload_optimizer="cpu", offload_params="cpu"),
    Option(stage=3, offload_optimizer="nvme", offload_params="nvme"),
)


# --- parameters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamTensor:
    module: str  # the module that owns it (ZeRO-3 gathers per module)
    numel: int
    trainable: bool
    quantized: bool = False  # a 4-bit NF4 weight (lora=qlora's base linears)


def parameter_tensors(shape: ModelShape, run: Optional[RunShape] = None) -> list[ParamTensor]:
    """Every parameter tensor in `model.parameters()` order (HF GPT-J's, and peft's under LoRA).

    Without `run`, or with full fine-tuning, every tensor is trainable. Under LoRA the base weights
    are frozen, each target gets lora_A (r x in) and lora_B (out x r), and a trained head is kept twice
    (peft's frozen original and its trainable copy).
    """
    d, f, V = shape.n_embd, shape.inner, shape.vocab_size
    lora = run is not None and run.lora
    full = not lora
    out: list[ParamTensor] = [ParamTensor("transformer.wte", V * d, full)]
    linears = {  # name: (module path in the block, in_features, out_features, has_bias)
        "q_proj": ("attn.q_proj", d, d, False),
        "k_proj": ("attn.k_proj", d, d, False),
        "v_proj": ("attn.v_proj", d, d, False),
        "out_proj": ("attn.out_proj", d, d, False),
        "fc_in": ("mlp.fc_in", d, f, True),
        "fc_out": ("mlp.fc_out", f, d, True),
    }
    fused = run is not None and run.fused_projections and not lora
    if fused:  # finetune.model.gptj.FusedInputProjection: one module, ahead of out_proj and fc_out
        linears = {"qkv_fc_in": ("qkv_fc_in", d, 3 * d + f, True),
                   **{k: v for k, v in linears.items() if k in ("out_proj", "fc_out")}}
    for i in range(shape.n_layer):
        block = f"transformer.h.{i}"
        out += [ParamTensor(f"{block}.ln_1", d, full), ParamTensor(f"{block}.ln_1", d, full)]
        for name, (path, n_in, n_out, bias) in linears.items():
            if name == "qkv_fc_in":  # its bias is fc_in's alone
                out += [ParamTensor(f"{block}.{path}", n_in * n_out, full), ParamTensor(f"{block}.{path}", f, full)]
                continue
            module = f"{block}.{path}"
            out.append(ParamTensor(module, n_in * n_out, full, quantized=lora and run.quantized_base))
            if bias:
                out.append(ParamTensor(module, n_out, full))
            if lora and name in run.lora_targets:
                out.append(ParamTensor(f"{module}.lora_A", run.lora_rank * n_in, True))
                out.append(ParamTensor(f"{module}.lora_B", n_out * run.lora_rank, True))
    out += [ParamTensor("transformer.ln_f", d, full), ParamTensor("transformer.ln_f", d, full)]

    head_name, head_sizes = {
        "clm": ("lm_head", [V * d, V]),
        "cls": ("score", [shape.num_labels * d]),
        "qa": ("qa_outputs", [2 * d, 2]),
    }[shape.head]
    out += [ParamTensor(head_name, n, full) for n in head_sizes]
    if lora and run.lora_train_head:
        out += [ParamTensor(f"{head_name}.modules_to_save", n, True) for n in head_sizes]
    return out


def count_parameters(shape: ModelShape) -> int:
    """Parameters of the model with its head (GPT-J 6B with lm_head: 6,050,882,784)."""
    return sum(t.numel for t in parameter_tensors(shape))


def trainable_parameters(shape: ModelShape, run: RunShape) -> int:
    """Parameters the optimizer updates: all of them, or LoRA adapters (+ the head copy)."""
    return sum(t.numel for t in parameter_tensors(shape, run) if t.trainable)


def stored_parameters(shape: ModelShape, run: RunShape) -> int:
    """Parameters held in memory: the model plus, under LoRA, the adapters and head copies."""
    return sum(t.numel for t in parameter_tensors(shape, run))


def zero2_gradient_partition(numels: Iterable[int], world: int) -> int:
    """Gradient elements one ZeRO-2 rank holds at most (the flat buffer behind DeepSpeed's `averaged_gradients`).

    DeepSpeed splits the flattened trainable parameters into `world` equal ranges but keeps the whole
    gradient of every parameter that overlaps its range, so a rank holds its share plus the parameters
    straddling its two edges. Assumes one parameter group.
    """
    numels = list(numels)
    part = math.ceil(sum(numels) / world)
    held = [0] * world
    start = 0
    for n in numels:
        end = start + n
        for rank in range(start // part, min(world - 1, (end - 1) // part) + 1):
            held[rank] += n
        start = end
    return max(held)


# --- the estimate ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineItem:
    name: str
    device: Device
    phase: Phase
    category: str  # model_states | activations | buffers | overhead
    bytes: int  # per GPU for "gpu", per node for "cpu" and "nvme"
    formula: str


@dataclass(frozen=True)
class Estimate:
    """Memory of one option: line items, totals per device and whether they fit the cluster."""

    option: Option
    items: tuple[LineItem, ...]
    capacity: dict[str, int]  # bytes per GPU, CPU RAM per node, NVMe per node

    def total(self, device: Device) -> int:
        """Peak bytes: persistent items plus the largest transient phase."""
        items = [i for i in self.items if i.device == device]
        persistent = sum(i.bytes for i in items if i.phase == "persistent")
        phases: dict[str, int] = {}
        for i in items:
            if i.phase != "persistent":
                phases[i.phase] = phases.get(i.phase, 0) + i.bytes
        return persistent + max(phases.values(), default=0)

    def component_bytes(self, device: Device = "gpu", category: Optional[str] = None) -> int:
        """Sum of the line items on `device` (optionally of one category), phases not collapsed."""
        return sum(i.bytes for i in self.items if i.device == device and category in (None, i.category))

    @property
    def gpu_bytes(self) -> int:
        return self.total("gpu")

    @property
    def cpu_bytes(self) -> int:
        return self.total("cpu")

    @property
    def nvme_bytes(self) -> int:
        return self.total("nvme")

    def headroom(self, device: Device) -> float:
        """Fraction of the device left free at peak; negative when it does not fit."""
        need, cap = self.total(device), self.capacity[device]
        if need == 0:
            return 1.0
        return (cap - need) / cap if cap > 0 else -math.inf

    @property
    def margin(self) -> float:
        """The smallest headroom over GPU, CPU and NVMe."""
        return min(self.headroom(dev) for dev in ("gpu", "cpu", "nvme"))

    @property
    def fits(self) -> bool:
        return self.margin >= 0

    @property
    def limiting_device(self) -> str:
        return min(("gpu", "cpu", "nvme"), key=self.headroom)


def estimate(
    shape: ModelShape,
    run: RunShape,
    cluster: Cluster,
    option: Option,
    *,
    buffers: ZeroBuffers = ZeroBuffers(),
) -> Estimate:
    """Peak memory per GPU and per node of one training step with `option`."""
    tensors = parameter_tensors(shape, run)
    P = sum(t.numel for t in tensors)
    Pt = sum(t.numel for t in tensors if t.trainable)
    N, g, b = cluster.world, cluster.gpus_per_node, PRECISION_BYTES[run.precision]
    stage, opt_dev, par_dev = option.stage, option.offload_optimizer, option.offload_params
    items: list[LineItem] = []

    def add(name: str, device: Device, phase: Phase, category: str, nbytes: float, formula: str) -> None:
        if nbytes > 0:
            items.append(LineItem(name, device, phase, category, int(nbytes), formula))

    def per_rank(device: Device, nbytes: float, formula: str) -> tuple[float, str]:
        # GPU lines are per GPU; host and NVMe lines add up the node's g ranks.
        return (nbytes, formula) if device == "gpu" else (g * nbytes, f"g x {formula}")

    def place(name: str, device: Device, nbytes: float, formula: str, category: str = "model_states") -> None:
        add(name, device, "persistent", category, *per_rank(device, nbytes, formula))

    # Parameters: whole on every GPU below stage 3; one 1/N partition per rank at stage 3.
    swapped = 0  # parameter elements per rank on NVMe
    Pq = sum(t.numel for t in tensors if t.quantized)
    if Pq and stage < 3:
        place("parameters (not quantized)", "gpu", b * (P - Pq), "b·(P - Pq)")
        place("parameters (4-bit NF4 base linears + constants)", "gpu", NF4_BYTES_PER_WEIGHT * Pq,
              f"{NF4_BYTES_PER_WEIGHT:.4f}·Pq")
    elif Pq:
        # ZeRO-3 partitions the packed 4-bit bytes like any parameter (stored in the precision's dtype, bitsandbytes'
        # quant_storage); their quantization constants live on the parameter object, whole on every rank.
        place("parameters (not quantized)", _device(par_dev), b * (P - Pq) / N, "b·(P - Pq)/N")
        place("4-bit NF4 base linears (packed bytes)", _device(par_dev), Pq / 2 / N, "0.5·Pq/N")
        place("NF4 quantization constants", "gpu", (NF4_BYTES_PER_WEIGHT - 0.5) * Pq,
              f"{NF4_BYTES_PER_WEIGHT - 0.5:.4f}·Pq")
        # The base is quantized whole on each rank's GPU before deepspeed.initialize partitions it.
        add("whole 4-bit model before ZeRO-3 partitions it", "gpu", "load", "buffers",
            b * (P - Pq) + NF4_BYTES_PER_WEIGHT * Pq, f"b·(P - Pq) + {NF4_BYTES_PER_WEIGHT:.4f}·Pq")
    if Pq:
        largest_q = max(t.numel for t in tensors if t.quantized)
        # Each 4-bit matmul dequantizes its weight to the compute dtype, in forward and again in backward.
        add("dequantized weight of one 4-bit linear", "gpu", "forward_backward", "buffers", b * largest_q,
            "b·largest quantized linear (d·f)")
    elif stage < 3:
        place("parameters", "gpu", b * P, "b·P")
    elif par_dev == "nvme":
        # DeepSpeed keeps partitions under 1 MiB, and the first max_in_cpu elements, in host memory.
        swappable = sum(math.ceil(t.numel / N) for t in tensors if math.ceil(t.numel / N) * b >= MIN_SWAP_BYTES)
        swapped = max(0, swappable - buffers.param_max_in_cpu)
        if swapped:
            place("parameters", "nvme", b * swapped, "b·(partitions of 1 MiB and up - max_in_cpu)")
            place("parameters kept in host memory", "cpu", b * (P / N - swapped), "b·(P/N - those on NVMe)")
        else:
            place("parameters", "cpu", b * P / N, "b·P/N (within max_in_cpu: none on NVMe)")
    else:
        place("parameters", _device(par_dev), b * P / N, "b·P/N")

    # Gradients (16-bit, or fp32 under fp32 precision).
    if stage <= 1:
        place("gradients", "gpu", b * Pt, "b·Pt")
    elif stage == 2 and opt_dev == "none":
        held = zero2_gradient_partition((t.numel for t in tensors if t.trainable), N)
        place("gradients", "gpu", b * held, "b·(Pt/N + whole gradients of parameters straddling the partition edges)")
    elif stage == 3:
        # DeepSpeed keeps the reduced gradient partitions where the optimizer runs, in data_types.grad_accum_dtype.
        grad_b = PRECISION_BYTES.get(buffers.grad_accum_dtype or run.precision, b)
        place("gradients", "gpu" if opt_dev == "none" else "cpu", grad_b * Pt / N,
              "b·Pt/N" if grad_b == b else f"{grad_b}·Pt/N (grad_accum_dtype {buffers.grad_accum_dtype})")

    # Optimizer: fp32 master weights and Adam's two moments. Plain fp32 DDP updates the weights
    # themselves; every ZeRO stage keeps an fp32 copy of its partition even in fp32.
    share, share_f = (Pt, "Pt") if stage == 0 else (Pt / N, "Pt/N")
    opt_device = _device(opt_dev)
    if stage > 0 or b == 2:
        place("fp32 master weights", opt_device, 4 * share, f"4·{share_f}")
    place("Adam moments (fp32 exp_avg, exp_avg_sq)", opt_device, 8 * share, f"8·{share_f}")
    if opt_dev != "none":
        # CPU Adam reads fp32 gradients from a persistent host buffer (swapped with the states on NVMe).
        place("fp32 gradients for the offloaded optimizer", opt_device, 4 * share, f"4·{share_f}")
    else:
        step = {0: (4 * Pt if b == 2 else 0, "4·Pt"), 1: (4 * Pt / N, "4·Pt/N"), 2: (4 * Pt / N, "4·Pt/N")}.get(
            stage, (4 * min(buffers.sub_group_size, Pt / N), "4·min(sub_group_size, Pt/N)")
        )
        add("fp32 gradient copy for the optimizer step", "gpu", "optimizer_step", "buffers", *step)

    _add_buffers(add, tensors, option, buffers, b, Pt)
    items += activation_items(shape, run)
    on_gpus = cluster.accelerator == "cuda"
    if on_gpus:
        add("CUDA context, NCCL, allocator reserve", "gpu", "persistent", "overhead", CUDA_CONTEXT_BYTES, "fixed")

    # Host: the processes themselves, pinned-allocation slack and the model load.
    process, process_f = (
        (HOST_PROCESS_BYTES, "g x 3 GiB") if on_gpus else (CPU_ACCELERATOR_PROCESS_BYTES, "g x 0.5 GiB"))
    add("host process (Python, torch, CUDA libs)", "cpu", "persistent", "overhead", g * process, process_f)
    add("deepspeed launcher processes", "cpu", "persistent", "overhead", LAUNCHER_BYTES, "0.5 GiB per node")
    pinned = sum(i.bytes for i in items if i.device == "cpu" and i.category == "model_states")
    if stage == 3 and "nvme" in (par_dev, opt_dev):
        grad_b = PRECISION_BYTES.get(buffers.grad_accum_dtype or run.precision, b)
        _add_nvme_host_buffers(add, tensors, option, buffers, grad_b=grad_b, N=N, g=g, swapped=swapped, b=b)
    if on_gpus:
        add("pinned-allocation slack", "cpu", "persistent", "overhead", PINNED_SLACK * pinned,
            "0.5 x pinned host bytes")
    if Pq:
        # Quantized while loading: the 4-bit model builds up on the host, one 16-bit tensor read at a time.
        add("model load (4-bit while loading, one 16-bit tensor at a time)", "cpu", "load", "buffers",
            g * (b * (P - Pq) + NF4_BYTES_PER_WEIGHT * Pq + b * max(t.numel for t in tensors)),
            f"g x (b·(P - Pq) + {NF4_BYTES_PER_WEIGHT:.4f}·Pq + b·max tensor)")
    elif stage < 3:
        add("model load (whole model on each rank's host)", "cpu", "load", "buffers", g * b * P, "g x b·P")
    else:
        biggest = max(t.numel for t in tensors)
        add("model load (zero.Init: one tensor at a time)", "cpu", "load", "buffers", g * b * biggest, "g x b·max tensor")

    capacity = {
        "gpu": int(cluster.gpu_memory_gb * GiB),
        "cpu": int(cluster.cpu_memory_gb * GiB),
        "nvme": int((cluster.nvme_gb or 0) * GiB),
    }
    return Estimate(option, tuple(items), capacity)


def sub_group_numels(numels: Iterable[int], sub_group_size: int) -> list[int]:
    """Elements of each optimizer sub-group of one param group, from its parameters' partitions in order: DeepSpeed's
    ZeRO-3 closes a sub-group once it reaches sub_group_size, so one can exceed it by a tensor."""
    groups, current = [], 0
    numels = list(numels)
    for i, n in enumerate(numels):
        current += n
        if current >= sub_group_size or i == len(numels) - 1:
            groups.append(current)
            current = 0
    return groups


def largest_sub_group(numels: Iterable[int], sub_group_size: int) -> int:
    """Elements of the largest optimizer sub-group (GPT-J's embedding alone on one GPU exceeds 1e8)."""
    return max(sub_group_numels(numels, sub_group_size), default=0)


def _add_nvme_host_buffers(add: Callable[..., None], tensors: list[ParamTensor], option: Option,
                           buffers: ZeroBuffers, *, b: int, grad_b: int, N: int, g: int, swapped: int) -> None:
    """Host memory of ZeRO-Infinity: page-locked swap buffers and the gradients' fp32 copies before their swap."""
    trainable = [math.ceil(t.numel / N) for t in tensors if t.trainable]
    group = largest_sub_group(trainable, buffers.sub_group_size)
    if option.offload_params == "nvme":
        size = buffers.param_swap_buffer_size or max(math.ceil(t.numel / N) for t in tensors)
        add("NVMe swap buffers: parameters (pinned)", "cpu", "persistent", "buffers",
            g * buffers.param_swap_buffer_count * size * b,
            "g x buffer_count·buffer_size·b (buffer_size auto: the largest partition)")
        if swapped:  # the updated 16-bit partitions of one sub-group go out through it after the step
            add("NVMe swap buffers: 16-bit staging (pinned)", "cpu", "persistent", "buffers",
                g * group * b, "g x b·largest sub-group")
    if option.offload_optimizer == "nvme":
        add("NVMe swap buffers: optimizer states (pinned)", "cpu", "persistent", "buffers",
            g * buffers.optimizer_swap_buffer_count * group * 4, "g x buffer_count·4·largest sub-group")
        if grad_b < 4:  # at the accumulation boundary every 16-bit gradient partition is cast to fp32 at once
            add("fp32 gradient copies before their swap-out", "cpu", "optimizer_step", "buffers",
                g * 4 * sum(trainable), "g x 4·Pt/N (none with data_types.grad_accum_dtype fp32)")
        if swapped:
            add("optimizer init: one fp32 sub-group", "cpu", "load", "buffers",
                g * 4 * group, "g x 4·largest sub-group")


def _device(offload: str) -> Device:
    return "gpu" if offload == "none" else offload  # type: ignore[return-value]


def _add_buffers(
    add: Callable[..., None], tensors: list[ParamTensor], option: Option, buffers: ZeroBuffers, b: int, Pt: int
) -> None:
    """ZeRO's communication buckets and gathered weights, alive during forward and backward."""
    stage, bucket = option.stage, buffers.reduce_bucket_size
    if stage == 0:
        # The engine flattens gradients into all-reduce buckets of at most the bucket size.
        add("gradient all-reduce bucket", "gpu", "forward_backward", "buffers", b * min(bucket, Pt), "b·min(bucket, Pt)")
        return
    overlap = buffers.overlap_comm if buffers.overlap_comm is not None else stage == 3
    if stage in (1, 2):
        # Allocated at full size whatever the model (contiguous_gradients), doubled with overlap_comm.
        n = 2 if overlap else 1
        add("gradient reduce bucket(s)", "gpu", "forward_backward", "buffers", n * b * bucket, f"{n} x b·reduce_bucket_size")
        # All-gathers of the updated weights write into the flat weight buffer (all_gather_into_tensor): no bucket.
    else:
        add("gradient reduce bucket", "gpu", "forward_backward", "buffers", b * bucket, "b·reduce_bucket_size")
        modules: dict[str, int] = {}
        persistent = 0
        for t in tensors:
            if t.numel < buffers.param_persistence_threshold:
                persistent += t.numel  # small tensors stay gathered on every GPU
            else:
                modules[t.module] = modules.get(t.module, 0) + t.numel
        live = max(modules.values(), default=0) + min(buffers.prefetch_bucket_size, buffers.max_live_parameters)
        add("gathered parameters (largest module + prefetch)", "gpu", "forward_backward", "buffers", b * live,
            "b·(largest module + min(prefetch_bucket, max_live_params))")
        add("persistent small parameters", "gpu", "persistent", "buffers", b * persistent,
            "b·(parameters below param_persistence_threshold)")
    if stage >= 2:
        largest = max((t.numel for t in tensors if t.trainable), default=0)
        add("largest gradient before reduction", "gpu", "forward_backward", "buffers", b * largest,
            "b·largest trainable tensor")


def activation_bytes_per_layer(shape: ModelShape, run: RunShape) -> int:
    """Bytes autograd saves for one GPT-J block in training (flash/memory-efficient SDPA, model dropouts 0).

    Saved per token: the block input (kept by ln_1); ln_1's output when a layer reading it trains
    its weight on it; rotary q and k, v and the SDPA output (whose merged-heads view is out_proj's
    input): 4·d, and 2·d more with fused projections (the fused product's q and k columns stay with
    it); the GELU's f-wide tensors and fc_out's input when fc_out trains; LayerNorm mean and
    rstd and SDPA's logsumexp per head in fp32. Under LoRA the frozen layers keep no inputs, and each
    target keeps lora_B's rank-r input plus, with dropout, its dropped-out input and the mask.
    The first block under LoRA keeps less (its input needs no gradient); this counts every block in full.
    """
    return run.micro_batch_size * run.seq_len * _layer_bytes_per_token(shape, run)[0]


def _layer_bytes_per_token(shape: ModelShape, run: RunShape) -> tuple[int, str]:
    b, d, f, h = PRECISION_BYTES[run.precision], shape.n_embd, shape.inner, shape.n_head

    def keeps_input(linear: str) -> bool:  # is the linear's plain input saved for its weight gradient?
        return not run.lora or (linear in run.lora_targets and run.lora_dropout == 0)

    n_d = 1 + any(keeps_input(n) for n in ("q_proj", "k_proj", "v_proj", "fc_in")) + 4
    if run.fused_projections and not run.lora:
        # The GELU's input and v are views of the one fused product, which keeps its q and k columns alive too.
        n_d += 2
    n_f = GELU_SAVED_TENSORS + keeps_input("fc_out")
    per_token = (n_d * d + n_f * f) * b + (2 + h) * 4
    formula = f"({n_d}d + {n_f}f)·b + (2 + h)·4"
    if run.lora:
        for target in run.lora_targets:
            n_in = f if target == "fc_out" else d
            per_token += run.lora_rank * b + (n_in * (b + 1) if run.lora_dropout > 0 else 0)
        formula += " + per LoRA target r·b" + (" + in_features·(b + 1)" if run.lora_dropout > 0 else "")
    return per_token, formula


def logits_item(shape: ModelShape, run: RunShape) -> LineItem:
    """The head's logits and loss.

    Full logits (transformers' way, and this project's with model.chunked_loss=false): the fp32 logits (kept in
    the model output), cross-entropy's fp32 log-probabilities, and in backward their gradient and the logits'
    gradient: 4 fp32 copies. cls scores only the last token.
    Chunked (clm, finetune.model.chunked_loss): per predicted token the head's input row (d·b), its int64 target,
    fp32 log-sum-exp and a bool mask (13 bytes) stay until backward; one chunk of C = min(chunk, B·S) tokens
    is live at a time: forward its logits in b and fp32 plus logsumexp's fp32 scratch (C·V·(b + 8)), backward the
    fp32 recomputed logits turned gradient and its copy in b (C·V·(2b + 4)) and, when the head trains, the
    weight gradient summed over chunks in fp32 (V·d·4; the plain path writes its gradient in b too).
    """
    B, S, b, d, V = run.micro_batch_size, run.seq_len, PRECISION_BYTES[run.precision], shape.n_embd, shape.vocab_size
    phase: Phase = "forward_backward"
    if shape.head == "clm" and run.chunked_loss:
        from finetune.model.chunked_loss import default_chunk_tokens

        C = min(run.loss_chunk_tokens or default_chunk_tokens(V), B * S)
        head_trains = not run.lora or run.lora_train_head
        scratch = max(C * V * (b + 8), C * V * (2 * b + 4) + (V * d * 4 if head_trains else 0))
        head_grad = " + V·d·4" if head_trains else ""
        formula = f"B·S·(d·b + 13) + max(C·V·(b + 8), C·V·(2b + 4){head_grad}), C = {C}"
        return LineItem("logits and loss (chunked)", "gpu", phase, "activations", B * S * (d * b + 13) + scratch,
                        formula)
    n_logits, logits_f = {"clm": (B * S * V, "B·S·V"), "cls": (B * shape.num_labels, "B·num_labels"),
                          "qa": (B * S * 2, "B·S·2")}[shape.head]
    return LineItem("logits and loss (fp32)", "gpu", phase, "activations", 16 * n_logits, f"{logits_f}·4·4")


def activation_items(shape: ModelShape, run: RunShape) -> list[LineItem]:
    """Activation line items per GPU: saved tensors, final norm, logits and loss, backward scratch."""
    B, S, b = run.micro_batch_size, run.seq_len, PRECISION_BYTES[run.precision]
    d, f, L = shape.n_embd, shape.inner, shape.n_layer
    layer = activation_bytes_per_layer(shape, run)
    per_layer_f = f"B·S·({_layer_bytes_per_token(shape, run)[1]})"
    if run.activation_checkpointing:
        saved = L * B * S * d * b + layer
        saved_f = f"L·B·S·d·b (checkpointed block inputs) + one block recomputed: {per_layer_f}"
    else:
        saved = L * layer
        saved_f = f"L·{per_layer_f}"
    phase: Phase = "forward_backward"
    return [
        LineItem("activations saved for backward", "gpu", phase, "activations", saved, saved_f),
        LineItem("final LayerNorm input and output", "gpu", phase, "activations", 2 * B * S * d * b, "2·B·S·d·b"),
        logits_item(shape, run),
        LineItem("backward scratch (one block's gradients)", "gpu", phase, "activations", B * S * (2 * f + 4 * d) * b,
                 "B·S·(2f + 4d)·b"),
    ]


# --- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    run: RunShape
    cluster: Cluster
    margin: float
    options: tuple[Estimate, ...]  # fastest first
    recommended: Optional[Estimate]
    reason: str


def plan(
    shape: ModelShape,
    run: RunShape,
    cluster: Cluster,
    *,
    margin: float = 0.1,
    buffers: Union[ZeroBuffers, Mapping[Union[int, Option], ZeroBuffers]] = ZeroBuffers(),
    options: Sequence[Option] = SPEED_ORDER,
) -> Plan:
    """Estimate every option of `options` (fastest first); recommend the fastest whose every device keeps `margin` free.

    `buffers`: one setting for all options, or one per Option or per ZeRO stage (an Option's own entry wins;
    stages left out: DeepSpeed's defaults).
    """
    if not 0 <= margin < 1:
        raise ConfigError(f"plan.margin is {margin}; use a fraction of memory to keep free, e.g. 0.1.")

    def option_buffers(option: Option) -> ZeroBuffers:
        if isinstance(buffers, ZeroBuffers):
            return buffers
        return buffers.get(option, buffers.get(option.stage, ZeroBuffers()))

    if run.quantized_base:  # a 4-bit base on NVMe is neither modelled nor tested (docs/lora.md, QLoRA limits)
        options = [o for o in options if o.offload_params != "nvme"]
    estimates = tuple(estimate(shape, run, cluster, o, buffers=option_buffers(o)) for o in options)
    recommended = next((e for e in estimates if e.margin >= margin), None)
    return Plan(shape, run, cluster, margin, estimates, recommended, _reason(estimates, recommended, margin, cluster))


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _reason(options: tuple[Estimate, ...], best: Optional[Estimate], margin: float, cluster: Cluster) -> str:
    def need(e: Estimate) -> str:
        dev = e.limiting_device
        return f"{e.option.name} needs {_gib(e.total(dev))} GiB of {dev.upper()} ({_gib(e.capacity[dev])} available)"

    if best is None:
        smallest = min(options, key=lambda e: e.gpu_bytes)
        return (
            f"Nothing fits with {margin:.0%} headroom on {cluster.nodes} x {cluster.gpus_per_node} GPUs: the least "
            f"GPU memory is {_gib(smallest.gpu_bytes)} GiB ({smallest.option.name}); {need(smallest)}. Lower "
            "trainer.micro_batch_size or data.max_seq_len, turn on activation checkpointing, use LoRA, or add GPUs."
        )
    faster = options[: options.index(best)]
    text = (
        f"{best.option.name} is the fastest option with at least {margin:.0%} of every device free: "
        f"{_gib(best.gpu_bytes)} of {_gib(best.capacity['gpu'])} GiB per GPU, "
        f"{_gib(best.cpu_bytes)} of {_gib(best.capacity['cpu'])} GiB CPU RAM per node."
    )
    if best.option.stage == 0:
        text += " Stage 0 is DeepSpeed as plain data parallel (no ZeRO partitioning)."
    if faster:
        text += f" Faster options do not keep {margin:.0%} free: " + "; ".join(need(e) for e in faster) + "."
    return text


def format_table(plan: Plan) -> str:
    """The plan as text: every option with per-GPU and per-node totals, the pick and its breakdown."""
    s, r, c = plan.shape, plan.run, plan.cluster
    P, Pt = stored_parameters(s, r), trainable_parameters(s, r)
    lora = f"LoRA r={r.lora_rank} on {','.join(r.lora_targets)}" if r.lora else "full fine-tuning"
    if r.quantized_base:
        lora = "Q" + lora + ", base linears in 4-bit NF4"
    lines = [
        f"Model: GPT-J L={s.n_layer} d={s.n_embd} f={s.inner} h={s.n_head} V={s.vocab_size}, head {s.head}; "
        f"P={P:,} parameters, Pt={Pt:,} trainable ({lora})",
        f"Run: {r.precision}, micro batch B={r.micro_batch_size} x S={r.seq_len} tokens, activation checkpointing "
        f"{'on' if r.activation_checkpointing else 'off'}",
        f"Cluster: {c.nodes} node(s) x g={c.gpus_per_node} GPUs (N={c.world}), {c.gpu_memory_gb:g} GiB per GPU, "
        f"{c.cpu_memory_gb:g} GiB CPU RAM per node, " + (f"{c.nvme_gb:g} GiB NVMe per node" if c.nvme_gb else "no NVMe"),
        "",
        f"{'#':>2}  {'option (fastest first)':<40}{'GPU GiB/GPU':>12}{'CPU GiB/node':>13}{'NVMe GiB/node':>14}  fits  headroom",
    ]
    for i, e in enumerate(plan.options, 1):
        nvme = _gib(e.nvme_bytes) if e.nvme_bytes else "-"
        mark = "  <- recommended" if e is plan.recommended else ""
        lines.append(
            f"{i:>2}  {e.option.name:<40}{_gib(e.gpu_bytes):>12}{_gib(e.cpu_bytes):>13}{nvme:>14}  "
            f"{'yes' if e.fits else 'no':<4}  {_headroom(e.margin):>8}{mark}"
        )
    lines += ["", ("Recommended: " if plan.recommended else "Recommendation: none. ") + plan.reason, ""]
    shown = plan.recommended or min(plan.options, key=lambda e: e.gpu_bytes)
    lines.append(f"Breakdown of {shown.option.name} (peak = persistent + the largest transient phase):")
    lines.append(f"  {'component':<50}{'device':<7}{'phase':<17}{'GiB':>8}  formula")
    for it in shown.items:
        lines.append(f"  {it.name:<50}{it.device:<7}{it.phase:<17}{it.bytes / GiB:>8.2f}  {it.formula}")
    return "\n".join(lines)


def _headroom(m: float) -> str:
    return "-inf" if m == -math.inf else f"{m:.0%}"


def plan_to_json(plan: Plan) -> dict:
    """The plan as JSON-ready data: inputs, every option with its line items, the pick and why."""

    def option(e: Estimate) -> dict:
        def device(dev: str) -> dict:
            return {
                "total_bytes": e.total(dev),
                "capacity_bytes": e.capacity[dev],
                "components": [
                    {k: v for k, v in asdict(i).items() if k != "device"} for i in e.items if i.device == dev
                ],
            }

        return {
            "name": e.option.name,
            "stage": e.option.stage,
            "offload": {"optimizer": e.option.offload_optimizer, "params": e.option.offload_params},
            "gpu_per_gpu": device("gpu"),
            "cpu_per_node": device("cpu"),
            "nvme_per_node": device("nvme"),
            "fits": e.fits,
            "headroom": None if e.margin == -math.inf else e.margin,
            "recommended": e is plan.recommended,
        }

    return {
        "model": asdict(plan.shape) | {"parameters": stored_parameters(plan.shape, plan.run),
                                       "trainable_parameters": trainable_parameters(plan.shape, plan.run)},
        "run": asdict(plan.run) | {"lora_targets": list(plan.run.lora_targets)},
        "cluster": asdict(plan.cluster),
        "margin": plan.margin,
        "options": [option(e) for e in plan.options],
        "recommended": plan.recommended.option.name if plan.recommended else None,
        "reason": plan.reason,
    }

