"""`deepspeed=auto` and the memory check in real launches: 2 CPU ranks (gloo), the tiny model."""
from __future__ import annotations

import re
import time

import pytest

pytestmark = pytest.mark.integration


def test_auto_chooses_a_config_logs_why_and_trains(launch, tmp_path):
    run = launch(tmp_path / "run", "task=qa", "deepspeed=auto", "trainer.max_steps=2", "trainer.log_every=1",
                 "trainer.micro_batch_size=2", "trainer.eval_at_end=false")
    assert run.output.count("deepspeed=auto chose") == 1, run.output[-3000:]  # rank 0 only, one line and why
    chosen = re.search(r"deepspeed=auto chose deepspeed=\w+ \(ZeRO-(\d)", run.output)
    trained = re.search(r"\| ZeRO-(\d)", run.output)  # the runner's start line, from the JSON it really used
    assert chosen and trained and chosen.group(1) == trained.group(1), run.output[-3000:]
    assert "1 node(s) x 2 rank(s)" in run.output and "host RAM / ranks on the host" in run.output
    assert sorted(run.train_losses()) == [1, 2]

    # A relaunch (resume) keeps the first launch's pick without planning again: planned with 0.5 GiB per device,
    # less than the fixed overhead alone, it would stop with "found no DeepSpeed config that fits".
    again = launch(tmp_path / "run", "task=qa", "deepspeed=auto", "trainer.max_steps=3", "trainer.log_every=1",
                   "trainer.micro_batch_size=2", "trainer.eval_at_end=false", "deepspeed.device_memory_gb=0.5")
    assert "deepspeed=auto: keeping" in again.output and "deepspeed=auto chose" not in again.output
    assert "Resuming at step 2" in again.output and f"| ZeRO-{chosen.group(1)}" in again.output
    assert sorted(again.train_losses()) == [1, 2, 3]


def test_config_that_cannot_fit_is_refused_before_the_model_is_built(launch, tmp_path):
    # GPT-J 6B (random init would need ~24 GB per rank to build: being refused first is what keeps this test quick)
    # on 2 stated 40 GiB GPUs: full fine-tuning keeps ~16 bytes per parameter, 48 GB per GPU under ZeRO-3 and more
    # under ZeRO-2, so only offloading the optimizer to the 1000 GiB of host RAM fits.
    started = time.monotonic()
    run = launch(tmp_path / "run", "task=qa", "model=gptj-6b", "model.path=null", "deepspeed=zero2",
                 "trainer.precision=bf16", "trainer.micro_batch_size=1", "data.max_seq_len=256",
                 "deepspeed.device_memory_gb=40", "deepspeed.cpu_memory_gb=1000", check=False)
    assert run.returncode == 2, run.output[-3000:]
    assert "Traceback" not in run.output, run.output[-3000:]
    assert "zero2.json (ZeRO-2) does not fit" in run.output and "deepspeed=zero3_offload" in run.output
    assert "deepspeed.check_memory=false" in run.output
    assert run.output.count("option (fastest first)") == 1  # the table once (rank 0), not once per rank
    assert "Training qa" not in run.output and not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - started < 120
