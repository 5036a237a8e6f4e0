"""GPT-J: configuration and backbone, numerically equal to Hugging Face transformers' GPT-J.

One block: a single LayerNorm feeds attention and MLP in parallel, and the block returns
x + attn(ln(x)) + mlp(ln(x)). Rotary embeddings cover the first `rotary_dim` dims of each head,
interleaved ("rotate every two", as in the original Mesh-Transformer-JAX code).
Module and parameter names are HF's, so HF state dicts load with strict=True.

Packed sequences (padding-free batches): several examples concatenated into one row, described by `cu_seq_lens`
(the cumulative lengths, as flash-attn's varlen kernels take them). Positions restart at every example and
attention is causal within each example only, so every example computes exactly what it would alone.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# One (key, value) pair per layer, each (B, n_head, T_past, head_dim).
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class ModelConfigError(ValueError):
    """A model config (preset, override or config.json) is not a usable GPT-J config."""


@dataclass
class GPTJConfig:
    """GPT-J hyper-parameters, with the field names and defaults of HF's `GPTJConfig` (GPT-J 6B)."""

    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: Optional[int] = 64
    n_inner: Optional[int] = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    # Classification head.
    num_labels: int = 2
    problem_type: Optional[str] = None  # regression | single_label_classification | multi_label_classification
    id2label: Optional[dict[int, str]] = None
    # Keys of a config.json this class does not model; written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change one of them."
            )
        if self.rotary_dim is not None and (self.rotary_dim > self.head_dim or self.rotary_dim % 2):
            raise ModelConfigError(
                f"rotary_dim ({self.rotary_dim}) must be even and at most the head dim n_embd / n_head = "
                f"{self.head_dim}; set rotary_dim to an even number up to {self.head_dim} (GPT-J 6B: 64), or null "
                "for rotary over the whole head."
            )
        if self.activation_function not in _ACTIVATIONS:
            raise ModelConfigError(
                f"activation_function {self.activation_function!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    # --- HF config.json interop -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "GPTJConfig":
        model_type = raw.get("model_type", "gptj")
        if model_type != "gptj":
            raise ModelConfigError(
                f"config.json has model_type {model_type!r}, but this framework fine-tunes GPT-J "
                "(model_type 'gptj'); point model.path at a GPT-J checkpoint."
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "id2label"}
        if not isinstance(raw, dict):
            raise ModelConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}.")
        kwargs = {k: v for k, v in raw.items() if k in known}
        if raw.get("id2label") is not None:
            id2label = raw["id2label"]
            try:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            except (AttributeError, TypeError, ValueError):
                raise ModelConfigError(
                    "field 'id2label' must map label ids to names, e.g. {\"0\": \"negative\", \"1\": \"positive\"}, "
                    f"got {id2label!r}; fix it or remove it (labels are then LABEL_0, LABEL_1, ...)."
                ) from None
            kwargs.setdefault("num_labels", len(kwargs["id2label"]))
        # HF writes label2id and derived keys itself; everything else unknown round-trips.
        derived = {"model_type", "label2id", "architectures", "transformers_version", "torch_dtype", "dtype"}
        extra = {k: v for k, v in raw.items() if k not in known and k not in derived and k != "id2label"}
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "id2label")}
        id2label = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        out["id2label"] = {str(i): name for i, name in id2label.items()}
        out["label2id"] = {name: i for i, name in id2label.items()}
        out.update(self.extra)
        out["model_type"] = "gptj"
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "GPTJConfig":
        """The config of a config.json; an unusable value is a ModelConfigError naming the file and the field."""
        try:
            raw = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelConfigError(
                f"{path} is not valid JSON ({err}); re-export the checkpoint's config.json.") from None
        try:
            return cls.from_hf_dict(raw)
        except ModelConfigError as err:
            raise ModelConfigError(f"{path}: {err} (edit that file, or re-save the checkpoint).") from None

    def to_dict(self) -> dict[str, Any]:
        """HF-style dict; peft reads the base model's config through this."""
        return self.to_hf_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_hf_dict().get(key, default)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTJConfig":
        if name not in PRESETS:
            raise ModelConfigError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ModelConfigError(
                f"model.overrides has unknown GPT-J config keys {sorted(unknown)}; valid keys are the fields of GPTJConfig "
                "(n_layer, n_embd, n_head, rotary_dim, n_inner, vocab_size, n_positions, ...)."
            )
        return cls(**{**PRESETS[name], **overrides})


