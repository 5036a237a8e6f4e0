"""lora=qlora under ZeRO-3 trains as under ZeRO-2: real DeepSpeed on 2 CPU ranks, fp32, one launch.

ZeRO-3 partitions the 4-bit base's packed bytes (stored in the precision's dtype, bitsandbytes' quant_storage) and
gathers them for each forward and backward; the quantization constants stay whole on every rank. The same seed
gives the same 4-bit base and adapters under every stage, so the logged losses and the trained adapter (final/,
gathered from the partitions: not empty, as ZeRO-3 adapters are in peft issue 2946) must agree with ZeRO-2's within
what fp32 reordering of the gradient reduction can move (train_worker.py: LOSS_RTOL, weight_disagreements).
`deepspeed=zero3_offload` also moves the partitions and the optimizer to the host, and a ZeRO-3 run stopped after
step 2 resumes from its checkpoint to the same step 3. Marked slow: `make test-all`.
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file
from train_worker import LOSS_RTOL, instruction_data, run_jobs, train_losses, train_lrs, weight_disagreements

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LR, STEPS = 3e-3, 3
STAGES = ("zero2", "zero3", "zero3_offload")


@pytest.fixture(scope="module")
def qlora_stages(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_zero3")
    data = instruction_data(root / "instructions.jsonl")
    runs = []

    def common(stage: str, steps: int = STEPS, save_every: int = 0) -> list[str]:
        return ["task=clm", "model=tiny", f"deepspeed={stage}", "lora=qlora", "lora.dropout=0",
                "trainer.precision=fp32", f"trainer.max_steps={steps}", "trainer.log_every=1",
                "trainer.eval_every=0", "trainer.eval_at_end=false", f"trainer.save_every={save_every}",
                "trainer.seed=3",
                f"optim.lr={LR}", "scheduler=constant", "scheduler.warmup_steps=1", "deepspeed.check_memory=false",
                f"data.train_file={data}", f"data.validation_file={data}", "data.prompt_column=prompt",
                "data.response_column=response", "data.packing=false", "data.max_seq_len=128",
                "trainer.micro_batch_size=2", "trainer.grad_accum_steps=1"]

    for stage in STAGES:
        (root / stage).mkdir()  # the runner checks the run dir's permissions before writing to it
        runs.append({"run_dir": str(root / stage), "overrides": common(stage)})
    # ZeRO-3 stopped after step 2 (its checkpoint) and resumed to step 3 in the same run dir.
    (root / "zero3_resumed").mkdir()
    for steps in (2, STEPS):
        runs.append({"run_dir": str(root / "zero3_resumed"), "overrides": common("zero3", steps, save_every=2)})
    results = run_jobs(run_ranks, root / "jobs", runs, world=2)
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return {stage: root / stage for stage in (*STAGES, "zero3_resumed")}


@pytest.mark.parametrize("stage", [*STAGES[1:], "zero3_resumed"])
def test_zero3_qlora_losses_and_adapter_equal_zero2s(qlora_stages, stage):
    reference, other = train_losses(qlora_stages["zero2"]), train_losses(qlora_stages[stage])
    assert sorted(reference) == sorted(other) == [1, 2, 3] and reference[3] < reference[1]  # it trained
    for step in (1, 2, 3):
        assert other[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (other, reference)
    adapter = {s: load_file(qlora_stages[s] / "final" / "adapter" / "adapter_model.safetensors")
               for s in ("zero2", stage)}
    assert adapter[stage].keys() == adapter["zero2"].keys() and len(adapter["zero2"]) == 2 * 2 * 6
    assert all(t.numel() > 0 for t in adapter[stage].values())
    assert weight_disagreements(adapter[stage], adapter["zero2"], lrs=train_lrs(qlora_stages["zero2"])) == []
