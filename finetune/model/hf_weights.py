"""Hugging Face-format checkpoints: read, low-memory load (plain or ZeRO-3 partitioned), atomic save.

Loading streams one tensor at a time from the checkpoint files into a model built on the meta
device, so peak host memory stays near the size of the weights in the target dtype (plus the
largest tensor), instead of the two full copies of `model.load_state_dict(torch.load(...))`.
Under ZeRO-3 every rank copies only its own partition of each tensor: no communication, and
host memory per rank near model size / world size.

Layouts read: `model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json`. Layout written: safetensors (sharded above `max_shard_size`), or .bin.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import nn

from finetune.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, make_private, new_file_mode, swap_into_place
from finetune.model import HEADS, GPTJConfig, GPTJPreTrainedModel, ModelConfigError, build_model
from finetune.model.gptj import FUSED_MODULE, FUSED_PARTS, init_module_weights, split_fused

logger = logging.getLogger(__name__)

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# HF's GPT-J checkpoints on the hub (saved by older transformers) also hold the attention's causal-mask
# buffers. They are constants, not weights (this model builds its mask on the fly), so they are skipped.
_MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")

# A .bin file is read through one memory map; pages it touched stay in this process's RSS until the
# map is dropped, so it is re-opened after this many bytes to keep the overhead bounded.
_BIN_REMAP_BYTES = 256 * 2**20

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or does not fit the model. The message names the fix."""


def torch_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """`bf16` | `fp16` | `fp32` (or HF's `bfloat16` | `float16` | `float32`) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"Unknown dtype {name!r}; use one of bf16, fp16, fp32.")
    return DTYPES[name]


# --- locating a checkpoint ------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name: the Hub's form, and what never names a local path


def looks_local(path: str) -> bool:
    """Whether `path` names a local directory rather than a Hub repo: it starts with ./ ../ / or ~, its parent
    directory exists, or it is not of the Hub's org/name form. Such a path is never sent to the Hub."""
    repo_part = path.partition("@")[0]
    if path.startswith((".", "/", "~", "\\")) or not _HUB_ID.fullmatch(repo_part):
        return True
    return Path(repo_part).parent.exists() or Path(path).parent.exists()


def resolve_model_dir(path: str | Path) -> Path:
    """A local checkpoint directory as is; a Hub id (`org/name`, optionally `@revision`) downloaded when online.

    A path that looks local (see `looks_local`) is never fetched from the Hub, so a typo or the wrong working
    directory fails here instead of loading someone else's model; a Hub fetch logs the repo, revision and commit.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(
            f"model.path {str(path)!r} is a file; point it at the checkpoint directory that holds config.json."
        )
    if isinstance(path, Path) or looks_local(str(path)):
        raise CheckpointError(
            f"model.path {str(path)!r}: no such local model dir ({local.absolute()} does not exist; paths are "
            f"relative to the working directory {Path.cwd()}). Pass an existing directory holding config.json and "
            "the weights. Only an org/name id whose org is not a local directory is fetched from the Hugging Face "
            "Hub."
        )
    repo_id, _, revision = str(path).partition("@")
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    if _rank() == 0:
        logger.warning("model.path %r is not a local directory: fetching Hugging Face Hub repo %s at revision %s%s.",
                       str(path), repo_id, revision or "main", " (offline: local cache only)" if offline else "")
    try:
        from huggingface_hub import snapshot_download

        def fetch(patterns: list[str]) -> Path:
            return Path(snapshot_download(
                repo_id, revision=revision or None, allow_patterns=patterns, local_files_only=offline))

        # safetensors first: GPT-J's hub repo also has a 24 GB pytorch_model.bin that would be downloaded for nothing.
        model_dir = fetch(["*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab*", "merges*"])
        if not _weight_files_present(model_dir):
            model_dir = fetch(["*.json", "*.bin", "*.txt", "tokenizer*", "vocab*", "merges*"])
    except Exception as err:  # offline, unknown repo, network down, gated: one answer for all
        why = ("the Hugging Face Hub is offline (HF_HUB_OFFLINE) and it is not cached" if offline
               else f"downloading it failed ({type(err).__name__}: {err})")
        raise CheckpointError(
            f"model.path {str(path)!r} is not a local directory and {why}. Download the checkpoint beforehand "
            f"(e.g. `huggingface-cli download {repo_id} --local-dir DIR`) and set model.path=DIR."
        ) from None
    if _rank() == 0:  # the snapshot dir is named by the commit the revision resolved to
        logger.warning("Hugging Face Hub repo %s at revision %s is commit %s: %s", repo_id, revision or "main",
                       model_dir.name, model_dir)
    return model_dir


def _weight_files_present(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX))


def read_config(model_dir: str | Path) -> GPTJConfig:
    """The GPTJConfig of a checkpoint directory's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json; a Hugging Face checkpoint directory holds config.json next to the "
            "weights. Point model.path at that directory."
        )
    try:
        return GPTJConfig.from_json_file(path)
    except ModelConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


