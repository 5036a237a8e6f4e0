"""ZeRO-3 with parameters and optimizer states on NVMe (deepspeed=zero3_nvme) under real DeepSpeed, 2 CPU ranks.

It trains to the losses of ZeRO-3 with both in CPU memory (zero3_offload: the same DeepSpeedCPUAdam), swaps into a
directory of its own under deepspeed.nvme_path that is gone at the end, checkpoints the swapped optimizer states,
and a relaunch resumes to the same losses. The first NVMe run on a machine builds DeepSpeed's async_io op (minutes,
then cached in ~/.cache/torch_extensions); it needs libaio-dev, which .ci/run installs (scripts/libaio.sh).
"""
from __future__ import annotations

import re

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4
TRAIN = ("task=qa", "model=tiny", "trainer.precision=bf16", f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4",
         "trainer.save_every=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_at_end=false")
SWAP_REPORT = re.compile(r"NVMe swap (\S+): [\d.]+ GiB \(parameters ([\d.]+) GiB, optimizer states and gradients "
                         r"([\d.]+) GiB\); removed\.")


@pytest.fixture(scope="module")
def async_io():
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        pytest.skip("libaio is not installed, so DeepSpeed cannot build async_io: run scripts/libaio.sh as root "
                    "(apt-get install -y libaio-dev); .ci/run does")


def test_nvme_trains_like_cpu_offload_checkpoints_and_resumes(launch, tmp_path, async_io):
    cpu = launch(tmp_path / "cpu", *TRAIN, "deepspeed=zero3_offload")
    disk = tmp_path / "disk"
    disk.mkdir()
    nvme = (*TRAIN, "deepspeed=zero3_nvme", f"deepspeed.nvme_path={disk}")
    first = launch(tmp_path / "nvme", *nvme, "trainer.stop_after_steps=2")
    assert "DeepSpeedCPUAdam" in first.output and "offload: nvme" in first.output

    # Both parameters and optimizer states went to the run's own directory, which is gone after the launch.
    swap_dir, params_gib, optimizer_gib = SWAP_REPORT.search(first.output).groups()
    assert swap_dir.startswith(f"{disk}/finetune-swap-nvme-")
    assert float(params_gib) > 0 and float(optimizer_gib) > 0
    assert list(disk.iterdir()) == []
    # The checkpoint carries each rank's swapped optimizer states (DeepSpeed copies them out of the swap folder).
    offloaded = first.run_dir / "checkpoints" / "global_step2" / "offloaded_tensors"
    assert sorted(p.name for p in offloaded.iterdir()) == ["rank00", "rank01"]
    assert all({f.name.split("-")[0] for f in p.iterdir()} >= {"exp_avg", "exp_avg_sq"} for p in offloaded.iterdir())

    resumed = launch(tmp_path / "nvme", *nvme)
    assert "Resuming at step 2" in resumed.output
    assert list(disk.iterdir()) == []
    assert (resumed.run_dir / "final" / "model.safetensors").is_file()

    # launch/export.py finds the fp32 master weights of an NVMe checkpoint in its offloaded_tensors/ (the optimizer
    # files hold empty tensors for them): final/ is those weights in bf16, as training ran.
    from safetensors.torch import load_file

    from finetune.tools.export import export_checkpoint

    exported = export_checkpoint(resumed.run_dir / "checkpoints", tmp_path / "exported", dtype="fp32")
    master = load_file(exported / "model.safetensors")
    final = load_file(resumed.run_dir / "final" / "model.safetensors")
    assert master.keys() == final.keys()
    for name, weight in final.items():
        assert torch.equal(master[name].to(torch.bfloat16).float(), weight.float()), name

    reference = cpu.train_losses()
    on_nvme = resumed.train_losses()  # steps 1-2 of the first launch, 3-4 of the relaunch
    assert sorted(reference) == sorted(on_nvme) == list(range(1, STEPS + 1))
    for step in reference:
        assert on_nvme[step] == pytest.approx(reference[step], rel=1e-5), (step, reference, on_nvme)
    assert reference[STEPS] < reference[1]


def test_nvme_path_that_does_not_exist_is_refused(launch, tmp_path, async_io):
    missing = tmp_path / "no_such_disk"
    run = launch(tmp_path / "run", *TRAIN, "deepspeed=zero3_nvme", f"deepspeed.nvme_path={missing}", nprocs=0,
                 check=False)
    assert run.returncode != 0
    assert f"deepspeed.nvme_path='{missing}' does not exist" in run.output and "mkdir -p" in run.output
    assert "Traceback" not in run.output
    assert not missing.exists() and not (run.run_dir / "checkpoints").exists()
