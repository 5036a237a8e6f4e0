"""What the checkpoint durability work costs per GB: fsync of freshly written shards, and the checksums recorded
in complete.json at each save and checked before each resume (finetune/training/commit.py).

    python bench/checkpoint_checksums.py --dir /path/on/the/checkpoint/disk --gib 2 --files 4

Writes `--files` files of `--gib` GiB in total into `--dir` (removed afterwards), then times:
  fsync      fsync of the just-written files (what a save adds before its marker: the page cache written out)
  xxh3_128   the checksums as a save/resume computes them (finetune.training.commit.checksums: a thread per file)
  xxh3 1 th  the same on one thread
  sha256     hashlib's sha256 on one thread, for comparison (a cryptographic hash, not used)
The files are in the page cache when hashed (just written), so the hash figures are the CPU cost; reading from
disk on a resume is bounded by the disk instead (a checkpoint disk reads at 0.5-3 GB/s, below xxh3's speed).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.training.commit import checksums, file_checksum, fsync_tree  # noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(16 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="a directory on the disk to measure")
    parser.add_argument("--gib", type=float, default=2.0, help="total size of the files")
    parser.add_argument("--files", type=int, default=4, help="files (a checkpoint has one per rank and kind)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="checksum-bench-", dir=args.dir))
    try:
        size = int(args.gib * 2**30 / args.files)
        block = os.urandom(16 * 2**20)
        names = []
        for i in range(args.files):
            name = f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt"
            with open(work / name, "wb") as handle:
                for _ in range(size // len(block)):
                    handle.write(block)
            names.append(name)
        gb = size // len(block) * len(block) * args.files / 1e9
        results = {
            "fsync": timed(lambda: fsync_tree(work)),
            f"xxh3_128 ({min(8, os.cpu_count() or 1, args.files)} threads)": timed(lambda: checksums(work, names)),
            "xxh3_128 (1 thread)": timed(lambda: [file_checksum(work / n) for n in names]),
            "sha256 (1 thread)": timed(lambda: [sha256_file(work / n) for n in names]),
        }
        print(f"{gb:.2f} GB in {args.files} files under {args.dir}, {os.cpu_count()} CPUs")
        print(f"{'what':<28} {'s':>7} {'s per GB':>9} {'GB/s':>7}")
        for what, seconds in results.items():
            print(f"{what:<28} {seconds:7.2f} {seconds / gb:9.3f} {gb / seconds:7.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
