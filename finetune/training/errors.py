"""Why training stopped by itself: each error's message says what happened, where the last complete checkpoint is
and what to do (the runner prints it without a traceback and exits with code 3)."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on safely. The message says what happened, where the last complete checkpoint is and
    what to do; the run stops on every rank with a non-zero exit code."""


class NonFiniteLossError(TrainingError):
    """trainer.max_nonfinite_steps consecutive steps had a non-finite loss or gradients (bf16/fp32)."""


class DiskSpaceError(TrainingError):
    """The checkpoint file system has less free space than the next checkpoint needs."""


class RankFailureError(TrainingError):
    """A collective failed: another rank died, or hung past trainer.collective_timeout_s."""


class CheckpointConversionError(TrainingError):
    """DeepSpeed could not convert a checkpoint to its universal form for a relaunch on another layout."""
