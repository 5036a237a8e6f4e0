"""One real training run shared by the after-training tools' tests (export, evaluate, predict)."""
from __future__ import annotations

import pytest

STEPS = 4


@pytest.fixture(scope="session")
def qa_run(launch, tmp_path_factory):
    """`deepspeed --num_gpus 2 launch/train.py task=qa` under ZeRO-3, 4 steps, checkpoints at steps 2 and 4.

    Evaluation at the end uses micro batch 2 on each of the 2 ranks (what evaluate must reproduce).
    """
    run_dir = tmp_path_factory.mktemp("tools_qa") / "run"
    return launch(run_dir, "task=qa", "model=tiny", "deepspeed=zero3", f"trainer.max_steps={STEPS}",
                  "trainer.micro_batch_size=2", "trainer.save_every=2", "trainer.keep_last=2", "trainer.eval_every=0",
                  "trainer.log_every=1", "trainer.precision=fp32")
