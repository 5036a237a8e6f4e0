"""Loop pieces that need no launch: run length, the resumable data stream, sharded evaluation, checkpoint
commit / resume / pruning / disk check (a fake engine writes the files), the non-finite guard (one-process engine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from finetune import train_loop
from finetune.config import ConfigError, DataConfig, TrainerConfig
from finetune.data import TaskData
from finetune.distributed import DistInfo, rng_state
from finetune.tasks import get_task
from finetune.train_loop import (COMPLETE_MARKER, Checkpointer, DataPosition, DiskSpaceError, checkpoint_complete,
                                  evaluate, total_optimizer_steps, train_batches)


def rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"x": list(range(n))})


def ids(batch) -> list[int]:
    return batch["x"].tolist()


def collate(features):
    return {"x": torch.tensor([f["x"] for f in features])}


def test_total_steps_from_max_steps_or_epochs():
    assert total_optimizer_steps(TrainerConfig(max_steps=7), num_rows=100, world_size=2) == 7
    # 100 rows / 2 ranks / micro 5 = 10 micro batches per epoch; accum 2 -> 5 steps per epoch
    trainer = TrainerConfig(max_steps=None, epochs=1.5, micro_batch_size=5, grad_accum_steps=2)
    assert total_optimizer_steps(trainer, num_rows=100, world_size=2) == 8  # ceil(7.5)
    with pytest.raises(ConfigError, match="fewer than trainer.micro_batch_size"):
        total_optimizer_steps(TrainerConfig(micro_batch_size=8), num_rows=10, world_size=2)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_ranks_split_each_epoch_into_disjoint_batches():
    data = rows(20)
    per_rank = [take(train_batches(data, collate, info=DistInfo(r, 2, r), micro_batch_size=3, seed=1,
                                   start=DataPosition()), 3) for r in (0, 1)]
    seen = [i for stream in per_rank for _, batch in stream for i in ids(batch)]
    assert len(seen) == len(set(seen)) == 18  # 10 rows per rank -> 3 full micro batches each, no overlap
    assert [pos for pos, _ in per_rank[0]] == [DataPosition(0, 1), DataPosition(0, 2), DataPosition(0, 3)]


def test_stream_restarted_at_a_position_continues_identically_across_epochs():
    data, info = rows(12), DistInfo(1, 2, 1)
    full = take(train_batches(data, collate, info=info, micro_batch_size=2, seed=5, start=DataPosition()), 8)
    # 6 rows per rank -> 3 batches per epoch; resume after the 2nd batch of epoch 1 (5 consumed)
    position = full[4][0]
    assert position == DataPosition(1, 2)
    resumed = take(train_batches(data, collate, info=info, micro_batch_size=2, seed=5, start=position), 3)
    assert [ids(b) for _, b in resumed] == [ids(b) for _, b in full[5:8]]
    assert [p for p, _ in resumed] == [p for p, _ in full[5:8]]
    # each epoch is a different order
    assert [ids(b) for _, b in full[:3]] != [ids(b) for _, b in full[3:6]]


class FakeEngine:
    """Returns cls logits that encode the row: logits = [x, -x] -> predicted class 0 for x > 0."""

    device = torch.device("cpu")

    def eval(self):
        pass

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask=None, labels=None):
        x = input_ids[:, 0].float()
        return SimpleNamespace(logits=torch.stack([x, -x], dim=-1), loss=torch.tensor(0.0))


def test_evaluate_gathers_shards_and_drops_padding_duplicates(monkeypatch):
    # 5 rows over 2 ranks: the sampler pads rank 1 with a duplicate of row 0.
    values = [3, -1, 2, -4, 5]
    labels = [0, 0, 0, 1, 1]  # predictions are [0, 1, 0, 1, 0] -> 3 of 5 right
    validation = datasets.Dataset.from_dict({
        "input_ids": [[v] for v in values], "attention_mask": [[1]] * 5, "labels": labels})
    data = TaskData(train=None, validation=validation, num_labels=2, problem_type="single_label_classification")
    task = get_task("cls")
    from finetune.data import DataCollator

    collator = DataCollator(pad_token_id=0)
    gathered = []

    def fake_gather(records):  # what all_gather_object returns once every rank has contributed
        gathered.append(records)
        return list(gathered)

    monkeypatch.setattr(train_loop, "all_gather_objects", fake_gather)
    # "rank 1" runs its shard first; "rank 0" then sees both shards and computes the metrics
    assert evaluate(FakeEngine(), task, data, DataConfig(), collator, info=DistInfo(1, 2, 1), micro_batch_size=2) is None
    result = evaluate(FakeEngine(), task, data, DataConfig(), collator, info=DistInfo(0, 2, 0), micro_batch_size=2)
    assert [len(r) for r in gathered] == [3, 3]  # 6 rows for 5: one padding duplicate
    assert result["accuracy"] == pytest.approx(3 / 5)


class FakeCheckpointEngine:
    """Writes what DeepSpeed's save_checkpoint would (a file per rank of 1000 bytes) and records loads."""

    def __init__(self, step: int = 0):
        self.global_steps = step
        self.saved: list[str] = []
        self.loaded: list[str] = []
        self.client_states: dict[str, dict] = {}
        self.module = torch.nn.Linear(10, 10)  # 110 fp32 parameters, for the size estimate

    def save_checkpoint(self, directory, *, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is the Checkpointer's to write, after the commit
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (Path(directory) / tag / name).write_bytes(b"x" * 1000)
        self.saved.append(tag)
        self.client_states[tag] = client_state

    def load_checkpoint(self, directory, *, tag):
        self.loaded.append(tag)
        return str(Path(directory) / tag), self.client_states[tag]


def save_at(checkpointer: Checkpointer, engine: FakeCheckpointEngine, step: int) -> None:
    engine.global_steps = step
    checkpointer.save(engine, DataPosition(0, step))


def test_a_save_is_committed_with_a_marker_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 5)
    marker = json.loads((tmp_path / "global_step5" / COMPLETE_MARKER).read_text())
    assert marker["files"] == {"mp_rank_00_model_states.pt": 1000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 1000}
    assert (tmp_path / "latest").read_text() == "global_step5"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed into place
    assert checkpoint_complete(tmp_path / "global_step5")
    (tmp_path / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated later
    assert not checkpoint_complete(tmp_path / "global_step5")


def test_resume_skips_an_interrupted_save_and_removes_it(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 4)
    # killed while saving step 6: shards on disk, no marker, `latest` still at 4
    (tmp_path / "global_step6").mkdir()
    (tmp_path / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    # killed between marker and `latest` cannot leave `latest` behind a complete tag for long: simulate it too
    (tmp_path / "latest").write_text("global_step2")
    resumed = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    position = resumed.resume(engine)
    assert engine.loaded == ["global_step4"] and position == DataPosition(0, 4)
    assert not (tmp_path / "global_step6").exists()
    assert "global_step6" in capsys.readouterr().out
    assert (tmp_path / "latest").read_text() == "global_step4"
    assert resumed.last_complete == tmp_path / "global_step4"


def test_resume_ignores_a_damaged_checkpoint_without_deleting_it(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=3)
    engine = FakeCheckpointEngine()
    save_at(ckpt, engine, 2)
    save_at(ckpt, engine, 4)
    (tmp_path / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert ckpt.resume(engine) == DataPosition(0, 2)
    assert (tmp_path / "global_step4").is_dir()
    assert "ignoring" in capsys.readouterr().out


def test_resume_without_a_complete_checkpoint_starts_fresh(tmp_path):
    engine = FakeCheckpointEngine()
    assert Checkpointer(tmp_path / "missing", info=DistInfo(0, 1, 0), keep_last=2).resume(engine) is None
    (tmp_path / "global_step3").mkdir()  # the first save was interrupted
    (tmp_path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / "global_step1").mkdir()
    (tmp_path / "global_step1" / COMPLETE_MARKER).write_text("{}")  # a marker from another tool: not ours
    assert Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).resume(engine) is None
    assert engine.loaded == [] and not (tmp_path / "global_step3").exists()


def test_resume_of_a_run_dir_from_before_completion_markers_trusts_latest(tmp_path):
    for step in (2, 4):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    engine = FakeCheckpointEngine()
    engine.client_states["global_step4"] = {"position": {"epoch": 0, "batches": 4}, "rng": [rng_state()],
                                           "world_size": 1}
    assert Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2).resume(engine) == DataPosition(0, 4)
    assert engine.loaded == ["global_step4"] and (tmp_path / "global_step2").is_dir()


def test_prune_keeps_the_newest_complete_checkpoints_and_never_the_only_one(tmp_path):
    ckpt = Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    for step in (5, 10, 50):
        save_at(ckpt, engine, step)
    (tmp_path / "zero_to_fp32.py").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step50", "latest", "zero_to_fp32.py"]
    # keep_last=1 and a newer leftover without marker: the complete one stays, the leftover goes at the next save
    (tmp_path / "global_step60").mkdir()
    ckpt.keep_last = 1
    ckpt._prune()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step50"]
    save_at(ckpt, engine, 100)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["global_step100"]


def test_save_refuses_to_start_without_disk_space(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints", info=DistInfo(0, 1, 0), keep_last=2)
    engine = FakeCheckpointEngine()
    free = {"bytes": 10**9}
    monkeypatch.setattr(train_loop.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    save_at(ckpt, engine, 1)  # first save: estimated from the parameters (110 * (4 + 12) bytes + margin)
    free["bytes"] = 1500  # less than the 2000 bytes the previous checkpoint takes
    with pytest.raises(DiskSpaceError) as err:
        save_at(ckpt, engine, 2)
    message = str(err.value)
    assert "global_step2" in message and str(tmp_path) in message and "trainer.keep_last" in message
    assert "0.00 GiB" in message and "global_step1" in message  # needed/free and the last complete checkpoint
    assert engine.saved == ["global_step1"] and not (tmp_path / "checkpoints" / "global_step2").exists()
    free["bytes"] = 1000
    fresh = Checkpointer(tmp_path / "other", info=DistInfo(0, 1, 0), keep_last=2)
    with pytest.raises(DiskSpaceError, match="estimated from 110 parameters"):
        save_at(fresh, engine, 1)


# A real one-process DeepSpeed engine (fp32, no ZeRO: a plain torch AdamW that DeepSpeed does not check for
# non-finite gradients) in a subprocess, so that no process group outlives the test.
GUARD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from finetune import distributed
    from finetune.config import OptimConfig, SchedulerConfig, TrainerConfig
    from finetune.distributed import DistInfo
    from finetune.engine import build_ds_config, initialize, load_ds_json
    from finetune.train_loop import NonFiniteLossError, _NonFiniteGuard

    distributed.init_distributed()
    trainer = TrainerConfig(max_steps=10, micro_batch_size=2, precision="fp32", max_nonfinite_steps=2)
    base, source = load_ds_json("ds_configs/zero0.json")
    ds = build_ds_config(base, source=source, trainer=trainer, optim=OptimConfig(lr=0.1),
                         scheduler=SchedulerConfig(name="constant", warmup_steps=1), world_size=1, total_steps=10,
                         accelerator="cpu")
    torch.manual_seed(0)
    engine = initialize(torch.nn.Linear(4, 1), ds, weight_decay=0.0)
    guard = _NonFiniteGuard(engine, trainer, DistInfo(0, 1, 0))
    x = torch.randn(2, 4)
    report = {"own_check": guard.own_check}
    for step in (1, 2, 3, 4, 5):
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss = engine(x).pow(2).mean() * (float("nan") if step >= 4 else 1.0)
        engine.backward(loss)
        guard.add_loss(float(loss))
        guard.before_update()
        engine.step()
        report[step] = {
            "applied": guard.after_update(step),
            "changed": any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters())),
            "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
            "skipped": engine.skipped_steps,
        }
        try:
            guard.stop_at_limit(step, last_complete=lambda: "CKPT")
        except NonFiniteLossError as err:
            report["error"] = str(err)
            break
    print(json.dumps(report))
""")


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_a_plain_torch_optimizer():
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["own_check"] is True
    for step in ("1", "2", "3"):  # finite steps update from the first on (the warmup's first rate is not 0)
        assert report[step] == {"applied": True, "changed": True, "finite": True, "skipped": 0}, step
    # NaN loss: no update reaches the weights, DeepSpeed counts the skip
    assert report["4"] == {"applied": False, "changed": False, "finite": True, "skipped": 1}
    assert report["5"] == {"applied": False, "changed": False, "finite": True, "skipped": 2}
    assert "Stopped at step 5" in report["error"] and "steps 4-5" in report["error"] and "CKPT" in report["error"]
    assert "trainer.max_nonfinite_steps=2" in report["error"]
