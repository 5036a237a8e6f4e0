"""Fused q/k/v/fc_in projections (model.fused_projections): the same numbers as the four separate layers, and
Hugging Face's names and layout in every state dict and checkpoint.

Tolerances. A fused output column is the dot product the separate layer computes, over the same K = n_embd inputs;
only the GEMM's blocking of the output columns can differ, and with it the order of the K-term fp32 sum. Each
order's result is within gamma_K * sum_i |x_i| |w_i| of the exact value (gamma_K = K u / (1 - K u), u = 2^-24,
Higham's bound for recursive or blocked summation), so the two differ by at most twice that. The input gradient
of the fused product sums 3 n_embd + inner_dim terms at once where the separate layers sum four GEMMs of at most
inner_dim terms and then add the four results: each within gamma_(3 n_embd + inner_dim) times the sum of
|g| |w| products. These bounds hold on any CPU (AVX2, AVX-512, AMX, the `default` kernels).

Whole-model comparisons use the HF parity tests' tolerances (rtol 1e-5 on losses, 1e-4 on gradients): the
projections' rounding (relative 2 gamma_64 ~ 8e-6 at width 64, bounded above) reaches the loss at that order and a
gradient at a few times it, while a misplaced row, head or rotary dim moves them by O(1).
"""
import dataclasses

import pytest
import torch

from finetune.model import GPTJConfig, build_model
from finetune.model.gptj import FUSED_PARTS, GPTJBlock, fused_part_rows
from finetune.model.hf_weights import hf_names_of, hf_state_dict, load_state_into, save_pretrained

U = 2.0 ** -24
TINY = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
# GPT-J 6B's attention (width 4096, 16 heads of 256 with 64 rotary dims): a slicing bug in the head or rotary
# layout that a width-64 model could hide shows here. The MLP is narrower than 6B's 16384 to keep CI fast; the
# fused weight's row offsets still differ from every part's size (4096 * 3, then 2048).
GPTJ_WIDTH = dict(n_embd=4096, n_head=16, rotary_dim=64, n_inner=2048)


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def pair(config: GPTJConfig, task: str = "clm"):
    """An unfused and a fused model with the same weights."""
    unfused = build_model(config, task=task, init=False)
    torch.manual_seed(0)
    unfused.init_weights()
    fused = build_model(config, task=task, device="meta", fused_projections=True)
    fused.load_state_dict(unfused.state_dict(), strict=True, assign=True)
    return unfused.eval(), fused.eval()


def separate_projections(block: GPTJBlock, h: torch.Tensor) -> list[torch.Tensor]:
    return [block.get_submodule(part)(h) for part in FUSED_PARTS]


@pytest.mark.parametrize("shape", ["tiny", "gptj_width"])
def test_fused_projection_equals_the_four_layers_within_summation_bound(shape):
    config = GPTJConfig(**{**TINY, "n_layer": 1, **({} if shape == "tiny" else GPTJ_WIDTH)})
    torch.manual_seed(0)
    unfused_block = GPTJBlock(config)
    with torch.device("meta"):
        fused_block = GPTJBlock(config, fused=True)
    fused_block.load_state_dict(unfused_block.state_dict(), strict=True, assign=True)
    with torch.no_grad():  # a non-zero fc_in bias, so that its place in the fused product is checked too
        unfused_block.mlp.fc_in.bias.normal_()
        fused_block.qkv_fc_in.bias.copy_(unfused_block.mlp.fc_in.bias)
    h = torch.randn(2, 5, config.n_embd, requires_grad=True)
    h_fused = h.detach().clone().requires_grad_()
    expected = separate_projections(unfused_block, h)
    got = fused_block.qkv_fc_in(h_fused)
    d = config.n_embd
    weights = [unfused_block.get_submodule(part).weight for part in FUSED_PARTS]
    for name, e, g, w in zip(FUSED_PARTS, expected, got, weights):
        bound = 2 * gamma(d) * (h.detach().abs() @ w.detach().abs().T)
        assert e.shape == g.shape
        assert ((e - g).abs() <= bound).all(), name
    # Backward: the same upstream gradients into both.
    torch.manual_seed(1)
    upstream = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(expected, upstream)
    torch.autograd.backward(got, upstream)
    k_fused, k_separate = 3 * d + config.inner_dim, config.inner_dim + 3
    g_abs = torch.cat(upstream, dim=-1).abs()
    bound = (gamma(k_fused) + gamma(k_separate)) * (g_abs @ fused_block.qkv_fc_in.weight.detach().abs())
    assert ((h.grad - h_fused.grad).abs() <= bound).all()
    fused_grads = dict(zip(FUSED_PARTS, fused_block.qkv_fc_in.weight.grad.split(fused_part_rows(config))))
    tokens = h.shape[0] * h.shape[1]
    for name, g_up, w in zip(FUSED_PARTS, upstream, weights):  # each a sum over the tokens, bounded alike
        bound = 2 * gamma(tokens) * (g_up.reshape(tokens, -1).abs().T @ h.detach().reshape(tokens, -1).abs())
        assert ((w.grad - fused_grads[name]).abs() <= bound).all(), name
    torch.testing.assert_close(fused_block.qkv_fc_in.bias.grad, unfused_block.mlp.fc_in.bias.grad, rtol=0,
                               atol=2 * gamma(tokens) * upstream[3].abs().sum((0, 1)).max().item())


