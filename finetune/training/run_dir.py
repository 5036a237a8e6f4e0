"""One run per run dir, and only the user's: an exclusive lock for the launch, and the permission check.

Two launches in one run dir would delete each other's checkpoints, clear each other's NVMe swap files and
truncate each other's metrics.jsonl. So rank 0 holds an exclusive `flock` on `<run dir>/.lock` from before the
run touches anything until it ends, with a record of the holder (host, pid, SLURM job id, start time) in the
file. A second launch is refused with a message naming the holder. The kernel drops the lock when its holder dies
(however it dies), so a later launch simply takes it, with a notice naming the launch before. A lock still held
by a process that is gone (a forked data loader worker that outlived its parent, a node lost with its NFS lock)
is stale when the record's pid is dead on this host, or when its SLURM job is the current job (a requeue of it)
or has finished; it is then broken (the file replaced) with a notice.

Whoever can write into a run dir can make the next launch resume their checkpoint (docs/security.md): a run dir
must be the user's and writable by the user alone, unless trainer.allow_shared_run_dir=true.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from finetune.config import ConfigError

LOCK_FILE = ".lock"
SQUEUE_TIMEOUT_S = 20


class RunDirInUseError(ConfigError):
    """Another live launch holds the run dir's lock."""


class RunDirPermissionError(ConfigError):
    """The run dir is not the user's, or others can write into it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job_id: Optional[str] = None
    started: Optional[str] = None  # for the messages
    pid_started: Optional[float] = None  # the process's start time: a reused pid is another process

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(host=socket.gethostname(), pid=os.getpid(), slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                   started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), pid_started=_process_start(os.getpid()))

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started or '?'}"


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 -- gone, or no psutil: the pid alone decides
        return None


def stale_reason(holder: Holder, *, host: Optional[str] = None, job_id: Optional[str] = None,
                 job_finished: Optional[Callable[[str], Optional[bool]]] = None) -> Optional[str]:
    """Why the launch `holder` no longer runs, or None when it may still run (or this cannot be told).

    `host`/`job_id`: this process's (defaults: the real ones); `job_finished(job_id)`: True/False, None unknown
    (default: asks squeue)."""
    host = socket.gethostname() if host is None else host
    job_id = os.environ.get("SLURM_JOB_ID") if job_id is None else job_id
    if holder.slurm_job_id and job_id and holder.slurm_job_id == job_id:
        # SLURM runs one instance of a job at a time: this is the same job, requeued (or restarted).
        return f"it was SLURM job {job_id}, which this launch is a restart of"
    if holder.host == host:
        if not _pid_alive(holder.pid):
            return f"pid {holder.pid} is no longer running on {host}"
        started = _process_start(holder.pid)
        if holder.pid_started is not None and started is not None and abs(started - holder.pid_started) > 1:
            return f"pid {holder.pid} on {host} is now another process"
    if holder.slurm_job_id:
        finished = (job_finished or slurm_job_finished)(holder.slurm_job_id)
        if finished:
            return f"its SLURM job {holder.slurm_job_id} has ended"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def slurm_job_finished(job_id: str) -> Optional[bool]:
    """Whether SLURM no longer runs `job_id` (squeue lists pending and running jobs only); None: cannot tell."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=SQUEUE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # squeue errors with "Invalid job id specified" once a job has left its memory
        return True if "invalid job id" in result.stderr.lower() else None
    state = result.stdout.strip()
    return state == "" or state in {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                                    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class RunDirLock:
    """The exclusive lock of one run dir, held by this process from `acquire` to `release` (or its exit)."""

    def __init__(self, run_dir: Path, *, notice: Callable[[str], None] = print,
                 stale: Callable[[Holder], Optional[str]] = stale_reason):
        self.path = Path(run_dir) / LOCK_FILE
        self.notice, self.stale = notice, stale
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirInUseError naming its live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another launch may replace a stale file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ConfigError(
                        f"Cannot lock the run dir {self.path.parent} ({err.strerror} on {self.path}): its file "
                        "system does not support file locks (flock), which keep two launches out of one run dir. "
                        "Put the run dir (hydra.run.dir) on a file system that does (local disk, NFSv4, Lustre "
                        "mounted with -o flock)."
                    ) from None
                self._held_by_another()
                continue
            if not _same_file(fd, self.path):  # replaced by a launch that broke it: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            self._take_over(fd)
            return
        raise RunDirInUseError(f"Could not lock the run dir {self.path.parent}: another launch keeps replacing "
                               f"{self.path}. Launch once, into one run dir (hydra.run.dir).")

    def _held_by_another(self) -> None:
        """The lock is held: refuse, unless its holder is gone (then break it: replace the file)."""
        holder = _read_holder(self.path)
        reason = self.stale(holder) if holder is not None else None
        if reason is None:
            who = holder.describe() if holder is not None else "another process (no record of which)"
            raise RunDirInUseError(
                f"The run dir {self.path.parent} is in use by another launch: {who}. Two launches in one run dir "
                "would delete each other's checkpoints and metrics, so this one stops here, before touching "
                "anything. Wait for that run to end (relaunching then resumes it), or give this launch its own "
                f"hydra.run.dir. If that process is gone for sure, delete {self.path} and relaunch."
            )
        self.notice(f"Run dir lock: breaking the lock left by {holder.describe()}: {reason}.")
        replacement = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
        os.close(os.open(replacement, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
        os.replace(replacement, self.path)

    def _take_over(self, fd: int) -> None:
        previous = _read_holder(self.path)
        me = Holder.this_process()
        if previous is not None and (previous.host, previous.pid) != (me.host, me.pid):
            self.notice(f"Run dir lock: taken over from the launch before, {previous.describe()}, which ended.")
        record = (json.dumps(asdict(me)) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)

    def release(self) -> None:
        """Drop the lock; the record stays (the next launch names this one in its notice)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(path: Path) -> Optional[Holder]:
    try:
        record = json.loads(path.read_text() or "null")
        return Holder(**record) if isinstance(record, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def permission_problem(run_dir: Path, *, uid: Optional[int] = None) -> Optional[str]:
    """Why others could change what this run loads from `run_dir` (not the user's, or writable by group or
    others), or None. Checks the run dir and its checkpoints/ (the files a relaunch unpickles)."""
    uid = os.getuid() if uid is None else uid
    for path in (run_dir, run_dir / "checkpoints"):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            info = os.stat(path)
        if info.st_uid != uid:
            return f"{path} belongs to uid {info.st_uid}, not to you (uid {uid})"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = "its group and others" if info.st_mode & stat.S_IWOTH and info.st_mode & stat.S_IWGRP else (
                "others" if info.st_mode & stat.S_IWOTH else "its group")
            return f"{path} is writable by {who} (mode {stat.filemode(info.st_mode)})"
    return None


def check_permissions(run_dir: Path, *, allow_shared: bool, notice: Callable[[str], None] = print) -> None:
    """Refuse (RunDirPermissionError) a run dir others could write into, unless `allow_shared` (then warn).

    A new run dir of the user's (no checkpoints yet) that a umask of 002 made group-writable is tightened instead:
    nothing in it can have been planted for a resume yet."""
    info = os.stat(run_dir)
    fresh = not (run_dir / "checkpoints").exists()
    if fresh and not allow_shared and info.st_uid == os.getuid() and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(run_dir, stat.S_IMODE(info.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        notice(f"Run dir {run_dir}: removed the group/other write permission a umask gave it (docs/security.md).")
    problem = permission_problem(run_dir)
    if problem is None:
        return
    if allow_shared:
        notice(f"warning: {problem}. trainer.allow_shared_run_dir=true: going on, but whoever can write there can "
               "make this run load (and run) their files; see docs/security.md.")
        return
    raise RunDirPermissionError(
        f"Refusing the run dir {run_dir}: {problem}. A relaunch resumes whatever checkpoint it finds there, so "
        "anyone who can write into it decides what this run loads. Make it yours alone (chmod go-w "
        f"{run_dir} {run_dir / 'checkpoints'}), choose another hydra.run.dir, or, if you trust everyone who can "
        "write there, set trainer.allow_shared_run_dir=true."
    )
