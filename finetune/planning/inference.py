"""The memory check of the after-training tools (predict, evaluate, generate), as training has its own.

A model whose weights alone cannot fit the memory that will hold them is refused before it is built: a config.json
with a cls `num_labels` in the millions, a huge vocabulary or layer count would otherwise allocate (and initialize)
tens of GB first, then die with an out-of-memory error or take the node down. Only the weights are counted, so
nothing that fits is refused; what the estimate leaves out (activations, the KV cache) is small next to them.

The parameter count is in closed form (no per-layer loop: a config.json may claim billions of layers).
"""
from __future__ import annotations

import os
from typing import Optional

from finetune.config import ConfigError
from finetune.planning.choice import ModelDims
from finetune.planning.estimate import GiB

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
SHORT_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_ESCAPE = "check_memory=false skips this check"


def parameter_count(model: ModelDims, *, task: str, num_labels: Optional[int] = None) -> tuple[int, int]:
    """(all parameters, those of the task head) of a GPT-J config: equal to planning.estimate.count_parameters."""
    d, V, L = model.n_embd, model.vocab_size, model.n_layer
    f = model.n_inner if model.n_inner is not None else 4 * d
    per_layer = 2 * d + 4 * d * d + (d * f + f) + (f * d + d)  # ln_1, q/k/v/out_proj, fc_in, fc_out
    head = {"clm": V * d + V, "cls": (num_labels or 2) * d, "qa": 2 * d + 2}[task]
    return V * d + L * per_layer + 2 * d + head, head


def device_capacity(device: str, *, ranks_on_host: int = 1) -> tuple[int, str]:
    """Bytes one process may hold on `device` (cpu, cuda, cuda:N) and a description: the accelerator's total
    memory, or on the CPU the host's total RAM shared by the ranks on this host."""
    import psutil

    kind, _, index = device.partition(":")
    if kind == "cpu":
        total = psutil.virtual_memory().total
        share = f" / {ranks_on_host} ranks on this host" if ranks_on_host > 1 else ""
        return total // max(1, ranks_on_host), f"host RAM, {total / GiB:.1f} GiB total{share}"
    import torch

    if kind == "cuda" and torch.cuda.is_available():
        number = int(index) if index else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(number).total_memory
        return total, f"{torch.cuda.get_device_name(number)} memory"
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    number = int(index) if index else int(os.environ.get("LOCAL_RANK", 0))
    return int(accelerator.total_memory(number)), f"{accelerator.device_name()} memory"


def check_inference_memory(model: ModelDims, *, task: str, dtype: str, device: str, source: str,
                           shards: int = 1, ranks_on_host: int = 1, capacity: Optional[int] = None) -> None:
    """ConfigError unless the weights of `model` (with `task`'s head) in `dtype`, split over `shards` ranks
    (ZeRO-3 inference), fit the memory of `device` (or `capacity` bytes); `source` names the model in the message."""
    total, head = parameter_count(model, task=task, num_labels=getattr(model, "num_labels", None))
    dtype = SHORT_NAMES.get(dtype.removeprefix("torch."), dtype.removeprefix("torch."))
    need = total * DTYPE_BYTES[dtype] // max(1, shards)
    if capacity is None:
        capacity, where = device_capacity(device, ranks_on_host=ranks_on_host)
    else:
        where = f"{capacity / GiB:.1f} GiB given"
    if need <= capacity:
        return
    sizes = f"n_layer={model.n_layer:,}, n_embd={model.n_embd:,}, vocab_size={model.vocab_size:,}"
    if task == "cls":
        sizes += f", num_labels={getattr(model, 'num_labels', 2):,}: the classification head alone {head:,}"
    split = f", split over {shards} ranks" if shards > 1 else ""
    raise ConfigError(
        f"The model of {source} cannot fit: its weights alone need {need / GiB:,.1f} GiB in {dtype}{split} "
        f"({total:,} parameters; {sizes}), and {device} has {capacity / GiB:.1f} GiB "
        f"({where}). Check the sizes in its config.json (num_labels, vocab_size, n_layer, n_embd: a head of "
        f"millions of labels is a mistake there), load it in bf16 (model.dtype=bf16), or use a device with more "
        f"memory; {_ESCAPE}."
    )
