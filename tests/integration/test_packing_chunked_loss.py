"""Chunked loss and padding-free packing under real DeepSpeed on 2 CPU ranks (gloo), one launch for all cases.

- ZeRO-3 with every parameter partitioned (persistence threshold 0): the chunked causal-LM loss trains to the same
  losses as the full-logits one, in full fine-tuning and with LoRA training the head (peft's modules_to_save copy
  of lm_head, called with the loss keywords); lm_head's weight is gathered by DeepSpeed's hooks on its own call.
- ZeRO-2, instruction data of very different lengths: packed micro batches (data.packing=examples) train to the
  losses of padded ones (none).
- QA on the bundled data: after some packed training, evaluating the validation set packed and padded gives the
  same exact match and F1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TINY = dict(vocab_size=1000, n_positions=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)
STEPS = 5


def ds_config(stage: int, micro: int = 2) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even the tiny head
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "train_batch_size": 2 * micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": zero, "gradient_clipping": 1.0, "steps_per_print": 10**9}


def chunked_zero3(rank: int) -> dict:
    import deepspeed
    import torch

    from finetune.config import LoraConfig
    from finetune.model import GPTJConfig, build_model
    from finetune.training.lora import apply_lora

    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 1000, (2, 24), generator=g)] * STEPS  # one batch again and again: a loss that falls
    out = {}
    for variant in ("full", "lora_head"):
        for chunk in (None, 7):
            torch.manual_seed(0)
            model = build_model(GPTJConfig(**TINY), task="clm", loss_chunk_tokens=chunk)
            if variant == "lora_head":
                torch.manual_seed(1)
                model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, train_head=True))
            engine, *_ = deepspeed.initialize(model=model, config=ds_config(3),
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            losses = []
            for ids in batches:
                labels = ids.clone()
                labels[:, :5] = -100  # a prompt
                loss = engine(input_ids=ids, labels=labels).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            heads = [p for n, p in engine.module.named_parameters() if n.endswith("lm_head.weight")
                     or n.endswith("lm_head.modules_to_save.default.weight")]
            out[f"{variant}_{chunk}"] = {
                "losses": losses,
                "head_partitioned": all(p.ds_tensor.numel() < p.ds_numel for p in heads) and bool(heads),
            }
            engine.destroy()
    return out


def instruction_file(path: Path) -> str:
    rows = []
    for i in range(64):
        words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(2 + (i * 13) % 40))  # 2 to 41 words
        rows.append({"prompt": f"Item {i}:", "response": f" {words}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def packed_vs_padded_clm(out_dir: Path, info) -> dict:
    import deepspeed
    import torch

    from finetune.config import DataConfig
    from finetune.data.packing import packs_batches
    from finetune.distributed import main_process_first
    from finetune.model import GPTJConfig, build_model
    from finetune.model.tokenizer import GPTJTokenizer
    from finetune.tasks import get_task
    from finetune.training.data_order import BatchLayout, DataPosition, train_steps

    tokenizer = GPTJTokenizer.from_pretrained(None)
    task = get_task("clm")
    train_file = out_dir / "instructions.jsonl"
    if info.rank == 0:
        instruction_file(train_file)
    torch.distributed.barrier()
    out = {}
    for packing in ("examples", "none"):
        cfg = DataConfig(train_file=str(train_file), validation_fraction=0, prompt_column="prompt",
                         response_column="response", max_seq_len=64, packing=packing,
                         cache_dir=str(out_dir / "cache"))
        with main_process_first(info):
            data = task.load_data(cfg, tokenizer)
        collate = task.collator(tokenizer, cfg)
        assert collate.packed == packs_batches(cfg, "clm")
        torch.manual_seed(0)
        model = build_model(GPTJConfig(**{**TINY, "vocab_size": 50400}), task="clm", loss_chunk_tokens=64)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config(2, micro=4),
                                          model_parameters=model.parameters())
        batches = train_steps(data.train, collate, info=info, layout=BatchLayout(4, 1, info.world_size), seed=5,
                              start=DataPosition())
        losses, rows = [], []
        for _ in range(STEPS):
            _, [batch] = next(batches)
            rows.append(list(batch["input_ids"].shape))
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[packing] = {"losses": losses, "shapes": rows}
        engine.destroy()
    return out


def qa_packed_vs_padded_eval(out_dir: Path, info) -> dict:
    import deepspeed
    import torch

    from finetune.config import DataConfig
    from finetune.distributed import main_process_first
    from finetune.model import GPTJConfig, build_model
    from finetune.model.tokenizer import GPTJTokenizer
    from finetune.tasks import get_task
    from finetune.training.data_order import BatchLayout, DataPosition, train_steps
    from finetune.training.evaluation import evaluate

    tokenizer = GPTJTokenizer.from_pretrained(None)
    task = get_task("qa")
    cfg = DataConfig(max_seq_len=128, doc_stride=32, cache_dir=str(out_dir / "cache"))  # the bundled data
    with main_process_first(info):
        data = task.load_data(cfg, tokenizer)
    packed, padded = task.collator(tokenizer, cfg), task.collator(tokenizer, DataConfig(packing=False))
    assert packed.packed and not padded.packed
    torch.manual_seed(0)
    model = build_model(GPTJConfig.preset("tiny", pad_token_id=tokenizer.pad_token_id), task="qa")
    config = ds_config(2, micro=8)
    config["optimizer"]["params"]["lr"] = 3e-3
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    batches = train_steps(data.train, packed, info=info, layout=BatchLayout(8, 1, info.world_size), seed=1,
                          start=DataPosition())
    losses = []
    for _ in range(40):
        _, [batch] = next(batches)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    results = {name: evaluate(engine, task, data, cfg, collate, info=info, micro_batch_size=8)
               for name, collate in (("packed", packed), ("padded", padded))}
    engine.destroy()
    return {"losses": losses, **results}


def worker(out_dir: Path) -> None:
    import torch

    from finetune.distributed import init_distributed

    info = init_distributed()
    report = {"chunked_zero3": chunked_zero3(info.rank), "clm_packing": packed_vs_padded_clm(out_dir, info),
              "qa_eval": qa_packed_vs_padded_eval(out_dir, info)}
    torch.distributed.barrier()
    (out_dir / f"report_rank{info.rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def reports(tmp_path_factory, run_ranks) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("packing_chunked")
    run_ranks(__file__, str(out_dir), timeout=420)
    return [json.loads((out_dir / f"report_rank{r}.json").read_text()) for r in range(2)]


pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("variant", ["full", "lora_head"])
def test_chunked_loss_under_zero3_trains_like_full_logits(reports, variant):
    for report in reports:
        runs = report["chunked_zero3"]
        plain, chunked = runs[f"{variant}_None"], runs[f"{variant}_7"]
        assert chunked["head_partitioned"] and plain["head_partitioned"]
        assert chunked["losses"] == pytest.approx(plain["losses"], rel=1e-5)
        assert plain["losses"][-1] < plain["losses"][0]  # and it trains


def test_packed_instruction_batches_train_like_padded_ones(reports):
    for report in reports:
        packed, padded = report["clm_packing"]["examples"], report["clm_packing"]["none"]
        assert all(shape[0] == 1 for shape in packed["shapes"]) and all(shape[0] == 4 for shape in padded["shapes"])
        # padding: 4 x the longest row; packing: only the real tokens
        assert sum(s[1] for s in packed["shapes"]) < sum(4 * s[1] for s in padded["shapes"])
        assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-5)


def test_qa_metrics_packed_equal_padded(reports):
    results = reports[0]["qa_eval"]
    assert results["losses"][-1] < results["losses"][0]
    packed, padded = results["packed"], results["padded"]
    assert packed["f1"] > 0  # the model learned something to compare
    assert packed["exact_match"] == padded["exact_match"] and packed["f1"] == padded["f1"]
    assert reports[1]["qa_eval"]["packed"] is None  # metrics on rank 0 only


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
