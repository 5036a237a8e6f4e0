"""lora=qlora under ZeRO-3 trains as under ZeRO-2: real DeepSpeed on 2 CPU ranks, fp32, one launch, three runs.

ZeRO-3 partitions the 4-bit base's packed bytes (stored in the precision's dtype, bitsandbytes' quant_storage) and
gathers them for each forward and backward; the quantization constants stay whole on every rank. The same seed
gives the same 4-bit base and adapters under every stage, so the logged losses and the trained adapter (final/,
gathered from the partitions: not empty, as ZeRO-3 adapters are in peft issue 2946) must agree with ZeRO-2's within
what fp32 reordering of the gradient reduction can move (train_worker.py: LOSS_RTOL, weight_disagreements).
`deepspeed=zero3_offload` also moves the partitions and the optimizer to the host. Marked slow: `make test-all`.
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
    for stage in STAGES:
        overrides = ["task=clm", "model=tiny", f"deepspeed={stage}", "lora=qlora", "lora.dropout=0",
                     "trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                     "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0", "trainer.seed=3",
                     f"optim.lr={LR}", "scheduler=constant", "scheduler.warmup_steps=1", "deepspeed.check_memory=false",
                     f"data.train_file={data}", f"data.validation_file={data}", "data.prompt_column=prompt",
                     "data.response_column=response", "data.packing=false", "data.max_seq_len=128",
                     "trainer.micro_batch_size=2", "trainer.grad_accum_steps=1"]
        (root / stage).mkdir()  # the runner checks the run dir's permissions before writing to it
        runs.append({"run_dir": str(root / stage), "overrides": overrides})
    results = run_jobs(run_ranks, root / "jobs", runs, world=2)
    assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return {stage: root / stage for stage in STAGES}


@pytest.mark.parametrize("stage", STAGES[1:])
def test_zero3_qlora_losses_and_adapter_equal_zero2s(qlora_stages, stage):
    reference, other = train_losses(qlora_stages["zero2"]), train_losses(qlora_stages[stage])
    assert sorted(reference) == sorted(other) == [1, 2, 3] and reference[3] < reference[1]  # it trained
    for step in (1, 2, 3):
        assert other[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (other, reference)
    adapter = {s: load_file(qlora_stages[s] / "final" / "adapter" / "adapter_model.safetensors") for s in ("zero2", stage)}
    assert adapter[stage].keys() == adapter["zero2"].keys() and len(adapter["zero2"]) == 2 * 2 * 6
    assert all(t.numel() > 0 for t in adapter[stage].values())
    assert weight_disagreements(adapter[stage], adapter["zero2"], lrs=train_lrs(qlora_stages["zero2"])) == []
