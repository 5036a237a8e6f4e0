"""Predict every row of a file with a trained model, as JSON Lines (config: conf/predict.yaml).

    python launch/predict.py task=qa model.path=outputs/qa/RUN/final input=questions.jsonl output=answers.jsonl
    python launch/predict.py task=cls model.path=DIR input=reviews.csv output=labels.jsonl data.text_column=review
    python launch/predict.py task=clm model.path=DIR input=prompts.jsonl output=out.jsonl generation.max_new_tokens=50

Output lines: clm {"index", "generated_text", "ended_with_eos"}; cls {"index", "label", "label_id", "scores"}
(multi-label: "labels"; regression: "score"); qa {"index", "id", "answer", "score"}. One process; rerunning with
the same output skips the rows already written (a half-written last line is rewritten).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune.builders import torch_dtype  # noqa: E402
from finetune.cli import hydra_app  # noqa: E402
from finetune.config import ConfigError, DataConfig, GenerationConfig, TaskConfig, to_typed  # noqa: E402
from finetune.model.hf_weights import resolve_model_dir  # noqa: E402
from finetune.model.tokenizer import GPTJTokenizer  # noqa: E402
from finetune.tools.predict import (  # noqa: E402
    check_columns,
    check_output,
    load_model_for_inference,
    make_predictor,
    predict_file,
    read_input,
)
from launch.generate import pick_device  # noqa: E402  (the device rule of every launch tool)


@hydra_app("predict")
def main(cfg: DictConfig) -> None:
    for key in ("model.path", "input", "output"):
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"{key}= is required: python launch/predict.py task=qa model.path=DIR input=FILE output=FILE.jsonl")
    task = to_typed(TaskConfig, cfg.task, section="task").name
    data_cfg = to_typed(DataConfig, cfg.data, section="data")
    generation = to_typed(GenerationConfig, cfg.generation, section="generation")
    dtype = torch_dtype(cfg.model.dtype)
    device = pick_device(cfg.get("device"))

    rows = read_input(cfg.input, task=task, cfg=data_cfg)  # before the model: a wrong file fails fast
    check_columns(rows, task, data_cfg, input_name=cfg.input)
    check_output(Path(cfg.output).expanduser())  # never appends to (or cuts) a file that is not predictions
    model = load_model_for_inference(cfg.model.path, task=task, dtype=dtype, device=device, base_model=cfg.base_model,
                                     check_memory=cfg.check_memory, quantize_base=cfg.get("quantize_base"))
    tokenizer = GPTJTokenizer.from_pretrained(resolve_model_dir(cfg.model.path))
    tokenizer.check_fits(model.config.vocab_size)
    predict = make_predictor(task, model, tokenizer, data_cfg, generation=generation, input_name=cfg.input)

    start = time.perf_counter()
    skipped, predicted = predict_file(rows, cfg.output, predict, batch_size=cfg.batch_size,
                                      id_column=data_cfg.id_column, progress=cfg.progress,
                                      private=cfg.private_outputs)
    resumed = f" (resumed: {skipped} rows were already there)" if skipped else ""
    print(f"[predict] {predicted} rows -> {cfg.output} in {time.perf_counter() - start:.1f} s on {device}{resumed}",
          file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
