"""Committing a checkpoint directory: its files on stable storage, then a completion marker that lists them.

The marker (`complete.json`) is written last and atomically. It lists every file with its size (checked whenever
the checkpoints are listed: cheap) and an xxHash3-128 checksum (checked before a checkpoint is resumed: it reads
every byte). Before the marker is written, the files and their directories are fsynced, so that after a machine
crash a checkpoint marked complete holds what was written, not zeros or a truncated shard.

The checksums detect damage (a torn write, a bad disk, a partial copy), not tampering: whoever can write the files
can rewrite the marker too. What keeps a tampered file from running code is finetune.training.checkpoint_trust.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional

COMPLETE_MARKER = "complete.json"  # in a tag dir: written last, it makes the checkpoint count
CHECKSUM = "xxh3_128"  # ~5 GB/s per core: the disk, not the hash, bounds the time (BENCHMARKS.md)
_READ_CHUNK = 16 * 2**20


def file_checksum(path: Path) -> str:
    """`xxh3_128:<hex>` of the file's bytes."""
    import xxhash

    digest = xxhash.xxh3_128()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            read = handle.readinto(buffer)
            if not read:
                break
            digest.update(view[:read])
    return f"{CHECKSUM}:{digest.hexdigest()}"


def checksums(directory: Path, names: Iterable[str], *, workers: Optional[int] = None) -> dict[str, str]:
    """The checksum of each file `names` (relative to `directory`), hashed by a few threads (the hash releases the
    GIL, so several files are read and hashed at once: a checkpoint is one file per rank and kind)."""
    names = list(names)
    workers = workers or max(1, min(8, os.cpu_count() or 1, len(names)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(lambda name: file_checksum(directory / name), names)))


def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, every directory below it, itself and its parent (the entry naming it)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    for path in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync(path)
    _fsync(directory)
    _fsync(directory.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listed_files(tag_dir: Path) -> list[str]:
    """Every file below `tag_dir` but the marker, relative, sorted."""
    return [str(f.relative_to(tag_dir)) for f in sorted(tag_dir.rglob("*"))
            if f.is_file() and f.name != COMPLETE_MARKER]


def commit_tag_dir(tag_dir: Path, *, record: dict[str, Any], synced: bool = False) -> None:
    """Mark `tag_dir` complete: fsync its files (unless `synced`: the caller did), then write its marker listing
    every file with its size and checksum, plus `record` (step, layout, model)."""
    if not synced:
        fsync_tree(tag_dir)
    names = listed_files(tag_dir)
    files = {name: (tag_dir / name).stat().st_size for name in names}
    marker = {**record, "files": files, "checksums": checksums(tag_dir, names)}
    write_atomically(tag_dir / COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")


def read_marker(tag_dir: Path) -> Optional[dict[str, Any]]:
    try:
        marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def checkpoint_complete(tag_dir: Path) -> bool:
    """Whether `tag_dir` was committed and every file its marker lists has the size it had then (cheap: no read)."""
    marker = read_marker(tag_dir)
    try:
        files = marker["files"]  # type: ignore[index]
        return all(_inside(name) and (tag_dir / name).is_file() and (tag_dir / name).stat().st_size == size
                   for name, size in files.items())
    except (KeyError, TypeError, AttributeError, OSError, ValueError):
        return False


def checksum_mismatches(tag_dir: Path) -> list[str]:
    """The files of a complete `tag_dir` whose bytes differ from the checksum in its marker (reads every byte).
    A marker written before checksums were recorded has nothing to compare: []."""
    recorded = (read_marker(tag_dir) or {}).get("checksums") or {}
    outside = [name for name in recorded if not _inside(name)]
    actual = checksums(tag_dir, [name for name in recorded if name not in outside])
    return outside + [name for name in actual if actual[name] != recorded[name]]


def _inside(name: str) -> bool:
    """Whether a marker's file name stays inside its tag dir (a damaged or forged marker could say otherwise)."""
    return isinstance(name, str) and not os.path.isabs(name) and ".." not in Path(name).parts


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part (rename is atomic on POSIX file systems); the new
    content and its directory entry are on stable storage when this returns."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)