def test_gptj_width_block_matches_unfused():
    """A whole block at GPT-J 6B's width (heads, rotary dims): only rounding may differ, so a bound far below any
    layout bug. Attention and the MLP are smooth; the projections differ by at most 2 gamma_K |x||w|, which the
    block moves by at most a few times its weights' norms: 1e-4 is that with a wide margin (a misplaced head or
    rotary dim moves outputs by O(1))."""
    config = GPTJConfig(**{**TINY, "n_layer": 1, "vocab_size": 64, **GPTJ_WIDTH})
    unfused, fused = pair(config)
    ids = torch.randint(0, 64, (1, 12))
    a, b = unfused(ids, labels=ids), fused(ids, labels=ids)
    scale = a.logits.abs().max().item()
    assert (a.logits - b.logits).abs().max().item() <= 1e-4 * scale
    assert abs(a.loss.item() - b.loss.item()) <= 1e-4 * abs(a.loss.item())


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_forward_and_backward_equal_unfused(task):
    unfused, fused = pair(GPTJConfig(**TINY, num_labels=3, pad_token_id=999), task)
    ids = torch.randint(0, 999, (2, 9))
    labels = {"clm": {"labels": ids}, "cls": {"labels": torch.tensor([0, 2])},
              "qa": {"start_positions": torch.tensor([1, 3]), "end_positions": torch.tensor([2, 5])}}[task]
    out_u, out_f = unfused(ids, **labels), fused(ids, **labels)
    torch.testing.assert_close(out_f.loss, out_u.loss, rtol=1e-5, atol=1e-6)
    out_u.loss.backward()
    out_f.loss.backward()
    grads_u = {n: p.grad for n, p in unfused.named_parameters()}
    grads_f = hf_state_dict({n: p.grad for n, p in fused.named_parameters()}, fused.config)
    assert set(grads_u) == set(grads_f)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_has_hf_names_in_unfused_order_and_loads_strict():
    unfused, fused = pair(GPTJConfig(**TINY))
    state_u, state_f = unfused.state_dict(), fused.state_dict()
    assert list(state_f) == list(state_u)
    assert all(torch.equal(state_f[k], state_u[k]) for k in state_u)
    assert "transformer.h.1.attn.q_proj.weight" in state_f and not any("qkv_fc_in" in k for k in state_f)
    # Both directions load strictly; the round trip leaves the fused weight as it was.
    fresh = build_model(GPTJConfig(**TINY), task="clm", init=False, fused_projections=True)
    assert not fresh.load_state_dict(state_f, strict=True).missing_keys
    assert torch.equal(fresh.transformer.h[0].qkv_fc_in.weight, fused.transformer.h[0].qkv_fc_in.weight)
    back = build_model(GPTJConfig(**TINY), task="clm", init=False)
    back.load_state_dict(state_f, strict=True)
    # A state dict lacking one of the four is an error naming it, as for an unfused model.
    del state_u["transformer.h.0.attn.k_proj.weight"]
    with pytest.raises(RuntimeError, match="k_proj.weight"):
        fresh.load_state_dict(state_u, strict=True)


def test_zero3_placeholders_pass_through_state_dict_hooks():
    """DeepSpeed's ZeRO-3 checkpoints save and load the module state with every parameter partitioned away
    (0 elements): the hooks must pass those placeholders through, in both directions."""
    model = build_model(GPTJConfig(**TINY), task="clm", init=False, fused_projections=True)
    for p in model.parameters():
        p.data = torch.empty(0)
    state = model.state_dict()
    assert state["transformer.h.0.attn.q_proj.weight"].numel() == 0
    model.load_state_dict(state, strict=True)


def test_random_init_draws_the_unfused_numbers():
    """The same seed gives the same weights, and leaves the generator where the unfused init leaves it."""
    config = GPTJConfig(**TINY)
    states, next_draws = [], []
    for fused in (False, True):
        model = build_model(config, task="clm", init=False, fused_projections=fused)
        torch.manual_seed(7)
        model.init_weights()
        states.append(model.state_dict())
        next_draws.append(torch.rand(1).item())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert next_draws[0] == next_draws[1]


def test_hf_checkpoint_round_trip(tmp_path):
    """save_pretrained of a fused model (or of a DeepSpeed-style state dict named by parameter) writes HF's four
    tensors; load_state_into streams them back into the fused weight."""
    from safetensors.torch import load_file

    config = GPTJConfig(**TINY)
    unfused, fused = pair(config)
    save_pretrained(fused, tmp_path / "model", config=config, task="clm")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert set(saved) == set(unfused.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in unfused.state_dict().items())
    by_parameter = {n: p.detach() for n, p in fused.named_parameters()}  # as _zero3_consolidated_16bit_state_dict
    save_pretrained(by_parameter, tmp_path / "by_parameter", config=config, task="clm", max_shard_size="200KB")
    loaded = build_model(config, task="clm", device="meta", fused_projections=True)
    report = load_state_into(loaded, tmp_path / "by_parameter")
    assert report.unused == [] and "transformer.h.0.qkv_fc_in.weight" in report.loaded
    for (name, p), (_, q) in zip(loaded.named_parameters(), fused.named_parameters()):
        assert torch.equal(p, q), name


