"""GPT-J with its three task heads, named and computed like HF's GPTJFor{CausalLM,SequenceClassification,QuestionAnswering}."""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from finetune.model.gptj import GPTJConfig, GPTJModel, KVCache, init_module_weights

# "mean": Hugging Face's loss. "sum": summed over the loss targets, which the training loop divides by the target
# count of the whole global batch (finetune.training.loss).
LOSS_REDUCTIONS = ("mean", "sum")


def _check_reduction(loss_reduction: str) -> str:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction={loss_reduction!r}; use one of {', '.join(LOSS_REDUCTIONS)}.")
    return loss_reduction


# NamedTuples rather than dataclasses: DeepSpeed's ZeRO-3 hooks walk tuples to find the output tensors
# (for its backward-pass parameter gathering); a dataclass hides them and draws a warning.
class CausalLMOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor  # (B, T, vocab), fp32
    past_key_values: Optional[KVCache] = None


class SequenceClassifierOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    logits: torch.Tensor  # (B, num_labels), fp32


class QuestionAnsweringOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    start_logits: torch.Tensor  # (B, T), fp32
    end_logits: torch.Tensor


class GPTJPreTrainedModel(nn.Module):
    """Shared by the heads: the `transformer` backbone, weight init, activation checkpointing switch."""

    def __init__(self, config: GPTJConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTJModel(config)

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
    def __init__(self, config: GPTJConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        labels: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> CausalLMOutput:
        """`loss_reduction`: "mean" (HF's) is the mean NLL over target tokens (labels[:, 1:] != -100); "sum" is
        their summed NLL, for a training loop that normalises over a whole global batch itself."""
        hidden, presents = self.transformer(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        # fp32 logits as HF: the softmax over 50400 classes loses too much in half precision.
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            # Token t predicts token t+1; -100 marks positions without loss (padding, prompts).
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                reduction=_check_reduction(loss_reduction),
            )
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=presents)


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
    def __init__(self, config: GPTJConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> SequenceClassifierOutput:
        """`loss_reduction`: "mean" (HF's) averages the per-example losses, "sum" adds them up."""
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, n_embd)
        logits = self.score(pooled).float()
        loss = None if labels is None else self.loss(logits, labels, reduction=_check_reduction(loss_reduction))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """HF's loss for the problem type. An example's loss is the mean over its labels (regression with several
        outputs, multi-label), so "mean" over examples equals HF's mean over all elements and "sum" adds the
        examples' losses."""
        problem_type = self.config.problem_type
        if problem_type is None:  # HF's inference rule
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.view(-1), labels.reshape(-1).to(logits.dtype), reduction=reduction)
            per_element = F.mse_loss(logits, labels.to(logits.dtype), reduction="none")
        elif problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), reduction=reduction)
        else:
            per_element = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        if reduction == "mean":
            return per_element.mean()
        return per_element.mean(-1).sum()


class GPTJForQuestionAnswering(GPTJPreTrainedModel):
    def __init__(self, config: GPTJConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        *,
        loss_reduction: str = "mean",
    ) -> QuestionAnsweringOutput:
        """`loss_reduction`: "mean" (HF's) is the mean over features of (start CE + end CE) / 2, each softmax over
        every position of the batch, padding included, as in transformers. "sum" sums that over the features with
        each softmax over the feature's own tokens (attention_mask): padding is never an answer, and a feature's
        loss then does not depend on how long the other features of its micro batch are. (A position outside the
        sequence is ignored: it adds 0.)"""
        hidden, _ = self.transformer(input_ids, attention_mask, position_ids)
        start_logits, end_logits = self.qa_outputs(hidden).float().split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # As HF: positions outside the sequence are clamped to T and ignored.
            ignored = start_logits.size(1)
            start_positions = start_positions.view(-1).clamp(0, ignored)
            end_positions = end_positions.view(-1).clamp(0, ignored)
            reduction = _check_reduction(loss_reduction)
            start_scores, end_scores = start_logits, end_logits
            if reduction == "sum" and attention_mask is not None:
                padding = attention_mask == 0
                start_scores = start_logits.masked_fill(padding, torch.finfo(start_logits.dtype).min)
                end_scores = end_logits.masked_fill(padding, torch.finfo(end_logits.dtype).min)
            loss = (
                F.cross_entropy(start_scores, start_positions, ignore_index=ignored, reduction=reduction)
                + F.cross_entropy(end_scores, end_positions, ignore_index=ignored, reduction=reduction)
            ) / 2
        return QuestionAnsweringOutput(loss=loss, start_logits=start_logits, end_logits=end_logits)


HEADS: dict[str, type[GPTJPreTrainedModel]] = {
    "clm": GPTJForCausalLM,
    "cls": GPTJForSequenceClassification,
    "qa": GPTJForQuestionAnswering,
}
# The `architectures` entry of config.json for each head, as HF names them.
ARCHITECTURES = {cls: cls.__name__ for cls in HEADS.values()}


def build_model(
    config: GPTJConfig, *, task: str = "clm", device: torch.device | str | None = None, init: bool = True
) -> GPTJPreTrainedModel:
    """Build GPT-J with the head of `task` (clm | cls | qa).

    device="meta" builds shapes only (no memory), for loading weights tensor by tensor afterwards.
    init=False skips the random init (the weights will be overwritten by a checkpoint anyway).
    """
    if task not in HEADS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(HEADS)}.")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = HEADS[task](config)
    if init and str(device) != "meta":
        model.init_weights()
    return model
