"""Writing output files safely: atomic replacement, permissions without touching the process umask, private outputs.

Torch-free and dependency-free, so every floor (model I/O, tools, the runner) can use it.

- `atomic_write_text`: a reader (or a crash) sees the old content or the new one, never a mix or an empty file.
- `swap_into_place`: publish a finished staging directory as `target` (its files fsynced first), replacing what
  was there with no moment at which neither exists under `target` (Linux renameat2 RENAME_EXCHANGE; elsewhere
  rename aside, then in).
- `new_file_mode`: the mode a new file gets here (umask and default ACLs applied), found by creating one:
  `os.umask` can only be read by setting it, and setting it process-wide races with other threads' file creation.
- Private outputs (`make_private`): files 0600, directories 0700, for shared nodes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path

PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700


def new_file_mode(directory: str | Path) -> int:
    """Permission bits a file created in `directory` gets (0o666 less the umask, or what default ACLs say)."""
    probe = Path(directory) / f".mode-probe-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def make_private(path: str | Path) -> None:
    """chmod `path` (a file, or a directory and everything below it) to 0600 files / 0700 directories."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        if not path.is_symlink():
            path.chmod(PRIVATE_FILE_MODE)
        return
    path.chmod(PRIVATE_DIR_MODE)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), PRIVATE_DIR_MODE)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), PRIVATE_FILE_MODE)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new entry in `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file and directory below `directory` (before a rename publishes them: after a machine crash a
    renamed-in file whose data was never written back would read as zeros)."""
    for root, dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(root)


def atomic_write_text(path: str | Path, text: str, *, private: bool = False) -> Path:
    """Write `text` to `path` through a temporary file in the same directory: fsync, then rename over `path`.

    The new file keeps the mode an existing `path` had (else that of any new file), or 0600 with `private`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    mode = PRIVATE_FILE_MODE if private else (path.stat().st_mode & 0o777 if path.is_file() else None)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# --- publishing a directory -------------------------------------------------------------------------
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the entries `a` and `b` (Linux >= 3.15, glibc >= 2.28); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_into_place(staging: str | Path, target: str | Path) -> None:
    """Publish the finished directory `staging` as `target` (same parent), then delete what `target` held.

    At every moment `target` is the old output or the new one: the two are exchanged in one system call where the
    file system allows, else the old one is renamed aside and the new one in (a crash between the two leaves the
    old output complete under `.<name>.old-*`), and if the second rename fails the old one is put back.
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists() and not target.is_symlink():
        staging.rename(target)
        fsync_dir(target.parent)
        return
    if _exchange(staging, target):
        old = staging  # now holds the previous output
    else:
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            old.rename(target)
            raise
    fsync_dir(target.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
