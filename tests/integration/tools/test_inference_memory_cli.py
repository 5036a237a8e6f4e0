"""launch/evaluate.py refuses, before loading data or building, a model whose weights cannot fit (subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.model import GPTJConfig, build_model
from finetune.model.hf_weights import save_pretrained

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow  # a subprocess importing torch, DeepSpeed and datasets: ~10 s idle, a minute on a busy machine
def test_evaluate_refuses_a_huge_head_before_building(tmp_path):
    """launch/evaluate.py as a user runs it, on a model dir whose config.json claims 10^12 labels."""
    config = GPTJConfig.preset("tiny", pad_token_id=50256)
    save_pretrained(build_model(config, task="clm"), tmp_path / "model", config=config, task="clm")
    raw = json.loads((tmp_path / "model" / "config.json").read_text())
    raw.pop("id2label"), raw.pop("label2id")
    (tmp_path / "model" / "config.json").write_text(json.dumps({**raw, "num_labels": 10**12}))
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "task=cls",
                             f"model.path={tmp_path / 'model'}", "data.max_eval_samples=4", "eval.output=null"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot fit" in result.stderr and "Traceback" not in result.stderr
