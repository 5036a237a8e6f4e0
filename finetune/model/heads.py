"""GPT-J with its three task heads, named and computed like HF's GPTJForCausalLM, GPTJForSequenceClassification and
GPTJForQuestionAnswering.

Beyond HF's heads:
- `loss_reduction="sum"` (keyword-only) returns the loss summed over its targets instead of their mean, so that a
  training loop can weigh every target of a global batch alike (clm: target tokens; cls and qa: examples).
- `cu_seq_lens`: input_ids is one packed row of several examples (finetune.model.gptj); the outputs are the same
  per example as unpacked: cls pools each example's last token, qa scores each example's span on its own tokens.
- The causal-LM head computes its loss chunk by chunk over tokens when `loss_chunk_tokens` is set
  (finetune.model.chunked_loss): with labels, the full (tokens x vocab) logits are then never built, and the
  output carries each target's loss (`token_nll`) instead. Without labels (generation) it returns logits as HF.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from finetune.model.chunked_loss import LMHead
from finetune.model.gptj import GPTJConfig, GPTJModel, KVCache, PackedSequences, init_module_weights

IGNORE_INDEX = -100
# "mean": Hugging Face's loss. "sum": summed over the loss targets, which the training loop divides by the target
# count of the whole global batch (finetune.training.loss).
LOSS_REDUCTIONS = ("mean", "sum")


# NamedTuples rather than dataclasses: DeepSpeed's ZeRO-3 hooks walk tuples to find the output tensors
# (for its backward-pass parameter gathering); a dataclass hides them and draws a warning.
class CausalLMOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]  # (B, T, vocab), fp32; None when the loss was computed in chunks
    past_key_values: Optional[KVCache] = None
    # Chunked loss only: (B, T - 1) fp32, the loss of predicting labels[:, 1:] at each position (0 where ignored).
    token_nll: Optional[torch.Tensor] = None


class SequenceClassifierOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor  # (B, num_labels), fp32


class QuestionAnsweringOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    start_logits: torch.Tensor  # (B, T), fp32 (packed: (1, total), each example's logits on its own tokens)
    end_logits: torch.Tensor


def _check_reduction(loss_reduction: str) -> None:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction={loss_reduction!r}; use 'mean' (as transformers) or 'sum'.")


class GPTJPreTrainedModel(nn.Module):
    """Shared by the heads: the `transformer` backbone, weight init, activation checkpointing switch."""

    def __init__(self, config: GPTJConfig, *, fused_projections: bool = False):
        super().__init__()
        self.config = config
        self.transformer = GPTJModel(config, fused_projections=fused_projections)

    def init_weights(self) -> None:
        """HF's random init (call on a materialized model; ZeRO-3 callers gather each module first)."""
        for module in self.modules():
            init_module_weights(module, self.config.initializer_range)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.transformer.gradient_checkpointing = enabled

    @property
    def head_names(self) -> list[str]:
        """Top-level modules outside the backbone: trained in full (not LoRA-adapted) when fine-tuning with LoRA."""
        return [name for name, _ in self.named_children() if name != "transformer"]


class GPTJForCausalLM(GPTJPreTrainedModel):
    def __init__(self, config: GPTJConfig, *, loss_chunk_tokens: Optional[int] = None,
                 fused_projections: bool = False):
        super().__init__(config, fused_projections=fused_projections)
        self.lm_head = LMHead(config.n_embd, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # Tokens per chunk of the loss with labels; None: full logits and F.cross_entropy, as transformers.
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        labels: Optional[torch.Tensor] = None,
        cu_seq_lens: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> CausalLMOutput:
        """`loss_reduction`: "mean" (HF's) is the mean NLL over target tokens (labels[:, 1:] != -100); "sum" is
        their summed NLL, for a training loop that normalises over a whole global batch itself. With labels and
        model.chunked_loss the NLL is computed chunk by chunk (no full fp32 logits; `logits` is then None)."""
        _check_reduction(loss_reduction)
        hidden, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                            cu_seq_lens)
        if labels is not None and self.loss_chunk_tokens:
            loss, token_nll = self._chunked_loss(hidden, labels, loss_reduction)
            return CausalLMOutput(loss=loss, logits=None, past_key_values=presents, token_nll=token_nll)
        # fp32 logits as HF: the softmax over 50400 classes loses too much in half precision.
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            # Token t predicts token t+1; -100 marks positions without loss (padding, prompts, packed boundaries).
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction=loss_reduction)
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=presents)

    def _chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor, loss_reduction: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # only positions with a target reach the head (not prompts, padding)
        nll = self.lm_head(hidden[:, :-1][keep], targets[keep], chunk_tokens=self.loss_chunk_tokens)
        # for evaluation records only: detached, so training keeps no graph for it
        token_nll = torch.zeros(targets.shape, dtype=nll.dtype, device=nll.device).masked_scatter(keep, nll.detach())
        loss = nll.sum()
        if loss_reduction == "mean":
            loss = loss / keep.sum()  # no target at all: nan, as F.cross_entropy
        return loss, token_nll


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pad_token_id: Optional[int]) -> torch.Tensor:
    """Index of the last real token of each row, for right or left padding.

    The attention mask decides when given: GPT-J pads with eos, so the pad id alone cannot tell
    a pad from a real end-of-text token.
    """
    T = input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), T - 1, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * real).argmax(-1)


