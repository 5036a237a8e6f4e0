"""Text generation for GPT-J: greedy decoding and sampling (temperature, top-k, top-p) with a KV cache.

Follows transformers' `generate()` semantics so results can be compared token for token: `max_length`
counts the prompt, finished rows are filled with `pad_token_id` after their eos, and the sampling
filters run in HF's order (temperature, then top-k, then top-p). Batches are LEFT padded, so every row's
next token sits in the last column; the model derives positions from the attention mask.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from finetune.config import GenerationConfig
from finetune.model.tokenizer import GPTJTokenizer

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' default when no length is given


class GenerationError(ValueError):
    """A generation argument is invalid. The message names the argument and the fix."""


def left_pad(token_id_lists: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths with padding on the LEFT.

    Returns `input_ids` (B, T) and `attention_mask` (B, T), 1 on real tokens. Left padding keeps the
    last real token of every row in the last column, where the next token is predicted.
    """
    if not token_id_lists:
        raise GenerationError("left_pad got no prompts; pass at least one list of token ids.")
    for row, ids in enumerate(token_id_lists):
        if len(ids) == 0:
            raise GenerationError(
                f"Prompt {row} is empty (no tokens); generation needs at least one token to continue from."
            )
    width = max(len(ids) for ids in token_id_lists)
    input_ids = torch.full((len(token_id_lists), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_id_lists), width), dtype=torch.long)
    for row, ids in enumerate(token_id_lists):
        input_ids[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


# --- sampling filters (HF's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) ---------
def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (ties with the k-th included); the rest become -inf."""
    top_k = min(top_k, logits.size(-1))
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `top_p`.

    The most likely token always survives, so a row never ends up empty.
    """
    sorted_logits, sorted_indices = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, float("-inf"))


