import collections
import subprocess
import sys
from pathlib import Path

from finetune.data import load_task_data
from finetune.data.sources import BUNDLED_DATA_DIR

ROOT = Path(__file__).resolve().parents[3]


def test_generator_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_bundled_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)  # fmt: skip
    for shipped in sorted(BUNDLED_DATA_DIR.glob("*/*.jsonl")):
        generated = tmp_path / shipped.parent.name / shipped.name
        assert generated.read_bytes() == shipped.read_bytes(), shipped
    assert sum(p.stat().st_size for p in BUNDLED_DATA_DIR.glob("*/*.jsonl")) < 1_000_000


def rows(task: str, split: str) -> int:
    return len((BUNDLED_DATA_DIR / task / f"{split}.jsonl").read_text().splitlines())


def test_bundled_data_is_the_default_for_every_task(make_cfg, tokenizer):
    clm = load_task_data("clm", make_cfg(), tokenizer)
    assert len(clm.train) > 20 and len(clm.validation) > 5

    cls = load_task_data("cls", make_cfg(), tokenizer)
    assert (len(cls.train), len(cls.validation)) == (rows("cls", "train"), rows("cls", "validation"))
    assert 200 <= rows("cls", "train") <= 2000 and 50 <= rows("cls", "validation") <= 200
    assert cls.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert max(collections.Counter(cls.train["labels"]).values()) < 0.5 * len(cls.train)

    qa = load_task_data("qa", make_cfg(), tokenizer)
    # One window per example: every context fits max_seq_len.
    assert (len(qa.train), len(qa.validation)) == (rows("qa", "train"), rows("qa", "validation"))
    assert len(qa.validation_examples) == len(qa.validation)
    assert max(len(ids) for ids in qa.train["input_ids"]) < 128
    starts = qa.validation["start_positions"]
    assert qa.validation["end_positions"] == starts  # single-token answers
    # Neither a fixed position nor a fixed answer word reaches 40 exact match: the model has to read the question.
    assert max(collections.Counter(starts).values()) < 0.4 * len(starts)
    answers = [a["text"][0] for a in qa.validation_examples["answers"]]
    assert max(collections.Counter(answers).values()) < 0.1 * len(answers)
