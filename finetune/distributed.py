"""Rank and world discovery, process-group setup, seeding and rank-0 helpers.

Launchers: `deepspeed` and `torchrun` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; `srun` (one task per GPU) sets
SLURM_* only, mapped here; a plain `python launch/train.py` is a world of one.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's global rank from the launcher's environment, before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def launch_stamp() -> str:
    """A name every rank of one launch computes alike without communicating, for the default run dir.

    SLURM: the job (and step) id. Under a launcher (deepspeed, torchrun) all local ranks are children of one
    launcher process, so its start time and pid are shared. Otherwise (plain python) the current time and this
    process's pid. Milliseconds and the pid keep two launches started in the same second apart (the run dir's
    lock refuses the rare clash that remains).
    """
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    started, pid = time.time(), os.getpid()
    if "LOCAL_RANK" in os.environ:
        try:
            import psutil

            started, pid = psutil.Process(os.getppid()).create_time(), os.getppid()
        except Exception:  # noqa: BLE001 -- no parent info: the ranks broadcast rank 0's dir anyway
            pass
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S', time.localtime(started))}.{int(started * 1000) % 1000:03d}-{pid}"


def _fill_env_from_slurm_or_single() -> None:
    """Give torch.distributed's env:// init what it needs when no torch-style launcher set it."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        # MASTER_ADDR/PORT come from the sbatch script (first node of the allocation).
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # Port 0: the store binds a free port itself (no other rank has to find it), so parallel runs cannot collide.
    os.environ.setdefault("MASTER_PORT", "0")


class RendezvousError(RuntimeError):
    """Rank 0 cannot listen on the rendezvous port (MASTER_PORT): another process holds it."""


DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
# Rank 0 alone processes the data on a first run while the others wait (main_process_first): minutes to hours for
# a large corpus, so that one wait has its own, long, timeout instead of the collective timeout of the loop.
SETUP_WAIT_TIMEOUT = timedelta(hours=6)
_setup_wait_group: Any = None


