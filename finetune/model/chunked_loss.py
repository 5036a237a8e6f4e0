"""Cross-entropy of a linear projection over a large vocabulary, without the whole (tokens x vocab) logits.

The causal-LM head of GPT-J projects every position onto 50400 classes; at micro batch 4 x 2048 tokens the fp32
logits alone are 1.65 GB, and cross-entropy's softmax and the backward pass add three more copies. Here the
tokens are processed `chunk_tokens` at a time: the forward keeps only each token's log-sum-exp, and the backward
recomputes one chunk's logits to form its gradients (one extra chunk-sized matmul per chunk, about a third more
work in the head, ~1 % of a GPT-J 6B step). Peak memory of the loss is one chunk's logits instead of four full
copies. When the head trains, its weight gradient is summed over the chunks in an fp32 buffer (vocabulary x width,
826 MB for GPT-J 6B) and cast once, so that half-precision training gets the plain path's gradient, not one
rounded at every chunk; a frozen head (LoRA's default for clm) needs no such buffer.

Numerics follow the plain path `F.cross_entropy(F.linear(h, W, b).float(), t)`: the logits are computed in the
input's dtype and cast to fp32, the softmax runs in fp32, and the logits' gradient is cast back to the input's
dtype before the two gradient matmuls. Each token's loss and input gradient come from its own row alone, as in
the plain path.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# A chunk's fp32 logits are about this many elements by default (2^25 floats = 128 MiB): 512 tokens at 50400 classes.
DEFAULT_CHUNK_ELEMENTS = 2**25


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: a power of two whose fp32 logits stay under ~128 MiB (64 to 8192)."""
    return int(min(8192, max(64, 2 ** math.floor(math.log2(max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size))))))


class LMHead(nn.Linear):
    """GPT-J's `lm_head`, an `nn.Linear` (same parameters and state-dict names) that can also return the loss.

    `lm_head(hidden)` gives the logits. `lm_head(hidden, targets, chunk_tokens=C)`, with hidden (N, n_embd) and
    targets (N,) (every entry a class id), gives each token's cross-entropy (N,) in fp32, C tokens at a time.
    The loss is computed inside this module's own forward so that whatever manages the weight around a call of
    the module keeps doing so: DeepSpeed ZeRO-3 gathers a module's partitioned parameters in a hook on its call,
    and peft's `modules_to_save` wrapper forwards the call (and its keywords) to the trained copy.
    """

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                chunk_tokens: Optional[int] = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        chunk = chunk_tokens or default_chunk_tokens(self.out_features)
        return linear_cross_entropy(hidden, self.weight, self.bias, targets, chunk_tokens=chunk)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, *, chunk_tokens: int) -> torch.Tensor:
    """Per-token `cross_entropy(linear(hidden, weight, bias).float(), targets, reduction="none")`, chunked.

    hidden (N, d), weight (V, d), bias (V,) or None, targets (N,) int64 in [0, V). Returns (N,) fp32.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}.")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"Expected hidden (N, d) and targets (N,); got {tuple(hidden.shape)}, {tuple(targets.shape)}.")
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(nll)
        for span in _chunks(hidden.shape[0], chunk_tokens):
            logits = F.linear(hidden[span], weight, bias).float()  # (C, V)
            lse[span] = torch.logsumexp(logits, dim=-1)
            nll[span] = lse[span] - logits.gather(1, targets[span, None]).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_tokens = chunk_tokens
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Summed over chunks in fp32 and rounded once at the end, as the plain path's single matmul rounds once.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        rows = torch.arange(min(ctx.chunk_tokens, hidden.shape[0]), device=hidden.device)
        for span in _chunks(hidden.shape[0], ctx.chunk_tokens):
            h = hidden[span]
            # d nll / d logits = softmax - one_hot(target), scaled by the incoming gradient of each token.
            grad_logits = F.linear(h, weight, bias).float().sub_(lse[span, None]).exp_()
            grad_logits[rows[: h.shape[0]], targets[span]] -= 1
            grad_logits = grad_logits.mul_(grad_nll[span, None]).to(hidden.dtype)  # as .float()'s backward casts
            if need_hidden:
                grad_hidden[span] = grad_logits @ weight
            if need_weight:
                grad_weight += _matmul_fp32(grad_logits.t(), h)
            if need_bias:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
            del grad_logits
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
        )


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32, so that the sum over chunks is not rounded to half precision at every chunk. On a GPU, half
    inputs keep their fast kernel where torch can return its fp32 accumulator (`out_dtype`); on a CPU they are
    upcast (no faster half kernel to lose)."""
    if a.dtype == torch.float32:
        return a @ b
    if not a.is_cuda:
        return a.float() @ b.float()
    if _cuda_mm_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


@functools.cache
def _cuda_mm_out_dtype() -> bool:
    try:
        x = torch.ones(1, 1, dtype=torch.bfloat16, device="cuda")
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False