# What each field must be: (allowed types, least value, what to write instead). bool is checked apart: it is an int.
_POSITIVE_INT = ((int,), 1, "a positive integer")
_FIELD_RULES: dict[str, tuple[tuple[type, ...], Optional[float], str]] = {
    "vocab_size": _POSITIVE_INT, "n_positions": _POSITIVE_INT, "n_embd": _POSITIVE_INT, "n_layer": _POSITIVE_INT,
    "n_head": _POSITIVE_INT, "rotary_dim": _POSITIVE_INT, "n_inner": _POSITIVE_INT, "num_labels": _POSITIVE_INT,
    "bos_token_id": ((int,), 0, "a token id (an integer >= 0)"),
    "eos_token_id": ((int,), 0, "a token id (an integer >= 0)"),
    "pad_token_id": ((int,), 0, "a token id (an integer >= 0)"),
    "resid_pdrop": ((int, float), 0, "a probability in [0, 1)"),
    "embd_pdrop": ((int, float), 0, "a probability in [0, 1)"),
    "attn_pdrop": ((int, float), 0, "a probability in [0, 1)"),
    "layer_norm_epsilon": ((int, float), 0, "a positive number, e.g. 1e-5"),
    "initializer_range": ((int, float), 0, "a number >= 0, e.g. 0.02"),
    "activation_function": ((str,), None, "a string"),
    "use_cache": ((bool,), None, "true or false"),
    "tie_word_embeddings": ((bool,), None, "true or false"),
}
_NULLABLE = {"rotary_dim", "n_inner", "bos_token_id", "eos_token_id", "pad_token_id", "problem_type", "id2label"}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _check_field_types(config: "GPTJConfig") -> None:
    """A ModelConfigError naming the first field whose value cannot describe a GPT-J model, and what it must be."""
    for name, (types, least, what) in _FIELD_RULES.items():
        value = getattr(config, name)
        if value is None and name in _NULLABLE:
            continue
        is_bool = isinstance(value, bool)
        wrong_type = (not isinstance(value, types) or (is_bool and bool not in types)
                      or (not is_bool and types == (bool,)))
        too_small = not wrong_type and least is not None and (
            value < least or (name == "layer_norm_epsilon" and value == 0))
        too_big = not wrong_type and name.endswith("_pdrop") and value >= 1
        if wrong_type or too_small or too_big:
            got = f"the string {value!r}" if isinstance(value, str) else repr(value)
            raise ModelConfigError(
                f"field {name!r} must be {what}, got {got}"
                + ("; write numbers without quotes" if isinstance(value, str) and str not in types else "") + "."
            )
    if config.problem_type is not None and config.problem_type not in PROBLEM_TYPES:
        raise ModelConfigError(f"field 'problem_type' must be one of {', '.join(PROBLEM_TYPES)} or null, "
                               f"got {config.problem_type!r}.")


