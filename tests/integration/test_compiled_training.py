"""trainer.compile=true trains with real DeepSpeed (CPU ranks, inductor with g++) and equals eager training.

Both runs of a case start from the same seed and data order in one process group; only the compiled blocks differ.
Tolerance: inductor fuses each block's elementwise ops and writes its own LayerNorm and reduction kernels, so it
rounds in another order than ATen's kernels: each value a block computes moves by a few fp32 units in the last
place, and a step's logged loss (the mean of up to 512 per-target losses) by at most what summing them in another
order allows, (n - 1) u (train_worker.LOSS_RTOL, 3.05e-5). A wrong graph (a missed mask, a stale parameter under
ZeRO-3, a recompute that differs under activation checkpointing) moves the loss by 1e-3 or more.
A compiled run's first train record shows the compile time, and no later one carries it again: steps of other
packed and padded batch lengths reuse the graphs of the first step (dynamic shapes, no recompiles). Later runs of
the same process may find their graphs compiled already (then no record shows any).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.train_worker import LOSS_RTOL, instruction_data, run_jobs

pytestmark = pytest.mark.integration

STEPS = 4
COMMON = ("model=tiny", "trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
          "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0", "trainer.seed=3",
          "optim.lr=3e-3", "scheduler=constant", "scheduler.warmup_steps=1", "deepspeed.check_memory=false",
          "trainer.micro_batch_size=4")


def clm_overrides(data: Path, *extra: str) -> tuple[str, ...]:
    return ("task=clm", f"data.train_file={data}", f"data.validation_file={data}", "data.prompt_column=prompt",
            "data.response_column=response", "data.max_seq_len=128", *extra)


def train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == "train"]


def run_pairs(run_ranks, root: Path, cases: dict[str, tuple[str, ...]], *, world: int) -> dict:
    """Each case trained eagerly and compiled, all in one launch; {case: (eager records, compiled records)}."""
    runs = [{"run_dir": str(root / f"{name}_{mode}"), "overrides": [*COMMON, *overrides, f"trainer.compile={mode}"]}
            for name, overrides in cases.items() for mode in ("false", "true")]
    results = run_jobs(run_ranks, root, runs, world=world)
    failed = [result for result in results if not result["ok"]]
    assert not failed, failed
    return {name: (train_records(root / f"{name}_false"), train_records(root / f"{name}_true")) for name in cases}


def check_pair(name: str, eager: list[dict], compiled: list[dict]) -> None:
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, STEPS + 1)), name
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=LOSS_RTOL), (name, e["step"])
    moved = max(abs(r["loss"] - eager[0]["loss"]) for r in eager) / eager[0]["loss"]
    assert moved > 100 * LOSS_RTOL, f"{name}: the loss hardly changed, so equal losses would prove little"
    assert "compile_s" not in eager[0]
    if "compiles" in compiled[0]:  # absent when an earlier run of this process compiled the same graphs
        assert compiled[0]["compile_s"] > 0 and compiled[0]["compiles"] >= 1, name
    later = [r["step"] for r in compiled[1:] if "compile_s" in r]
    assert not later, f"{name}: recompiled at steps {later}"


def check_pairs(pairs: dict) -> None:
    for name, (eager, compiled) in pairs.items():
        check_pair(name, eager, compiled)
    first_case = next(iter(pairs))
    assert "compiles" in pairs[first_case][1][0], "the first compiled run of the process reported no compile time"


def test_compiled_training_equals_eager_zero2_packed(run_ranks, tmp_path):
    """CI: 1 rank (two would compile the same graphs twice on CI's cores), ZeRO-2, clm packed (one row per micro
    batch, its length changing every step)."""
    data = instruction_data(tmp_path / "instructions.jsonl")
    cases = {"clm_packed": ("deepspeed=zero2", *clm_overrides(data, "data.packing=auto"))}
    check_pairs(run_pairs(run_ranks, tmp_path, cases, world=1))


@pytest.mark.slow
def test_compiled_training_equals_eager_zero3_checkpointing(run_ranks, tmp_path):
    """ZeRO-3 (parameters gathered by hooks between the graphs), activation checkpointing (the recompute runs the
    compiled block again), packed and padded batches, all three tasks."""
    data = instruction_data(tmp_path / "instructions.jsonl")
    cases = {
        "clm_packed_z3_ckpt": ("deepspeed=zero3", "model.gradient_checkpointing=true",
                               *clm_overrides(data, "data.packing=auto")),
        "clm_padded_z3": ("deepspeed=zero3", *clm_overrides(data, "data.packing=false")),
        "cls_padded_z3_ckpt": ("deepspeed=zero3", "model.gradient_checkpointing=true", "task=cls",
                               "data.packing=false"),
        "qa_z2_ckpt": ("deepspeed=zero2", "model.gradient_checkpointing=true", "task=qa"),
    }
    check_pairs(run_pairs(run_ranks, tmp_path, cases, world=2))
