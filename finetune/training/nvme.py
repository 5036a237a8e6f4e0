"""NVMe offload (ZeRO-Infinity): the run's own swap directory, checked before anything is built, removed at the end.

`deepspeed.nvme_path` names a directory on a fast local disk. Each run swaps into its own subdirectory of it,
named after the run dir (`swap_subdir`), so two runs on one disk never share files, and DeepSpeed adds a folder
per rank below it (zero_stage_3/<dtype>params/rank<N>, zero_stage_3/optimizer/rank<N>). The swap files only mean
something to the processes that wrote them: a resume rebuilds them from the checkpoint, which holds its own copy
of the optimizer states. So the directory is emptied at the start (what a killed run left), and removed when the
run ends, however it ends.

Before the model is built, `prepare_swap_dirs` refuses with a ConfigError: a missing nvme_path (it is not
created: a typo would fill another disk), one that is not a writable directory or lacks O_DIRECT (DeepSpeed's
async I/O opens its files with it), a disk with less free space than the memory planner's NVMe estimate,
a locked-memory limit below DeepSpeed's pinned swap buffers, and a DeepSpeed that cannot build its async_io op
(libaio missing).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import resource
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

from finetune import distributed
from finetune.config import ConfigError, RunConfig
from finetune.distributed import DistInfo
from finetune.model.hf_weights import CheckpointError
from finetune.planning.estimate import Estimate, GiB
from finetune.training.checkpoint_trust import load_restricted

SWAP_PREFIX = "finetune-swap-"
LIBAIO_FIX = (
    "install libaio's development package (Debian/Ubuntu: sudo apt-get install -y libaio-dev; Fedora/RHEL: "
    "sudo dnf install -y libaio-devel; or run scripts/libaio.sh), then relaunch; DeepSpeed builds the op at "
    "first use"
)
_CAP_IPC_LOCK = 14  # capability bit: mlock beyond RLIMIT_MEMLOCK


def swap_subdir(run_dir: Path) -> str:
    """The run's directory name under nvme_path: the run dir's name plus a hash of its full path."""
    resolved = Path(run_dir).resolve()
    return f"{SWAP_PREFIX}{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"


def nvme_swap_dirs(ds_config: dict[str, Any]) -> dict[str, Path]:
    """Where a filled config swaps to NVMe: {"offload_param" | "offload_optimizer": directory}."""
    zero = ds_config.get("zero_optimization") or {}
    return {key: Path(zero[key]["nvme_path"]) for key in ("offload_param", "offload_optimizer")
            if (zero.get(key) or {}).get("device") == "nvme"}


def check_nvme_path(nvme_path: Path) -> Optional[str]:
    """Why `nvme_path` (the user's directory) cannot hold swap files, or None."""
    if not nvme_path.exists():
        return (f"deepspeed.nvme_path={str(nvme_path)!r} does not exist. Create it on a fast local disk (mkdir -p) "
                "or point deepspeed.nvme_path at an existing directory; it is not created for you, since a "
                "mistyped path would silently fill another disk.")
    if not nvme_path.is_dir():
        return f"deepspeed.nvme_path={str(nvme_path)!r} is not a directory; give a directory on a fast local disk."
    return None


def make_swap_dir(swap_dir: Path) -> Optional[str]:
    """Empty and create `swap_dir`, then write a block with O_DIRECT as DeepSpeed's async I/O will; why not, or None."""
    try:
        shutil.rmtree(swap_dir, ignore_errors=True)  # a killed run's files: stale, and they take the space
        swap_dir.mkdir()
        probe = swap_dir / ".o_direct_probe"
        block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT requires
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as err:
        what = "does not support O_DIRECT" if err.errno == 22 else "is not writable"
        return (f"deepspeed.nvme_path={str(swap_dir.parent)!r} {what} ({err.strerror}: {err.filename}). DeepSpeed "
                "swaps with O_DIRECT writes; give a writable directory on a local disk (ext4, xfs; not a network "
                "file system).")
    return None


def free_space_problem(swap_dir: Path, needed: int, what: str) -> Optional[str]:
    free = shutil.disk_usage(swap_dir).free
    if needed <= free:
        return None
    return (f"deepspeed.nvme_path={str(swap_dir.parent)!r} has {free / GiB:.1f} GiB free, but this run swaps about "
            f"{needed / GiB:.1f} GiB there per node ({what}, the memory planner's estimate). Free space on that "
            "disk, point deepspeed.nvme_path at a larger one, or spread the run over more nodes.")


def memlock_problem(pinned_per_rank: int) -> Optional[str]:
    """DeepSpeed mlock()s its NVMe swap buffers; without CAP_IPC_LOCK, RLIMIT_MEMLOCK must allow them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= pinned_per_rank or _has_capability(_CAP_IPC_LOCK):
        return None
    return (f"NVMe offload locks about {pinned_per_rank / GiB:.2f} GiB of swap buffers per rank in RAM, but the "
            f"locked-memory limit is {soft / 2**20:.0f} MiB (ulimit -l). Raise it: `ulimit -l unlimited` before "
            "launching, memlock in /etc/security/limits.conf, `--ulimit memlock=-1` for docker, or "
            "PropagateResource/--propagate=MEMLOCK under SLURM.")


def _has_capability(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def async_io_problem() -> Optional[str]:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if builder is not None and builder.is_compatible(verbose=False):
        return None
    return f"NVMe offload needs DeepSpeed's async_io op, which cannot be built here (libaio not found): {LIBAIO_FIX}."


def clear_stale(nvme_path: Optional[str], subdir: str, *, info: DistInfo) -> None:
    """Remove what a killed launch of this run dir left in its swap directory (one rank per node)."""
    if nvme_path and info.local_rank == 0:
        shutil.rmtree(Path(nvme_path).expanduser() / subdir, ignore_errors=True)


def prepare_for_run(run: RunConfig, ds_config: dict, model: Any, *, info: DistInfo) -> list[Path]:
    """The swap directories of a filled DeepSpeed config, checked and created (a collective); [] without NVMe."""
    from finetune.planning.choice import offload_estimate

    swap_dirs = nvme_swap_dirs(ds_config)
    if not swap_dirs:
        return []
    per_node = ranks_on_this_host()
    estimate = offload_estimate(run, model, ds_config, world_size=info.world_size, ranks_per_node=per_node)
    return prepare_swap_dirs(swap_dirs, estimate, ranks_per_node=per_node, info=info)


def prepare_swap_dirs(swap_dirs: dict[str, Path], estimate: Estimate, *, ranks_per_node: int,
                      info: DistInfo) -> list[Path]:
    """Check and create the run's swap directories (a collective: every rank calls it); returns them.

    `swap_dirs` is nvme_swap_dirs of the filled DeepSpeed config; `estimate` the planner's estimate of that
    config for this launch (its NVMe lines and pinned swap buffers are per node of `ranks_per_node` ranks).
    Every rank raises the same ConfigError when any rank found a problem.
    """
    dirs = sorted(set(swap_dirs.values()))
    problem = async_io_problem() if info.local_rank == 0 else None
    for directory in dirs:
        problem = problem or check_nvme_path(directory.parent)
    if problem is None and info.local_rank == 0:  # one rank per node prepares the node's directories
        for directory in dirs:
            problem = problem or make_swap_dir(directory)
        problem = problem or _space_problem(swap_dirs, estimate)
    problem = problem or memlock_problem(_pinned_swap_bytes(estimate) // ranks_per_node)
    problems = [p for p in distributed.all_gather_objects(problem) if p]
    if problems:
        if info.local_rank == 0:
            remove_swap_dirs(dirs, info=info, report=False)
        raise ConfigError(problems[0])
    return dirs


def _space_problem(swap_dirs: dict[str, Path], estimate: Estimate) -> Optional[str]:
    """Parameters go to offload_param's directory, optimizer states and gradients to offload_optimizer's."""
    needs: dict[Path, list[tuple[str, int]]] = {}
    for item in estimate.items:
        if item.device != "nvme":
            continue
        key = "offload_param" if item.name.startswith("parameters") else "offload_optimizer"
        directory = swap_dirs.get(key) or next(iter(swap_dirs.values()))
        needs.setdefault(directory, []).append((item.name, item.bytes))
    for directory, items in needs.items():
        what = " + ".join(f"{name} {size / GiB:.1f} GiB" for name, size in items)
        problem = free_space_problem(directory, sum(size for _, size in items), what)
        if problem:
            return problem
    return None


def _pinned_swap_bytes(estimate: Estimate) -> int:
    return sum(i.bytes for i in estimate.items if i.name.startswith("NVMe swap buffers"))


def ranks_on_this_host() -> int:
    """How many ranks of this launch share this rank's host (a collective)."""
    hosts = distributed.all_gather_objects(socket.gethostname())
    return hosts.count(socket.gethostname())


def swap_usage(directory: Path) -> dict[str, int]:
    """Bytes under `directory` by kind: DeepSpeed's parameter swap ("*params" folders) and optimizer swap."""
    usage = {"parameters": 0, "optimizer": 0}
    for path in directory.rglob("*"):
        if path.is_file():
            kind = "optimizer" if "optimizer" in path.relative_to(directory).parts else "parameters"
            usage[kind] += path.stat().st_size
    return usage


def remove_swap_dirs(dirs: list[Path], *, info: DistInfo, report: bool = True) -> None:
    """Remove the run's swap directories (one rank per node, once every rank is done with them); rank 0 says
    how much they held."""
    if info.local_rank != 0:
        return
    for directory in dirs:
        if report and info.is_main and directory.is_dir():
            usage = swap_usage(directory)
            print(f"NVMe swap {directory}: {sum(usage.values()) / GiB:.3f} GiB (parameters "
                  f"{usage['parameters'] / GiB:.3f} GiB, optimizer states and gradients "
                  f"{usage['optimizer'] / GiB:.3f} GiB); removed.", flush=True)
        shutil.rmtree(directory, ignore_errors=True)


# --- resuming ---------------------------------------------------------------------------------------
def complete_resume(engine, load_dir: str, tag: str) -> None:
    """Restore what DeepSpeed's NVMe resume leaves out (a collective: every rank calls it after load_checkpoint).

    With the optimizer on NVMe, DeepSpeed (0.16 to at least 0.19) resumes by copying the checkpoint's swap files
    (offloaded_tensors/) back into the swap folder and skips the rank's *_optim_states.pt. It then reads back only
    the fp32 master weights: the learning rate stays at its initial value until the schedule's next step, Adam's
    moments restart from zero and its step count from 0 (the files of the moments sit there unread until the next
    step overwrites them), and sub-groups too small to swap (under 1 MiB of fp32, e.g. GPT-J's LayerNorm gains and
    biases on 4 or more ranks) restart from the initial model. Here the param groups get their saved settings, the
    swapped sub-groups their step count and their moments registered with the swapper (the next step reads them
    from their files), and the small ones master weights, moments and step from the rank's optim_states file.
    """
    import torch

    optimizer = engine.optimizer
    # restricted: the checkpoint passed checkpoint_trust before the engine loaded it, and is read the same way here
    saved = load_restricted(engine._get_zero_ckpt_name(load_dir, tag))
    saved = saved["optimizer_state_dict"]
    saved_state = saved["optimizer_state_dict"]["state"]
    index = _saved_state_index(optimizer)
    for group, saved_group in zip(optimizer.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})  # the scheduled lr, betas, ...
    optimizer.checkpoint_event_prologue()  # every parameter back to its partition before touching them
    for sub_group, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
        state = saved_state.get(index[sub_group], {})
        live = optimizer.optimizer.state[fp32]
        if optimizer._swappable_optimizer_subgroup(sub_group):
            _register_swapped_moments(optimizer, fp32, state, optimizer.fp16_partitioned_groups_flat_numel[sub_group])
            continue
        fp32.data.copy_(saved["fp32_flat_groups"][sub_group])
        for key, value in state.items():  # the optimizer creates them at its first step: often not there yet
            if torch.is_tensor(live.get(key)) and torch.is_tensor(value):
                live[key].copy_(value)
            else:
                live[key] = value.clone() if torch.is_tensor(value) else value
        optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)  # the 16-bit copy forward reads
    optimizer.checkpoint_event_epilogue()  # re-gather the persistent (small, always gathered) parameters


