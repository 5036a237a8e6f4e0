"""Inference after training: load a trained model, predict rows of a file per task, write resumable JSON Lines.

- `load_model_for_inference`: a HF-format dir (ours, transformers-saved, a merged final/) or a LoRA adapter dir
  (peft files, e.g. final/ of a LoRA run) on top of its base model, merged for speed.
- `make_predictor(task, ...)`: rows (dicts) -> one prediction dict per row. Features are built by the task's data
  code (finetune.data), so a row is tokenized exactly as in training; QA answers come from the same
  post-processing as evaluation.
- `predict_file`: runs a predictor over an input file in batches and appends to a JSONL output, one line per
  input row in input order; rerun with the same output to continue where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import datasets
import torch

from finetune.model.quantized import BASE_QUANTIZATION_FILE  # noqa: I001 -- before peft, which imports bitsandbytes
from finetune.config import ConfigError, DataConfig, GenerationConfig
from finetune.files import PRIVATE_FILE_MODE
from finetune.model import GPTJConfig, GPTJPreTrainedModel
from finetune.model.hf_weights import CheckpointError, load_pretrained, open_safetensors, resolve_model_dir
from finetune.model.tokenizer import GPTJTokenizer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEAD_NAMES = {"clm": "lm_head", "cls": "score", "qa": "qa_outputs"}

Predictor = Callable[[list[dict[str, Any]], int], list[dict[str, Any]]]  # (rows, index of the first) -> predictions


class PredictionInputError(ConfigError):
    """The input or output file of a prediction run cannot be used; the message names the file, row and fix."""


# --- loading --------------------------------------------------------------------------------------------
def is_adapter_dir(path: str | Path) -> bool:
    """A peft adapter without full weights next to it (a LoRA run's final/ unless merged)."""
    path = Path(path)
    has_weights = any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / ADAPTER_CONFIG).is_file() and not has_weights


def load_model_for_inference(
    path: str | Path,
    *,
    task: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    base_model: Optional[str] = None,
    check_memory: bool = True,
    quantize_base: Optional[bool] = None,
) -> GPTJPreTrainedModel:
    """The model at `path` in eval mode: full weights, or a LoRA adapter merged into its base.

    The adapter's base is `base_model`, else the `base_model_name_or_path` recorded in adapter_config.json.
    The head comes from the adapter (it is trained in full); a config.json next to the adapter supplies its
    labels (id2label), else they are LABEL_i. With `check_memory`, a model whose weights cannot fit `device`
    is refused before it is built (finetune.planning.inference).
    A QLoRA adapter (base_quantization_config.json next to it) gets its base quantized to 4-bit NF4 as in
    training, computing in `dtype`, with the adapter applied unmerged (merging into 4-bit weights would round
    the sum to 4 bits); `quantize_base` True/False forces either way (False: a 16-bit base, adapter merged).
    """
    model_dir = resolve_model_dir(path)
    if not is_adapter_dir(model_dir):
        check = memory_check(task=task, dtype=dtype, device=device, source=str(path)) if check_memory else None
        return load_pretrained(model_dir, task=task, dtype=dtype, device=device, check=check)
    import peft

    adapter_config = peft.PeftConfig.from_pretrained(str(model_dir))
    base = base_model or adapter_config.base_model_name_or_path
    if not base:
        raise CheckpointError(
            f"{model_dir} holds a LoRA adapter whose base model is not recorded (the run started from a random "
            "init, or it was saved without base_model_name_or_path); pass base_model=DIR, the checkpoint it was "
            "trained on, or evaluate the merged export of the run (launch/export.py merge_lora=true)."
        )
    overrides: dict[str, Any] = {}
    if (model_dir / "config.json").is_file():
        head_config = json.loads((model_dir / "config.json").read_text())
        overrides = {k: head_config[k] for k in ("num_labels", "id2label", "problem_type", "pad_token_id")
                     if head_config.get(k) is not None}
    if task == "cls" and "num_labels" not in overrides:
        with open_safetensors(model_dir / ADAPTER_WEIGHTS) as f:
            head = [k for k in f.keys() if f".{HEAD_NAMES[task]}." in k and k.endswith(".weight")]
            if head:
                overrides["num_labels"] = f.get_slice(head[0]).get_shape()[0]
    if quantize_base is None:
        quantize_base = (model_dir / BASE_QUANTIZATION_FILE).is_file()
    try:
        if quantize_base:  # the 4-bit base is a fraction of what the 16-bit check counts: not refused by it
            from finetune.model.quantized import load_pretrained_quantized

            model = load_pretrained_quantized(base, task=task, dtype=dtype, config_overrides=overrides or None)
        else:
            # The base is loaded and merged in fp32 on the CPU, then moved: both must fit.
            def check(config: GPTJConfig) -> None:
                if check_memory:
                    base_source = f"{base} (the base of {path})"
                    memory_check(task=task, dtype=torch.float32, device="cpu", source=base_source)(config)
                    memory_check(task=task, dtype=dtype, device=device, source=str(path))(config)

            model = load_pretrained(base, task=task, dtype=torch.float32, config_overrides=overrides or None,
                                    check=check)
    except CheckpointError as err:
        raise CheckpointError(
            f"The base model of the LoRA adapter in {model_dir} could not be loaded: {err} Pass base_model=DIR to "
            "point at it."
        ) from None
    # A plain PeftModel: the PeftModelFor<task> wrappers expect transformers' generation API.
    adapter_config.task_type = None
    with_adapter = peft.PeftModel.from_pretrained(model, str(model_dir), config=adapter_config)
    if quantize_base:  # the LoRA layers stay in the model itself; .to(dtype) would cast the packed 4-bit bytes
        return with_adapter.get_base_model().to(device=device).eval()
    merged = with_adapter.merge_and_unload()
    return merged.to(device=device, dtype=dtype).eval()


