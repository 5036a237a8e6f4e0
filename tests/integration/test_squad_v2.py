"""A SQuAD v2 file (SQuAD's nested JSON, some questions unanswerable) trains with no extra flag on 2 CPU ranks:
`data.version_2_with_negative: auto` finds the unanswerable questions, says so once, trains them and reports
HasAns/NoAns metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "finetune" / "assets" / "data" / "qa"

pytestmark = pytest.mark.integration


def squad_v2_json(rows: list[dict], path: Path) -> str:
    """SQuAD v2.0's layout (data -> paragraphs -> qas) with every third question made unanswerable."""
    articles = []
    for i, row in enumerate(rows):
        impossible = i % 3 == 2
        answers = [] if impossible else [{"text": t, "answer_start": s}
                                         for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        qa = {"id": row["id"], "question": row["question"], "answers": answers, "is_impossible": impossible}
        if impossible:  # as in SQuAD v2: the plausible (wrong) answer is kept apart, answers is empty
            qa["plausible_answers"] = [{"text": row["answers"]["text"][0],
                                        "answer_start": row["answers"]["answer_start"][0]}]
        articles.append({"title": row["title"], "paragraphs": [{"context": row["context"], "qas": [qa]}]})
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return str(path)


def test_squad_v2_trains_without_a_flag_and_reports_has_and_no_answer_metrics(launch, tmp_path):
    def rows(split: str, n: int) -> list[dict]:
        return [json.loads(line) for line in (BUNDLED / f"{split}.jsonl").read_text().splitlines()[:n]]

    train = squad_v2_json(rows("train", 48), tmp_path / "train-v2.0.json")
    dev = squad_v2_json(rows("validation", 24), tmp_path / "dev-v2.0.json")
    run = launch(tmp_path / "run", "task=qa", "deepspeed=zero2", f"data.train_file={train}",
                 f"data.validation_file={dev}", "trainer.max_steps=3", "trainer.micro_batch_size=4",
                 "trainer.eval_every=0", "trainer.save_every=0")
    notice = "data.version_2_with_negative=auto: 16 of 48 train and 8 of 24 validation questions have no answer"
    assert run.output.count(notice) == 1, run.output[-3000:]  # rank 0 alone says it
    results = run.eval_results
    assert (results["HasAns_total"], results["NoAns_total"], results["total"]) == (16.0, 8.0, 24.0)
    for key in ("HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert 0.0 <= results[key] <= 100.0, results
    assert results["exact_match"] == pytest.approx((16 * results["HasAns_exact"] + 8 * results["NoAns_exact"]) / 24)
    (evaluation,) = run.split("eval")
    assert evaluation["NoAns_total"] == 8.0