def _register_swapped_moments(optimizer, fp32, state: dict, numel: int) -> None:
    """Adam's state of a swapped sub-group, as the swapper keeps it between steps: tensors without memory whose
    swap files (exp_avg-<id>.tensor.swp, ...) the next swap-in reads."""
    import torch

    live = optimizer.optimizer.state[fp32]
    swapper = optimizer.optimizer_swapper
    for key, value in state.items():
        if not torch.is_tensor(value):
            live[key] = value  # the step count
            continue
        path = Path(swapper.swap_folder) / f"{key}-{fp32.ds_id}.tensor.swp"
        if not path.is_file():
            raise ConfigError(f"The NVMe checkpoint lacks {path.name} (Adam's {key}); it cannot resume exactly. "
                              "Resume from another checkpoint, or start the run over.")
        live[key] = torch.empty(numel, dtype=fp32.dtype)  # never written: no memory until the swap-in fills it
    swap_info = swapper._get_param_swap_info(fp32)  # registers the tensors of `live` under their file names
    swap_info.release_memory()


def _saved_state_index(optimizer) -> dict[int, int]:
    """Sub-group -> its key in the saved base optimizer state: torch numbers parameters in param_groups order, and
    DeepSpeed's ZeRO-3 fills each param group with its sub-groups' fp32 partitions before saving."""
    optimizer._set_fp32_optimizer_param_groups()
    try:
        position = {}
        for group in optimizer.optimizer.param_groups:
            for param in group["params"]:
                position[id(param)] = len(position)
        return {i: position[id(fp32)] for i, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat)}
    finally:
        optimizer._clear_fp32_optimizer_param_groups()


