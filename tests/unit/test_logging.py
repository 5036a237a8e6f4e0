"""RunLogger: metrics.jsonl, W&B offline runs read back from their .wandb file, progress bar, MFU."""
import json
import struct
import time

import pytest
import torch

from finetune.config import LoggerConfig
from finetune.logging import METRICS_FILE, WANDB_ID_FILE, RunLogger, mfu, peak_flops_for_device

NO_WANDB = LoggerConfig(backend="none")


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_metrics_jsonl_holds_each_logged_record(tmp_path):
    with RunLogger(tmp_path, is_main=True, logger_cfg=NO_WANDB, config_dict={}, resume=False) as logger:
        logger.log(10, "train", {"loss": torch.tensor(2.5), "lr": 1e-4, "tokens_per_s": 1234.5, "grad_norm": None})
        # Readable while the run is going: every line is flushed.
        expected = {"step": 10, "split": "train", "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.5}
        assert read_metrics(tmp_path) == [expected]
        logger.log(10, "eval", {"loss": 2.75, "exact_match": 41.0})
    assert read_metrics(tmp_path)[1] == {"step": 10, "split": "eval", "loss": 2.75, "exact_match": 41.0}


def test_resume_appends_and_a_fresh_run_starts_over(tmp_path):
    for step in (1, 2):
        with RunLogger(tmp_path, is_main=True, logger_cfg=NO_WANDB, config_dict={}, resume=step > 1) as logger:
            logger.log(step, "train", {"loss": float(step)})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with RunLogger(tmp_path, is_main=True, logger_cfg=NO_WANDB, config_dict={}, resume=False) as logger:
        logger.log(1, "train", {"loss": 9.0})
    assert read_metrics(tmp_path) == [{"step": 1, "split": "train", "loss": 9.0}]


def test_other_ranks_write_nothing(tmp_path):
    wandb_cfg = LoggerConfig(backend="wandb", mode="offline")
    with RunLogger(tmp_path / "run", is_main=False, logger_cfg=wandb_cfg, config_dict={}, resume=False) as logger:
        logger.log(1, "train", {"loss": 1.0})
        assert logger.progress(10).disable
        assert logger.wandb_run is None
    assert not (tmp_path / "run").exists()


def test_progress_bar_on_rank_zero_starts_at_the_resumed_step(tmp_path):
    with RunLogger(tmp_path, is_main=True, logger_cfg=NO_WANDB, config_dict={}, resume=False) as logger:
        bar = logger.progress(100, initial_step=40)
        assert not bar.disable and (bar.total, bar.n) == (100, 40)
        bar.close()


def test_mfu_follows_the_6n_plus_attention_estimate():
    # GPT-J 6B at 2048 tokens: 6N + 12·L·H·T FLOPs per token.
    n, layers, width, seq = 6_053_381_344, 28, 4096, 2048
    per_token = 6 * n + 12 * layers * width * seq
    assert mfu(1000.0, n, layers, width, seq, peak_flops=989e12) == pytest.approx(1000 * per_token / 989e12)
    assert mfu(1000.0, n, layers, width, seq, peak_flops=None) is None


def test_no_peak_flops_on_cpu():
    assert peak_flops_for_device(torch.device("cpu")) is None


# --- W&B (offline, no network) -------------------------------------------------------------------------
def wandb_records(path):
    """Records of a .wandb file: a LevelDB-style log (7-byte header, 32 KiB blocks) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir, timeout_s=30.0):
    """{step: {key: value}} over every W&B run file under run_dir/wandb.

    run.finish() returns before wandb-core has written the file out, so wait for each run's exit record.
    """
    paths = sorted((run_dir / "wandb").glob("*run-*/run-*.wandb"))
    assert paths, f"no W&B run file under {run_dir / 'wandb'}"
    deadline = time.monotonic() + timeout_s
    history = {}
    for path in paths:
        while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
            assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
            time.sleep(0.1)
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                row = history.setdefault(record.history.step.num, {})
                for item in record.history.item:
                    row["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return history


@pytest.fixture
def isolated_wandb(tmp_path, monkeypatch):
    """No API key anywhere W&B looks (env, settings, .netrc) and every W&B file under tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def test_wandb_offline_run_holds_the_metrics_and_a_relaunch_resumes_it(isolated_wandb, capfd):
    run_dir = isolated_wandb
    # Online without any API key: the run continues offline and says how to upload it.
    cfg = LoggerConfig(backend="wandb", mode="online", project="unit-test", tags=["t1"])
    with RunLogger(run_dir, is_main=True, logger_cfg=cfg, config_dict={"optim": {"lr": 0.5}}, resume=False) as logger:
        assert logger.wandb_run.offline
        assert logger.wandb_run.config["optim"] == {"lr": 0.5}
        for step, loss in [(1, 3.0), (2, 2.5), (3, 2.25)]:
            logger.log(step, "train", {"loss": loss, "lr": 0.5})
        logger.log(3, "eval", {"loss": 2.0})
        first_id = logger.wandb_run.id
    notice = capfd.readouterr().err
    assert "no API key" in notice and f"wandb sync {run_dir / 'wandb'}/offline-run-" in notice
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == first_id
    history = wandb_history(run_dir)
    assert [history[s]["train/loss"] for s in (1, 2, 3)] == [3.0, 2.5, 2.25]
    assert history[3]["eval/loss"] == 2.0

    offline = LoggerConfig(backend="wandb", mode="offline", project="unit-test")
    with RunLogger(run_dir, is_main=True, logger_cfg=offline, config_dict={}, resume=True) as logger:
        assert logger.wandb_run.id == first_id
        logger.log(4, "train", {"loss": 2.0})
    assert wandb_history(run_dir)[4]["train/loss"] == 2.0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 3, 4]
