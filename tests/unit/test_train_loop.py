"""Loop pieces that need no DeepSpeed: run length, the resumable data stream, sharded evaluation, pruning."""
from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from finetune import train_loop
from finetune.config import ConfigError, DataConfig, TrainerConfig
from finetune.data import TaskData
from finetune.distributed import DistInfo
from finetune.tasks import get_task
from finetune.train_loop import Checkpointer, DataPosition, evaluate, total_optimizer_steps, train_batches


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


def test_prune_keeps_the_newest_checkpoints(tmp_path):
    for step in (5, 10, 50, 100):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / "latest").write_text("global_step100")
    (tmp_path / "zero_to_fp32.py").write_text("")
    Checkpointer(tmp_path, info=DistInfo(0, 1, 0), keep_last=2)._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step100", "global_step50", "latest", "zero_to_fp32.py"]
