"""Fine-tune GPT-J with DeepSpeed (config: conf/train.yaml).

    deepspeed launch/train.py task=qa                              # tiny model, bundled data, all local devices
    deepspeed --num_gpus 2 launch/train.py task=cls deepspeed=zero2
    deepspeed --num_gpus 8 launch/train.py experiment=gptj6b_squad_8gpu model.path=/models/gpt-j-6b
    python launch/train.py task=clm deepspeed=none                 # one process, no launcher

Relaunching with the same hydra.run.dir resumes from its latest checkpoint.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without `pip install -e .`

from finetune import distributed, runner  # noqa: E402
from finetune.cli import hydra_app  # noqa: E402
from finetune.config import check_overrides_apply, parse_config  # noqa: E402


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank=N` that the deepspeed launcher appends (LOCAL_RANK is in the env too)."""
    return [arg for arg in argv if not re.fullmatch(r"--local[_-]rank=\d+", arg)]


def quiet_hydra_off_rank0(argv: list[str]) -> list[str]:
    """Only rank 0 writes into the run dir: other ranks get no .hydra/ copy and no log file from Hydra."""
    if distributed.env_rank() == 0:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@hydra_app("train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    check_overrides_apply(parse_config(cfg), HydraConfig.get().overrides.task)
    runner.run(cfg)


if __name__ == "__main__":
    sys.argv = quiet_hydra_off_rank0(strip_launcher_args(sys.argv))
    runner.register_resolvers()
    main()