PRESETS: dict[str, dict[str, Any]] = {
    "gptj-6b": {},
    # Same code path as 6B: every feature (partial rotary, parallel block, 50400 vocab) is exercised.
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8},
}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation used by GPT-2 / GPT-J ("gelu_new" in HF).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {
    "gelu_new": gelu_new,
    "gelu": F.gelu,
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


# --- rotary position embedding --------------------------------------------------------------------
def rotary_sin_cos(position_ids: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos of shape (B, T, rotary_dim // 2), computed in fp32 exactly as HF's table is."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device) / rotary_dim))
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, rotary_dim/2)
    return torch.sin(angles), torch.cos(angles)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    # Pairs (x0, x1), (x2, x3), ... rotate as complex numbers: (x0, x1) -> (-x1, x0).
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """x: (B, T, n_head, rotary_dim); sin/cos: (B, T, rotary_dim/2), interleaved to match the pairs."""
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, dim=3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, dim=3)
    return (x * cos + rotate_every_two(x) * sin).to(x.dtype)


# --- the block ------------------------------------------------------------------------------------
class GPTJAttention(nn.Module):
    """Causal self-attention with rotary positions. Fused blocks (see FusedInputProjection) compute q, k, v
    elsewhere: the module then holds only out_proj, and the block calls `attend` directly."""

    def __init__(self, config: GPTJConfig, *, fused: bool = False):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.attn_pdrop = config.attn_pdrop
        if not fused:
            self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        attn_mask: Union[torch.Tensor, "PackedSequences", None],
        past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), sin, cos, attn_mask, past)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sin: torch.Tensor,
        cos: torch.Tensor,
        attn_mask: Union[torch.Tensor, "PackedSequences", None],
        past: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """q, k, v: (B, T, n_embd) projections -> (output (B, T, n_embd), this step's (k, v) for the cache)."""
        B, T, C = q.shape
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, n_head, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim)
        v = v.view(B, T, self.n_head, self.head_dim)
        rd = self.rotary_dim or self.head_dim
        q = torch.cat([apply_rotary(q[..., :rd], sin, cos), q[..., rd:]], dim=-1)
        k = torch.cat([apply_rotary(k[..., :rd], sin, cos), k[..., rd:]], dim=-1)
        dropout_p = self.attn_pdrop if self.training else 0.0
        if isinstance(attn_mask, PackedSequences):  # one packed row: (T, n_head, head_dim) per example
            y = packed_attention(q[0], k[0], v[0], attn_mask, dropout_p=dropout_p).reshape(B, T, C)
            return self.resid_dropout(self.out_proj(y)), (k.transpose(1, 2), v.transpose(1, 2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head, T, head_dim)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        # SDPA keeps softmax in fp32 internally; attn_mask None means plain causal (the fast kernel path).
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=attn_mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y)), (k, v)


class GPTJMLP(nn.Module):
    """fc_in -> activation -> fc_out. Fused blocks compute fc_in elsewhere and call `finish` on its output."""

    def __init__(self, config: GPTJConfig, *, fused: bool = False):
        super().__init__()
        if not fused:
            self.fc_in = nn.Linear(config.n_embd, config.inner_dim)
        self.fc_out = nn.Linear(config.inner_dim, config.n_embd)
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.fc_in(x))

    def finish(self, pre_activation: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.act(pre_activation)))


# Hugging Face's names of the four projections a fused block computes as one, in the fused weight's row order.
FUSED_PARTS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")
FUSED_MODULE = "qkv_fc_in"  # the fused module's name in a block: transformer.h.N.qkv_fc_in.{weight,bias}


def fused_part_rows(config: GPTJConfig) -> tuple[int, int, int, int]:
    """Rows of each of FUSED_PARTS in the fused weight (3 * n_embd + inner_dim in all)."""
    return (config.n_embd, config.n_embd, config.n_embd, config.inner_dim)


