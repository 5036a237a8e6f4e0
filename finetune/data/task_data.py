"""What every task's data loader returns to the runner."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import datasets

# Columns the collator consumes, per task; others (QA's example_id, offset_mapping) are for post-processing only.
# seq_lens: the document pieces of a clm block (data.packing=documents).
MODEL_INPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "clm": ("input_ids", "attention_mask", "labels", "seq_lens"),
    "cls": ("input_ids", "attention_mask", "labels"),
    "qa": ("input_ids", "attention_mask", "start_positions", "end_positions"),
}


@dataclass
class TaskData:
    """Model-ready features of one task.

    clm: input_ids, attention_mask, labels (-100: no loss); with data.packing=documents also seq_lens.
    cls: input_ids, attention_mask, labels (int; multi-hot list[float]; or float for regression).
    qa: input_ids, attention_mask, start_positions, end_positions; `validation` also keeps example_id and
    offset_mapping ((start, end) into the context for context tokens, None elsewhere) for post-processing, and
    `validation_examples` holds the raw examples (id, title, context, question, answers).
    `skipped_rows` maps each split (train, validation) to its rows dropped by data.on_bad_row=skip, per reason
    (finetune.data.bad_rows); empty dicts when nothing was skipped.
    """

    train: datasets.Dataset
    validation: Optional[datasets.Dataset]
    validation_examples: Optional[datasets.Dataset] = None
    num_labels: Optional[int] = None
    id2label: Optional[dict[int, str]] = None
    # HF names: single_label_classification | multi_label_classification | regression
    problem_type: Optional[str] = None
    skipped_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    # qa: SQuAD v2 (unanswerable questions trained, "" a possible answer), data.version_2_with_negative resolved.
    version_2_with_negative: bool = False

    def skipped_row_metrics(self) -> dict[str, int]:
        """Flat metrics of `skipped_rows`: `skipped_rows_<split>` (the total) and `skipped_rows_<split>_<reason>`."""
        metrics = {}
        for split, counts in self.skipped_rows.items():
            metrics[f"skipped_rows_{split}"] = sum(counts.values())
            metrics.update({f"skipped_rows_{split}_{reason}": count for reason, count in sorted(counts.items())})
        return metrics
