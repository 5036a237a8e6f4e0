"""Fine-tune GPT-J with DeepSpeed (config: conf/train.yaml).

    deepspeed launch/train.py task=qa                              # tiny model, bundled data, all local devices
    deepspeed --num_gpus 2 launch/train.py task=cls deepspeed=zero2
    deepspeed --num_gpus 8 launch/train.py experiment=gptj6b_squad_8gpu model.path=/models/gpt-j-6b
    python launch/train.py task=clm deepspeed=none                 # one process, no launcher

Relaunching with the same hydra.run.dir resumes from its latest checkpoint. The run dir gets curves.png when the run
ends. The script returns the run's objective (`sweep.objective`), which is what a sweep optimises:

    python launch/train.py -m hydra/sweeper=optuna 'optim.lr=tag(log,interval(1e-4,1e-2))' hydra.sweeper.n_trials=8
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune import distributed, runner  # noqa: E402
from finetune.cli import hydra_app  # noqa: E402
from finetune.config import check_overrides_apply, parse_config  # noqa: E402
from finetune.tools import sweep  # noqa: E402


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank=N` that the deepspeed launcher appends (LOCAL_RANK is in the env too)."""
    return [arg for arg in argv if not re.fullmatch(r"--local[_-]rank=\d+", arg)]


def quiet_hydra_off_rank0(argv: list[str]) -> list[str]:
    """Only rank 0 writes into the run dir: other ranks get no .hydra/ copy and no log file from Hydra."""
    if distributed.env_rank() == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def draw_curves(run_dir: Path) -> None:
    """curves.png in the run dir, from rank 0; a picture that cannot be drawn never fails the run."""
    if distributed.env_rank() != 0 or not (run_dir / "metrics.jsonl").is_file():
        return
    try:
        from finetune.tools.report import draw_run

        draw_run(run_dir)
    except Exception as error:  # noqa: BLE001
        print(f"warning: no {run_dir / 'curves.png'}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)


@hydra_app("train")
def main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()

    def train() -> Any:
        check_overrides_apply(parse_config(cfg), hydra_cfg.overrides.task)
        try:
            return runner.run(cfg)
        finally:
            draw_curves(Path(hydra_cfg.runtime.output_dir))

    # In a multirun a failed trial becomes a recorded failure (sweep.TrialFailed) and the sweep goes on.
    objective, _ = sweep.objective_of(cfg)
    return sweep.run_trial(train, objective=objective, sweeping=hydra_cfg.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    sys.argv = quiet_hydra_off_rank0(strip_launcher_args(sys.argv))
    runner.register_resolvers()
    main()
