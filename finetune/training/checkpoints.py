"""Training checkpoints: DeepSpeed's engine state plus the loop's, committed atomically, pruned, resumed.

A checkpoint counts only once committed (every rank's files written, then a completion marker), so a run killed
while saving resumes from the previous one. The marker also records the layout that wrote the checkpoint and the
model it holds (finetune.training.resume), which a relaunch reads before building anything; a relaunch on another
layout loads a universal copy (finetune.training.universal). (Hugging Face-format weights, for loading and export,
are finetune.model.hf_weights.)
"""
from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from finetune import distributed
from finetune.config import ConfigError
from finetune.distributed import DistInfo, all_gather_objects, barrier, broadcast_object, rng_state, set_rng_state
from finetune.training import checkpoint_trust, faults
from finetune.training.commit import (
    COMPLETE_MARKER,
    checkpoint_complete,
    checksum_mismatches,
    commit_tag_dir,
    fsync_tree,
    read_marker,
    write_atomically,
)
from finetune.training.data_order import DataPosition
from finetune.training.errors import CheckpointConversionError, DiskSpaceError, TrainingError
from finetune.training.resume import RunLayout
from finetune.training.universal import UNIVERSAL_SUFFIX, convert_to_universal

__all__ = ["COMPLETE_MARKER", "CHECKPOINT_TAG", "Checkpointer", "ResumePoint", "checkpoint_complete",
           "commit_tag_dir"]

CHECKPOINT_TAG = re.compile(r"^global_step(\d+)$")
LATEST = "latest"  # DeepSpeed's pointer to the newest checkpoint (read by its tools and by launch/export.py)
SIZE_MARGIN = 1.1  # checkpoints of one run barely vary in size; the margin covers the estimate of the first one


@dataclass(frozen=True)
class ResumePoint:
    """The newest complete checkpoint of a run dir, as its marker describes it (read before the engine exists)."""

    path: Path
    step: int
    layout: Optional[RunLayout]  # None: written before completion markers existed
    model: Optional[dict[str, Any]]  # model_signature; None: written before it was recorded

    @property
    def tag(self) -> str:
        return self.path.name