class GPTJForSequenceClassification(GPTJPreTrainedModel):
    def __init__(self, config: GPTJConfig, *, fused_projections: bool = False):
        super().__init__(config, fused_projections=fused_projections)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        cu_seq_lens: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> SequenceClassifierOutput:
        """`loss_reduction`: "mean" (HF's) averages the per-example losses, "sum" adds them up."""
        _check_reduction(loss_reduction)
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids, cu_seq_lens=cu_seq_lens)
        if cu_seq_lens is not None:  # one packed row: each example's last token
            pooled = hidden[0, cu_seq_lens[1:].long() - 1]
        else:
            last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, n_embd)
        logits = self.score(pooled).float()
        loss = None if labels is None else self.loss(logits, labels, loss_reduction=loss_reduction)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, *, loss_reduction: str = "mean") -> torch.Tensor:
        """HF's loss for the problem type; "sum" adds up the per-example losses (each the mean over its outputs)."""
        problem_type = self.config.problem_type
        if problem_type is None:  # HF's inference rule
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), reduction=loss_reduction)
        if problem_type == "regression":
            if self.num_labels == 1:  # labels (B,) or (B, 1), as HF accepts both
                logits, labels = logits.view(-1, 1), labels.reshape(-1, 1)
            elementwise = F.mse_loss(logits, labels.to(logits.dtype), reduction="none")
        else:
            elementwise = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        if loss_reduction == "mean":
            return elementwise.mean()
        return elementwise.sum() * (elementwise.shape[0] / elementwise.numel())  # per example: mean over outputs


class GPTJForQuestionAnswering(GPTJPreTrainedModel):
    def __init__(self, config: GPTJConfig, *, fused_projections: bool = False):
        super().__init__(config, fused_projections=fused_projections)
        self.qa_outputs = nn.Linear(config.n_embd, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        cu_seq_lens: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> QuestionAnsweringOutput:
        """`loss_reduction`: "mean" (HF's) is the mean over features of (start CE + end CE) / 2, each softmax over
        every position of the row, padding included, as in transformers. "sum" sums that over the features with
        each softmax over the feature's own tokens: padding is never an answer, and a feature's loss then does not
        depend on how long the other features of its micro batch are. Packed rows (cu_seq_lens): each feature's
        softmax spans its own tokens under either reduction. (A position outside the sequence adds 0.)"""
        _check_reduction(loss_reduction)
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids, cu_seq_lens=cu_seq_lens)
        start_logits, end_logits = self.qa_outputs(hidden).float().split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            if cu_seq_lens is not None:  # each example's softmax runs over its own tokens only
                packed = PackedSequences.from_cu_seq_lens(cu_seq_lens, hidden.shape[1])
                starts = packed.per_example(start_logits[0], float("-inf"))  # (n, longest)
                ends = packed.per_example(end_logits[0], float("-inf"))
                lengths = packed.inside.sum(-1)
            else:
                starts, ends = start_logits, end_logits
                lengths = torch.full((starts.shape[0],), starts.shape[1], device=starts.device)
                if loss_reduction == "sum" and attention_mask is not None:
                    padding = attention_mask == 0
                    starts = starts.masked_fill(padding, torch.finfo(starts.dtype).min)
                    ends = ends.masked_fill(padding, torch.finfo(ends.dtype).min)
            loss = (_span_loss(starts, start_positions, lengths, loss_reduction)
                    + _span_loss(ends, end_positions, lengths, loss_reduction)) / 2
        return QuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


def _span_loss(logits: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, reduction: str) -> torch.Tensor:
    # As HF: a position outside the sequence is clamped to its length and ignored.
    positions = positions.view(-1)
    positions = torch.minimum(positions.clamp(min=0), lengths)
    positions = positions.masked_fill(positions == lengths, IGNORE_INDEX)
    return F.cross_entropy(logits, positions, ignore_index=IGNORE_INDEX, reduction=reduction)


HEADS: dict[str, type[GPTJPreTrainedModel]] = {
    "clm": GPTJForCausalLM,
    "cls": GPTJForSequenceClassification,
    "qa": GPTJForQuestionAnswering,
}
# The `architectures` entry of config.json for each head, as HF names them.
ARCHITECTURES = {cls: cls.__name__ for cls in HEADS.values()}


def build_model(
    config: GPTJConfig, *, task: str = "clm", device: torch.device | str | None = None, init: bool = True,
    loss_chunk_tokens: Optional[int] = None, fused_projections: bool = False,
) -> GPTJPreTrainedModel:
    """Build GPT-J with the head of `task` (clm | cls | qa).

    device="meta" builds shapes only (no memory), for loading weights tensor by tensor afterwards.
    init=False skips the random init (the weights will be overwritten by a checkpoint anyway).
    loss_chunk_tokens (clm only): compute the loss with labels this many tokens at a time (None: full logits).
    fused_projections: each block computes q/k/v_proj and fc_in as one matrix product (training speed); the
    state dict keeps Hugging Face's names either way (finetune.model.gptj.FusedInputProjection).
    """
    if task not in HEADS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(HEADS)}.")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        extra = {"loss_chunk_tokens": loss_chunk_tokens} if task == "clm" else {}
        model = HEADS[task](config, fused_projections=fused_projections, **extra)
    if init and str(device) != "meta":
        model.init_weights()
    return model