class FusedInputProjection(nn.Module):
    """q_proj, k_proj, v_proj and fc_in as one matrix product: both halves of GPT-J's parallel block read ln_1's
    output, so one GEMM of width 3 * n_embd + inner_dim (28672 for 6B) replaces four.

    `weight` holds the four HF weights stacked along the output rows, in FUSED_PARTS order; each output column is
    the same dot product the separate layer computes. `bias` is fc_in's bias alone: q, k and v have none, and
    zeros in a trainable bias would not stay zero. State dicts show the four HF tensors (GPTJBlock's hooks).
    """

    def __init__(self, config: GPTJConfig, out_proj: nn.Linear):
        super().__init__()
        self.rows = fused_part_rows(config)
        self.weight = nn.Parameter(torch.empty(sum(self.rows), config.n_embd))
        self.bias = nn.Parameter(torch.empty(config.inner_dim))
        # A plain tuple, not a submodule: for `init_weights` only (draws out_proj's numbers in unfused order).
        self._init_after_v = (out_proj,)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, n_embd) -> q, k, v (B, T, n_embd) and fc_in's output (B, T, inner_dim), views of one result."""
        qkv_rows = self.rows[0] + self.rows[1] + self.rows[2]
        bias = torch.cat([self.bias.new_zeros(qkv_rows), self.bias])  # one fused addmm, as nn.Linear's
        return F.linear(x, self.weight, bias).split(self.rows, dim=-1)

    @torch.no_grad()
    def init_weights(self, initializer_range: float) -> None:
        """The numbers an unfused block draws, in its order: q, k, v, out_proj, fc_in. out_proj belongs to another
        module (initialized, and under ZeRO-3 gathered, after this one), so its draw waits on it until then."""
        d = self.rows[0]
        for start in (0, d, 2 * d):  # row blocks of a contiguous tensor: the same stream as separate tensors
            self.weight[start:start + d].normal_(mean=0.0, std=initializer_range)
        out_proj = self._init_after_v[0]
        out_proj._drawn_weight = torch.empty_like(self.weight[:d]).normal_(mean=0.0, std=initializer_range)
        self.weight[3 * d:].normal_(mean=0.0, std=initializer_range)
        self.bias.zero_()


class GPTJBlock(nn.Module):
    """x + attn(ln_1(x)) + mlp(ln_1(x)). `fused`: q/k/v/fc_in as one product (FusedInputProjection), with state
    dicts still in Hugging Face's names and layout (split on `state_dict()`, joined on `load_state_dict()`)."""

    def __init__(self, config: GPTJConfig, *, fused: bool = False):
        super().__init__()
        ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        attn, mlp = GPTJAttention(config, fused=fused), GPTJMLP(config, fused=fused)
        # Registered in this order so that modules() visits q/k/v/fc_in before out_proj (see init_weights).
        self.ln_1 = ln_1
        self.qkv_fc_in = FusedInputProjection(config, attn.out_proj) if fused else None
        self.attn, self.mlp = attn, mlp
        if fused:
            self.register_state_dict_post_hook(_split_fused_state)
            self.register_load_state_dict_pre_hook(_join_fused_state)

    def forward(self, x, sin, cos, attn_mask, past=None):
        h = self.ln_1(x)
        if self.qkv_fc_in is None:
            attn_out, present = self.attn(h, sin, cos, attn_mask, past)
            return x + attn_out + self.mlp(h), present
        q, k, v, pre_activation = self.qkv_fc_in(h)
        attn_out, present = self.attn.attend(q, k, v, sin, cos, attn_mask, past)
        return x + attn_out + self.mlp.finish(pre_activation), present


# The order of an unfused block's state dict, which a fused block's reproduces.
_BLOCK_STATE_ORDER = ("ln_1.weight", "ln_1.bias", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                      "attn.out_proj.weight", "mlp.fc_in.weight", "mlp.fc_in.bias", "mlp.fc_out.weight",
                      "mlp.fc_out.bias")


def split_fused(weight: Any, rows: tuple[int, ...]) -> list[Any]:
    """The four HF weights of a fused weight (views). A ZeRO-3 placeholder (partitioned away: 0 elements) gives four
    placeholders, so that DeepSpeed's own save and load of its module state pass through unchanged."""
    if weight.shape[0] != sum(rows):
        return [weight] * len(rows)
    return list(weight.split(rows, dim=0))


