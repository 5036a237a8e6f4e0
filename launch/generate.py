"""Continue prompts with GPT-J and print prompt + continuation (config: conf/generate.yaml).

    python launch/generate.py model=gptj-6b model.path=DIR model.dtype=bf16 prompt="In a shocking finding, ..." \
        generation.do_sample=true generation.temperature=0.9 generation.max_length=100
    python launch/generate.py model=tiny prompt='["first prompt","second, with a comma"]' generation.max_new_tokens=5
    python launch/generate.py model.path=outputs/my-run/final model.dtype=bf16   # a (Q)LoRA adapter on its base

A single `prompt=...` needs no Hydra quoting (commas, quotes and `${` are taken literally); a list does.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, ListConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune.builders import build_model_from_config, torch_dtype  # noqa: E402
from finetune.cli import hydra_app, quote_free_text_overrides  # noqa: E402
from finetune.config import ConfigError, GenerationConfig, ModelConfig, to_typed  # noqa: E402
from finetune.model.generation import generate_text  # noqa: E402
from finetune.model.hf_weights import resolve_model_dir  # noqa: E402
from finetune.model.tokenizer import GPTJTokenizer  # noqa: E402
from finetune.tools.predict import is_adapter_dir, load_model_for_inference, memory_check  # noqa: E402

SEPARATOR = "-" * 80


def prompts_from_config(value: Any) -> list[str]:
    """The `prompt` setting as a list of strings (a single string is a batch of one)."""
    prompts = list(value) if isinstance(value, (ListConfig, list)) else [value]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(
            f"prompt must be a string or a non-empty list of strings, got {value!r}; quote list items that "
            "Hydra would read as numbers or null, e.g. prompt='[\"1\",\"two\"]'."
        )
    return prompts


def pick_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a torch device; use cpu, cuda, cuda:N or null (auto).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; set device=cpu or device=null.")
    return device


@hydra_app("generate")
def main(cfg: DictConfig) -> None:
    model_cfg = to_typed(ModelConfig, cfg.model, section="model")
    generation_cfg = to_typed(GenerationConfig, cfg.generation, section="generation")
    prompts = prompts_from_config(cfg.prompt)
    device = pick_device(cfg.get("device"))

    # The seed also fixes a random-init model (model.path unset), so the whole output is reproducible.
    torch.manual_seed(generation_cfg.seed)
    if model_cfg.path is not None and is_adapter_dir(resolve_model_dir(model_cfg.path)):  # a (Q)LoRA run's final/
        model = load_model_for_inference(model_cfg.path, task="clm", dtype=torch_dtype(model_cfg.dtype), device=device,
                                         base_model=cfg.get("base_model"), quantize_base=cfg.get("quantize_base"),
                                         check_memory=cfg.check_memory)
    else:
        check = memory_check(task="clm", dtype=torch_dtype(model_cfg.dtype), device=device,
                             source=model_cfg.path or f"model={model_cfg.name}") if cfg.check_memory else None
        model = build_model_from_config(model_cfg, task="clm", device=device, check=check)
    # A checkpoint dir carries its tokenizer; elsewhere (random init) the bundled GPT-J tokenizer is the one.
    tokenizer = GPTJTokenizer.from_pretrained(resolve_model_dir(model_cfg.path) if model_cfg.path else None)
    tokenizer.check_fits(model.config.vocab_size)

    start = time.perf_counter()
    completions = generate_text(model, tokenizer, prompts, generation_cfg)
    seconds = time.perf_counter() - start
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if i:
            print(SEPARATOR)
        print(prompt + completion.text, flush=True)
    # Stats on stderr, so stdout is only the text.
    counts = ", ".join(str(len(c.token_ids)) for c in completions)
    print(f"[generate] new tokens per prompt: {counts}; {seconds:.1f} s on {device}", file=sys.stderr)

if __name__ == "__main__":
    sys.argv[1:] = quote_free_text_overrides(sys.argv[1:], keys=["prompt"])
    main()