# --- reading tensors --------------------------------------------------------------------------------
_PREAD_SUPPORTED: Optional[bool] = None


def open_safetensors(file: Path, *, mapped: bool = False):
    """safe_open of `file`; a file whose header safetensors cannot parse (truncated, corrupt, not safetensors) is
    a CheckpointError naming it. Reads with pread when this safetensors has it, unless `mapped`: the tensors pread
    returns own their memory, while a memory map keeps every page read so far resident (counted in RSS) until it
    is closed."""
    from safetensors import SafetensorError, safe_open

    global _PREAD_SUPPORTED
    try:
        if _PREAD_SUPPORTED is not False and not mapped:
            try:
                handle = safe_open(str(file), framework="pt", backend="pread")
                _PREAD_SUPPORTED = True
                return handle
            except TypeError:
                _PREAD_SUPPORTED = False
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({type(err).__name__}: {err}); it is probably truncated or "
            "corrupt (an interrupted download or copy). Download or copy it again."
        ) from None


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A .bin file's tensors, memory-mapped when its format allows; torch's restricted unpickler refuses anything
    but tensors and containers, and an unreadable file is a CheckpointError naming it."""
    try:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (pre-zipfile) .bin files cannot be memory-mapped
            logger.warning("%s is in torch's legacy format: loading it whole (re-save it for low memory).", file)
            return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"{file} cannot be read as torch weights ({type(err).__name__}: {str(err).splitlines()[0]}); it is "
            "truncated, corrupt, or holds objects other than tensors. Download or copy it again, or use a "
            "safetensors checkpoint."
        ) from None


class _CheckpointReader:
    """Names, shapes and data of a checkpoint's tensors, read one at a time from whichever layout is there."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        if (model_dir / SAFE_WEIGHTS).is_file() or (model_dir / SAFE_INDEX).is_file():
            self.format = "safetensors"
            files = self._files(SAFE_WEIGHTS, SAFE_INDEX)
        elif (model_dir / BIN_WEIGHTS).is_file() or (model_dir / BIN_INDEX).is_file():
            self.format = "bin"
            files = self._files(BIN_WEIGHTS, BIN_INDEX)
        else:
            raise CheckpointError(
                f"{model_dir} holds no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}. "
                "Point model.path at a complete Hugging Face checkpoint directory."
            )
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._bin_cache: tuple[Optional[Path], dict[str, torch.Tensor]] = (None, {})
        self._bin_bytes = 0
        for file in files:
            for name, shape in self._shapes_in(file):
                self.file_of[name], self.shapes[name] = file, shape
        self._release_bin()

    def _files(self, single: str, index: str) -> list[Path]:
        if (self.model_dir / single).is_file():
            return [self.model_dir / single]
        try:
            weight_map = json.loads((self.model_dir / index).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(
                f"{self.model_dir / index} is not a valid index ({err!r}); re-save the checkpoint.") from None
        files = [self.model_dir / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{self.model_dir / index} lists shards that are missing: {absent[:5]}; "
                                  "the download or copy is incomplete.")
        return files

    def _shapes_in(self, file: Path) -> Iterator[tuple[str, tuple[int, ...]]]:
        if self.format == "safetensors":
            with open_safetensors(file) as f:
                for name in f.keys():
                    yield name, tuple(f.get_slice(name).get_shape())
        else:
            for name, tensor in self._bin_state(file).items():
                yield name, tuple(tensor.shape)

    def _bin_state(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache[0] != file:
            self._bin_cache, self._bin_bytes = (file, _load_bin(file)), 0
        return self._bin_cache[1]

    def _release_bin(self) -> None:
        self._bin_cache = (None, {})

    def _raw(self, name: str) -> tuple[torch.Tensor, bool]:
        """The tensor, and whether it owns its memory (False: a view into a file map that must be copied)."""
        file = self.file_of[name]
        if self.format == "safetensors":
            with open_safetensors(file) as f:
                return f.get_tensor(name), bool(_PREAD_SUPPORTED)
        tensor = self._bin_state(file)[name]
        self._bin_bytes += tensor.nbytes
        if self._bin_bytes > _BIN_REMAP_BYTES:
            self._release_bin()  # the caller's reference keeps this tensor's pages alive until it copies them
        return tensor, False

    def read(self, name: str, *, dtype: torch.dtype, device: torch.device, mapped: bool = False) -> torch.Tensor:
        """Tensor `name` in `dtype` on `device`, owning its memory; with `mapped`, a safetensors tensor already in
        `dtype` that stays on the CPU is returned memory-mapped from its file instead (copy-on-write)."""
        if mapped and self.format == "safetensors" and device.type == "cpu":
            with open_safetensors(self.file_of[name], mapped=True) as f:
                tensor = f.get_tensor(name)
            if tensor.dtype == dtype:
                return tensor
        tensor, owned = self._raw(name)
        return tensor.to(device=device, dtype=dtype, copy=not owned)

    def read_joined(self, names: list[str], *, dtype: torch.dtype, device: torch.device,
                    mapped: bool = False) -> torch.Tensor:
        """Tensors `names` stacked along dim 0 (a fused block's weight from its four HF tensors), or the one tensor."""
        if len(names) == 1:
            return self.read(names[0], dtype=dtype, device=device, mapped=mapped)
        return torch.cat([self.read(n, dtype=dtype, device=device) for n in names])

    def read_flat_joined(self, names: list[str], start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of `names` stacked along dim 0 and flattened: stacking along dim 0 concatenates
        the flattened tensors, so each piece comes from the tensor that holds it."""
        pieces, offset = [], 0
        for name in names:
            size = math.prod(self.shapes[name])
            lo, hi = max(start, offset), min(end, offset + size)
            if lo < hi:
                pieces.append(self.read_flat(name, lo - offset, hi - offset))
            offset += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def joined_shape(self, names: list[str]) -> Optional[tuple[int, ...]]:
        """The shape of `names` stacked along dim 0; None when one is absent or their trailing dims differ."""
        shapes = [self.shapes.get(n) for n in names]
        if any(s is None or len(s) == 0 for s in shapes) or len({s[1:] for s in shapes}) != 1:
            return shapes[0] if len(shapes) == 1 else None
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only the rows that hold them when it can.
        May be a view into a file map: copy it, then drop it."""
        shape = self.shapes[name]
        if self.format == "safetensors" and len(shape) > 0:
            row = math.prod(shape[1:])
            first, last = start // row, -(-end // row)
            with open_safetensors(self.file_of[name]) as f:
                rows = f.get_slice(name)[first:last]
            return rows.reshape(-1)[start - first * row:end - first * row]
        return self._raw(name)[0].reshape(-1)[start:end]


# --- loading ------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did: tensors copied, head weights freshly initialized, checkpoint tensors left unused."""

    model_dir: Path
    format: str  # safetensors | bin
    loaded: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def _is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if _is_partitioned(param) else tuple(param.shape)


def _parameter_slots(model: nn.Module) -> dict[str, tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Each parameter under its first name, with every (module, attribute) holding it (tied weights share one)."""
    slots: dict[int, tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        slots.setdefault(id(param), (name, param, []))[2].append((module, attr))
    return {name: (param, holders) for name, param, holders in slots.values()}


def hf_names_of(param_name: str) -> list[str]:
    """The Hugging Face tensors a parameter holds, in order along dim 0: four for a fused block's weight
    (finetune.model.gptj.FusedInputProjection), fc_in's bias for its bias, else the parameter's own name."""
    owner, _, attr = param_name.rpartition(".")
    block, dot, module = owner.rpartition(".")
    if module != FUSED_MODULE:
        return [param_name]
    prefix = block + dot
    return [f"{prefix}{part}.weight" for part in FUSED_PARTS] if attr == "weight" else [f"{prefix}mlp.fc_in.bias"]


def hf_state_dict(state: Mapping[str, Any], config: GPTJConfig) -> dict[str, Any]:
    """`state` with a fused block's tensors split into Hugging Face's (views; lazy tensors stay lazy), e.g. a
    ZeRO-3 consolidated state dict (DeepSpeed names it by parameter, not through the module's state-dict hooks)."""
    from finetune.model.gptj import fused_part_rows

    out: dict[str, Any] = {}
    for name, tensor in state.items():
        names = hf_names_of(name)
        if len(names) == 1:
            out[names[0]] = tensor
        elif isinstance(tensor, torch.Tensor):
            out.update(zip(names, split_fused(tensor, fused_part_rows(config))))
        else:  # a tensor DeepSpeed gathers on demand: gathered once, when the first of its parts is saved
            out.update(zip(names, _LazyRows.parts(tensor, fused_part_rows(config))))
    return out


class _LazyRows:
    """Rows [start, end) of a lazily gathered tensor (tools/export's), gathering it once for all its parts."""

    def __init__(self, source: Any, start: int, end: int, shared: dict[str, Any]):
        self._source, self._start, self._end, self._shared = source, start, end, shared
        self.shape = torch.Size((end - start, *source.shape[1:]))
        self.dtype = source.dtype

    @classmethod
    def parts(cls, source: Any, rows: tuple[int, ...]) -> list["_LazyRows"]:
        shared: dict[str, Any] = {"left": len(rows)}
        bounds = [0, *torch.tensor(rows).cumsum(0).tolist()]
        return [cls(source, a, b, shared) for a, b in zip(bounds, bounds[1:])]

    def materialize(self) -> torch.Tensor:
        if "tensor" not in self._shared:
            self._shared["tensor"] = self._source.materialize()
        part = self._shared["tensor"][self._start:self._end].clone()
        self._shared["left"] -= 1
        if self._shared["left"] == 0:
            self._shared.pop("tensor")
        return part

    detach = contiguous = materialize

    def float(self) -> torch.Tensor:
        return self.materialize().float()


def _first(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _rank() -> int:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


@torch.no_grad()
def load_state_into(
    model: GPTJPreTrainedModel,
    model_dir: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
    mapped: bool = False,
    materialize: Optional[Callable[[str, torch.Tensor, nn.Parameter], nn.Parameter]] = None,
) -> LoadReport:
    """Copy a checkpoint's tensors into `model`, one tensor at a time.

    Plain parameters (meta or materialized) are replaced by the checkpoint's tensor in `dtype`
    (None: the parameter's dtype) on `device` (None: the parameter's device; cpu for meta).
    `mapped` (inference): safetensors tensors already in `dtype` on the CPU are memory-mapped from the file,
    not copied, as transformers does: they become resident only as they are read (an embedding table mostly
    never is), as clean file pages the OS can drop; a write copies the page it touches.
    ZeRO-3 partitioned parameters (built under `deepspeed.zero.Init`) receive only this rank's slice,
    in the dtype zero.Init gave them; call it before `deepspeed.initialize`, which copies the partitions
    into the optimizer's master weights. Head weights the checkpoint lacks (or has in another shape, e.g. a
    new num_labels) are initialized fresh; missing or misshaped backbone tensors raise CheckpointError.
    `materialize(name, tensor, placeholder)` turns each tensor read into the parameter that replaces the
    placeholder (default: a plain nn.Parameter); finetune.model.quantized uses it to quantize while loading.
    """
    model_dir = Path(model_dir)
    reader = _CheckpointReader(model_dir)
    names = [n for n in reader.shapes if not _MASK_BUFFER.match(n)]
    # A bare GPTJModel checkpoint names its tensors without the `transformer.` prefix.
    prefix = "" if any(n.startswith("transformer.") for n in names) else "transformer."
    key_of = {prefix + n: n for n in names}
    slots = _parameter_slots(model)
    heads = tuple(f"{h}." for h in model.head_names)
    # A fused block's weight is read from the four HF tensors it stacks (hf_names_of).
    sources = {name: [key_of.get(n) for n in hf_names_of(name)] for name in slots}

    missing, misshaped, fresh = [], [], []
    for name, (param, _) in slots.items():
        keys = sources[name]
        shape = reader.joined_shape(keys) if None not in keys else None
        if shape == _shape(param):
            continue
        if name.startswith(heads):
            fresh.append(name)
        elif None in keys:
            missing.extend(n for n, k in zip(hf_names_of(name), keys) if k is None)
        else:
            misshaped.append(f"{name} (checkpoint {list(shape) if shape else [reader.shapes[k] for k in keys]}, "
                             f"model {list(_shape(param))})")
    if missing or misshaped:
        problems = ([f"missing tensors: {_first(missing)}"] if missing else []) + (
            [f"wrongly shaped tensors: {_first(misshaped, 3)}"] if misshaped else [])
        raise CheckpointError(
            f"Checkpoint {model_dir} does not fit {type(model).__name__}: {'; '.join(problems)}. Check that its "
            "config.json describes these weights (n_layer, n_embd, n_inner, vocab_size) and that model.overrides "
            "does not change the backbone's shape."
        )

    report = LoadReport(model_dir=model_dir, format=reader.format, initialized=fresh)
    # Every name, tied aliases included: a checkpoint's copy of a tied lm_head.weight is not "unused".
    report.unused = sorted(set(key_of) - {n for p, _ in model.named_parameters(remove_duplicate=False)
                                          for n in hf_names_of(p)})
    _init_fresh(model, fresh, dtype=dtype, device=device)
    for name, (param, holders) in slots.items():
        if name in fresh:
            continue
        if _is_partitioned(param):
            _load_partition(param, reader, sources[name])
        else:
            target_device = torch.device(device) if device is not None else (
                torch.device("cpu") if param.is_meta else param.device)
            tensor = reader.read_joined(sources[name], dtype=dtype or param.dtype, device=target_device,
                                        mapped=mapped)
            new = (materialize(name, tensor, param) if materialize is not None
                   else nn.Parameter(tensor, requires_grad=param.requires_grad))
            del tensor  # a quantized `new` does not hold it: one 16-bit tensor alive at a time
            for module, attr in holders:
                module._parameters[attr] = new
        report.loaded.append(name)

    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"After loading {model_dir}, tensors are still unmaterialized: {_first(leftover)}.")
    if _rank() == 0:
        if fresh:
            logger.warning("Initialized new weights absent from (or shaped differently in) %s: %s; they need training.",
                           model_dir, _first(fresh, 10))
        if report.unused:
            logger.info("Tensors of %s unused by %s: %s.", model_dir, type(model).__name__, _first(report.unused, 10))
    return report


def _init_fresh(model: GPTJPreTrainedModel, fresh: list[str], *, dtype, device) -> None:
    """HF's init (normal(0, initializer_range), zero bias) for head modules the checkpoint lacks weights of."""
    # In `fresh` order: under ZeRO-3 every rank must gather the same modules in the same order.
    owners = dict.fromkeys(model.get_submodule(name.rpartition(".")[0]) for name in fresh)
    for owner in owners:
        params = list(owner.parameters(recurse=False))
        if any(_is_partitioned(p) for p in params):
            import deepspeed

            # Small (a head): gather it, let rank 0 initialize, and DeepSpeed re-partitions it on exit.
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if _group_rank(params[0]) == 0:
                    init_module_weights(owner, model.config.initializer_range)
            continue
        for attr, param in list(owner._parameters.items()):
            if param is None:
                continue
            target_device = torch.device(device) if device is not None else (
                torch.device("cpu") if param.is_meta else param.device)
            empty = torch.empty(param.shape, dtype=dtype or param.dtype, device=target_device)
            owner._parameters[attr] = nn.Parameter(empty, requires_grad=param.requires_grad)
        init_module_weights(owner, model.config.initializer_range)


def _needs_gather(param: nn.Parameter) -> bool:
    """Partitions that are not a plain tensor this rank can write into: NVMe-swapped, quantized, or with
    ZeRO++ hierarchical secondary copies that would go stale."""
    tensor = param.ds_tensor
    return (
        str(getattr(tensor, "final_location", None)).endswith("nvme")
        or hasattr(tensor, "ds_quant_scale")
        or getattr(param, "ds_secondary_tensor", None) is not None
    )


def _group_rank(param: nn.Parameter) -> int:
    """This rank's index among the ranks `param` is partitioned over (modifier_rank counts the same way)."""
    from deepspeed import comm as dist

    return dist.get_rank(group=param.ds_process_group)


def _load_partition(param: nn.Parameter, reader: _CheckpointReader, keys: list[str]) -> None:
    """Copy this rank's slice of checkpoint tensors `keys` (stacked along dim 0: one tensor, or a fused block's
    four) into the ZeRO-3 partition of `param`.

    DeepSpeed (runtime/zero/partition_parameters.py, `_partition_param`) pads the flattened tensor to a
    multiple of the world size and gives rank r elements [r * ds_tensor.ds_numel, (r + 1) * ds_tensor.ds_numel);
    the padding is never read, so it is left as is.
    """
    import deepspeed

    if _needs_gather(param):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if _group_rank(param) == 0:
                param.data.copy_(reader.read_joined(keys, dtype=param.dtype, device=param.device))
        return
    size = param.ds_tensor.ds_numel
    start = _group_rank(param) * size
    end = min(start + size, param.ds_numel)
    if start < end:
        param.ds_tensor.narrow(0, 0, end - start).copy_(reader.read_flat_joined(keys, start, end))


def load_pretrained(
    model_dir: str | Path,
    *,
    task: str,
    dtype: torch.dtype,
    config_overrides: Optional[Mapping[str, Any]] = None,
    device: torch.device | str = "cpu",
    check: Optional[Callable[[GPTJConfig], None]] = None,
) -> GPTJPreTrainedModel:
    """GPT-J with the head of `task` (clm | cls | qa) and a checkpoint's weights in `dtype`, in eval mode.

    `model_dir` is a local directory or a hub id (see resolve_model_dir). `config_overrides` replaces
    config.json fields, e.g. {"num_labels": 3, "id2label": {...}} for a new classification head.
    Peak host memory is at most the weights' size in `dtype` plus the largest tensor: safetensors weights already
    in `dtype`, loaded to the CPU, stay memory-mapped from the file and are read in as they are used (see
    load_state_into's `mapped`). `check(config)` runs before anything is built (a memory check may raise there).
    """
    model_dir = resolve_model_dir(model_dir)
    config = read_config(model_dir)
    if config_overrides:
        config = _override(config, dict(config_overrides))
    if check is not None:
        check(config)
    model = build_model(config, task=task, device="meta")
    load_state_into(model, model_dir, dtype=dtype, device=device, mapped=True)
    return model.eval()


def _override(config: GPTJConfig, overrides: dict[str, Any]) -> GPTJConfig:
    valid = set(GPTJConfig.__dataclass_fields__) - {"extra"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise CheckpointError(f"config_overrides has unknown GPT-J config keys {unknown}; valid keys: {sorted(valid)}.")
    if overrides.get("id2label") is not None:
        overrides["id2label"] = {int(k): v for k, v in overrides["id2label"].items()}
        overrides.setdefault("num_labels", len(overrides["id2label"]))
    if "num_labels" in overrides and "id2label" not in overrides and config.id2label is not None \
            and len(config.id2label) != overrides["num_labels"]:
        overrides["id2label"] = None  # the checkpoint's labels do not describe the new head
    try:
        return replace(config, **overrides)
    except ModelConfigError as err:
        raise CheckpointError(f"config_overrides: {err}") from None


# --- saving ---------------------------------------------------------------------------------------
def save_pretrained(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    out_dir: str | Path,
    *,
    config: GPTJConfig,
    task: str,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str] = "5GB",
    safe_serialization: bool = True,
    overwrite: bool = False,
    extra_writer: Optional[Callable[[Path], None]] = None,
    private: bool = False,
) -> None:
    """Write a checkpoint transformers loads: config.json and weights (sharded above `max_shard_size`).

    Tensors are cast to `dtype` (None: as they are) one shard at a time, so at most one shard is
    copied. Everything is written into a hidden staging directory next to `out_dir` and renamed
    into place at the end, so an interrupted save never leaves a half-written `out_dir`.
    `extra_writer(staging_dir)` may add files (tokenizer, adapters) to the same atomic publish.
    A non-empty `out_dir` is only replaced with overwrite=True, in one swap (finetune.files.swap_into_place).
    `private`: files 0600 and directories 0700 (shared nodes); else the permissions any new file gets here.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if task not in HEADS:
        raise CheckpointError(f"Unknown task {task!r}; choose one of {sorted(HEADS)}.")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise CheckpointError(
            f"{out_dir} already exists and is not empty; choose another directory or pass overwrite=True to replace it."
        )
    state = _state_to_save(model_or_state_dict, config=config, task=task)
    target = {k: torch.empty(t.shape, dtype=dtype or t.dtype, device="meta") for k, t in state.items()}
    pattern = "model{suffix}.safetensors" if safe_serialization else "pytorch_model{suffix}.bin"
    split = split_torch_state_dict_into_shards(target, filename_pattern=pattern, max_shard_size=max_shard_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out_dir, private=private)
    try:
        # safetensors writes through a private (0600) temp file; its files get the permissions any new file gets.
        file_mode = PRIVATE_FILE_MODE if private else new_file_mode(staging)
        for filename, names in split.filename_to_tensors.items():
            shard = {n: _own_memory(state[n].detach().to(dtype=dtype or state[n].dtype).contiguous()) for n in names}
            if safe_serialization:
                save_file(shard, staging / filename, metadata={"format": "pt"})
                os.chmod(staging / filename, file_mode)
            else:
                torch.save(shard, staging / filename)
            del shard
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            index_name = SAFE_INDEX if safe_serialization else BIN_INDEX
            (staging / index_name).write_text(json.dumps(index, indent=2, sort_keys=True))
        saved_dtype = dtype or next(iter(state.values())).dtype
        hf_config = {**config.to_hf_dict(), "architectures": [HEADS[task].__name__],
                     "torch_dtype": str(saved_dtype).removeprefix("torch.")}
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if extra_writer is not None:
            extra_writer(staging)
        publish_dir(staging, out_dir, private=private)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a view into a larger tensor (a fused weight's part): safetensors refuses tensors sharing memory."""
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.nbytes else tensor


def _state_to_save(model_or_state_dict, *, config: GPTJConfig, task: str) -> dict[str, torch.Tensor]:
    """The state dict in Hugging Face's names (fused blocks split), checked against the model `config` and `task`
    describe, so what is saved loads."""
    if isinstance(model_or_state_dict, nn.Module):
        if any(_is_partitioned(p) for p in model_or_state_dict.parameters()):
            raise CheckpointError(
                "save_pretrained got a ZeRO-3 partitioned model; pass the consolidated state dict instead "
                "(engine._zero3_consolidated_16bit_state_dict() on rank 0)."
            )
        state = model_or_state_dict.state_dict()
    else:
        state = hf_state_dict(model_or_state_dict, config)
    expected = build_model(config, task=task, device="meta").state_dict()
    if config.tie_word_embeddings:
        # safetensors stores no aliases; HF re-ties lm_head to the embedding on load.
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"The state dict does not match a {HEADS[task].__name__} of the given config: missing {_first(missing)}; "
            f"unexpected {_first(unexpected)}; wrongly shaped {_first(misshaped, 3)}. Pass the config the model was "
            "built with, and merge LoRA adapters (or save them separately) before saving the full model."
        )
    return state


def make_staging_dir(out_dir: Path, *, private: bool = False) -> Path:
    """A new hidden directory next to `out_dir` to write an output into before publishing it (0700 if private:
    nothing in it is reachable by others while it is written)."""
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=PRIVATE_DIR_MODE if private else 0o777)
    return staging


def publish_dir(staging: Path, out_dir: Path, *, private: bool = False) -> None:
    """Make the finished staging dir `out_dir`, replacing an existing one in one swap; with `private`, its files
    become 0600 and its directories 0700 first."""
    if private:
        make_private(staging)
    swap_into_place(staging, out_dir)
