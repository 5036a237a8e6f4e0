"""The three tasks as small plug-ins of the one training loop.

A task decides what the loop cannot know by itself: the model-config tweaks its head needs, how many loss
targets a batch holds, what to keep of each evaluated row (small, picklable, gathered across ranks), and how those
rows become metrics. Data loading and collation are shared (`finetune.data`); the head is picked by the task name
(`build_model`). Batches are padded rows or one packed row (`cu_seq_lens`, data.packing); records and target
counts are per example either way.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics
from finetune.config import DataConfig
from finetune.data import DataCollator, TaskData, load_task_data, postprocess_qa_predictions, qa_references
from finetune.data.collate import IGNORE_INDEX
from finetune.data.packing import packs_batches
from finetune.model.tokenizer import GPTJTokenizer


class Task(Protocol):
    name: str
    # The metric shown in the progress bar and summary; `higher_is_better` says which way is good.
    main_metric: str
    higher_is_better: bool
    # What a sweep optimises unless sweep.objective says otherwise (finetune.tools.sweep.objective_of).
    objective_metric: str

    def load_data(self, cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData: ...

    def collator(self, tokenizer: GPTJTokenizer, cfg: Optional[DataConfig] = None) -> DataCollator: ...

    def model_overrides(self, data: TaskData, tokenizer: GPTJTokenizer) -> dict[str, Any]: ...

    def num_loss_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the head's loss averages over in `batch`, counted: the denominator of its "mean" and the number of
        terms of its "sum" (`loss_reduction`). A 0-dim int64 tensor on the batch's device."""
        ...

    def eval_records(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[Any]: ...

    def compute_eval_metrics(self, records: list[Any], data: TaskData, cfg: DataConfig) -> dict[str, float]: ...


class _BaseTask:
    name = ""

    def load_data(self, cfg: DataConfig, tokenizer: GPTJTokenizer) -> TaskData:
        return load_task_data(self.name, cfg, tokenizer)

    def collator(self, tokenizer: GPTJTokenizer, cfg: Optional[DataConfig] = None) -> DataCollator:
        """Padded rows, or one packed row per micro batch when `cfg.packing` says so (None: padded)."""
        return DataCollator(tokenizer.pad_token_id, packed=cfg is not None and packs_batches(cfg, self.name))

    def num_loss_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """0-dim int64 on the batch's device: the examples of the batch (cls, qa), whatever the row layout."""
        examples = batch["labels"] if "labels" in batch else batch["start_positions"]
        return torch.tensor(examples.shape[0], dtype=torch.int64, device=examples.device)

    def model_overrides(self, data: TaskData, tokenizer: GPTJTokenizer) -> dict[str, Any]:
        # GPT-J pads with <|endoftext|>; saying so in config.json lets transformers' heads batch padded inputs.
        return {"pad_token_id": tokenizer.pad_token_id}


class CausalLMTask(_BaseTask):
    name, main_metric, higher_is_better = "clm", "perplexity", False
    objective_metric = "perplexity"

    def num_loss_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Token t predicts token t+1: the targets are the shifted labels that are not -100 (prompt, padding).
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def eval_records(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[Any]:
        # Per example (summed token NLL, token count): the dataset perplexity weighs every token alike.
        labels = batch["labels"][:, 1:]
        if getattr(outputs, "token_nll", None) is not None:  # the chunked loss: no logits
            nll = outputs.token_nll  # (B, T-1)
        else:
            nll = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX,
                                  reduction="none")
        counts = labels != IGNORE_INDEX
        if "cu_seq_lens" in batch:  # one packed row: example i predicts at positions [cu_i, cu_i+1) of the shift
            bounds = batch["cu_seq_lens"].tolist()
            spans = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
            return [(float(nll[0, span].sum()), int(counts[0, span].sum())) for span in spans]
        return [(float(s), int(c)) for s, c in zip(nll.sum(-1).tolist(), counts.sum(-1).tolist())]

    def compute_eval_metrics(self, records: list[Any], data: TaskData, cfg: DataConfig) -> dict[str, float]:
        total_nll = sum(r[0] for r in records)
        tokens = max(1, sum(r[1] for r in records))
        loss = total_nll / tokens
        return {"loss": loss, "perplexity": metrics.perplexity(loss)}


class ClassificationTask(_BaseTask):
    name, main_metric, higher_is_better = "cls", "accuracy", True
    objective_metric = "accuracy"

    def model_overrides(self, data: TaskData, tokenizer: GPTJTokenizer) -> dict[str, Any]:
        overrides = super().model_overrides(data, tokenizer)
        overrides.update(num_labels=data.num_labels, id2label=data.id2label, problem_type=data.problem_type)
        return {k: v for k, v in overrides.items() if v is not None}

    def eval_records(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[Any]:
        loss = float(outputs.loss) if outputs.loss is not None else float("nan")
        logits = outputs.logits.float().cpu().numpy()
        labels = batch["labels"].cpu().numpy()
        return [(loss, row, label) for row, label in zip(logits, labels)]

    def compute_eval_metrics(self, records: list[Any], data: TaskData, cfg: DataConfig) -> dict[str, float]:
        logits = np.stack([r[1] for r in records])
        labels = np.stack([r[2] for r in records])
        result = {"loss": float(np.mean([r[0] for r in records]))}
        if data.problem_type == "regression":
            result["mse"] = metrics.mse(logits.squeeze(-1), labels)
        elif data.problem_type == "multi_label_classification":
            result.update(metrics.multilabel_metrics(logits, labels))
        else:
            result.update(metrics.accuracy_and_macro_f1(logits.argmax(-1), labels, num_labels=data.num_labels))
        return result


class QuestionAnsweringTask(_BaseTask):
    name, main_metric, higher_is_better = "qa", "exact_match", True
    objective_metric = "f1"  # smoother than exact match: a search sees small improvements

    def eval_records(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[Any]:
        loss = float(outputs.loss) if outputs.loss is not None else float("nan")
        starts = outputs.start_logits.float().cpu().numpy()
        ends = outputs.end_logits.float().cpu().numpy()
        if "cu_seq_lens" in batch:  # one packed row: each feature's logits on its own tokens
            bounds = batch["cu_seq_lens"].tolist()
            return [(loss, starts[0, a:b], ends[0, a:b]) for a, b in zip(bounds, bounds[1:])]
        lengths = batch["attention_mask"].sum(-1).tolist()  # right padding: the real tokens come first
        return [(loss, s[:n], e[:n]) for s, e, n in zip(starts, ends, lengths)]

    def compute_eval_metrics(self, records: list[Any], data: TaskData, cfg: DataConfig) -> dict[str, float]:
        predictions = postprocess_qa_predictions(
            data.validation_examples,
            data.validation,
            [r[1] for r in records],
            [r[2] for r in records],
            n_best=cfg.n_best,
            max_answer_length=cfg.max_answer_length,
            version_2_with_negative=data.version_2_with_negative,
            null_score_diff_threshold=cfg.null_score_diff_threshold,
        )
        result = {"loss": float(np.mean([r[0] for r in records]))}
        result.update(metrics.squad_metrics(predictions, qa_references(data.validation_examples)))
        return result


TASKS: dict[str, Task] = {t.name: t for t in (CausalLMTask(), ClassificationTask(), QuestionAnsweringTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        from finetune.config import ConfigError

        raise ConfigError(f"task={name!r} is unknown; choose one of {', '.join(TASKS)} (e.g. task=qa).")
    return TASKS[name]