# --- exporting --------------------------------------------------------------------------------------
@contextlib.contextmanager
def offloaded_master_weights(tag_dir: Path) -> Iterator[None]:
    """Within it, DeepSpeed's zero_to_fp32 reads an NVMe checkpoint: the fp32 master weights of the sub-groups the
    optimizer swapped are not in the ranks' *_optim_states.pt (empty tensors there) but in
    offloaded_tensors/rank<NN>/<ds_id>.tensor.swp, raw fp32 padded to the I/O alignment. They are memory-mapped,
    so a lazy consolidation still reads one output shard's worth at a time. No effect on other checkpoints."""
    offloaded = Path(tag_dir) / "offloaded_tensors"
    if not offloaded.is_dir():
        yield
        return
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    parse = zero_to_fp32.parse_optim_states

    def parse_with_offloaded(files, ds_checkpoint_dir):
        stage, world_size, fp32_flat_groups, *rest = parse(files, ds_checkpoint_dir)
        _fill_offloaded_groups(fp32_flat_groups, Path(ds_checkpoint_dir), files[0])
        return (stage, world_size, fp32_flat_groups, *rest)

    with mock.patch.object(zero_to_fp32, "parse_optim_states", parse_with_offloaded):
        yield


def _fill_offloaded_groups(fp32_flat_groups: list, tag_dir: Path, optim_file: str) -> None:
    import torch

    from finetune.planning.estimate import sub_group_numels

    model_file = next(iter(sorted(tag_dir.glob("*model_states.pt"))))
    param_shapes = load_restricted(model_file, mmap=True)["param_shapes"]
    config = load_restricted(Path(optim_file), mmap=True).get("ds_config") or {}
    sub_group_size = int((config.get("zero_optimization") or {}).get("sub_group_size", 10**9))
    world = len(fp32_flat_groups)
    numels = [n for group in param_shapes
              for n in sub_group_numels([math.ceil(math.prod(s) / world) for s in group.values()], sub_group_size)]
    rank_dirs = {int(p.name.removeprefix("rank")): p for p in (tag_dir / "offloaded_tensors").iterdir()}
    for rank, groups in enumerate(fp32_flat_groups):
        if len(groups) != len(numels):
            raise CheckpointError(f"{tag_dir}: rank {rank} saved {len(groups)} optimizer sub-groups but its parameter "
                                  f"shapes make {len(numels)}; the checkpoint is inconsistent.")
        for i, tensor in enumerate(groups):
            if tensor.numel() or not numels[i]:
                continue
            path = rank_dirs[rank] / f"{tensor.ds_id}.tensor.swp"
            if not path.is_file() or path.stat().st_size < 4 * numels[i]:
                raise CheckpointError(f"{path} is missing or short: this NVMe checkpoint lacks rank {rank}'s fp32 "
                                      "weights; export another checkpoint.")
            groups[i] = torch.from_file(str(path), shared=False, size=numels[i], dtype=torch.float32)