def _split_fused_state(block: GPTJBlock, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    fused = block.qkv_fc_in
    weight = state.pop(f"{prefix}{FUSED_MODULE}.weight", None)
    bias = state.pop(f"{prefix}{FUSED_MODULE}.bias", None)
    if weight is None or bias is None:  # filtered out by the caller
        return
    for part, tensor in zip(FUSED_PARTS, split_fused(weight, fused.rows)):
        state[f"{prefix}{part}.weight"] = tensor
    state[f"{prefix}mlp.fc_in.bias"] = bias
    # This block's entries are the dict's tail (a module's hooks run after its children): put them in HF order.
    mine = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    for key in [prefix + k for k in _BLOCK_STATE_ORDER if prefix + k in mine] + list(mine):
        if key in mine:
            state[key] = mine.pop(key)


def _join_fused_state(block: GPTJBlock, state: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                      missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    names = [f"{prefix}{part}.weight" for part in FUSED_PARTS]
    if all(name in state for name in names):
        state[f"{prefix}{FUSED_MODULE}.weight"] = torch.cat([state.pop(name) for name in names])
    elif any(name in state for name in names):  # name the HF tensors that are absent, not just the fused one
        missing_keys.extend(name for name in names if name not in state)
    if f"{prefix}mlp.fc_in.bias" in state:
        state[f"{prefix}{FUSED_MODULE}.bias"] = state.pop(f"{prefix}mlp.fc_in.bias")


# --- packed sequences -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedSequences:
    """The examples of one packed row, and how attention lays them out (built once per forward, shared by every
    layer).

    `cu_seq_lens` (n + 1,) int32 on the model's device; `lengths` on the host (shapes and flash-attn's max length
    need them there: read once per forward, never inside a layer). Attention runs as ONE kernel call for the row:
    - padded (default): the n examples gathered into (n, longest) rows, right-padded, with causal attention. A real
      query then sees only keys of its own example at or before it, never a pad key, so it is exact; pad queries'
      outputs are dropped (their gradients are zero). Costs n * longest^2 per head.
    - block-diagonal: one causal (T, T) mask allowing each example's own keys. Costs T^2 per head; chosen when
      that is less, i.e. when one long example makes padding the others to it dearer (`block_mask` is not None).
    `gather_index` (n, longest): the row position of each example's j-th token (pads point at a real token);
    `inside` (n, longest): True where that is a token of the example; `scatter_index` (T,): where each row
    position's output sits in the flattened (n * longest) padded layout."""

    cu_seq_lens: torch.Tensor
    lengths: tuple[int, ...]
    gather_index: torch.Tensor
    inside: torch.Tensor
    scatter_index: torch.Tensor
    block_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_cu_seq_lens(cls, cu_seq_lens: torch.Tensor, total: int) -> "PackedSequences":
        bounds = cu_seq_lens.tolist()
        lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 1:
            raise ValueError(
                f"cu_seq_lens {bounds[:8]}{'...' if len(bounds) > 8 else ''} must rise from 0 to the packed row's "
                f"length {total} in steps of at least 1 (one step per example)."
            )
        return cls._build(cu_seq_lens.to(torch.int32), lengths)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, examples: "PackedSequences") -> "PackedSequences":
        """The runs of a packed row that start at each position 0: `examples`, or finer when an example holds
        several documents (data.packing=documents), each restarting its positions."""
        total = position_ids.shape[1]
        restarts = position_ids[0] == 0
        # the common case (one document per example): every restart is an example start; one host read to check
        if bool((restarts.sum() == len(examples.lengths)) & restarts[examples.cu_seq_lens[:-1].long()].all()):
            return examples
        starts = restarts.nonzero().flatten().tolist()
        example_starts = [0, *itertools.accumulate(examples.lengths[:-1])]
        if not set(example_starts) <= set(starts):
            raise ValueError("position_ids of a packed row must restart at 0 where each example of cu_seq_lens starts.")
        bounds = starts + [total]
        cu = torch.tensor(bounds, dtype=torch.int32, device=examples.cu_seq_lens.device)
        return cls._build(cu, tuple(b - a for a, b in zip(bounds, bounds[1:])))

    @classmethod
    def _build(cls, cu_seq_lens: torch.Tensor, lengths: tuple[int, ...]) -> "PackedSequences":
        device, n, longest, total = cu_seq_lens.device, len(lengths), max(lengths), sum(lengths)
        starts = cu_seq_lens[:-1].long()
        offsets = torch.arange(longest, device=device)
        inside = offsets < (cu_seq_lens[1:].long() - starts)[:, None]  # (n, longest)
        gather_index = (starts[:, None] + offsets).clamp(max=total - 1)
        positions = torch.arange(total, device=device)
        example = torch.bucketize(positions, cu_seq_lens[1:].long(), right=True)  # (T,) each position's example
        scatter_index = example * longest + positions - starts[example]
        block_mask = None
        if total * total < n * longest * longest:
            block_mask = (example[:, None] == example[None, :]) & (positions[:, None] >= positions[None, :])
        return cls(cu_seq_lens, lengths, gather_index, inside, scatter_index, block_mask)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """(1, total): 0, 1, ... restarting at every example, as each example alone would have."""
        return (self.scatter_index % self.gather_index.shape[1])[None].to(device)

    def last_token_index(self) -> torch.Tensor:
        """(n,): the index of each example's last token in the packed row."""
        return self.cu_seq_lens[1:].long() - 1

    def per_example(self, row: torch.Tensor, fill: float) -> torch.Tensor:
        """(total, ...) values of the packed row -> (n, longest, ...) per example, `fill` past each example's end."""
        inside = self.inside.reshape(*self.inside.shape, *[1] * (row.dim() - 1))
        return row[self.gather_index].masked_fill(~inside, fill)


@functools.cache
def _flash_varlen():
    """flash-attn's variable-length kernel when the package is installed (GPU only), else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


# trainer.compile: runs eagerly between the block's compiled graphs. The body traces as one graph without host
# reads (a slow test compiles it with fullgraph), but its index tensors' shapes (examples per row, the longest
# example) change every step and hit dynamo's 0/1 specialisation: inside the block they recompiled mid-run.
@torch.compiler.disable
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences, *,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention within each example of a packed row. q, k, v: (T, n_head, head_dim) -> (T, n_head, head_dim).

    flash-attn's varlen kernel on a GPU (fp16/bf16) when installed; otherwise ONE SDPA call for the whole row, in
    the padded or block-diagonal layout that `packed` chose (see PackedSequences), no loop over examples.
    """
    flash = _flash_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        cu, longest = packed.cu_seq_lens, packed.max_len
        return flash(q, k, v, cu, cu, longest, longest, dropout_p=dropout_p, causal=True)
    return packed_sdpa(q, k, v, packed, dropout_p=dropout_p)


def packed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences, *,
                dropout_p: float = 0.0) -> torch.Tensor:
    """packed_attention's one SDPA call (the padded or the block-diagonal layout)."""
    n_head, head_dim = q.shape[1:]
    if packed.block_mask is not None:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, n_head, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.block_mask, dropout_p=dropout_p)
        return y[0].transpose(0, 1)
    n, longest = packed.gather_index.shape
    q, k, v = (t[packed.gather_index].transpose(1, 2) for t in (q, k, v))  # (n, n_head, longest, head_dim)
    # is_causal also for longest == 1 (a 1 x 1 causal mask is no mask): a plain bool keeps dynamic shapes compilable
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return y.transpose(1, 2).reshape(n * longest, n_head, head_dim)[packed.scatter_index]


