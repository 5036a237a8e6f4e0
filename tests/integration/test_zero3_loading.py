"""Streaming a checkpoint into a model built under deepspeed.zero.Init, with 2 real CPU ranks (gloo).

The test saves a checkpoint, then runs this file as a script on 2 ranks; each rank loads the checkpoint
into its ZeRO-3 partitions, gathers every parameter, compares it with the checkpoint and reports to a
JSON file that the test checks.
"""
import json
import sys
from pathlib import Path

import pytest

# Odd sizes (n_inner 75, vocab 1001) give tensors whose element count does not split evenly: padded partitions.
TINY = dict(vocab_size=1001, n_positions=32, n_embd=36, n_layer=2, n_head=4, rotary_dim=8, n_inner=75)
WORLD = 2



@pytest.mark.integration
def test_zero3_ranks_load_their_partitions_bit_exact(tmp_path, run_ranks):
    import torch

    from finetune.model import GPTJConfig, build_model
    from finetune.model.hf_weights import save_pretrained

    config = GPTJConfig(**TINY)
    torch.manual_seed(0)
    model = build_model(config, task="clm")
    save_pretrained(model, tmp_path / "ckpt", config=config, task="clm", max_shard_size="50KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()

    run_ranks(__file__, str(tmp_path), world=WORLD, timeout=240)

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, result in enumerate(results):
        for case in ("sliced", "gathered"):
            assert result[case]["mismatches"] == [], (r, case)
            assert result[case]["checked"] == result[case]["expected"] > 0
        # Each rank holds its half (rounded up per tensor), not the whole model.
        held, total = result["sliced"]["partition_numel"], result["sliced"]["model_numel"]
        assert total / WORLD <= held <= total / WORLD + result["sliced"]["tensors"]
        # Fused projections: each rank's slice of the fused weight comes from the four HF tensors it stacks.
        assert result["fused"]["mismatches"] == [] and result["fused"]["checked"] == TINY["n_layer"] * 2, r
        assert result["fused"]["partition_numel"] == held
        assert result["fresh_head"]["initialized"] == ["score.weight"]
        assert 0.005 < result["fresh_head"]["std"] < 0.05
    # The fresh head came from rank 0's init and is the same on every rank.
    assert results[0]["fresh_head"]["checksum"] == results[1]["fresh_head"]["checksum"]


def rank_main(work: Path) -> None:
    import deepspeed
    import torch
    from safetensors.torch import load_file

    import finetune.model.hf_weights as checkpoint
    from finetune.distributed import init_distributed
    from finetune.model import GPTJConfig, build_model

    init_distributed()  # its atexit teardown keeps gloo from aborting the exit
    rank = torch.distributed.get_rank()
    ckpt = work / "ckpt"
    expected = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        expected.update(load_file(shard))
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    config = GPTJConfig(**TINY)

    def build(task, fused=False):
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return build_model(config, task=task, init=False, fused_projections=fused)

    def compare(model, report):
        mismatches, checked = [], 0
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if name in report.loaded:
                    checked += 1
                    if not torch.equal(param.data, expected[name]):
                        mismatches.append(name)
        return {"mismatches": mismatches, "checked": checked, "expected": len(report.loaded)}

    results = {}
    model = build("clm")
    report = checkpoint.load_state_into(model, ckpt)
    params = list(model.parameters())
    results["sliced"] = {
        **compare(model, report),
        "partition_numel": sum(p.ds_tensor.ds_numel for p in params),
        "model_numel": sum(p.ds_numel for p in params),
        "tensors": len(params),
    }

    model = build("clm", fused=True)
    report = checkpoint.load_state_into(model, ckpt)
    mismatches, checked = [], 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            parts = [expected[n] for n in checkpoint.hf_names_of(name)]
            if len(parts) > 1 or name.endswith("qkv_fc_in.bias"):
                checked += 1
            if not torch.equal(param.data, torch.cat(parts)):
                mismatches.append(name)
    results["fused"] = {"mismatches": mismatches, "checked": checked,
                        "partition_numel": sum(p.ds_tensor.ds_numel for p in model.parameters())}

    # The fallback for partitions that cannot be written in place (NVMe, quantized, ZeRO++):
    # gather each tensor, rank 0 copies it in. Also: a causal-LM checkpoint into a classifier.
    checkpoint._needs_gather = lambda param: True
    model = build("cls")
    report = checkpoint.load_state_into(model, ckpt)
    results["gathered"] = compare(model, report)
    with deepspeed.zero.GatheredParameters([model.score.weight]):
        score = model.score.weight.data.clone()
    results["fresh_head"] = {"initialized": report.initialized, "std": score.std().item(),
                             "checksum": score.double().abs().sum().item()}
    (work / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]))
