"""GPT-J with a 4-bit NF4 base (QLoRA's quantization): bitsandbytes `Linear4bit` in place of the block's linears.

The six linear layers of every block (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc_in`, `fc_out`) hold their
weights as 4-bit NormalFloat, 64 weights per block with one absmax constant each, the constants themselves
quantized to 8 bits (double quantization) -- the QLoRA paper's settings, and transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`.
Embeddings, LayerNorms, biases and the heads keep their dtype. A layer computes in `compute_dtype`: it
dequantizes its weight to that dtype for each matmul.

`load_quantized_into` quantizes while loading: each 16-bit tensor is read from the checkpoint, quantized, and
dropped before the next is read, so the whole 16-bit model is never in memory (GPT-J 6B: 12 GB in bf16,
3.8 GB with its linears in 4 bits). `quantize_linears` quantizes a model that is already materialized (a random init).

Same bytes as transformers: both quantize with `bitsandbytes.functional.quantize_4bit` (here in chunks of whole
blocks, see `quantize_nf4`), so a model quantized here and transformers' one quantized from the same checkpoint hold
identical 4-bit weights and constants (tests/unit/training/test_qlora.py).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from finetune.model.heads import GPTJPreTrainedModel, build_model

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
BLOCKSIZE = 64  # weights per absmax constant (bitsandbytes' and the paper's default for 4-bit)
# Written next to a QLoRA adapter: its base's quantization as BitsAndBytesConfig keyword arguments, so that tools
# and users quantize the base the way it was trained.
BASE_QUANTIZATION_FILE = "base_quantization_config.json"


def _drop_kernel_fetch_warning(record: logging.LogRecord) -> bool:
    # On AVX512-BF16 CPUs bitsandbytes tries, at import, to fetch an optional inference kernel from the Hugging
    # Face hub and warns when it cannot (offline machines); that kernel is of no use here (see NF4Linear).
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


# Installed before anything imports bitsandbytes (peft does, at its own import): import this module first.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernel_fetch_warning)


def _bnb():
    import bitsandbytes

    return bitsandbytes


@dataclass(frozen=True)
class NF4Settings:
    compute_dtype: torch.dtype
    double_quant: bool = True
    # The packed 4-bit weights' storage dtype (bitsandbytes' quant_storage): uint8, two weights per byte.
    quant_storage: torch.dtype = torch.uint8


@functools.lru_cache(maxsize=None)  # one class: isinstance checks and pickling need it
def _linear4bit_class():
    bnb = _bnb()

    class NF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit, with two changes for training:

        - its state dict loads back (a DeepSpeed checkpoint holds the module's state dict): the quantization
          constants bitsandbytes adds to it are dropped on load, as the base is re-quantized from the same
          weights at every start, and the packed weight is copied in as saved;
        - the AVX512-BF16 CPU inference path is off: it repacks the weight in place for a kernel that computes
          in bf16 whatever the compute dtype, and that packing has no backward, so a training step after an
          evaluation would lose the gradient through the base layer.
        """

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.support_avx512bf16_for_cpu = False

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
                del state_dict[key]
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)

    return NF4Linear


def is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "NF4Linear" or type(module).__module__.startswith("bitsandbytes")