def test_lazy_tensors_are_split_without_gathering_twice():
    """tools/export's ZeRO-3 tensors are gathered when saved: a fused one once for its four parts."""
    config = GPTJConfig(**TINY)
    weight = torch.randn(sum(fused_part_rows(config)), config.n_embd)
    gathered = []

    class Lazy:
        shape, dtype = weight.shape, weight.dtype

        def materialize(self):
            gathered.append(1)
            return weight

    parts = hf_state_dict({"transformer.h.0.qkv_fc_in.weight": Lazy()}, config)
    assert list(parts) == hf_names_of("transformer.h.0.qkv_fc_in.weight")
    assert [tuple(p.shape) for p in parts.values()] == [(r, config.n_embd) for r in fused_part_rows(config)]
    assert torch.equal(torch.cat([p.detach() for p in parts.values()]), weight)
    assert len(gathered) == 1


def test_misshaped_checkpoint_names_the_hf_tensor(tmp_path):
    from finetune.model.hf_weights import CheckpointError

    config = GPTJConfig(**TINY)
    save_pretrained(build_model(config, task="clm"), tmp_path / "m", config=config, task="clm")
    wider = build_model(dataclasses.replace(config, n_inner=300), task="clm", device="meta", fused_projections=True)
    with pytest.raises(CheckpointError, match=r"qkv_fc_in\.weight .*n_inner"):
        load_state_into(wider, tmp_path / "m")


def test_config_auto_true_false_and_lora_refusal():
    from finetune.config import ConfigError, LoraConfig, ModelConfig

    lora = LoraConfig(enabled=True)
    assert ModelConfig().uses_fused_projections(LoraConfig()) is True
    assert ModelConfig().uses_fused_projections(lora) is False
    assert ModelConfig(fused_projections=False).uses_fused_projections(LoraConfig()) is False
    with pytest.raises(ConfigError, match=r"model\.fused_projections=true .* LoRA.*auto"):
        ModelConfig(fused_projections=True).uses_fused_projections(lora)


def test_resume_signature_tells_fused_from_unfused():
    from finetune.config import ConfigError, LoraConfig
    from finetune.training.resume import check_same_model, model_signature

    config, lora = GPTJConfig(**TINY), LoraConfig()
    unfused = model_signature(config, task="clm", lora=lora)
    assert "fused_projections" not in unfused  # as checkpoints written before the option
    fused = model_signature(config, task="clm", lora=lora, fused_projections=True)
    with pytest.raises(ConfigError, match="fused_projections"):
        check_same_model(unfused, fused, checkpoint="ckpt")


def test_planner_counts_the_fused_model():
    """The memory planner lists the fused model's own parameters (the same count, one tensor where four were) and
    the q and k columns the fused product keeps alive in training: 2 * n_embd more per token per layer."""
    from finetune.planning.estimate import (PRECISION_BYTES, PRESET_SHAPES, RunShape, activation_bytes_per_layer,
                                            parameter_tensors)

    shape = PRESET_SHAPES["gptj-6b"]
    unfused, fused = RunShape(activation_checkpointing=False), RunShape(activation_checkpointing=False,
                                                                        fused_projections=True)
    tensors = parameter_tensors(shape, fused)
    assert sum(t.numel for t in tensors) == sum(t.numel for t in parameter_tensors(shape, unfused)) == 6_050_882_784
    model = build_model(GPTJConfig(), task="clm", device="meta", fused_projections=True)
    assert [t.numel for t in tensors] == [p.numel() for p in model.parameters()]  # the same tensors, in order
    extra = activation_bytes_per_layer(shape, fused) - activation_bytes_per_layer(shape, unfused)
    assert extra == 2 * shape.n_embd * PRECISION_BYTES[fused.precision] * fused.seq_len * fused.micro_batch_size
    lora = RunShape(lora_rank=8, fused_projections=True)  # LoRA keeps the separate layers
    assert len(parameter_tensors(shape, lora)) == len(parameter_tensors(shape, RunShape(lora_rank=8)))


def test_packed_rows_and_activation_checkpointing_equal_unfused():
    """A packed row (cu_seq_lens: attention per example) with activation checkpointing: the fused block goes through
    the same attention code, so loss and gradients match the unfused model's (the bounds of the tests above)."""
    unfused, fused = pair(GPTJConfig(**TINY))
    ids = torch.randint(0, 999, (1, 14))
    cu_seq_lens = torch.tensor([0, 5, 6, 14])
    grads = []
    for model in (unfused, fused):
        model.train()
        model.gradient_checkpointing_enable()
        out = model(ids, labels=ids, cu_seq_lens=cu_seq_lens)
        out.loss.backward()
        grads.append((out.loss, hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.config)))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