def memory_check(*, task: str, dtype: torch.dtype | str, device: torch.device | str, source: str, shards: int = 1,
                 ranks_on_host: int = 1) -> Callable[[GPTJConfig], None]:
    """The check to run on a model's config before it is built: its weights must fit `device` (ConfigError)."""
    from finetune.planning.inference import check_inference_memory

    def check(config: GPTJConfig) -> None:
        check_inference_memory(config, task=task, dtype=str(dtype), device=str(torch.device(device)), source=source,
                               shards=shards, ranks_on_host=ranks_on_host)

    return check


# --- predicting -------------------------------------------------------------------------------------------
def _model_inputs(features: dict[str, list], tokenizer: GPTJTokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    from finetune.data import DataCollator

    rows = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    return {k: v.to(device) for k, v in DataCollator(tokenizer.pad_token_id)(rows).items()}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _refuse_bad_rows(input_name: str, problems: list[Any], first: int) -> None:
    """A PredictionInputError for the first bad row of a batch (the data module's row checks, as in training)."""
    for offset, problem in enumerate(problems):
        if problem is not None:
            raise PredictionInputError(f"{input_name}, row {first + offset + 1}, field {problem.field!r}: "
                                       f"{problem.detail}")


def clm_prompt(row: dict[str, Any], cfg: DataConfig) -> str:
    """The prompt of a row as training formatted it: data.prompt_template, data.prompt_column, else data.text_column."""
    if cfg.prompt_template is not None:
        return cfg.prompt_template.format(**row)
    return row[cfg.prompt_column or cfg.text_column]


def make_predictor(
    task: str,
    model: GPTJPreTrainedModel,
    tokenizer: GPTJTokenizer,
    data_cfg: DataConfig,
    *,
    generation: Optional[GenerationConfig] = None,
    input_name: str = "input",
) -> Predictor:
    """The batch prediction function of `task`: clm -> generated_text; cls -> label, scores; qa -> answer, score."""
    if task == "clm":
        return _clm_predictor(model, tokenizer, data_cfg, generation or GenerationConfig())
    if task == "cls":
        return _cls_predictor(model, tokenizer, data_cfg, input_name)
    if task == "qa":
        return _qa_predictor(model, tokenizer, data_cfg, input_name)
    raise ConfigError(f"task={task!r} is unknown; use clm, cls or qa.")


def _clm_predictor(model, tokenizer, cfg: DataConfig, generation: GenerationConfig) -> Predictor:
    from finetune.model.generation import generate_text

    def predict(rows: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
        completions = generate_text(model, tokenizer, [clm_prompt(row, cfg) for row in rows], generation)
        return [{"generated_text": c.text, "ended_with_eos": c.ended_with_eos} for c in completions]

    return predict


def _cls_predictor(model, tokenizer, cfg: DataConfig, input_name: str) -> Predictor:
    from finetune.data.cls import MULTI, REGRESSION, SINGLE, ClsParams, LabelSpec, build_cls_features, check_cls_rows

    config = model.config
    problem = config.problem_type or (REGRESSION if config.num_labels == 1 else SINGLE)
    names = [(config.id2label or {}).get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    # The data code builds labels too; prediction rows have none, so each gets a placeholder it accepts.
    placeholder_column, placeholder = "__predict_label__", {SINGLE: 0, MULTI: [], REGRESSION: 0.0}[problem]
    params = ClsParams(max_seq_len=cfg.max_seq_len, truncation=cfg.truncation, text_column=cfg.text_column,
                       text_pair_column=cfg.text_pair_column, pair_separator=cfg.pair_separator,
                       label_column=placeholder_column, labels=LabelSpec(problem, config.num_labels))

    def predict(rows: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
        batch = {key: [row.get(key) for row in rows] for key in (cfg.text_column, cfg.text_pair_column) if key}
        batch[placeholder_column] = [placeholder] * len(rows)
        _refuse_bad_rows(input_name, check_cls_rows(batch, tokenizer=tokenizer, params=params), first)
        features = build_cls_features(batch, list(range(first, first + len(rows))), tokenizer=tokenizer, params=params)
        with torch.no_grad():
            logits = model(**_model_inputs(features, tokenizer, _device(model))).logits.float().cpu()
        if problem == REGRESSION:
            return [{"score": float(v)} for v in logits[:, 0]]
        if problem == MULTI:
            probs = logits.sigmoid()
            return [{"labels": [names[i] for i in range(len(names)) if p[i] > 0.5],
                     "scores": dict(zip(names, p.tolist()))} for p in probs]
        probs = logits.softmax(-1)
        return [{"label": names[int(p.argmax())], "label_id": int(p.argmax()), "scores": dict(zip(names, p.tolist()))}
                for p in probs]

    return predict


def _qa_predictor(model, tokenizer, cfg: DataConfig, input_name: str) -> Predictor:
    from finetune.data import postprocess_qa_predictions
    from finetune.data.qa import build_qa_features, check_qa_rows, qa_params, resolve_end_token

    # Prediction rows carry no gold answers, so the no-answer slot is always allowed while building features.
    # Without data to look at, `auto` means SQuAD v1: pass data.version_2_with_negative=true for a v2 model.
    cfg = resolve_end_token(cfg, cfg.version_2_with_negative is True)
    params = dataclasses.replace(qa_params(cfg, keep_eval_columns=True), allow_no_answer=True)

    def predict(rows: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
        indices = list(range(first, first + len(rows)))
        ids = [str(index) for index in indices]  # internal keys; the row's own id (maybe repeated) is added by the writer
        batch = {"id": ids, "question": [row.get(cfg.question_column) for row in rows],
                 "context": [row.get(cfg.context_column) for row in rows],
                 "answers": [{"text": [], "answer_start": []}] * len(rows)}
        _refuse_bad_rows(input_name, check_qa_rows(batch, tokenizer=tokenizer, params=params), first)
        features = build_qa_features(batch, indices, tokenizer=tokenizer, params=params)
        with torch.no_grad():
            out = model(**_model_inputs(features, tokenizer, _device(model)))
        lengths = [len(f) for f in features["input_ids"]]
        starts = [s[:n] for s, n in zip(out.start_logits.float().cpu().numpy(), lengths)]
        ends = [e[:n] for e, n in zip(out.end_logits.float().cpu().numpy(), lengths)]
        examples = datasets.Dataset.from_dict({"id": ids, "context": batch["context"]})
        answers = postprocess_qa_predictions(
            examples, datasets.Dataset.from_dict(features), starts, ends, n_best=cfg.n_best,
            max_answer_length=cfg.max_answer_length, version_2_with_negative=cfg.version_2_with_negative is True,
            null_score_diff_threshold=cfg.null_score_diff_threshold,
        )
        by_example: dict[str, list[int]] = {}
        for index, example_id in enumerate(features["example_id"]):
            by_example.setdefault(example_id, []).append(index)
        predictions = []
        for example_id, context in zip(ids, batch["context"]):
            windows = [(features["offset_mapping"][f], starts[f], ends[f]) for f in by_example.get(example_id, [])]
            answer = answers[example_id]
            predictions.append({"answer": answer, "score": answer_score(answer, context, windows)})
        return predictions

    return predict


def answer_score(answer: str, context: str, windows: Iterable[tuple[list, Any, Any]]) -> Optional[float]:
    """The start + end logit of `answer` (the best over the windows and places where the context holds it), or for ""
    the no-answer score (lowest over windows of the last token's start + end, as post-processing scores it)."""
    windows = list(windows)
    if not answer:
        scores = [float(s[-1] + e[-1]) for _, s, e in windows]
        return min(scores) if scores else None
    spans, at = set(), context.find(answer)
    while at >= 0:
        spans.add((at, at + len(answer)))
        at = context.find(answer, at + 1)
    best = None
    for offsets, starts, ends in windows:
        start_at = {o[0]: t for t, o in enumerate(offsets) if o is not None}
        end_at = {o[1]: t for t, o in reversed(list(enumerate(offsets))) if o is not None}
        for begin, end in spans:
            if begin in start_at and end in end_at and start_at[begin] <= end_at[end]:
                score = float(starts[start_at[begin]] + ends[end_at[end]])
                best = score if best is None else max(best, score)
    return best


# --- input and resumable output ------------------------------------------------------------------------
def read_input(path: str | Path, *, task: str, cfg: DataConfig) -> datasets.Dataset:
    """The rows of `path` (jsonl/json, csv, parquet, txt; SQuAD JSON for qa), read as training reads data files."""
    from finetune.data.errors import DataError
    from finetune.data.qa import read_qa_files
    from finetune.data.sources import FORMAT_BY_EXTENSION, read_files

    path = Path(path).expanduser()
    if not path.is_file():
        raise PredictionInputError(f"input={str(path)!r} does not exist; pass the file of rows to predict (jsonl, csv, ...).")
    fmt = cfg.format or FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if fmt is None:
        raise PredictionInputError(
            f"input={str(path)!r}: cannot tell its format from the extension; set data.format=json|csv|parquet|text "
            "or use .jsonl/.csv/.parquet/.txt."
        )
    try:
        return (read_qa_files if task == "qa" else read_files)([str(path)], fmt, cfg)
    except DataError as err:  # its message names the file and line already
        raise PredictionInputError(str(err)) from None


def required_columns(task: str, cfg: DataConfig) -> dict[str, str]:
    """Input columns a task's predictions read -> the config key naming each."""
    if task == "clm":
        if cfg.prompt_template is not None:
            return {f: "data.prompt_template" for _, f, _, _ in string.Formatter().parse(cfg.prompt_template) if f}
        return {cfg.prompt_column: "data.prompt_column"} if cfg.prompt_column else {cfg.text_column: "data.text_column"}
    if task == "cls":
        columns = {cfg.text_column: "data.text_column"}
        return {**columns, cfg.text_pair_column: "data.text_pair_column"} if cfg.text_pair_column else columns
    return {cfg.question_column: "data.question_column", cfg.context_column: "data.context_column"}


def check_columns(rows: datasets.Dataset, task: str, cfg: DataConfig, *, input_name: str) -> None:
    for column, key in required_columns(task, cfg).items():
        if column not in rows.column_names:
            raise PredictionInputError(
                f"input={input_name!r} has no column {column!r} (set by {key}); its columns are {rows.column_names}. "
                f"Rename the column in the file, or pass {key}=<column>."
            )


def _not_predictions(output: Path, why: str) -> PredictionInputError:
    return PredictionInputError(
        f"output={str(output)!r} {why}, so it is not the output of an earlier run of this command; it was left "
        "untouched. Choose another output file, or delete it yourself to start over."
    )


def check_output(output: Path) -> tuple[int, int]:
    """(complete prediction lines in `output`, byte length of those lines), touching nothing; a PredictionInputError
    when it is anything but this command's output, so an unrelated file is never appended to or truncated.

    Line n must be a JSON object with "index": n-1. A last line without its newline (a crash mid-write) must be the
    start of such a line; `predict_file` cuts it off before appending."""
    if not output.exists():
        return 0, 0
    if not output.is_file():
        raise _not_predictions(output, "is not a regular file")
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("index") != number - 1:
            raise _not_predictions(output, f"line {number} is not the prediction of input row {number}")
    tail, expected = data[end:], f'{{"index": {len(lines)}'.encode()
    if tail and not (tail.startswith(expected) or expected.startswith(tail)):
        raise _not_predictions(output, f"ends with {tail[:40]!r}, which is not the start of a prediction line")
    return len(lines), end


def completed_rows(output: Path) -> int:
    """Rows already in `output`: its complete lines. A half-written last line (a crash mid-write) is cut off, once
    `check_output` has found the file to be predictions."""
    done, end = check_output(output)
    if output.is_file() and output.stat().st_size > end:
        with open(output, "r+b") as handle:
            handle.truncate(end)
    return done


def predict_file(
    rows: datasets.Dataset,
    output: str | Path,
    predict: Predictor,
    *,
    batch_size: int,
    id_column: Optional[str] = None,
    progress: bool = True,
    private: bool = False,
) -> tuple[int, int]:
    """Append the predictions of `rows` not yet in `output`; returns (rows skipped as done, rows predicted).

    Each line is `{"index": row number (0-based), "id": the row's id_column value if any, ...prediction}`,
    flushed per batch, so an interrupted run loses at most one batch. `private`: the file is 0600.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1.")
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    done, _ = check_output(output)
    if done > len(rows):
        raise PredictionInputError(
            f"output={str(output)!r} already has {done} rows but the input has {len(rows)}; it belongs to another "
            "input. Choose another output file, or delete it to start over."
        )
    completed_rows(output)
    bar = tqdm(total=len(rows), initial=done, unit="row", disable=not progress, desc="predict")
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE if private else 0o666)
    if private:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # also when the file was there already
    with open(fd, "a", encoding="utf-8") as handle:
        for first in range(done, len(rows), batch_size):
            batch = rows.select(range(first, min(first + batch_size, len(rows)))).to_list()
            for offset, (row, prediction) in enumerate(zip(batch, predict(batch, first))):
                record = {"index": first + offset}
                if id_column and row.get(id_column) is not None:
                    record["id"] = row[id_column]
                handle.write(json.dumps({**record, **prediction}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
    bar.close()
    return done, len(rows) - done
