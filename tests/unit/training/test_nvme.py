"""NVMe offload's swap directory: named per run, refused with a clear error when it cannot work, removed at the end."""
from __future__ import annotations

import resource
from pathlib import Path

import pytest

from finetune.config import ConfigError
from finetune.distributed import DistInfo
from finetune.planning.estimate import GiB, LineItem
from finetune.training import nvme

MAIN = DistInfo(rank=0, world_size=1, local_rank=0)


def test_swap_subdir_is_per_run_and_stable(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "other" / "a"
    assert nvme.swap_subdir(a) == nvme.swap_subdir(a)
    assert nvme.swap_subdir(a) != nvme.swap_subdir(b)  # same name, different run dirs
    assert nvme.swap_subdir(a).startswith(f"{nvme.SWAP_PREFIX}a-")


def test_missing_path_and_file_are_refused(tmp_path):
    assert "does not exist" in nvme.check_nvme_path(tmp_path / "nope")
    assert "mkdir -p" in nvme.check_nvme_path(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in nvme.check_nvme_path(tmp_path / "file")
    assert nvme.check_nvme_path(tmp_path) is None


def test_swap_dir_is_emptied_created_and_probed(tmp_path):
    swap = tmp_path / "finetune-swap-run"
    (swap / "zero_stage_3").mkdir(parents=True)
    (swap / "zero_stage_3" / "stale.swp").write_bytes(b"x" * 10)  # a killed run's leftovers
    assert nvme.make_swap_dir(swap) is None
    assert swap.is_dir() and list(swap.iterdir()) == []


def test_unwritable_path_is_refused():
    # /proc refuses new entries even to root (these tests run as root in CI, where chmod would not stop it).
    problem = nvme.make_swap_dir(Path("/proc") / "finetune-swap-x")
    assert problem and "deepspeed.nvme_path='/proc'" in problem and "writable" in problem


def _estimate_with(items):
    from finetune.planning.estimate import Estimate, Option

    return Estimate(Option(stage=3, offload_optimizer="nvme", offload_params="nvme"), tuple(items),
                    {"gpu": 0, "cpu": 0, "nvme": 0})


def _nvme_item(name, size):
    return LineItem(name, "nvme", "persistent", "model_states", int(size), "")


def test_too_small_disk_is_refused_with_the_estimate(tmp_path):
    swap = tmp_path / "swap"
    swap.mkdir()
    huge = _estimate_with([_nvme_item("parameters", 10**15), _nvme_item("Adam moments", 10**15)])
    problem = nvme._space_problem({"offload_param": swap, "offload_optimizer": swap}, huge)
    assert problem and "GiB free" in problem and "1862645.1 GiB" in problem and "parameters" in problem
    small = _estimate_with([_nvme_item("parameters", 1000), _nvme_item("Adam moments", 1000)])
    assert nvme._space_problem({"offload_param": swap, "offload_optimizer": swap}, small) is None


def test_memlock_limit_below_the_swap_buffers_is_refused(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (64 * 2**20, 64 * 2**20))
    monkeypatch.setattr(nvme, "_has_capability", lambda bit: False)
    problem = nvme.memlock_problem(2 * GiB)
    assert problem and "ulimit -l unlimited" in problem and "64 MiB" in problem
    assert nvme.memlock_problem(32 * 2**20) is None  # within the limit
    monkeypatch.setattr(nvme, "_has_capability", lambda bit: bit == 14)  # CAP_IPC_LOCK ignores the limit
    assert nvme.memlock_problem(2 * GiB) is None


def test_missing_libaio_names_the_package(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    class Incompatible:
        def is_compatible(self, verbose=False):
            return False

    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "create_op_builder", lambda name: Incompatible())
    problem = nvme.async_io_problem()
    assert "libaio" in problem and "apt-get install -y libaio-dev" in problem


def test_swap_dirs_are_removed_with_a_report(tmp_path, capsys):
    swap = tmp_path / "swap"
    (swap / "zero_stage_3" / "bfloat16params" / "rank0").mkdir(parents=True)
    (swap / "zero_stage_3" / "optimizer" / "rank0").mkdir(parents=True)
    (swap / "zero_stage_3" / "bfloat16params" / "rank0" / "1_param.tensor.swp").write_bytes(b"p" * 2048)
    (swap / "zero_stage_3" / "optimizer" / "rank0" / "1.tensor.swp").write_bytes(b"o" * 4096)
    assert nvme.swap_usage(swap) == {"parameters": 2048, "optimizer": 4096}
    other_node = DistInfo(rank=1, world_size=2, local_rank=1)
    nvme.remove_swap_dirs([swap], info=other_node)  # not this node's first rank: leaves it
    assert swap.is_dir()
    nvme.remove_swap_dirs([swap], info=MAIN)
    assert not swap.exists()
    assert "NVMe swap" in capsys.readouterr().out


def test_prepare_refuses_on_every_rank_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(nvme.distributed, "all_gather_objects", lambda obj: [obj])  # one rank, no process group
    estimate = _estimate_with([_nvme_item("parameters", 1000)])
    swap = tmp_path / "disk" / "finetune-swap-run"
    with pytest.raises(ConfigError, match="does not exist"):
        nvme.prepare_swap_dirs({"offload_param": swap}, estimate, ranks_per_node=1, info=MAIN)
    (tmp_path / "disk").mkdir()
    assert nvme.prepare_swap_dirs({"offload_param": swap, "offload_optimizer": swap}, estimate, ranks_per_node=1,
                                  info=MAIN) == [swap]
    assert swap.is_dir()
    huge = _estimate_with([_nvme_item("parameters", 10**15)])
    with pytest.raises(ConfigError, match="GiB free"):
        nvme.prepare_swap_dirs({"offload_param": swap}, huge, ranks_per_node=1, info=MAIN)
    assert not swap.exists()  # refused: the directory it made is gone again
