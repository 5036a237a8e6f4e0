"""Export a DeepSpeed training checkpoint as a Hugging Face-format model (config: conf/export.yaml).

    python launch/export.py checkpoint=outputs/qa/RUN/checkpoints out=exported/qa dtype=bf16
    python launch/export.py checkpoint=outputs/qa/RUN/checkpoints/global_step200 out=DIR
    python launch/export.py checkpoint=RUN/checkpoints out=DIR merge_lora=false       # a LoRA run: adapter only

The output loads with `finetune.model.hf_weights.load_pretrained`, launch/evaluate.py and transformers' AutoModelFor*.
Runs in one process on CPU; the weights are consolidated by DeepSpeed's zero_to_fp32, one shard at a time.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune.cli import hydra_app  # noqa: E402
from finetune.config import ConfigError  # noqa: E402
from finetune.tools.export import export_checkpoint  # noqa: E402


@hydra_app("export")
def main(cfg: DictConfig) -> None:
    for key in ("checkpoint", "out"):
        if not cfg.get(key):
            raise ConfigError(
                f"{key}= is required: python launch/export.py checkpoint=RUN_DIR/checkpoints out=DIR "
                "[dtype=bf16|fp16|fp32] [merge_lora=true|false]."
            )
    start = time.perf_counter()
    out = export_checkpoint(
        cfg.checkpoint, cfg.out, tag=cfg.tag, dtype=cfg.dtype, merge_lora=cfg.merge_lora, base_model=cfg.base_model,
        config_path=cfg.config, task=cfg.task, max_shard_size=cfg.max_shard_size, overwrite=cfg.overwrite,
        private=cfg.private_outputs,
    )
    files = sorted(p.name for p in out.iterdir())
    print(f"Exported {cfg.checkpoint} -> {out} in {time.perf_counter() - start:.1f} s: {', '.join(files)}")


if __name__ == "__main__":
    main()
