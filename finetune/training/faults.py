"""Fault injection for tests (test-only): make a rank die, or its loss turn NaN, at a named point of the loop.

Tests of the recovery paths need failures at exact places: a rank killed in the middle of a step, a save
interrupted before it is committed, a non-finite loss. The environment variable FINETUNE_FAULT lists them,
comma-separated, each `<point>[@<step>[+]][:rank<r>]`:

    kill_in_step@5:rank1    rank 1 kills itself (SIGKILL, like `kill -9`) in step 5, after the backward pass of the
                            step's first micro batch and before the optimizer step
    kill_in_save@4          every rank kills itself once its shards of the step-4 checkpoint are written,
                            before the checkpoint is committed (marked complete and named `latest`)
    nan_loss@9+:rank1       rank 1's loss is NaN from step 9 on (`@9` alone: in step 9 only)

    raise_in_save@4:rank1   rank 1 raises a RuntimeError as it starts saving the step-4 checkpoint (before its
                            shards are written), while the other ranks go on into the save
    wait_in_step@3          every rank waits at the start of step 3 until the file FINETUNE_FAULT_RELEASE names
                            exists (at most 10 minutes): a run held in the middle while a test does something beside it

No step: every step; no rank: every rank. Unset (always, outside tests), a check is one dict lookup.

FINETUNE_FAULT is honoured only together with the test switch FINETUNE_FAULT_INJECTION=1, which the test fixtures
set: a FINETUNE_FAULT left in a user's environment (copied from a test, a stale export) cannot kill a real run.
Without the switch it is ignored, with a warning.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

ENV = "FINETUNE_FAULT"
SWITCH = "FINETUNE_FAULT_INJECTION"  # must be "1" for ENV to count
RELEASE_ENV = "FINETUNE_FAULT_RELEASE"
POINTS = ("kill_in_step", "kill_in_save", "nan_loss", "raise_in_save", "wait_in_step")
WAIT_LIMIT_S = 600
_SPEC = re.compile(r"^(?P<point>\w+?)(?:@(?P<step>\d+)(?P<onward>\+)?)?(?::rank(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    point: str
    step: Optional[int] = None  # None: every step
    onward: bool = False  # step and every later one
    rank: Optional[int] = None  # None: every rank

    def matches(self, point: str, step: int, rank: int) -> bool:
        if point != self.point or (self.rank is not None and rank != self.rank):
            return False
        return self.step is None or step == self.step or (self.onward and step > self.step)


@functools.lru_cache(maxsize=4)
def parse(spec: str) -> tuple[Fault, ...]:
    """The faults of a FINETUNE_FAULT value; a typo raises instead of silently injecting nothing."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _SPEC.match(item)
        if match is None or match["point"] not in POINTS:
            raise ValueError(
                f"{ENV}={spec!r}: cannot read {item!r}; write <point>[@<step>[+]][:rank<r>] with a point out of "
                f"{', '.join(POINTS)}, e.g. kill_in_step@5:rank1."
            )
        faults.append(Fault(match["point"], int(match["step"]) if match["step"] else None, bool(match["onward"]),
                            int(match["rank"]) if match["rank"] else None))
    return tuple(faults)


def active(point: str, *, step: int, rank: int) -> bool:
    """Whether FINETUNE_FAULT asks for `point` at this step on this rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    if os.environ.get(SWITCH) != "1":
        _warn_ignored(spec)
        return False
    return any(fault.matches(point, step, rank) for fault in parse(spec))


@functools.lru_cache(maxsize=1)
def _warn_ignored(spec: str) -> None:
    print(f"warning: {ENV}={spec!r} is ignored: fault injection is for the project's tests, which also set "
          f"{SWITCH}=1. Unset {ENV} to silence this.", file=sys.stderr, flush=True)


class InjectedFault(RuntimeError):
    """The error `raise_if_active` raises: an unexpected failure of one rank, for the tests of the error paths."""


def raise_if_active(point: str, *, step: int, rank: int) -> None:
    """Raise InjectedFault on this rank when `point` is asked for here."""
    if active(point, step=step, rank=rank):
        print(f"{ENV}: {point} raising on rank {rank} at step {step}, t={time.time():.3f}", file=sys.stderr,
              flush=True)
        raise InjectedFault(f"{ENV}: {point} at step {step} on rank {rank}")


def kill_if_active(point: str, *, step: int, rank: int) -> None:
    """SIGKILL this process (no cleanup, no flush: a crash as `kill -9` makes it) when `point` is asked for here."""
    if active(point, step=step, rank=rank):
        # The test measures how long the job takes to go down from this moment.
        print(f"{ENV}: {point} killing rank {rank} at step {step}, t={time.time():.3f}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def wait_if_active(point: str, *, step: int, rank: int) -> None:
    """Sleep until the file FINETUNE_FAULT_RELEASE names exists (or WAIT_LIMIT_S passed) when `point` is asked for."""
    if not active(point, step=step, rank=rank):
        return
    release = os.environ.get(RELEASE_ENV, "")
    print(f"{ENV}: {point} waiting on rank {rank} at step {step} for {release}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + WAIT_LIMIT_S
    while release and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.2)
