"""Numerical parity with Hugging Face transformers' GPT-J, for the backbone and the three heads."""
import pytest
import torch
import transformers

from finetune.model import (
    GPTJConfig,
    GPTJForCausalLM,
    GPTJForQuestionAnswering,
    GPTJForSequenceClassification,
    build_model,
)
from finetune.model.hf_weights import hf_state_dict

TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4, rotary_dim=8)
PAIRS = {
    "clm": (GPTJForCausalLM, transformers.GPTJForCausalLM),
    "cls": (GPTJForSequenceClassification, transformers.GPTJForSequenceClassification),
    "qa": (GPTJForQuestionAnswering, transformers.GPTJForQuestionAnswering),
}
PAD = 999  # a pad id that never appears among the real tokens


def make_pair(task: str, *, fused: bool = False, **overrides):
    torch.manual_seed(0)
    hf_config = transformers.GPTJConfig(**{**TINY, **overrides}, num_labels=3, pad_token_id=PAD)
    hf_config._attn_implementation = "eager"
    hf = PAIRS[task][1](hf_config).eval()
    ours = build_model(GPTJConfig(**{**TINY, **overrides}, num_labels=3, pad_token_id=PAD), task=task,
                       fused_projections=fused).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def padded_batch(side: str):
    torch.manual_seed(1)
    lengths = [12, 7, 3]
    T = max(lengths)
    ids = torch.full((3, T), PAD)
    mask = torch.zeros(3, T, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(T - n, T)
        ids[row, cols] = torch.randint(0, PAD, (n,))
        mask[row, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def outputs_of(out, task):
    if task == "qa":
        return [out.start_logits, out.end_logits]
    return [out.logits]


def grads_by_hf_name(model):
    """Gradients under HF's parameter names (a fused block's split into q/k/v_proj and fc_in)."""
    return hf_state_dict({n: p.grad for n, p in model.named_parameters()}, model.config)


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
@pytest.mark.parametrize("side,fused", [
    ("none", False), ("right", False), ("left", False),
    # Fused projections: left padding in CI (masks, positions, pads); the rest in make test-all.
    pytest.param("none", True, marks=pytest.mark.slow), pytest.param("right", True, marks=pytest.mark.slow),
    ("left", True),
])
def test_logits_loss_and_grads_match_transformers(task, side, fused):
    ours, hf = make_pair(task, fused=fused)
    if side == "none":
        ids = torch.randint(0, PAD, (2, 10))
        mask, positions = torch.ones_like(ids), None
    else:
        ids, mask, positions = padded_batch(side)
    # A token whose predecessor is padding has no meaningful prediction (left padding): no loss there.
    first_real = mask.argmax(-1)
    no_context = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0
    labels = {
        "clm": {"labels": ids.masked_fill((mask == 0) | no_context, -100)},
        "cls": {"labels": torch.tensor([0, 2, 1])[: ids.shape[0]]},
        # Answer spans inside the real tokens; 50 lies outside the sequence and is clamped and ignored as in HF.
        "qa": {
            "start_positions": (first_real + torch.tensor([50, 2, 0])[: len(ids)]),
            "end_positions": (first_real + torch.tensor([2, 2, 1])[: len(ids)]),
        },
    }[task]
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, **labels)
    out_ours, out_hf = ours(**kwargs), hf(**kwargs)

    real = mask.bool()
    for a, b in zip(outputs_of(out_ours, task), outputs_of(out_hf, task)):
        if task == "cls":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:  # padded positions carry no meaning; compare real tokens only
            torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    if task == "qa" and side == "left":
        # The QA softmax runs over every position, left pads included, whose outputs are arbitrary
        # (a pad query attends to no real key); only real positions are comparable.
        return
    torch.testing.assert_close(out_ours.loss, out_hf.loss, atol=1e-5, rtol=1e-5)

    out_ours.loss.backward()
    out_hf.loss.backward()
    hf_grads = dict(hf.named_parameters())
    ours_grads = grads_by_hf_name(ours)
    assert set(ours_grads) == set(hf_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, hf_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("problem_type,labels", [
    ("regression", torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])),
    ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
])
def test_classification_losses_match_transformers(problem_type, labels):
    ours, hf = make_pair("cls")
    ours.config.problem_type = hf.config.problem_type = problem_type
    ids = torch.randint(0, PAD, (2, 6))
    torch.testing.assert_close(ours(ids, labels=labels).loss, hf(input_ids=ids, labels=labels).loss)


def test_regression_single_output_matches_transformers():
    ours, hf = make_pair("cls")
    ours = build_model(GPTJConfig(**TINY, num_labels=1, pad_token_id=PAD), task="cls")
    hf = transformers.GPTJForSequenceClassification(transformers.GPTJConfig(**TINY, num_labels=1, pad_token_id=PAD))
    ours.load_state_dict(hf.state_dict())
    ids, labels = torch.randint(0, PAD, (3, 5)), torch.tensor([0.3, -2.0, 1.5])
    torch.testing.assert_close(ours(ids, labels=labels).loss, hf(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_full_rotary_and_other_activation_match_transformers(fused):
    ours, hf = make_pair("clm", fused=fused, rotary_dim=16, activation_function="gelu")
    ids = torch.randint(0, PAD, (2, 9))
    torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_state_dict_names_equal_transformers(fused):
    for task, (ours_cls, hf_cls) in PAIRS.items():
        with torch.device("meta"):
            ours = ours_cls(GPTJConfig(), fused_projections=fused)
            hf = hf_cls(transformers.GPTJConfig())
        assert set(ours.state_dict()) == set(hf.state_dict()), task
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


def test_gptj_6b_parameter_count_on_meta():
    model = build_model(GPTJConfig.preset("gptj-6b"), task="clm", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 6_050_882_784
    assert all(p.device.type == "meta" for p in model.parameters())


def test_random_init_follows_hf_scheme():
    model = build_model(GPTJConfig(**{**TINY, "n_layer": 1}), task="clm")
    w = model.transformer.h[0].mlp.fc_in.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.transformer.h[0].mlp.fc_in.bias) == 0
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(64))


def test_gradient_checkpointing_gives_the_same_gradients():
    ours, _ = make_pair("clm")
    ids = torch.randint(0, PAD, (2, 8))
    ours.train()
    ours(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    ours(ids, labels=ids).loss.backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)