# Elements quantized at a time. bitsandbytes' CPU quantizer makes ~17 bytes of temporaries per element (fp32 copies,
# int32 codes); in chunks of 4M that is ~70 MB instead of ~1.1 GB for a GPT-J 6B fc_in.
QUANTIZE_CHUNK = 2**22


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Hand the C heap's free pages back to the OS. The quantizer's temporaries (16 MB each for a 4M chunk) fall
    below glibc's mmap threshold, so once freed they stay in the heap, counted in RSS, between the chunks and tensors
    that outlive them: measured at GPT-J width, 0.2-0.4 GB of a 1.1 GB load (bench/qlora_memory.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def quantize_nf4(weight: torch.Tensor, settings: NF4Settings):
    """bitsandbytes.functional.quantize_4bit(weight, nf4, blocksize 64, double quantization), chunk by chunk.

    The same bytes as one call: each 64-weight block is quantized on its own (chunks hold whole blocks), and the
    second level (the absmax constants, less their mean, in blocks of 256) runs once on all of them, as
    bitsandbytes does (tests/unit/training/test_qlora.py compares with transformers' quantization). The outputs are
    allocated once, before any temporary, and each chunk's result is copied in: no list of pieces to concatenate."""
    bnb = _bnb()
    functional = bnb.functional
    flat = weight.contiguous().reshape(-1)
    if flat.numel() <= QUANTIZE_CHUNK:
        return functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE,
                                        compress_statistics=settings.double_quant, quant_type="nf4",
                                        quant_storage=settings.quant_storage)
    packed_all = torch.empty(-(-flat.numel() // 2), dtype=torch.uint8, device=weight.device)  # 2 weights a byte
    absmax_all = torch.empty(-(-flat.numel() // BLOCKSIZE), dtype=torch.float32, device=weight.device)
    for start in range(0, flat.numel(), QUANTIZE_CHUNK):
        part, state = functional.quantize_4bit(flat[start:start + QUANTIZE_CHUNK], blocksize=BLOCKSIZE,
                                               compress_statistics=False, quant_type="nf4")
        packed_all[start // 2:start // 2 + part.numel()] = part.reshape(-1)
        absmax_all[start // BLOCKSIZE:start // BLOCKSIZE + state.absmax.numel()] = state.absmax
        del part, state
    packed_all = packed_all.view(settings.quant_storage).unsqueeze(1)  # as bitsandbytes shapes it
    code = functional.get_4bit_type("nf4", device=weight.device)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=BLOCKSIZE, code=code, quant_type="nf4")
    if not settings.double_quant:
        return packed_all, functional.QuantState(absmax=absmax_all, **common)
    offset = absmax_all.mean()
    quantized_absmax, state2 = functional.quantize_blockwise(absmax_all - offset, blocksize=256)
    return packed_all, functional.QuantState(absmax=quantized_absmax, offset=offset, state2=state2, **common)


def _quantized_weight(weight: torch.Tensor, module: nn.Module, settings: NF4Settings) -> nn.Parameter:
    bnb = _bnb()
    packed, state = quantize_nf4(weight, settings)
    if weight.device.type == "cpu":
        release_freed_host_memory()
    module.quant_state = state
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                             compress_statistics=settings.double_quant, quant_type="nf4",
                             quant_storage=settings.quant_storage, module=module, bnb_quantized=True)


def _targets(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not is_quantized_linear(module)
            and name.startswith("transformer.h.") and name.rsplit(".", 1)[-1] in QUANTIZED_LINEARS]


def _swap_in_4bit(model: nn.Module, name: str, settings: NF4Settings, *, device: str) -> nn.Module:
    """Replace linear `name` by an NF4Linear (weight still a placeholder) with the same bias; returns it."""
    old = model.get_submodule(name)
    new = _linear4bit_class()(old.in_features, old.out_features, bias=old.bias is not None,
                              compute_dtype=settings.compute_dtype, compress_statistics=settings.double_quant,
                              quant_type="nf4", quant_storage=settings.quant_storage, device=device)
    if old.bias is not None:
        new.bias = old.bias
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return new


def quantize_linears(model: GPTJPreTrainedModel, settings: NF4Settings) -> GPTJPreTrainedModel:
    """Quantize the block linears of a materialized model in place, one layer at a time; returns it."""
    with torch.no_grad():
        for name in _targets(model):
            weight = model.get_submodule(name).weight.detach()
            module = _swap_in_4bit(model, name, settings, device="meta")
            module.weight = _quantized_weight(weight, module, settings)
            del weight
    model.is_loaded_in_4bit = True  # transformers' flag: peft then wraps these layers with its 4-bit LoRA layer
    return model


def prepare_for_quantized_load(model: GPTJPreTrainedModel, settings: NF4Settings):
    """Swap the block linears of a meta model for 4-bit ones; returns the `materialize` hook of
    `hf_weights.load_state_into` that quantizes each of their weights as it is read."""
    owners = {f"{name}.weight": _swap_in_4bit(model, name, settings, device="meta") for name in _targets(model)}
    model.is_loaded_in_4bit = True  # transformers' flag: peft then wraps these layers with its 4-bit LoRA layer

    def materialize(name: str, tensor: torch.Tensor, placeholder: nn.Parameter) -> nn.Parameter:
        if name in owners:
            return _quantized_weight(tensor, owners[name], settings)
        return nn.Parameter(tensor, requires_grad=placeholder.requires_grad)

    return materialize


def load_quantized_into(model: GPTJPreTrainedModel, model_dir: str | Path, *, dtype: torch.dtype,
                        settings: NF4Settings, device: torch.device | str = "cpu"):
    """Load a checkpoint into a meta `model`, quantizing the block linears tensor by tensor (read in `dtype`,
    the dtype the other weights keep) on `device` (a GPU quantizes in milliseconds what a CPU takes seconds for);
    returns hf_weights' LoadReport."""
    from finetune.model.hf_weights import load_state_into

    materialize = prepare_for_quantized_load(model, settings)
    return load_state_into(model, model_dir, dtype=dtype, device=device, materialize=materialize)


def load_pretrained_quantized(
    model_dir: str | Path, *, task: str, dtype: torch.dtype, compute_dtype: Optional[torch.dtype] = None,
    config_overrides: Optional[Mapping[str, Any]] = None,
) -> GPTJPreTrainedModel:
    """`hf_weights.load_pretrained` with a 4-bit NF4 base (on the CPU; bitsandbytes moves it with `.to`)."""
    from finetune.model import hf_weights

    model_dir = hf_weights.resolve_model_dir(model_dir)
    config = hf_weights.read_config(model_dir)
    if config_overrides:
        config = hf_weights._override(config, dict(config_overrides))
    model = build_model(config, task=task, device="meta")
    load_quantized_into(model, model_dir, dtype=dtype, settings=NF4Settings(compute_dtype=compute_dtype or dtype))
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the block linears' weights: the packed 4-bit data plus its quantization constants (`quantized`),
    and what the same weights take in 16 bits (`bf16`)."""
    quantized = sixteen_bit = 0
    for module in model.modules():
        if not is_quantized_linear(module):
            continue
        weight = module.weight
        quantized += weight.numel() * weight.element_size()
        state = weight.quant_state
        quantized += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
        if state.state2 is not None:
            quantized += state.state2.absmax.numel() * state.state2.absmax.element_size()
            quantized += state.state2.code.numel() * state.state2.code.element_size()
        sixteen_bit += 2 * module.in_features * module.out_features
    return {"quantized": quantized, "bf16": sixteen_bit}
