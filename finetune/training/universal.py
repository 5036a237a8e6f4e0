"""DeepSpeed's universal checkpoint: a ZeRO checkpoint re-partitionable for another world size.

A ZeRO checkpoint holds each rank's partition of the fp32 weights and optimizer states, so DeepSpeed's loader
accepts it only on the data-parallel world size that wrote it. `deepspeed.checkpoint.ds_to_universal` rewrites
it as one file per parameter and state (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), which an engine created with
`"checkpoint": {"load_universal": true}` partitions for its own world size (ZeRO stages 1-3, CPU offload included).

Here the conversion runs once, on rank 0, in a child process (its memory is returned at exit), into a staging
directory next to the checkpoints; it is committed like every checkpoint (completion marker, then an atomic
rename to `global_step<N>_universal`), so a conversion killed half-way is redone at the next launch and never
mistaken for a complete one. The original checkpoint is kept; the universal copy is pruned with it.

What DeepSpeed's universal form leaves out: parameters the optimizer does not hold (frozen ones, such as a LoRA
run's base weights). They never change during training, so the rebuilt model already has them (from model.path,
or the seeded random init), as the resumed run's model signature check makes sure of the shapes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from finetune.training.commit import COMPLETE_MARKER, checkpoint_complete, commit_tag_dir
from finetune.training.errors import CheckpointConversionError, DiskSpaceError

UNIVERSAL_SUFFIX = "_universal"
STAGING = ".universal-staging"  # in the checkpoints dir, removed after each conversion
# The extraction writes every fragment before merging them: about twice the optimizer states at the peak.
SPACE_FACTOR = 2.2


# A hung conversion (a stalled file system, a stuck worker) must end with an error, not keep every rank waiting;
# a healthy one converts at well over 100 MB/s, so this bound leaves a wide margin.
CONVERSION_SECONDS_PER_GIB = 120.0
MIN_CONVERSION_TIMEOUT_S = 1800.0


def conversion_timeout_s(checkpoint_bytes: int) -> float:
    return max(MIN_CONVERSION_TIMEOUT_S, CONVERSION_SECONDS_PER_GIB * checkpoint_bytes / 2**30)


def universal_tag(tag: str) -> str:
    return f"{tag}{UNIVERSAL_SUFFIX}"


def convert_to_universal(checkpoints: Path, tag: str, *, workers: int = 1, log=print) -> str:
    """Rank 0: `checkpoints/tag` in universal form as `checkpoints/<tag>_universal`, committed; returns its tag.

    A committed earlier conversion is reused. Raises DiskSpaceError before starting when the file system lacks
    room, CheckpointConversionError (with DeepSpeed's output) when the conversion fails; the original is untouched
    either way."""
    source, target = checkpoints / tag, checkpoints / universal_tag(tag)
    if checkpoint_complete(target):
        log(f"Checkpoints: using {target}, the universal form of {tag} converted at an earlier launch.")
        return target.name
    staging_root = checkpoints / STAGING
    shutil.rmtree(staging_root, ignore_errors=True)  # what a killed conversion left
    shutil.rmtree(target, ignore_errors=True)  # renamed into place but not committed: cannot happen, but be sure
    size = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
    free = shutil.disk_usage(checkpoints).free
    if size * SPACE_FACTOR > free:
        raise DiskSpaceError(
            f"Converting {source} ({size / 2**30:.2f} GiB) to DeepSpeed's universal form needs about "
            f"{size * SPACE_FACTOR / 2**30:.2f} GiB free, and the file system of {checkpoints} has "
            f"{free / 2**30:.2f} GiB. Free some space (older run dirs, or trainer.keep_last), or relaunch on the "
            "number of ranks that wrote the checkpoint, which needs no conversion; nothing was changed."
        )
    timeout_s = conversion_timeout_s(size)
    staging = staging_root / target.name
    staging_root.mkdir(parents=True)
    log(f"Checkpoints: converting {source} to DeepSpeed's universal form for this world size "
        f"({size / 2**30:.2f} GiB; the original is kept) ...")
    started = time.perf_counter()
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(staging), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(max(1, workers // 2)), "--inject_missing_state"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:  # subprocess.run kills it
        shutil.rmtree(staging_root, ignore_errors=True)
        raise CheckpointConversionError(
            f"DeepSpeed's conversion of {source} to its universal form did not finish within {timeout_s:.0f} s "
            f"({size / 2**30:.2f} GiB) and was stopped. The checkpoint is unchanged. Relaunch on the number of ranks "
            "that wrote it to resume without a conversion, or, if the file system is just slow, relaunch (the "
            f"limit scales with the checkpoint: {CONVERSION_SECONDS_PER_GIB:.0f} s per GiB, at least "
            f"{MIN_CONVERSION_TIMEOUT_S:.0f} s)."
        ) from None
    if proc.returncode != 0 or not (staging / "zero").is_dir():
        output = (proc.stdout + proc.stderr).strip().splitlines()
        shutil.rmtree(staging_root, ignore_errors=True)
        raise CheckpointConversionError(
            f"DeepSpeed could not convert {source} to its universal form (exit code {proc.returncode}): "
            f"{' | '.join(output[-6:])}. The checkpoint is unchanged; relaunch on the number of ranks that wrote it "
            "to resume without a conversion."
        )
    # ds_to_universal points a `latest_universal` file in the staging root at its output: not ours to keep.
    commit_tag_dir(staging, record={"universal_of": tag})
    os.replace(staging, target)
    shutil.rmtree(staging_root, ignore_errors=True)
    log(f"Checkpoints: {target} written in {time.perf_counter() - started:.1f} s.")
    return target.name


def is_universal(tag_dir: Path) -> bool:
    return tag_dir.name.endswith(UNIVERSAL_SUFFIX) and (tag_dir / COMPLETE_MARKER).is_file()
