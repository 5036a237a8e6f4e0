"""lora=qlora trains the same whatever the parallel layout: real DeepSpeed (ZeRO-2, fp32) on 1 and 2 CPU ranks.

As tests/integration/test_layout_invariance.py does for full fine-tuning: a global batch of 4 instruction rows as
4x1x1 (micro batch x accumulation x ranks) and 2x1x2, three optimizer steps at a high learning rate; the logged
losses and the trained adapter (final/adapter/, what the optimizer moved) agree within what fp32 reordering can move
(train_worker.py: LOSS_RTOL, weight_disagreements). The 4-bit base is quantized on every rank from the same init, so
every rank holds the same bytes. Marked slow (two launches): `make test-all`.
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file
from train_worker import LOSS_RTOL, instruction_data, run_jobs, train_losses, train_lrs, weight_disagreements

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LR, STEPS = 3e-3, 3
LAYOUTS = {1: (4, 1), 2: (2, 1)}  # world size -> (micro batch, accumulation)


@pytest.fixture(scope="module")
def qlora_layouts(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_layouts")
    data = instruction_data(root / "instructions.jsonl")
    dirs = {}
    for world, (micro, accum) in LAYOUTS.items():
        dirs[world] = root / f"qlora_{micro}x{accum}x{world}"
        overrides = ["task=clm", "model=tiny", "deepspeed=zero2", "lora=qlora", "lora.dropout=0",
                     "trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
                     "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.save_every=0", "trainer.seed=3",
                     f"optim.lr={LR}", "scheduler=constant", "scheduler.warmup_steps=1", "deepspeed.check_memory=false",
                     f"data.train_file={data}", f"data.validation_file={data}", "data.prompt_column=prompt",
                     "data.response_column=response", "data.packing=false", "data.max_seq_len=128",
                     f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={accum}"]
        results = run_jobs(run_ranks, root / f"world{world}", [{"run_dir": str(dirs[world]), "overrides": overrides}],
                           world=world)
        assert all(r["ok"] for r in results), [r.get("error") for r in results]
    return dirs


def test_qlora_losses_and_final_weights_do_not_depend_on_the_layout(qlora_layouts):
    reference, other = train_losses(qlora_layouts[1]), train_losses(qlora_layouts[2])
    assert sorted(reference) == sorted(other) == [1, 2, 3] and reference[3] < reference[1]  # it trained
    for step in (1, 2, 3):
        assert other[step] == pytest.approx(reference[step], rel=LOSS_RTOL), (other, reference)
    adapter = {world: load_file(qlora_layouts[world] / "final" / "adapter" / "adapter_model.safetensors")
               for world in LAYOUTS}
    assert weight_disagreements(adapter[2], adapter[1], lrs=train_lrs(qlora_layouts[1])) == []
