"""QA logits -> answer text: the best-scoring span over all windows of an example, mapped back by offsets."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import datasets
import numpy as np


def postprocess_qa_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: Sequence[Any],
    end_logits: Sequence[Any],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
    """Answer text per example id.

    `examples` has `id` and `context`; `features` has `example_id`, `offset_mapping` and `input_ids` (from
    `TaskData.validation`); `start_logits[i]`/`end_logits[i]` are feature i's logits (rows of a padded 2-D array,
    or one array per feature). A span scores start + end logit, among the `n_best` best starts and ends of a
    window, with start <= end, at most `max_answer_length` tokens, both inside the context. The null score of
    an example is the lowest score of its windows' no-answer slot (each feature's last token); with
    `version_2_with_negative`, the answer is "" when null score > best span score + `null_score_diff_threshold`.
    """
    if not isinstance(version_2_with_negative, bool):  # data.version_2_with_negative=auto is resolved by load_qa
        raise TypeError(f"version_2_with_negative must be a bool, got {version_2_with_negative!r}.")
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"Got {len(start_logits)} start and {len(end_logits)} end logit rows for {len(features)} features; "
            "pass one row per feature, in the order of the features dataset."
        )
    columns = features.select_columns(["example_id", "offset_mapping", "input_ids"]).to_dict()
    by_example: dict[str, list[int]] = defaultdict(list)
    for index, example_id in enumerate(columns["example_id"]):
        by_example[example_id].append(index)
    offset_mappings = columns["offset_mapping"]
    lengths = [len(ids) for ids in columns["input_ids"]]
    examples_columns = examples.select_columns(["id", "context"]).to_dict()

    predictions: dict[str, str] = {}
    for example_id, context in zip(examples_columns["id"], examples_columns["context"]):
        best_score, best_text, null_score = -np.inf, "", np.inf
        for index in by_example.get(example_id, []):
            length, offsets = lengths[index], offset_mappings[index]
            starts = np.asarray(start_logits[index], dtype=np.float64)[:length]
            ends = np.asarray(end_logits[index], dtype=np.float64)[:length]
            null_score = min(null_score, starts[length - 1] + ends[length - 1])
            for start in np.argsort(starts)[::-1][:n_best]:
                if offsets[start] is None:
                    continue
                for end in np.argsort(ends)[::-1][:n_best]:
                    if offsets[end] is None or end < start or end - start + 1 > max_answer_length:
                        continue
                    score = starts[start] + ends[end]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[start][0] : offsets[end][1]]
        if version_2_with_negative and null_score - best_score > null_score_diff_threshold:
            best_text = ""
        predictions[example_id] = best_text
    return predictions


def qa_references(examples: datasets.Dataset) -> dict[str, list[str]]:
    """Gold answer texts per example id ([] for an unanswerable question), the references of `squad_metrics`."""
    references = {}
    columns = examples.select_columns(["id", "answers"]).to_dict()
    for example_id, answers in zip(columns["id"], columns["answers"]):
        # {"text": [...], "answer_start": [...]}, or a list of {"text", "answer_start"} objects
        references[example_id] = list(answers["text"]) if isinstance(answers, dict) else [a["text"] for a in answers]
    return references