def init_distributed(*, collective_timeout_s: Optional[float] = None) -> DistInfo:
    """Create the process group (NCCL on GPU, gloo on CPU: the accelerator's backend) and bind the local device.

    `collective_timeout_s` bounds how long any collective waits for a rank that neither answers nor dies (a
    hung rank, an unreachable node): past it the collective fails and the job exits, instead of hanging for
    DeepSpeed's default of 30 minutes. A rank that dies is noticed at once: its peers' connections close.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _setup_wait_group
    _fill_env_from_slurm_or_single()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        atexit.register(shutdown)  # once per process; later calls (multirun points) reuse the live group
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    timeout = timedelta(seconds=collective_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
            verbose=env_rank() == 0, timeout=timeout,
        )
    except torch.distributed.DistNetworkError as err:
        if "EADDRINUSE" not in str(err):
            raise
        raise RendezvousError(
            f"The rendezvous port MASTER_PORT={os.environ.get('MASTER_PORT')} on "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} is taken by another process, so rank 0 cannot listen on "
            "it and the other ranks could not join. Under launch/slurm/*.sbatch and the submitit preset the port is "
            "one found free on the first node just before the ranks start, and something took it in between: "
            "submit the job again. Elsewhere, set MASTER_PORT to a free port (or to 0 for a world of one)."
        ) from None
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _record_host(rank, world_size)
    if accelerator.device_name() == "cpu":
        _unlink_shm_buffer(rank, world_size)
    if _setup_wait_group is None and world_size > 1:  # gloo: a CPU barrier works beside NCCL too
        _setup_wait_group = torch.distributed.new_group(backend="gloo", timeout=SETUP_WAIT_TIMEOUT)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)
    quiet_logs(info)
    return info


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm segment DeepSpeed's CPU shared-memory allreduce creates for `rank` (csrc/cpu/comm/shm.cpp)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}"
    return Path("/dev/shm") / f"{name}_{rank}"


def _unlink_shm_buffer(rank: int, world_size: int) -> None:
    """Remove this rank's name for its shm allreduce segment once every rank has mapped all of them.

    DeepSpeed never unlinks these 66 MB segments, so each launch on a new port left world_size of them in
    /dev/shm (RAM) for good. Unlinked, a segment lives while a rank still maps it and is freed when the last
    one exits, even by kill -9."""
    if world_size > 1:
        torch.distributed.barrier()  # every rank is past shm_initialize, which maps all ranks' segments
    with contextlib.suppress(OSError):
        shm_buffer_path(rank).unlink()


# DeepSpeed warnings that say nothing actionable here: get_lr is asked for before the first step by DeepSpeed itself.
_HARMLESS_DS_WARNINGS = (
    "Attempting to get learning rate from scheduler",
)


def quiet_logs(info: DistInfo) -> None:
    """DeepSpeed logs at INFO on every rank: rank 0 keeps warnings of substance, the others errors only."""
    import warnings

    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if info.is_main else logging.ERROR)
    ds_logger.addFilter(lambda record: not any(text in record.getMessage() for text in _HARMLESS_DS_WARNINGS))
    # DeepSpeed still calls collectives that torch renamed; the deprecation is DeepSpeed's to act on, not a user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def shutdown() -> None:
    global _setup_wait_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _setup_wait_group = None


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def long_barrier() -> None:
    """A barrier under SETUP_WAIT_TIMEOUT instead of the collective timeout: for the waits on work whose length
    grows with the model and the file system (rank 0 committing or pruning a checkpoint, writing final/), which a
    slow shared file system can stretch past trainer.collective_timeout_s. A rank that dies still ends it at once."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=_setup_wait_group)


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. dataset processing that fills a cache); the others run it afterwards.

    The others wait under SETUP_WAIT_TIMEOUT, not the collective timeout: the body may take long on a first run.
    """
    def wait() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier(group=_setup_wait_group)

    if not info.is_main:
        wait()
    try:
        yield
    finally:  # also when rank 0's body fails: the others then run it and meet the same error, not a hang
        if info.is_main:
            wait()


# How long a rank with an error waits for rank 0's (to tell a shared error from its own), and rank 0 for the others.
ERROR_AGREE_WAIT = timedelta(seconds=20)


def error_reporter(message: str) -> Optional[str]:
    """Who prints a user-facing error that ended this rank: None (stay quiet), "" (print it) or "rank N" (print it,
    naming this rank). Call it once, on the way out, then `wait_for_error_reports`.

    A wrong config or bad data stops every rank with the same message: rank 0 prints it, once. Before the process
    group exists (config errors) every rank parsed the same command line, so that is the rule. Afterwards the ranks
    compare through the process group's key-value store: another rank whose message differs from rank 0's, or
    whose rank 0 has no error, prints its own, naming itself (a file missing on one node, a rank's own shard).
    """
    rank, store = env_rank(), _default_store()
    if store is None:  # before the process group: every rank read the same command line and config
        return "" if rank == 0 else None
    if torch.distributed.get_world_size() == 1:
        return ""
    try:
        if rank == 0:
            store.set(_error_key(0), message)
            return ""
        found = _wait_for_keys(store, [_error_key(0)])
        same = found and store.get(_error_key(0)).decode() == message
        store.set(_error_key(f"seen/{rank}"), "1")
        return None if same else f"rank {rank}"
    except Exception:  # noqa: BLE001 -- rank 0 is gone, taking the store with it: say it here
        return f"rank {rank}"


def wait_for_error_reports() -> None:
    """Rank 0, after printing its error: let the ranks that compare theirs read it before this process (which
    serves the store) exits. Returns at once in a world of one, or after ERROR_AGREE_WAIT when others have none."""
    store = _default_store()
    if store is None or env_rank() != 0 or torch.distributed.get_world_size() == 1:
        return
    with contextlib.suppress(Exception):
        _wait_for_keys(store, [_error_key(f"seen/{rank}") for rank in range(1, torch.distributed.get_world_size())])


def announce_failure(message: str) -> None:
    """Leave this rank's failure in the process group's store before the rank exits, so that the ranks whose
    collectives then fail can say why (see `announced_failures`). Best effort: never raises."""
    store = _default_store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.set(_error_key(f"failed/{env_rank()}"), message[:2000])


def announced_failures() -> dict[int, str]:
    """The failures other ranks announced, by rank (empty when none did, or the store is gone with rank 0)."""
    store = _default_store()
    if store is None:
        return {}
    found = {}
    with contextlib.suppress(Exception):
        for rank in range(torch.distributed.get_world_size()):
            key = _error_key(f"failed/{rank}")
            if rank != env_rank() and store.check([key]):
                found[rank] = store.get(key).decode(errors="replace")
    return found


def _error_key(name: Any) -> str:
    return f"finetune/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"  # a restart starts afresh


def _wait_for_keys(store: Any, keys: list[str]) -> bool:
    """Poll (store.wait would log a c10d warning on timeout) until `keys` exist or ERROR_AGREE_WAIT passed."""
    deadline = time.monotonic() + ERROR_AGREE_WAIT.total_seconds()
    while not store.check(keys):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _default_store() -> Any:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:  # no public accessor; torch's own elastic and RPC code use this one
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001
        return None


def _host_key(rank: int) -> str:
    return f"finetune/host/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _record_host(rank: int, world_size: int) -> None:
    """Leave this rank's host name in the store, for a peer that later has to say where a silent rank ran."""
    store = _default_store()
    if store is not None and world_size > 1:
        with contextlib.suppress(Exception):
            store.set(_host_key(rank), socket.gethostname())


# How long the ranks left after a failed collective wait for each other to check in (see silent_ranks).
CHECK_IN_WAIT = timedelta(seconds=5)


def silent_ranks() -> Optional[list[tuple[int, str]]]:
    """After a collective failed: the ranks that do not answer now, with their hosts, or None if unknowable.

    Every rank that is still alive checks in through the store (served by rank 0's process) and waits up to
    CHECK_IN_WAIT for the others; those that never do died or hang (a stopped process, a node cut off). None when
    the store itself does not answer: rank 0's node is the one lost, or this rank is the one cut off."""
    store = _default_store()
    if store is None or torch.distributed.get_world_size() == 1:
        return None
    key = lambda rank: f"finetune/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"  # noqa: E731
    world_size = torch.distributed.get_world_size()
    try:
        store.set_timeout(CHECK_IN_WAIT)  # a frozen rank 0 would hold every store call for the collective timeout
        store.set(key(torch.distributed.get_rank()), "1")
        deadline = time.monotonic() + CHECK_IN_WAIT.total_seconds()
        while time.monotonic() < deadline and not store.check([key(r) for r in range(world_size)]):
            time.sleep(0.1)
        silent = [rank for rank in range(world_size) if not store.check([key(rank)])]
        hosts = {rank: store.get(_host_key(rank)).decode() if store.check([_host_key(rank)]) else "?"
                 for rank in silent}
    except Exception:  # noqa: BLE001 -- the store is gone or does not answer
        return None
    return [(rank, hosts[rank]) for rank in silent]


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank."""
    if not torch.distributed.is_initialized():
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """One entry per rank, in rank order."""
    if not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over ranks (one collective for the whole list)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch, accelerator), to restore on resume."""
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if get_accelerator().device_name() != "cpu":
        state["accelerator"] = get_accelerator().get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["accelerator"])