def sampling_filter(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k (0 = off), then top-p (1.0 = off), in transformers' order."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


# --- argument checks --------------------------------------------------------------------------------
def _check_arguments(
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    *,
    max_length: Optional[int],
    max_new_tokens: Optional[int],
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: Optional[int],
    generator: Optional[torch.Generator],
) -> int:
    """Validate the arguments of `generate`; return the number of new tokens to produce at most."""
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise GenerationError(
            f"input_ids must be a non-empty (batch, length) tensor of token ids, got shape {tuple(input_ids.shape)}; "
            "use left_pad() to batch a list of prompts."
        )
    if input_ids.dtype not in (torch.long, torch.int):
        raise GenerationError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise GenerationError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
                "they must match (1 on real tokens, 0 on left padding)."
            )
        if not bool(attention_mask[:, -1].all()):
            raise GenerationError(
                "Some prompt is padded on the right (its last column is masked). Pad prompts on the LEFT "
                "(left_pad() does), so every row's next token follows its last real token."
            )
    prompt_len = input_ids.shape[1]
    if max_length is not None and max_new_tokens is not None:
        raise GenerationError(
            f"Both max_length ({max_length}) and max_new_tokens ({max_new_tokens}) are set; set only one "
            "(max_length counts the prompt, max_new_tokens does not)."
        )
    if max_length is not None:
        if max_length <= prompt_len:
            raise GenerationError(
                f"max_length ({max_length}) must exceed the prompt length ({prompt_len} tokens), since it counts "
                "the prompt; raise it or use max_new_tokens."
            )
        new_tokens = max_length - prompt_len
    else:
        new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {new_tokens}.")
    if do_sample and not temperature > 0:
        raise GenerationError(
            f"temperature must be > 0 when sampling, got {temperature}; for deterministic output use do_sample=False."
        )
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 disables it), got {top_k}.")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1 disables it), got {top_p}.")
    if seed is not None and generator is not None:
        raise GenerationError("Pass either seed or generator, not both; a seed just builds a seeded generator.")
    return new_tokens


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --- the decoding loop ------------------------------------------------------------------------------
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_length: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = 50256,
    pad_token_id: Optional[int] = 50256,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Continue each prompt of `input_ids` (B, T) with a causal LM; return prompt + continuation (B, T + n).

    - Lengths: set `max_length` (counts the prompt, as in transformers) or `max_new_tokens`, not both;
      with neither, up to 20 new tokens. Decoding stops early once every row has produced `eos_token_id`
      (None: never); a finished row is filled with `pad_token_id` (None: eos) after its eos.
    - Batches: pad on the left and pass `attention_mask` (see `left_pad`). GPT-J pads with eos, so padding
      cannot be told from the ids; without a mask every token counts as real.
    - Sampling (`do_sample=True`): `temperature` (> 0), `top_k` (0 = off), `top_p` (1.0 = off), applied in
      that order; `seed` or a `torch.Generator` (on the model's device) makes it reproducible.
      Greedy decoding ignores the three.

    The prompt runs through the model once; each further step feeds one token and reuses the KV cache.
    `model` is any module with GPT-J's causal LM forward (`GPTJForCausalLM`); it runs in eval mode, and
    its training mode is restored afterwards.
    """
    new_tokens = _check_arguments(
        input_ids, attention_mask, max_length=max_length, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, generator=generator,
    )
    device = _model_device(model)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).long()
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    n_positions = getattr(getattr(model, "config", None), "n_positions", None)
    if n_positions is not None and input_ids.shape[1] + new_tokens > n_positions:
        warnings.warn(
            f"Generating up to {input_ids.shape[1] + new_tokens} tokens, more than the {n_positions} positions the "
            "model was trained on; quality degrades past that.",
            stacklevel=2,
        )

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sequences = _decode(
                model, input_ids, attention_mask, new_tokens=new_tokens, do_sample=do_sample,
                temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, generator=generator,
            )
    finally:
        model.train(was_training)
    # An inference-mode tensor cannot enter autograd later (e.g. training on generated text); a copy can.
    return sequences.clone()


def _decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_id: Optional[int],
    pad_token_id: int,
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_input, past = input_ids, None  # first step: the whole prompt; then one token at a time
    for step in range(new_tokens):
        out = model(step_input, attention_mask=attention_mask, past_key_values=past, use_cache=True)
        logits, past = out.logits[:, -1, :], out.past_key_values  # (B, vocab), fp32
        if do_sample:
            logits = sampling_filter(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            next_tokens = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            next_tokens = logits.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        if eos_token_id is not None:
            unfinished &= next_tokens != eos_token_id
        if not bool(unfinished.any()) or step == new_tokens - 1:
            break  # the last token needs no forward pass
        # As transformers: the new token is attended to even in finished rows; their output is padding anyway.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
        step_input = next_tokens[:, None]
    return sequences


@dataclass
class Completion:
    """The continuation of one prompt."""

    text: str
    token_ids: list[int]  # new tokens, without the eos
    ended_with_eos: bool  # False: stopped by the length limit


def generate_text(
    model: nn.Module, tokenizer: GPTJTokenizer, prompts: Sequence[str], config: GenerationConfig
) -> list[Completion]:
    """Continue each prompt string as one left-padded batch; return the continuations (text after the prompt).

    An empty prompt starts from `<|endoftext|>`, the document separator GPT-J was trained with, which
    gives unconditional samples. `config.max_length` counts the longest prompt's tokens.
    """
    token_lists = [tokenizer.encode(p) or [tokenizer.eos_token_id] for p in prompts]
    input_ids, attention_mask = left_pad(token_lists, tokenizer.pad_token_id)
    sequences = generate(
        model, input_ids, attention_mask, max_length=config.max_length, max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=config.seed,
    )
    completions = []
    for row in sequences[:, input_ids.shape[1]:].tolist():
        ended = tokenizer.eos_token_id in row
        new_ids = row[: row.index(tokenizer.eos_token_id)] if ended else row
        completions.append(Completion(text=tokenizer.decode(new_ids), token_ids=new_ids, ended_with_eos=ended))
    return completions
