"""Run logging: metrics.jsonl always, Weights & Biases when configured, a progress bar; rank 0 only.

metrics.jsonl is the record every tool reads (one JSON object per line: `step`, `split`, values). W&B is a
view of the same numbers: `log(step, "train", {"loss": ...})` becomes `train/loss` at that step. Without an
API key an online run falls back to offline, so a job never dies (or prompts) for want of a login, and the
offline run can be uploaded later with `wandb sync`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from tqdm.auto import tqdm

from finetune.config import LoggerConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar: tensors and numpy numbers become Python numbers."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    return value


class RunLogger:
    """Writes one run's metrics. Construct on every rank; only `is_main` writes or talks to W&B.

    `resume=True` continues metrics.jsonl (appends) and the W&B run whose id is stored in the run dir;
    `resume=False` starts both afresh.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        is_main: bool,
        logger_cfg: LoggerConfig,
        config_dict: Mapping[str, Any],
        resume: bool,
        total_steps: Optional[int] = None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self._metrics = None
        self._wandb_run = None
        self._offline_notice = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / METRICS_FILE, "a" if resume else "w", encoding="utf-8")
        if logger_cfg.backend == "wandb" and logger_cfg.mode != "disabled":
            self._wandb_run = self._start_wandb(logger_cfg, dict(config_dict), resume)

    # --- W&B --------------------------------------------------------------------------------------
    def _start_wandb(self, cfg: LoggerConfig, config_dict: dict, resume: bool):
        import wandb

        mode = cfg.mode
        # login(prompt=False, verify=False) only looks for a key (WANDB_API_KEY, settings, .netrc): no prompt,
        # no network.
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            mode = "offline"
            self._offline_notice = True
        id_file = self.run_dir / WANDB_ID_FILE
        # A new run lets W&B pick the id; the file lets a relaunch (resume) continue the same W&B run.
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or self.run_dir.name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            config=config_dict,
            dir=str(self.run_dir),  # W&B files go to run_dir/wandb
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
        id_file.write_text(run.id + "\n")
        if self._offline_notice:
            print(
                f"W&B: no API key found (set WANDB_API_KEY or run `wandb login`); logging offline. "
                f"Upload later with: wandb sync {run.settings.sync_dir}",
                file=sys.stderr,
                flush=True,
            )
        return run

    @property
    def wandb_run(self):
        """The live W&B run on rank 0, else None."""
        return self._wandb_run

    # --- logging ----------------------------------------------------------------------------------
    def log(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """Record `values` (loss, lr, tokens_per_s, task metrics, ...) of `split` (train | eval | data) at `step`."""
        if not self.is_main:
            return
        clean = {k: _plain(v) for k, v in values.items() if v is not None}
        record = {"step": int(step), "split": split, **clean}
        # NaN/inf are kept as JSON's non-standard NaN/Infinity literals; Python's json reads them back.
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{split}/{k}": v for k, v in clean.items()}, step=int(step))

    def progress(self, total_steps: int, initial_step: int = 0) -> tqdm:
        """A step progress bar (with ETA) on rank 0, a disabled one elsewhere; the loop adds loss and tokens/s
        with `set_postfix`."""
        interactive = sys.stderr.isatty()
        return tqdm(
            total=total_steps,
            initial=initial_step,
            desc="train",
            unit="step",
            disable=not self.is_main,
            dynamic_ncols=True,
            # In batch logs (SLURM, nohup) every refresh is a new line: refresh rarely there.
            mininterval=0.5 if interactive else 30.0,
        )

    def finish(self, *, failed: bool = False) -> None:
        """Close metrics.jsonl and the W&B run (idempotent); repeat the `wandb sync` hint for offline runs."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            sync_dir = run.settings.sync_dir
            offline = run.offline
            run.finish(exit_code=1 if failed else 0)
            if offline:
                print(f"W&B run saved offline; upload it with: wandb sync {sync_dir}", file=sys.stderr, flush=True)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(failed=exc_type is not None)


# --- model FLOPs utilization --------------------------------------------------------------------------
def mfu(
    tokens_per_s: float, n_params: int, n_layer: int, n_embd: int, seq_len: int, peak_flops: Optional[float]
) -> Optional[float]:
    """Model FLOPs utilization: achieved training FLOP/s over the hardware peak (PaLM, appendix B).

    FLOPs per token = 6·N (forward + backward matmuls over N parameters) + 12·L·H·T (attention scores and
    values). Counted the same with LoRA or activation checkpointing (MFU counts model FLOPs, not the
    recomputed or skipped ones). `tokens_per_s` and `peak_flops` must cover the same devices (one GPU, or
    all of them). None when the peak is unknown.
    """
    if not peak_flops:
        return None
    flops_per_token = 6 * n_params + 12 * n_layer * n_embd * seq_len
    return tokens_per_s * flops_per_token / peak_flops


# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, from NVIDIA's data sheets; matched on the device name,
# most specific first ("H100 PCIe" before "H100").
_PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),  # fp16 (no bf16 on V100)
)


def peak_flops_for_device(device: Optional[torch.device] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one GPU, or None on CPU or an unlisted GPU (then no MFU is logged)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS if key in name), None)

