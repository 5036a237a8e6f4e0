"""Processed features are cached by a deterministic fingerprint: the contract that lets rank 0 build them first and
the other ranks load them."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import finetune.data.clm as clm
from finetune.data import DataError, load_task_data
from finetune.model.tokenizer import GPTJTokenizer

DOCS = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog {i} times."} for i in range(40)]


def cache_files(data):
    return [f["filename"] for f in data.train.cache_files]


def test_second_call_loads_the_cache_without_reprocessing(tmp_path, make_cfg, write_jsonl, tokenizer, monkeypatch):
    cfg = make_cfg(train_file=write_jsonl(tmp_path / "train.jsonl", DOCS), max_seq_len=32)
    first = load_task_data("clm", cfg, tokenizer)
    original = clm.build_clm_features

    def must_not_run(*args, **kwargs):
        raise AssertionError("features were recomputed instead of loaded from the cache")

    must_not_run.__module__, must_not_run.__qualname__ = original.__module__, original.__qualname__
    monkeypatch.setattr(clm, "build_clm_features", must_not_run)
    second = load_task_data("clm", cfg, tokenizer)
    assert cache_files(second) == cache_files(first) and Path(cache_files(first)[0]).name.startswith("cache-")
    assert second.train._fingerprint == first.train._fingerprint
    assert second.train.to_dict() == first.train.to_dict()
    assert second.validation.to_dict() == first.validation.to_dict()


def test_changed_tokenizer_or_max_seq_len_invalidates(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", DOCS)
    base = load_task_data("clm", make_cfg(train_file=path, max_seq_len=32), tokenizer)
    longer = load_task_data("clm", make_cfg(train_file=path, max_seq_len=48), tokenizer)
    assert cache_files(longer) != cache_files(base)
    assert {len(ids) for ids in longer.train["input_ids"][:-1]} == {48}

    changed = GPTJTokenizer.from_pretrained(None)
    changed.backend.add_tokens([" fox"])  # " fox" becomes one new id
    retokenized = load_task_data("clm", make_cfg(train_file=path, max_seq_len=32), changed)
    assert cache_files(retokenized) != cache_files(base)
    assert any(50400 in ids for ids in retokenized.train["input_ids"])


def test_another_process_computes_the_same_fingerprint_and_reads_the_cache(tmp_path, make_cfg, write_jsonl, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", DOCS)
    cfg = make_cfg(train_file=path, max_seq_len=32)
    data = load_task_data("clm", cfg, tokenizer)
    script = textwrap.dedent(
        f"""
        import datasets, finetune.data.clm as clm
        from finetune.config import DataConfig
        from finetune.data import load_task_data
        from finetune.model.tokenizer import GPTJTokenizer
        datasets.disable_progress_bars()
        def must_not_run(*args, **kwargs):
            raise AssertionError("recomputed")
        must_not_run.__module__, must_not_run.__qualname__ = "finetune.data.clm", "build_clm_features"
        clm.build_clm_features = must_not_run
        data = load_task_data("clm", DataConfig(train_file={path!r}, max_seq_len=32, cache_dir={cfg.cache_dir!r}),
                              GPTJTokenizer.from_pretrained(None))
        print(data.train._fingerprint, data.validation._fingerprint)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [data.train._fingerprint, data.validation._fingerprint]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_row_stops_before_features_are_cached(tmp_path, make_cfg, write_jsonl, tokenizer, num_proc):
    rows = [{"text": f"text {i}", "label": i % 3} for i in range(30)]
    rows[25]["label"] = None
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(train_file=path, validation_fraction=0, num_proc=num_proc)
    with pytest.raises(DataError, match=r"train\.jsonl, line 26, field 'label'"):
        load_task_data("cls", cfg, tokenizer)
    cache = Path(cfg.cache_dir)
    assert not list(cache.rglob("tmp*"))
    # Only the row checks' output (one map: one fingerprint, a file per process) is cached, no features.
    cached = [p.name for p in cache.rglob("cache-*.arrow")]
    assert len(cached) == num_proc and len({name.split("_")[0] for name in cached}) == 1

    rows[25]["label"] = 1
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert load_task_data("cls", cfg, tokenizer).train["labels"] == [row["label"] for row in rows]


def test_two_processes_give_the_same_features(make_cfg, tokenizer):
    one = load_task_data("qa", make_cfg(num_proc=1, max_seq_len=48, doc_stride=8), tokenizer)
    two = load_task_data("qa", make_cfg(num_proc=2, max_seq_len=48, doc_stride=8), tokenizer)
    assert two.train.to_dict() == one.train.to_dict()
    assert two.validation.to_dict() == one.validation.to_dict()
