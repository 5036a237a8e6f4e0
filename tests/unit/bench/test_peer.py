"""bench/peer.py's options and its peer settings, without running either stack."""
import pytest
import torch

import peer


def test_defaults_run_the_best_peer_and_the_recipe_defaults_at_the_tiny_width():
    args = peer.parse_args([])
    assert args.stack_labels == ["ours", "peer-best", "peer-defaults"]
    assert args.model_fields == {"n_layer": 2, "n_embd": 64, "n_head": 4, "rotary_dim": 8}
    assert args.learning_rate == 1e-2 and args.max_lens == peer.MAX_LEN and args.ours_extra == []


def test_wide_size_options_and_overrides():
    args = peer.parse_args(["--size", "wide", "--n-layer", "6", "--max-len", "clm=512", "--steps", "qa=12",
                            "--peer-settings", "best", "--ours-overrides",
                            "model.fused_projections=true 'trainer.compile=true'"])
    assert args.model_fields == {"n_layer": 6, "n_embd": 1024, "n_head": 16, "rotary_dim": 64}
    assert args.max_lens == {**peer.MAX_LEN, "clm": 512} and args.step_counts["qa"] == 12
    assert args.learning_rate == peer.SIZE_LR["wide"]
    assert args.stack_labels == ["ours", "peer-best"]
    assert args.ours_extra == ["model.fused_projections=true", "trainer.compile=true"]
    command = peer.ours_command("qa", 1, 12, "init", {}, peer.Path("run"), args)
    assert command[-2:] == args.ours_extra  # last: the user's overrides win over the bench's
    assert "++data.max_seq_len=384" in command and "optim.lr=0.0003" in command


@pytest.mark.parametrize("argv", [["--peer-settings", "fast"], ["--stacks", "ours,hf"], ["--steps", "qa=x"],
                                  ["--max-len", "summarize=5"], ["--repeats", "0"],
                                  ["--tasks", "qa", "--steps", "qa=3", "--warmup", "3"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit):
        peer.parse_args(argv)


def test_stacks_interleave_and_reverse_on_odd_repeats():
    order = peer.run_order(["ours", "peer-best", "peer-defaults"], repeats=3, defaults_repeats=1)
    assert order == [(0, "ours"), (0, "peer-best"), (0, "peer-defaults"), (1, "peer-best"), (1, "ours"),
                     (2, "ours"), (2, "peer-best")]


def test_ratios_pair_the_runs_of_one_repeat():
    runs = {"ours": [{"repeat": 0, "x": 4.0}, {"repeat": 1, "x": 6.0}],
            "peer-best": [{"repeat": 1, "x": 3.0}, {"repeat": 0, "x": 4.0}], "peer-defaults": [{"repeat": 0, "x": 1.0}]}
    assert peer.ratios(runs, "peer-best", "x") == [2.0, 1.0]
    assert peer.ratios(runs, "peer-defaults", "x") == [4.0]
    assert peer.spread([2.0, 1.0, 1.5]) == "1.50 (1.00-2.00)" and peer.spread([4.0]) == "4.00"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from finetune.model.tokenizer import GPTJTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    GPTJTokenizer.from_pretrained(None).save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def test_best_peer_pads_each_batch_to_its_longest_row(hf_tokenizer):
    qa = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "start_positions": 1, "end_positions": 2},
          {"input_ids": [8], "attention_mask": [1], "start_positions": 0, "end_positions": 0}]
    batch = peer.peer_collator("qa", "best", hf_tokenizer)(qa)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, hf_tokenizer.pad_token_id, hf_tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["start_positions"].tolist() == [1, 0]

    clm = peer.clm_features({"prompt": ["Count:", "Describe:"], "response": [" 1 2 3 4", " x"]}, hf_tokenizer, 128,
                            pad=False)
    rows = [dict(zip(clm, values)) for values in zip(*clm.values())]
    batch = peer.peer_collator("clm", "best", hf_tokenizer)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, longest) < (2, 128)
    short = min(range(2), key=lambda i: len(rows[i]["input_ids"]))
    assert batch["labels"][short, len(rows[short]["labels"]):].eq(-100).all()


def test_default_peer_keeps_the_recipes_max_length_rows(hf_tokenizer):
    clm = peer.clm_features({"prompt": ["Count:"], "response": [" 1 2"]}, hf_tokenizer, 128)
    batch = peer.peer_collator("clm", "defaults", hf_tokenizer)([dict(zip(clm, v)) for v in zip(*clm.values())])
    assert batch["input_ids"].shape == (1, 128) and isinstance(batch["input_ids"], torch.Tensor)


def test_best_peer_groups_rows_by_length(tmp_path):
    pytest.importorskip("transformers")
    spec = {"output_dir": str(tmp_path), "micro_batch": 8, "accum": 2, "steps": 3, "lr": 1e-2, "stage": 2}
    assert peer.peer_training_arguments({**spec, "setting": "best"}).train_sampling_strategy == "group_by_length"
    defaults = peer.peer_training_arguments({**spec, "setting": "defaults"})
    assert defaults.train_sampling_strategy == "random" and not defaults.torch_compile


def test_training_peak_rss_leaves_out_what_runs_after_the_last_step(tmp_path):
    """A 'rank' that trains two steps small, then evaluates big: the training peak must not see the evaluation."""
    import subprocess
    import sys

    progress = tmp_path / "progress.txt"
    child = ("import pathlib, time\n"
             "time.sleep(1.0)\n"
             f"pathlib.Path({str(progress)!r}).write_text('step\\nstep\\n')\n"
             "time.sleep(0.6)\n"
             "evaluation = bytearray(400 * 2**20)\n"  # touched: counts in the RSS
             "time.sleep(1.0)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, "--peer-worker"])
    sampler = peer.RankSampler([proc.pid], marker="--peer-worker", progress=progress, step_marker="step",
                               train_steps=2, interval=0.05)
    proc.wait()
    peaks = sampler.stop()
    assert 0 < peaks["peak_rss"] < 300 * 2**20 < peaks["peak_rss_with_eval"]