class Checkpointer:
    """DeepSpeed checkpoints in run_dir/checkpoints/global_step<N>, with the loop state in client_state.

    A save is committed only once every rank's files are written and on stable storage: DeepSpeed writes the
    shards (without touching `latest`), the ranks meet at a barrier, the files and directories are fsynced, then
    rank 0 writes the tag's completion marker (each file's size and checksum, finetune.training.commit) and
    `latest`, each atomically (temp file + os.replace). A tag without the marker is what an interrupted save
    left: resuming ignores it, rank 0 removes it, and the newest complete checkpoint is loaded. A complete tag
    whose files no longer match their checksums is passed over, with a notice, for the one before it. Pruning to
    `keep_last` counts complete checkpoints only and runs after a commit, so it never deletes the only complete
    one, nor the one `latest` names. Before anything unpickles a checkpoint, its files pass a restricted
    unpickler (finetune.training.checkpoint_trust).
    """

    def __init__(self, directory: Path, *, info: DistInfo, keep_last: int, layout: Optional[RunLayout] = None,
                 model: Optional[dict[str, Any]] = None):
        self.directory, self.info, self.keep_last = Path(directory), info, keep_last
        # Recorded in every checkpoint's marker: the layout of this launch and the model it trains.
        self.layout, self.model = layout, model
        self.last_complete: Optional[Path] = None  # the checkpoint a relaunch would resume from (for messages)

    # --- saving ---------------------------------------------------------------------------------------
    def save(self, engine, position: DataPosition) -> None:
        """Write and commit the checkpoint of the engine's current step (a collective: every rank calls it).

        Raises DiskSpaceError, before anything is written, when the file system lacks room for it."""
        step = engine.global_steps
        tag = f"global_step{step}"
        self._check_free_space(engine, tag)
        rng = all_gather_objects(rng_state())  # DeepSpeed writes client_state from rank 0 only
        client_state = {"position": asdict(position), "rng": rng, "world_size": self.info.world_size}
        record: dict[str, Any] = {"global_step": step, "world_size": self.info.world_size}
        if self.layout is not None:
            record["layout"] = self.layout.to_dict()
        if self.model is not None:
            record["model"] = self.model
        if self.info.is_main:
            # What an interrupted save of this step left, or a checkpoint of this step that a resume passed over
            # (damaged): start it clean, and drop its universal copy, which no longer matches.
            for leftover in (self.directory / tag, self.directory / f"{tag}{UNIVERSAL_SUFFIX}"):
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
        barrier()
        faults.raise_if_active("raise_in_save", step=step, rank=self.info.rank)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        faults.kill_if_active("kill_in_save", step=step, rank=self.info.rank)
        barrier()  # every rank's files are written
        # On stable storage before the marker says so: one rank per node flushes what that node wrote. This and
        # the commit grow with the model and the file system, so the others wait without the collective timeout.
        if self.info.local_rank == 0:
            fsync_tree(self.directory / tag)
        distributed.long_barrier()
        if self.info.is_main:
            commit_tag_dir(self.directory / tag, record=record, synced=True)
            write_atomically(self.directory / LATEST, tag)
            self._prune()
        self.last_complete = self.directory / tag
        distributed.long_barrier()

    def _check_free_space(self, engine, tag: str) -> None:
        """Rank 0 compares the expected size with the free space; every rank raises the same error."""
        problem = None
        if self.info.is_main:
            needed, basis = self._expected_size(engine)
            where = next(p for p in (self.directory, *self.directory.parents) if p.exists())
            free = shutil.disk_usage(where).free
            if needed > free:
                problem = (
                    f"Not enough disk space for checkpoint {tag}: it needs about {needed / 2**30:.2f} GiB ({basis}) "
                    f"but the file system of {where} has {free / 2**30:.2f} GiB free. Nothing of it was written; "
                    f"the last complete checkpoint is {self.describe_last_complete()}. Free some space, lower "
                    f"trainer.keep_last (now {self.keep_last}; an old checkpoint is deleted only after a new one is "
                    "complete, so one extra checkpoint must fit), or move the run dir to a larger disk; then "
                    "relaunch with the same hydra.run.dir to resume."
                )
        problem = broadcast_object(problem)
        if problem:
            raise DiskSpaceError(problem)

    def _expected_size(self, engine) -> tuple[int, str]:
        complete = self._complete_tags()
        if complete:
            size = sum(f.stat().st_size for f in complete[-1].rglob("*") if f.is_file())
            return int(size * SIZE_MARGIN), f"the size of {complete[-1].name}"
        params = list(engine.module.parameters())
        numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3 partitions keep their full size here
        weights = sum(n * p.element_size() for n, p in zip(numel, params))
        trainable = sum(n for n, p in zip(numel, params) if p.requires_grad)
        # weights + an fp32 master copy and Adam's two fp32 moments per trainable parameter
        return int((weights + 12 * trainable) * SIZE_MARGIN), f"estimated from {sum(numel):,} parameters"

    def _prune(self) -> None:
        complete = self._complete_tags()
        keep = set(complete[-self.keep_last:])
        latest = self._latest_tag()
        if latest is not None:
            keep.add(self.directory / latest)
        for path in self._tag_dirs():
            if path not in keep:  # older complete ones, and leftovers of interrupted saves
                shutil.rmtree(path, ignore_errors=True)
        for path in self.directory.glob(f"global_step*{UNIVERSAL_SUFFIX}"):  # a universal copy goes with its original
            if (self.directory / path.name.removesuffix(UNIVERSAL_SUFFIX)) not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # --- resuming -------------------------------------------------------------------------------------
    def find_resume_point(self) -> Optional[ResumePoint]:
        """The newest complete checkpoint, read from its marker before any engine exists; None for a fresh run.

        A collective: rank 0 chooses (removes leftovers of interrupted saves, passes over damaged checkpoints,
        checks `latest` and runs the restricted unpickler over the chosen one), and every rank gets the same
        outcome, a resume point or the same error. The others wait without the collective timeout: checking the
        checksums reads the whole checkpoint."""
        outcome: Any = None
        with distributed.main_process_first(self.info):
            if self.info.is_main:
                outcome = _outcome_of(self._choose_verified)
        return _raise_or_return(broadcast_object(outcome))

    def _choose_verified(self) -> Optional[ResumePoint]:
        tag = self._choose_and_clean()
        if tag is None:
            return None
        checkpoint_trust.verify_checkpoint_dir(self.directory / tag)
        return _describe(self.directory / tag)

    def universal_copy(self, point: ResumePoint, *, workers: int = 1) -> str:
        """The tag of `point`'s universal form, converted now by rank 0 (committed, the original kept) unless an
        earlier launch did. A collective: the other ranks wait for it without the collective timeout (a large
        checkpoint converts for minutes). The universal form passes the restricted unpickler before it is used."""
        def convert() -> str:
            tag = convert_to_universal(self.directory, point.tag, workers=workers, log=_notice_line)
            checkpoint_trust.verify_checkpoint_dir(self.directory / tag)
            return tag

        outcome: Any = None
        with distributed.main_process_first(self.info):
            if self.info.is_main:
                outcome = _outcome_of(convert, failure=lambda err: CheckpointConversionError(
                    f"Converting {point.path} failed: {err!r}"))
        return _raise_or_return(broadcast_object(outcome))

    def resume(self, engine, point: ResumePoint, *, seed: int, load_tag: Optional[str] = None) -> DataPosition:
        """Load `point` (or its universal form `load_tag`) into `engine`; returns the data position to go on from.

        RNG states: each rank gets its own back when the world size is the one that wrote the checkpoint, so a
        resumed run continues bit for bit. On another world size the streams cannot continue (another rank
        count draws other dropout masks anyway), so each rank is seeded from (trainer.seed, step, rank): the
        resumed run is reproducible, and no two ranks share a stream."""
        tag = load_tag or point.tag
        groups = [dict(group) for group in engine.basic_optimizer.param_groups] if load_tag is not None else []
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None or client_state is None:
            raise ConfigError(
                f"{self.directory / tag} is marked complete but DeepSpeed could not load it; delete it to resume "
                "from an older checkpoint, delete the directory to start over, or point hydra.run.dir at another run."
            )
        if load_tag is not None:
            _unshare_step_counters(engine)
            _restore_weight_decay(engine, groups)
        saved_world = client_state.get("world_size")
        if saved_world == self.info.world_size:
            set_rng_state(client_state["rng"][self.info.rank])
        else:
            distributed.seed_everything(resume_seed(seed, engine.global_steps, self.info.rank))
            if self.info.is_main:
                _notice(f"written by {saved_world} ranks, resumed on {self.info.world_size}: the random streams "
                        "(dropout) are re-seeded from trainer.seed, the step and the rank")
        self.last_complete = point.path
        position = client_state["position"]
        if "global_batches" not in position:  # written before global batches: micro batches of one rank
            accum = self.layout.grad_accum_steps if self.layout is not None else 1
            position = {"epoch": position["epoch"], "global_batches": position["batches"] // accum}
        return DataPosition(**position)

    def _choose_and_clean(self) -> Optional[str]:
        """Rank 0: the tag to resume from, after setting aside what interrupted saves left."""
        tags = self._tag_dirs()
        if tags and not any((p / COMPLETE_MARKER).exists() for p in tags):
            # Written before completion markers existed: trust `latest` as DeepSpeed did, once it names one of
            # this dir's checkpoints; delete nothing.
            latest = self._latest_tag()
            if latest is not None and not self._names_a_tag(latest):
                raise ConfigError(
                    f"{self.directory / LATEST} names {latest[:80]!r}, which is not a checkpoint of this run dir "
                    f"(expected global_step<N>, a directory in {self.directory}), and none of its checkpoints has a "
                    f"{COMPLETE_MARKER} to choose by. Write the tag to resume from into it, or delete it to start "
                    "over; nothing was loaded or changed."
                )
            return latest
        complete = self._complete_tags()
        chosen = None
        for candidate in reversed(complete):  # newest first: the first whose bytes are those committed
            damaged = checksum_mismatches(candidate)
            if not damaged:
                chosen = candidate
                break
            _notice(f"passing over {candidate}: {', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''} "
                    f"differ(s) from the checksums in its {COMPLETE_MARKER}, so it is damaged (a crash, a bad disk "
                    "or a partial copy); falling back to the complete checkpoint before it")
        for path in tags:
            if path == chosen:
                continue
            if not (path / COMPLETE_MARKER).exists():
                if chosen is None or _step_of(path) > _step_of(chosen):
                    _notice(f"removing {path}: its save was interrupted (no completion marker), so it is incomplete")
                    shutil.rmtree(path, ignore_errors=True)
            elif path not in complete:
                _notice(f"ignoring {path}: files listed in its {COMPLETE_MARKER} are missing or have another size")
        latest = self._latest_tag()
        if latest is not None and not self._names_a_tag(latest):
            _notice(f"ignoring {self.directory / LATEST}: it names {latest[:80]!r}, not a checkpoint of this dir; "
                    "the completion markers decide")
        if chosen is None:
            return None
        if latest != chosen.name:  # a kill between the marker and `latest`, a damaged newer tag, a bad `latest`
            write_atomically(self.directory / LATEST, chosen.name)
        return chosen.name

    # --- inspection -----------------------------------------------------------------------------------
    def _tag_dirs(self) -> list[Path]:
        """The checkpoint directories of this run dir: real directories (a symlink could lead anywhere)."""
        if not self.directory.is_dir():
            return []
        tags = [p for p in self.directory.iterdir()
                if CHECKPOINT_TAG.match(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(tags, key=_step_of)

    def _names_a_tag(self, name: str) -> bool:
        """Whether `name` (the content of `latest`) is one of this dir's checkpoint directories."""
        return bool(CHECKPOINT_TAG.match(name)) and (self.directory / name) in self._tag_dirs()

    def _complete_tags(self) -> list[Path]:
        """Committed checkpoints whose files are all there, oldest first."""
        return [p for p in self._tag_dirs() if checkpoint_complete(p)]

    def _latest_tag(self) -> Optional[str]:
        latest = self.directory / LATEST
        if not latest.is_file():
            return None
        return latest.read_bytes()[:4096].decode("utf-8", errors="replace").strip()

    def describe_last_complete(self) -> str:
        """The checkpoint a relaunch would resume from, for messages."""
        last = self.last_complete or next(iter(reversed(self._complete_tags())), None)
        return str(last) if last is not None else "none (the run would start over)"


def _outcome_of(work, *, failure=None) -> Any:
    """Rank 0's result of `work()`, or the error every rank is to raise (user and training errors as they are;
    anything else wrapped by `failure`, else re-raised): the others must not wait for a collective timeout."""
    try:
        return work()
    except (ConfigError, TrainingError) as err:
        return err
    except Exception as err:  # noqa: BLE001 -- every rank must stop, not wait for rank 0 forever
        if failure is None:
            return ConfigError(f"Reading the checkpoints failed on rank 0: {err!r}. Nothing was loaded or changed.")
        return failure(err)


def _raise_or_return(outcome: Any) -> Any:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _describe(tag_dir: Path) -> ResumePoint:
    """A complete checkpoint as its marker describes it (a checkpoint without one: layout and model unknown)."""
    marker = read_marker(tag_dir) or {}
    layout = marker.get("layout") or ({"world_size": marker["world_size"]} if "world_size" in marker else None)
    return ResumePoint(path=tag_dir, step=_step_of(tag_dir), layout=RunLayout.from_dict(layout) if layout else None,
                       model=marker.get("model"))


def _unshare_step_counters(engine) -> None:
    """Give each parameter group's optimizer state a `step` tensor of its own after a universal load.

    DeepSpeed's ZeRO-3 universal loader (0.19) assigns one and the same `step` tensor to every sub-group's state,
    and torch's Adam increments it in place once per group: with two groups (weights with weight decay, biases
    and norms without) the step count would then advance twice per step, and Adam's bias correction with it."""
    seen: set[int] = set()
    for state in getattr(engine.basic_optimizer, "state", {}).values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _restore_weight_decay(engine, groups: list[dict[str, Any]]) -> None:
    """Put back each parameter group's weight decay after a universal load.

    DeepSpeed's ZeRO-3 universal loader (0.19) copies the hyper-parameters of the checkpoint's first group onto
    every group, so the biases and norms (group 2, no decay) would be decayed like the weights. The rest it sets
    is the same in every group (betas, eps, and lr, which the schedule sets)."""
    for group, before in zip(engine.basic_optimizer.param_groups, groups):
        if "weight_decay" in before:
            group["weight_decay"] = before["weight_decay"]


def resume_seed(seed: int, step: int, rank: int) -> int:
    """A seed for `rank` resuming at `step` on another world size: well mixed, distinct per rank."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _step_of(tag_dir: Path) -> int:
    return int(CHECKPOINT_TAG.match(tag_dir.name).group(1))


def _notice(message: str) -> None:
    print(f"Checkpoints: {message}", flush=True)


def _notice_line(message: str) -> None:
    print(message, flush=True)
