"""The chunked causal-LM loss equals the plain full-logits path: loss, per-token losses and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from finetune.model import GPTJConfig, build_model
from finetune.model.chunked_loss import LMHead, default_chunk_tokens, linear_cross_entropy
from finetune.model.generation import generate

TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def plain_and_chunked(dtype, *, n=300, d=64, vocab=5000, chunk=64, seed=0, exact=True):
    """Per-token losses and (hidden, weight, bias) gradients of both paths under a random upstream gradient,
    and the exact (fp64) gradients when `exact`."""
    torch.manual_seed(seed)
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(vocab, d) * 0.05).to(dtype)
    bias = (torch.randn(vocab) * 0.1).to(dtype)
    targets = torch.randint(0, vocab, (n,))
    upstream = torch.rand(n)
    results = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if chunked:
            nll = linear_cross_entropy(*leaves, targets, chunk_tokens=chunk)
        else:
            nll = F.cross_entropy(F.linear(*leaves).float(), targets, reduction="none")
        (nll * upstream).sum().backward()
        results.append((nll.detach(), [t.grad for t in leaves]))
    if not exact:
        return results, None
    truth = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    (F.cross_entropy(F.linear(*truth), targets, reduction="none") * upstream.double()).sum().backward()
    return results, [t.grad for t in truth]


def test_fp32_equal_to_the_plain_path():
    (plain, chunked), _ = plain_and_chunked(torch.float32)
    assert rel(chunked[0], plain[0]) < 1e-6
    for name, a, b in zip(("hidden", "weight", "bias"), chunked[1], plain[1]):
        assert rel(a, b) < 1e-5, name


def test_bf16_equal_to_the_plain_path():
    (plain, chunked), truth = plain_and_chunked(torch.bfloat16)
    assert chunked[0].dtype == torch.float32
    assert rel(chunked[0], plain[0]) < 1e-5
    for name, a, b in zip(("hidden", "weight"), chunked[1][:2], plain[1][:2]):
        assert a.dtype == torch.bfloat16
        assert rel(a, b) < 1e-5, name
    # The bias gradient sums 300 tokens per class: both paths accumulate in fp32 and round once to bf16, in a
    # different order, which flips the last bit of a few classes. Neither is further from the exact value.
    assert rel(chunked[1][2], plain[1][2]) < 1e-4
    for a, b, exact in zip(chunked[1], plain[1], truth):
        assert rel(a, exact) <= rel(b, exact) * 1.01


@pytest.mark.slow
def test_gptj_width_and_vocabulary():
    # GPT-J 6B's head: width 4096, 50400 classes; 24 tokens in chunks of 10 (the last one partial).
    (plain, chunked), _ = plain_and_chunked(torch.float32, n=24, d=4096, vocab=50400, chunk=10, exact=False)
    assert rel(chunked[0], plain[0]) < 1e-6
    for name, a, b in zip(("hidden", "weight", "bias"), chunked[1], plain[1]):
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("chunk", [3, 7, 300, 10_000])
def test_any_chunk_size_gives_the_same_losses(chunk):
    (plain, _), _ = plain_and_chunked(torch.float32, chunk=64)
    (_, chunked), _ = plain_and_chunked(torch.float32, chunk=chunk)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), None, torch.zeros(2, dtype=torch.long),
                             chunk_tokens=0)


def test_default_chunk_follows_the_vocabulary():
    assert default_chunk_tokens(50400) == 512  # 512 x 50400 fp32 logits: 103 MB per chunk
    assert default_chunk_tokens(1000) == 8192
    assert default_chunk_tokens(10**7) == 64
    head = LMHead(8, 50400)
    assert head(torch.randn(3, 8)).shape == (3, 50400)  # without targets: the plain projection


def make_models(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    plain = build_model(GPTJConfig(**{**TINY, **overrides}), task="clm").to(dtype)
    chunked = build_model(GPTJConfig(**{**TINY, **overrides}), task="clm", loss_chunk_tokens=16).to(dtype)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def labelled_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 24))
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt
    labels[1, 15:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_causal_lm_loss_and_gradients_match_the_plain_head(dtype, reduction):
    plain, chunked = make_models(dtype)
    ids, labels = labelled_batch()
    out_plain = plain(ids, labels=labels, loss_reduction=reduction)
    out_chunked = chunked(ids, labels=labels, loss_reduction=reduction)
    assert out_chunked.logits is None and out_plain.token_nll is None
    assert rel(out_chunked.loss, out_plain.loss) < 1e-5
    count = int((labels[:, 1:] != -100).sum())
    if reduction == "sum":
        mean = plain(ids, labels=labels).loss
        assert rel(out_plain.loss, mean * count) < 1e-5
    out_plain.loss.backward()
    out_chunked.loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        tolerance = 1e-4 if (dtype == torch.bfloat16 and name == "lm_head.bias") else 1e-5  # see the bf16 test
        assert rel(p.grad, grads[name].grad) < tolerance, name


def test_token_losses_give_the_per_row_sums_of_the_full_logits():
    plain, chunked = make_models()
    ids, labels = labelled_batch()
    with torch.no_grad():
        logits = plain(ids).logits
        token_nll = chunked(ids, labels=labels).token_nll
    expected = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    assert token_nll.shape == (3, 23)
    torch.testing.assert_close(token_nll, expected, rtol=1e-5, atol=1e-5)
    assert bool((token_nll[labels[:, 1:] == -100] == 0).all())


def test_frozen_head_gets_no_gradient_and_the_rest_is_unchanged():
    plain, chunked = make_models()
    for model in (plain, chunked):
        model.lm_head.requires_grad_(False)
    ids, labels = labelled_batch()
    plain(ids, labels=labels).loss.backward()
    chunked(ids, labels=labels).loss.backward()
    assert chunked.lm_head.weight.grad is None
    grads = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        if p.requires_grad:
            assert rel(p.grad, grads[name].grad) < 1e-5, name


@pytest.mark.parametrize("train_head", [False, True])
def test_lora_with_and_without_a_trained_head(train_head):
    from finetune.config import LoraConfig
    from finetune.training.lora import apply_lora

    cfg = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, train_head=train_head)
    models = []
    for model in make_models():
        torch.manual_seed(2)  # the same adapter init for both
        models.append(apply_lora(model, cfg))
    plain, chunked = models
    ids, labels = labelled_batch()
    plain(input_ids=ids, labels=labels).loss.backward()
    out = chunked(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    grads = dict(plain.named_parameters())
    trained = [name for name, p in chunked.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trained)
    assert any("modules_to_save" in name and "lm_head" in name for name in trained) == train_head
    for name in trained:
        assert rel(dict(chunked.named_parameters())[name].grad, grads[name].grad) < 1e-5, name


def test_generation_is_unchanged():
    plain, chunked = make_models()
    prompt = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(chunked(prompt).logits, plain(prompt).logits)
    assert torch.equal(generate(chunked, prompt, max_new_tokens=6), generate(plain, prompt, max_new_tokens=6))
