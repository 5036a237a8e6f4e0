"""Shared fixtures for the data tests: the real bundled tokenizer, a config factory with a private cache, writers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import datasets
import pytest

from finetune.config import DataConfig
from finetune.model.tokenizer import GPTJTokenizer

datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def tokenizer() -> GPTJTokenizer:
    return GPTJTokenizer.from_pretrained(None)


@pytest.fixture
def make_cfg(tmp_path):
    """DataConfig with its cache inside tmp_path, so tests never touch the user's datasets cache."""

    def make(**overrides: Any) -> DataConfig:
        overrides.setdefault("cache_dir", str(tmp_path / "hf_cache"))
        return DataConfig(**overrides)

    return make


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows) -> str(path): one JSON object per line."""

    def write(path: Path, rows: Iterable[dict]) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    return write