# --- the backbone ---------------------------------------------------------------------------------
def attention_mask_4d(
    attention_mask: Optional[torch.Tensor], q_len: int, kv_len: int, device: torch.device
) -> Optional[torch.Tensor]:
    """Boolean (B, 1, q_len, kv_len) mask, True = may attend: causal, and only to non-pad keys.

    None when plain causal attention is exact (no padding, no cache), so SDPA can use its causal kernels.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if q_len == kv_len or q_len == 1:
            return None
        attention_mask = torch.ones(1, kv_len, dtype=torch.bool, device=device)
    # Query i sits at absolute position (kv_len - q_len + i) when a cache precedes it.
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask.bool()[:, None, None, :]
    # A pad query (left padding) may see no key at all; let it see every key so softmax stays finite.
    # Its output is never used: its own key is masked for every other position and its label is ignored.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def position_ids_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions counting only real tokens, so left-padded rows start at 0 like unpadded ones."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -q_len:]


class GPTJModel(nn.Module):
    """Embeddings, `n_layer` parallel blocks, final LayerNorm. Returns hidden states (B, T, n_embd)."""

    def __init__(self, config: GPTJConfig, *, fused_projections: bool = False):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPTJBlock(config, fused=fused_projections) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        cu_seq_lens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[KVCache]]:
        """`cu_seq_lens` (n + 1,): input_ids is one packed row of n examples (see the module docstring). Attention
        stays within each example, and within each run of `position_ids` that starts at 0 when they are given."""
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is not None and attention_mask.shape[1] != past_len + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions but the cache holds {past_len} and "
                f"input_ids {T}; pass the mask of the whole sequence so far."
            )
        attn_mask: Union[torch.Tensor, PackedSequences, None]
        if cu_seq_lens is not None:
            if B != 1 or past_key_values or use_cache:
                raise ValueError(
                    f"Packed sequences (cu_seq_lens) come as one row without a KV cache; got {B} rows"
                    f"{' and a cache' if past_key_values or use_cache else ''}."
                )
            examples = PackedSequences.from_cu_seq_lens(cu_seq_lens, T)
            if position_ids is None:
                position_ids, attn_mask = examples.position_ids(input_ids.device), examples
            else:  # attention restarts with the positions: at each example, and at each document inside one
                attn_mask = PackedSequences.from_position_ids(position_ids, examples)
        else:
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = position_ids_from_mask(attention_mask, T)
                else:
                    position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
            attn_mask = attention_mask_4d(attention_mask, T, past_len + T, input_ids.device)
        sin, cos = rotary_sin_cos(position_ids, self.config.rotary_dim or self.config.head_dim)

        x = self.drop(self.wte(input_ids))  # (B, T, n_embd)
        sin, cos = sin.to(x.dtype), cos.to(x.dtype)
        presents = []
        for i, block in enumerate(self.h):
            past = past_key_values[i] if past_key_values else None
            if self.gradient_checkpointing and self.training:
                # Non-reentrant: works with ZeRO-3's parameter hooks and inputs that need no grad.
                x, present = checkpoint(block, x, sin, cos, attn_mask, past, use_reentrant=False)
            else:
                x, present = block(x, sin, cos, attn_mask, past)
            if use_cache:
                presents.append(present)
        return self.ln_f(x), (tuple(presents) if use_cache else None)


@torch.no_grad()
def init_module_weights(module: nn.Module, initializer_range: float) -> None:
    """HF GPT-J's init: normal(0, initializer_range) for linear and embedding weights, zero biases, unit LayerNorm.
    Called on each module in `modules()` order, a fused block draws the same numbers as an unfused one."""
    if isinstance(module, FusedInputProjection):
        module.init_weights(initializer_range)
    elif isinstance(module, nn.Linear) and hasattr(module, "_drawn_weight"):  # a fused block's out_proj
        module.weight.copy_(module.__dict__.pop("_drawn_weight"))
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(mean=0.0, std=initializer_range)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
