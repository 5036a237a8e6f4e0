"""QLoRA (lora=qlora): a 4-bit NF4 base quantized while loading, its adapter loading onto transformers' 4-bit GPT-J,
merging into the original 16-bit weights, and what the config refuses.

Real bitsandbytes on the CPU: no mock. The reference is transformers' GPT-J quantized by bitsandbytes with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True).
"""
import math
import weakref

import peft
import pytest
import torch
import transformers

from finetune.config import LoraConfig
from finetune.model import GPTJConfig, build_model
from finetune.model.hf_weights import load_state_into, save_pretrained
from finetune.model.quantized import (
    NF4Settings,
    is_quantized_linear,
    linear_weight_bytes,
    load_pretrained_quantized,
    prepare_for_quantized_load,
    quantize_linears,
)
from finetune.planning.estimate import NF4_BYTES_PER_WEIGHT
from finetune.training.lora import (
    apply_lora,
    merged_quantized_state_dict,
    save_adapter,
)

TINY = dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, num_labels=3,
            pad_token_id=511)
QLORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], quantize_base="nf4")
HF_CLASSES = {"clm": transformers.GPTJForCausalLM, "cls": transformers.GPTJForSequenceClassification}
IDS = torch.randint(0, 511, (2, 9), generator=torch.Generator().manual_seed(2))
LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny fp32 GPT-J saved in small shards (the loader streams across files)."""
    torch.manual_seed(0)
    model = build_model(GPTJConfig(**TINY), task="clm")
    out = tmp_path_factory.mktemp("tiny_gptj")
    save_pretrained(model, out, config=GPTJConfig(**TINY), task="clm", max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def hf_quantized(checkpoint, task):
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    model = HF_CLASSES[task].from_pretrained(checkpoint, quantization_config=bnb_config, dtype=torch.float32,
                                             device_map="cpu", attn_implementation="eager", num_labels=3)
    for module in model.modules():
        # bitsandbytes' AVX512-BF16 inference kernel computes in bf16 whatever the compute dtype; ours turns it off
        # (finetune.model.quantized.NF4Linear), so both compute in fp32 here on any CPU.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def test_only_the_block_linears_are_4bit_and_hold_the_bytes_transformers_quantizes(checkpoint):
    ours = load_pretrained_quantized(checkpoint, task="clm", dtype=torch.float32)
    hf = hf_quantized(checkpoint, "clm")
    quantized = {name for name, module in ours.named_modules() if is_quantized_linear(module)}
    assert quantized == {f"transformer.h.{i}.{part}.{n}" for i in range(2) for n in LINEARS
                         for part in (["attn"] if n.endswith("proj") else ["mlp"])}
    for name in ("transformer.wte.weight", "transformer.h.0.ln_1.weight", "lm_head.weight",
                 "transformer.h.0.mlp.fc_in.bias"):
        assert ours.get_parameter(name).dtype == torch.float32, name
    for name in quantized:
        mine, theirs = ours.get_submodule(name).weight, hf.get_submodule(name).weight
        assert mine.dtype == torch.uint8 and torch.equal(mine.data, theirs.data), name
        for attr in ("absmax", "code"):
            assert torch.equal(getattr(mine.quant_state, attr), getattr(theirs.quant_state, attr)), name
        assert torch.equal(mine.quant_state.state2.absmax, theirs.quant_state.state2.absmax), name
    # 4 bits a weight, one 8-bit absmax per 64 weights, one fp32 absmax per 256 of those, and per layer the two
    # code tables (16 + 256 fp32): what the planner counts (NF4_BYTES_PER_WEIGHT, tables left out as negligible).
    numels = [ours.get_submodule(name).in_features * ours.get_submodule(name).out_features for name in quantized]
    expected = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * (16 + 256) for n in numels)
    assert linear_weight_bytes(ours) == {"quantized": expected, "bf16": 2 * sum(numels)}
    assert expected - 4 * (16 + 256) * len(numels) == pytest.approx(NF4_BYTES_PER_WEIGHT * sum(numels), rel=0.01)


def test_quantizing_while_loading_holds_one_16bit_weight_at_a_time(checkpoint):
    model = build_model(GPTJConfig(**TINY), task="clm", device="meta")
    materialize = prepare_for_quantized_load(model, NF4Settings(compute_dtype=torch.float32))
    alive, most = [], 0

    def watched(name, tensor, placeholder):  # reference counting frees a dropped tensor at once: no gc needed
        nonlocal most
        alive[:] = [ref for ref in alive if ref() is not None]
        alive.append(weakref.ref(tensor))
        most = max(most, len(alive))
        return materialize(name, tensor, placeholder)

    load_state_into(model, checkpoint, dtype=torch.float32, device="cpu", materialize=watched)
    quantized_reads = [ref for ref in alive if ref() is not None]
    assert most <= 2  # the tensor being read, and at most the previous one not yet collected
    assert not [ref for ref in quantized_reads if ref().dim() == 2 and ref().shape[0] == 64]  # no 16-bit weight kept


@pytest.mark.parametrize("task", ["clm", "cls"])
def test_the_adapter_loads_with_peft_onto_transformers_4bit_gptj_with_our_logits(checkpoint, task, tmp_path):
    ours = apply_lora(load_pretrained_quantized(checkpoint, task=task, dtype=torch.float32,
                                                config_overrides={"num_labels": 3}), QLORA)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in ours.parameters():  # a trained adapter (B = 0 would make it a no-op) and a trained head
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    assert {type(ours.get_submodule(f"base_model.model.transformer.h.0.attn.{n}")).__module__
            for n in ("q_proj", "v_proj")} == {"peft.tuners.lora.bnb"}  # peft's 4-bit LoRA layer, as on transformers
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(checkpoint))
    hf = peft.PeftModel.from_pretrained(hf_quantized(checkpoint, task), tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        mask = torch.ones_like(IDS)
        mine, theirs = ours(input_ids=IDS, attention_mask=mask).logits, hf(input_ids=IDS, attention_mask=mask).logits
    # The 4-bit weights and constants are the same bytes (test above), so both sides dequantize to the same fp32
    # weights and differ only in the order of fp32 operations, as the unquantized models of
    # tests/unit/model/test_parity.py do: the same tolerance.
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mine, ours.get_base_model()(input_ids=IDS).logits * 0)  # not trivially zero
    # What launch/generate.py, predict.py and evaluate.py load from such a dir: the base quantized as recorded
    # (base_quantization_config.json), the adapter unmerged: the same model, so the same logits.
    from finetune.tools.predict import load_model_for_inference

    loaded = load_model_for_inference(tmp_path / "adapter", task=task, dtype=torch.float32)
    assert any(is_quantized_linear(m) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=mask).logits, mine, atol=1e-5, rtol=1e-5)
        sixteen_bit = load_model_for_inference(tmp_path / "adapter", task=task, dtype=torch.float32,
                                               quantize_base=False)
        assert not any(is_quantized_linear(m) for m in sixteen_bit.modules())
        assert not torch.allclose(sixteen_bit(input_ids=IDS, attention_mask=mask).logits, mine, atol=1e-5, rtol=1e-5)


def test_training_moves_only_the_adapter_through_the_4bit_base(checkpoint):
    model = apply_lora(load_pretrained_quantized(checkpoint, task="clm", dtype=torch.float32), QLORA).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    first = model.get_submodule("base_model.model.transformer.h.0.attn.q_proj")
    for step in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        # Through the 4-bit layers down to the first block's adapter (A's gradient is B^T(...): 0 while B = 0).
        for part in ("lora_B",) + (("lora_A",) if step else ()):
            assert getattr(first, part)["default"].weight.grad.abs().sum() > 0, (step, part)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param.detach(), frozen[name]), name


def test_merging_uses_the_original_16bit_weights_not_the_dequantized_4bit_ones():
    torch.manual_seed(0)
    base = build_model(GPTJConfig(**TINY), task="cls")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    quantized = apply_lora(quantize_linears(base, NF4Settings(compute_dtype=torch.float32)), QLORA)
    with torch.no_grad():
        for p in quantized.parameters():
            if p.requires_grad:
                p.add_(0.1)
    trained = dict(quantized.state_dict())
    a = trained["base_model.model.transformer.h.1.mlp.fc_out.lora_A.default.weight"]
    b = trained["base_model.model.transformer.h.1.mlp.fc_out.lora_B.default.weight"]
    head = trained["base_model.model.score.modules_to_save.default.weight"]
    expected = original["transformer.h.1.mlp.fc_out.weight"] + (QLORA.alpha / QLORA.r) * b @ a
    merged = merged_quantized_state_dict(trained, dict(original), QLORA)
    assert set(merged) == set(original)  # a plain GPT-J state dict: no 4-bit data, no quantization constants
    torch.testing.assert_close(merged["transformer.h.1.mlp.fc_out.weight"], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(merged["score.weight"], head)
    assert torch.equal(merged["transformer.wte.weight"], original["transformer.wte.weight"])
    # The dequantized base differs from the original by NF4's rounding: merging into it would keep that error.
    fc_out = quantized.get_submodule("base_model.model.transformer.h.1.mlp.fc_out").base_layer
    import bitsandbytes

    dequantized = bitsandbytes.functional.dequantize_4bit(fc_out.weight.data, fc_out.weight.quant_state)
    assert (dequantized - original["transformer.h.1.mlp.fc_out.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(64, 4096), (1000, 96)])  # whole rows per chunk, and blocks across rows
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])  # ZeRO-3 stores them as floats
def test_chunked_quantization_gives_bitsandbytes_bytes(monkeypatch, shape, storage):
    import bitsandbytes

    from finetune.model import quantized

    monkeypatch.setattr(quantized, "QUANTIZE_CHUNK", 64 * 100)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16) * 0.02
    packed, state = quantized.quantize_nf4(weight, NF4Settings(compute_dtype=torch.bfloat16, quant_storage=storage))
    expected, expected_state = bitsandbytes.functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage and torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    assert state.shape == expected_state.shape and state.dtype == expected_state.dtype
    assert torch.equal(state.absmax, expected_state.absmax) and torch.equal(state.offset, expected_state.offset)
    assert torch.equal(state.state2.absmax, expected_state.state2.absmax)
    assert torch.equal(bitsandbytes.functional.dequantize_4bit(packed, state),
                       bitsandbytes.functional.dequantize_4bit(expected, expected_state))
