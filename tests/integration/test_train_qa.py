"""`deepspeed --num_gpus 2 launch/train.py task=qa` for real on CPU ranks: learning, ZeRO-3 partitioning, equal
losses under ZeRO-2 and ZeRO-3, stop-and-resume, and final/ loading in transformers. (One process against two
ranks is compared on clm in test_train_tasks.py: QA's loss depends on how rows are grouped into padded batches.)

Launches are shared between tests (module fixtures); every run uses the same seed and global batch of 16.
"""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 300  # the schedule length of every run here; short runs stop early with trainer.stop_after_steps
STOP, RESUME_TO = 4, 8
# Exact match (%) on the bundled validation set. Each context holds 3-4 facts whose values all look like answers:
# a model that learned the answer format but not the question scores ~28; an untrained one near 0.
EM_THRESHOLD = 50.0
SAME = dict(rel=2e-3, abs=1e-4)  # fp32 on CPU: only the order of reductions differs between setups

COMMON = (
    "task=qa", "model=tiny", f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.seed=7",
    "trainer.micro_batch_size=8", "trainer.precision=fp32",
)


@pytest.fixture(scope="module")
def zero3(launch, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qa_zero3") / "run"
    return launch(run_dir, *COMMON, "deepspeed=zero3", "trainer.save_every=150", "trainer.keep_last=1",
                  "trainer.eval_every=150")


@pytest.fixture(scope="module")
def zero2_stopped_then_resumed(launch, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qa_zero2") / "run"
    args = (*COMMON, "deepspeed=zero2", "trainer.eval_every=0")
    stopped = launch(run_dir, *args, f"trainer.stop_after_steps={STOP}")
    losses_at_stop = stopped.train_losses()
    resumed = launch(run_dir, *args, f"trainer.stop_after_steps={RESUME_TO}")
    return losses_at_stop, stopped, resumed


def test_zero3_learns_qa(zero3):
    losses = zero3.train_losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.6 * first, (first, last)
    results = zero3.eval_results
    assert results["step"] == STEPS
    assert results["exact_match"] >= EM_THRESHOLD, results
    evals = zero3.split("eval")
    assert [e["step"] for e in evals] == [150, STEPS]
    assert evals[-1]["exact_match"] == results["exact_match"]
    record = zero3.split("train")[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time"):
        assert key in record and record[key] == record[key], key  # present and not NaN


def test_run_dir_layout_and_console(zero3):
    run_dir = zero3.run_dir
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "final").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["model_type"] == "gptj" and config["architectures"] == ["GPTJForQuestionAnswering"]
    # save_every=150, keep_last=1: the step-150 checkpoint was pruned once the last one was written
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == [f"global_step{STEPS}"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
    # rank 0 alone talks: one start line, one summary naming where the results are
    assert zero3.output.count("Run dir: ") == 2  # at start and in the final summary
    assert zero3.output.count("Training qa") == 1
    assert str(run_dir / "eval_results.json") in zero3.output
    assert "ZeRO-3" in zero3.output and "world 2" in zero3.output


def test_zero3_partitions_parameters_and_optimizer_states(zero3):
    """Each rank's checkpoint shard holds ~1/2 of the fp32 weights and Adam moments, and no full weights."""
    from safetensors.torch import load_file

    num_params = sum(t.numel() for t in load_file(zero3.run_dir / "final" / "model.safetensors").values())
    step_dir = zero3.run_dir / "checkpoints" / f"global_step{STEPS}"
    partitions = []
    for rank in (0, 1):
        optim = torch.load(step_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                           weights_only=False)["optimizer_state_dict"]
        fp32 = sum(t.numel() for t in optim["fp32_flat_groups"])
        moments = sum(v.numel() for state in optim["optimizer_state_dict"]["state"].values()
                      for k, v in state.items() if k in ("exp_avg", "exp_avg_sq"))
        partitions.append(fp32)
        assert fp32 == pytest.approx(num_params / 2, rel=0.02)
        assert moments == pytest.approx(2 * fp32, rel=0.02)
        model_states = step_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        assert model_states.stat().st_size < 0.05 * num_params * 4  # module weights are not stored whole
    assert sum(partitions) == pytest.approx(num_params, rel=0.01)


def test_final_loads_in_transformers_with_equal_logits(zero3):
    transformers = pytest.importorskip("transformers")
    from finetune.model.hf_weights import load_pretrained

    final = zero3.run_dir / "final"
    ours = load_pretrained(final, task="qa", dtype=torch.float32).eval()
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(final, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GPTJForQuestionAnswering"
    input_ids = torch.randint(0, 50000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids), theirs(input_ids=input_ids)
    torch.testing.assert_close(a.start_logits, b.start_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.end_logits, b.end_logits, rtol=1e-4, atol=1e-4)


def test_zero2_matches_zero3_and_resume_matches_uninterrupted(zero3, zero2_stopped_then_resumed):
    at_stop, stopped, resumed = zero2_stopped_then_resumed
    reference = zero3.train_losses()
    assert sorted(at_stop) == list(range(1, STOP + 1))
    assert "Stopped after step 4" in stopped.output and not (stopped.run_dir / "final").exists()
    for step in range(1, STOP + 1):
        assert at_stop[step] == pytest.approx(reference[step], **SAME), step
    assert f"Resuming at step {STOP}: qa" in resumed.output
    resumed_losses = resumed.train_losses()
    assert sorted(resumed_losses) == list(range(1, RESUME_TO + 1))  # metrics.jsonl continued, not restarted
    for step in range(STOP + 1, RESUME_TO + 1):
        assert resumed_losses[step] == pytest.approx(reference[step], **SAME), step
    assert resumed_losses[RESUME_TO] < resumed_losses[1]  # ZeRO-2 learns too
