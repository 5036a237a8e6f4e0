"""Checkpoints run no code: every pickle file of a checkpoint passes a restricted unpickler before anything else
(DeepSpeed's loaders, its universal conversion, export) unpickles it without restriction.

DeepSpeed loads its checkpoint files with `torch.load(..., weights_only=False)`: a file holding an object whose
`__reduce__` calls `os.system` would run that call as the training user on every rank. Here each `*.pt` file of a
checkpoint is first read with torch's `weights_only=True` unpickler, which builds tensors, containers and plain
values only, plus the classes of TRUSTED_GLOBALS: exactly those DeepSpeed and this project write into ZeRO-0/2/3,
CPU/NVMe-offload and universal checkpoints (found with torch.serialization.get_unsafe_globals_in_checkpoint on
real ones; tests/unit/training/test_checkpoint_trust.py keeps the list honest). A file that needs anything else,
or that is not a torch file at all, is refused with UntrustedCheckpointError before any of it is unpickled for
real. With `mmap=True` the check reads the pickled structure, not the tensor data: seconds for a 6B checkpoint.

Call `verify_checkpoint_dir(tag_dir)` before handing a checkpoint directory to DeepSpeed (finetune.training.
checkpoints does on resume and before a universal conversion; export should too), and `load_restricted` to read
a checkpoint file yourself.
"""
from __future__ import annotations

import functools
import pickle
import re
from pathlib import Path
from typing import Any, Optional

from finetune.config import ConfigError

PICKLE_SUFFIX = ".pt"  # every file DeepSpeed unpickles from a checkpoint dir (NVMe swap files are raw tensors)


class UntrustedCheckpointError(ConfigError):
    """A checkpoint file would need more than tensors and DeepSpeed's own types to load: refused, nothing run."""


@functools.lru_cache(maxsize=1)
def trusted_globals() -> tuple[Any, ...]:
    """The classes and functions beyond torch's weights_only defaults that DeepSpeed's and this project's
    checkpoints hold (imported lazily: DeepSpeed is slow to import)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; pickles name either, by version
    reconstruct = numpy_core.multiarray._reconstruct
    allowed: list[Any] = [
        # client_state["rng"]: numpy's RNG state is a tuple holding an ndarray of uint32
        reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray, np.dtype, type(np.dtype(np.uint32)),
        # ZeRO optimizer states: the stage, the fp16 loss scaler, the slice of each parameter a rank holds
        ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
    ]
    return tuple(allowed)


def load_restricted(path: Path, **kwargs: Any) -> Any:
    """torch.load of a checkpoint file with the restricted unpickler (weights_only=True + TRUSTED globals)."""
    import torch

    with torch.serialization.safe_globals(list(trusted_globals())):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def file_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be unpickled safely, or None: it loads with the restricted unpickler."""
    try:
        try:
            load_restricted(path, mmap=True)  # the structure only: tensor data stays on disk
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            load_restricted(path)  # the pre-zip format cannot be memory-mapped
    except pickle.UnpicklingError as err:
        # torch's message says how to allowlist the global, which is not the advice to give here: name it only
        needed = re.search(r"GLOBAL ([\w.]+)", str(err))
        if needed:
            return f"it needs {needed.group(1)}, which the restricted unpickler does not allow"
        reason = re.search(r"(Unsupported [^\n.]*)", str(err))
        return reason.group(1) if reason else "the restricted unpickler refuses it"
    except Exception as err:  # noqa: BLE001 -- whatever the reason, it is not a file we can vouch for
        return f"not a readable torch file ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    return None


def verify_checkpoint_dir(tag_dir: Path) -> None:
    """Raise UntrustedCheckpointError unless every pickle file below `tag_dir` loads with the restricted
    unpickler. Rank 0 calls it (the other ranks get its outcome), before any unrestricted load of the checkpoint."""
    tag_dir = Path(tag_dir)
    for path in sorted(tag_dir.rglob(f"*{PICKLE_SUFFIX}")):
        problem = file_problem(path)
        if problem is not None:
            raise UntrustedCheckpointError(
                f"Refusing to load checkpoint {tag_dir}: {path.relative_to(tag_dir)} holds more than tensors and "
                f"the types DeepSpeed writes ({problem}). Unpickling it could run code, so nothing of it was "
                "loaded. A checkpoint written by this project never does this: the file was altered or comes from "
                "elsewhere. If you did not write it, treat the run dir as compromised; delete that checkpoint "
                "directory to resume from an older one, or start a new run (another hydra.run.dir). See "
                "docs/security.md."
            )
