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

import hashlib
import mmap
import os
import resource
import shutil
import socket
from pathlib import Path
from typing import Optional

from finetune import distributed
from finetune.config import ConfigError
from finetune.distributed import DistInfo
from finetune.planning.estimate import Estimate, GiB

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
    """Empty and create `swap_dir`, then write one block with O_DIRECT as DeepSpeed's async I/O will; why not, or None."""
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


def prepare_swap_dirs(swap_dirs: dict[str, Path], estimate: Estimate, *, ranks_per_node: int,
                      info: DistInfo) -> list[Path]:
    """Check and create the run's swap directories (a collective: every rank calls it); returns them.

    `swap_dirs` is engine.nvme_swap_dirs of the filled DeepSpeed config; `estimate` the planner's estimate of that
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
