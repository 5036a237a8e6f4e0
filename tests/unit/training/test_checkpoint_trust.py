"""The restricted unpickler every checkpoint passes before DeepSpeed unpickles it without restriction: what
DeepSpeed and this project write loads, a file that would run code is refused and runs nothing.
(Real ZeRO-2/3, offload, NVMe and universal checkpoints pass it in every integration test that resumes one.)"""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.distributed import DistInfo, rng_state
from finetune.training import checkpoint_trust
from finetune.training.checkpoint_trust import UntrustedCheckpointError, file_problem, verify_checkpoint_dir
from finetune.training.checkpoints import Checkpointer
from finetune.training.commit import COMPLETE_MARKER, commit_tag_dir


class WritesAFile:
    """A pickled object whose unpickling creates `path`: the stand-in for `os.system(...)`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def deepspeed_like_states() -> dict:
    """What DeepSpeed's ZeRO files hold beyond tensors and plain values (see checkpoint_trust.trusted_globals)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    random.seed(0)
    return {
        "module": {"transformer.wte.weight": torch.randn(4, 3)},
        "optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                 "dynamic": DynamicLossScaler(init_scale=2.0**16, scale_window=10, min_scale=1.0,
                                                             delayed_shift=1, consecutive_hysteresis=False),
                                 "param_slice_mappings": [{"w": fragment_address(numel=12, start=0)}]},
        "rng": [rng_state()],  # python's (a tuple), numpy's (an ndarray inside), torch's
        "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.19.8",
        "param_shapes": [{"w": torch.Size([4, 3])}],
    }


def test_what_deepspeed_writes_loads_with_the_restricted_unpickler(tmp_path):
    torch.save(deepspeed_like_states(), tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert file_problem(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt") is None
    loaded = checkpoint_trust.load_restricted(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert isinstance(loaded["rng"][0]["numpy"][1], np.ndarray)
    assert loaded["optimizer_state_dict"]["dynamic"].cur_scale == 2.0**16
    verify_checkpoint_dir(tmp_path)  # no error


def test_the_allowlist_is_exactly_deepspeeds_own_types():
    names = sorted(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}"
                   for g in checkpoint_trust.trusted_globals())
    assert all(name.startswith(("deepspeed.", "numpy.")) for name in names), names
    assert not any(name.split(".")[-1] in {"system", "eval", "exec", "open", "getattr", "Popen"} for name in names)


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    ran = tmp_path / "payload_ran"
    torch.save({"module": {}, "extra": WritesAFile(ran)}, tmp_path / "mp_rank_00_model_states.pt")
    problem = file_problem(tmp_path / "mp_rank_00_model_states.pt")
    assert problem is not None and "io.open" in problem and not ran.exists()
    (tmp_path / "old_format.pt").write_bytes(pickle.dumps(WritesAFile(ran)))  # a bare pickle, no zip container
    assert file_problem(tmp_path / "old_format.pt") is not None and not ran.exists()
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "mp_rank_00_model_states.pt").read_bytes()[:200])
    assert file_problem(tmp_path / "truncated.pt") is not None  # not a torch file: refused, never loaded


def test_a_tampered_checkpoint_with_a_matching_completion_record_is_refused_before_any_unpickling(tmp_path, capsys):
    checkpoints_dir = tmp_path / "checkpoints"
    tag = checkpoints_dir / "global_step4"
    tag.mkdir(parents=True)
    ran = tmp_path / "payload_ran"
    torch.save(deepspeed_like_states(), tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"w": torch.zeros(2)}, "client": WritesAFile(ran)}, tag / "mp_rank_00_model_states.pt")
    # the attacker rewrites the marker too: sizes and checksums match the tampered files
    commit_tag_dir(tag, record={"global_step": 4, "world_size": 1})
    (checkpoints_dir / "latest").write_text("global_step4")
    with pytest.raises(UntrustedCheckpointError) as err:
        Checkpointer(checkpoints_dir, info=DistInfo(0, 1, 0), keep_last=2).find_resume_point()
    message = str(err.value)
    assert str(tag) in message and "mp_rank_00_model_states.pt" in message and "io.open" in message
    assert "docs/security.md" in message and len(message.splitlines()) == 1
    assert not ran.exists()
    # what DeepSpeed's own loader would have done with it: run the payload
    torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert ran.exists()
    assert json.loads((tag / COMPLETE_MARKER).read_text())["global_step"] == 4  # nothing was deleted
