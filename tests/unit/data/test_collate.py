import torch

from finetune.data import DataCollator

PAD = 50256


def test_token_labels_are_padded_right_with_masks():
    features = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ]
    batch = DataCollator(PAD)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())

    rounded = DataCollator(PAD, pad_to_multiple_of=8)(features)
    assert rounded["input_ids"].shape == (2, 8) and rounded["labels"][0, 3:].eq(-100).all()


def test_sequence_labels_by_type():
    collate = DataCollator(PAD)
    ints = collate([{"input_ids": [1, 2], "labels": 2}, {"input_ids": [3], "labels": 0}])
    assert ints["labels"].tolist() == [2, 0] and ints["labels"].dtype == torch.long
    assert ints["attention_mask"].tolist() == [[1, 1], [1, 0]]
    floats = collate([{"input_ids": [1], "labels": 0.5}, {"input_ids": [3], "labels": -1.0}])
    assert floats["labels"].dtype == torch.float and floats["labels"].tolist() == [0.5, -1.0]
    multi_hot = collate([{"input_ids": [1, 2, 3], "labels": [1.0, 0.0]}, {"input_ids": [3], "labels": [1.0, 1.0]}])
    assert multi_hot["labels"].dtype == torch.float and multi_hot["labels"].tolist() == [[1.0, 0.0], [1.0, 1.0]]


def test_qa_positions_and_non_model_columns_are_ignored():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "start_positions": 1, "end_positions": 2,
         "example_id": "a", "offset_mapping": [None, [0, 2], [2, 4]]},
        {"input_ids": [8, 9], "attention_mask": [1, 1], "start_positions": 1, "end_positions": 1,
         "example_id": "b", "offset_mapping": [None, None]},
    ]  # fmt: skip
    batch = DataCollator(PAD)(features)
    assert set(batch) == {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["start_positions"].tolist() == [1, 1] and batch["end_positions"].tolist() == [2, 1]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
