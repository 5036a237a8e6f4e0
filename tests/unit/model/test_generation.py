"""generate(): KV-cache correctness, token-for-token parity with transformers, sampling, stopping, lengths, errors."""
import pytest
import torch
import transformers
from torch import nn

from finetune.config import GenerationConfig
from finetune.model import GPTJConfig, GPTJForCausalLM, build_model
from finetune.model.generation import GenerationError, generate, generate_text, left_pad, sampling_filter
from finetune.model.tokenizer import GPTJTokenizer

TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4, rotary_dim=8)
PAD = 999  # distinct from any eos used below, so padding after eos is visible
NO_EOS = None


@pytest.fixture(scope="module")
def pair():
    """Our model and transformers' GPT-J with the same random weights."""
    torch.manual_seed(0)
    # transformers keeps GPT-J's eos 50256, outside this vocabulary: it never stops a row unless told to.
    hf_config = transformers.GPTJConfig(**TINY, pad_token_id=PAD)
    hf = transformers.GPTJForCausalLM(hf_config).eval()
    ours = build_model(GPTJConfig(**TINY, pad_token_id=PAD), task="clm").eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of different lengths, left padded with PAD."""
    g = torch.Generator().manual_seed(3)
    return left_pad([torch.randint(0, PAD, (n,), generator=g).tolist() for n in (9, 4, 1)], PAD)


def hf_generate(hf, ids, mask, **kwargs):
    return hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kwargs)


class Recorder(nn.Module):
    """Wraps a model and records each forward's inputs and last-position logits, as generate() sees them."""

    def __init__(self, model: GPTJForCausalLM):
        super().__init__()
        self.model, self.config = model, model.config
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        self.calls.append((input_ids.shape[1], out.logits[:, -1].clone()))
        return out


# --- the KV cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_equals_full_recomputation(pair, prompts, padded):
    ours, _ = pair
    ids, mask = prompts if padded else (prompts[0][:1], None)  # row 0 is the longest: no padding
    recorder = Recorder(ours)
    new = 12
    out = generate(recorder, ids, mask, max_new_tokens=new, eos_token_id=NO_EOS, pad_token_id=PAD)

    # One forward over the prompt, then one token per step, none after the last token.
    assert [length for length, _ in recorder.calls] == [ids.shape[1]] + [1] * (new - 1)
    full_mask = torch.ones(len(ids), ids.shape[1] + new, dtype=torch.long)
    if mask is not None:
        full_mask[:, : ids.shape[1]] = mask
    for step, (_, cached_logits) in enumerate(recorder.calls):
        width = ids.shape[1] + step
        full = ours(out[:, :width], attention_mask=full_mask[:, :width]).logits[:, -1]
        torch.testing.assert_close(cached_logits, full, atol=1e-5, rtol=1e-5)
        # Greedy picks the argmax of the uncached logits too.
        assert torch.equal(out[:, width], full.argmax(-1))
    assert torch.equal(out[:, : ids.shape[1]], ids)


# --- parity with transformers ----------------------------------------------------------------------------
def test_greedy_equals_transformers_on_left_padded_batch(pair, prompts):
    ours, hf = pair
    ids, mask = prompts
    expected = hf_generate(hf, ids, mask, max_new_tokens=30, do_sample=False)
    got = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=NO_EOS, pad_token_id=PAD)
    assert got.shape == (3, ids.shape[1] + 30)
    assert torch.equal(got, expected)


def test_eos_stops_rows_like_transformers(pair, prompts):
    ours, hf = pair
    ids, mask = prompts
    free_run = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=NO_EOS, pad_token_id=PAD)
    eos = int(free_run[1, ids.shape[1] + 5])  # row 1 emits this as its 6th new token
    got = generate(ours, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=30, do_sample=False, eos_token_id=eos))

    prompt_len = ids.shape[1]
    for row in range(3):
        new = got[row, prompt_len:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert new[:stop] == free_run[row, prompt_len: prompt_len + stop].tolist()
        assert all(t == PAD for t in new[stop:])
    assert got[1, prompt_len + 6:].eq(PAD).all()


def test_decoding_stops_once_every_row_has_ended(pair, prompts):
    ours, _ = pair
    ids, mask = prompts[0][1:2], prompts[1][1:2]
    free_run = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=NO_EOS)
    eos = int(free_run[0, ids.shape[1] + 3])
    first = free_run[0, ids.shape[1]:].tolist().index(eos)
    got = generate(ours, ids, mask, max_new_tokens=10, eos_token_id=eos)
    assert got.shape[1] == ids.shape[1] + first + 1
    assert int(got[0, -1]) == eos


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.5), (0.9, 5, 1.0)])
def test_sampling_equals_transformers_with_the_same_seed(pair, prompts, temperature, top_k, top_p):
    ours, hf = pair
    ids, mask = prompts
    got = generate(
        ours, ids, mask, max_new_tokens=20, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=7, eos_token_id=NO_EOS, pad_token_id=PAD,
    )
    torch.manual_seed(7)  # transformers samples from the global generator
    expected = hf_generate(
        hf, ids, mask, max_new_tokens=20, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.3), (2.0, 10, 0.8)])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone())
    got = sampling_filter(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


# --- sampling ---------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_seeds_differ(pair, prompts):
    ours, _ = pair
    ids, mask = prompts
    kwargs = dict(max_new_tokens=15, do_sample=True, eos_token_id=NO_EOS, pad_token_id=PAD)
    a, b = generate(ours, ids, mask, seed=1, **kwargs), generate(ours, ids, mask, seed=1, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(ours, ids, mask, seed=2, **kwargs))
    # A generator gives the same stream as the seed it was seeded with.
    assert torch.equal(a, generate(ours, ids, mask, generator=torch.Generator().manual_seed(1), **kwargs))


def test_top_k_1_sampling_equals_greedy(pair, prompts):
    ours, _ = pair
    ids, mask = prompts
    greedy = generate(ours, ids, mask, max_new_tokens=15, eos_token_id=NO_EOS)
    sampled = generate(ours, ids, mask, max_new_tokens=15, do_sample=True, top_k=1, temperature=3.0, seed=5,
                       eos_token_id=NO_EOS)
    assert torch.equal(sampled, greedy)


# --- lengths --------------------------------------------------------------------------------------------
def test_max_length_counts_the_prompt_and_max_new_tokens_does_not(pair, prompts):
    ours, _ = pair
    ids, mask = prompts
    by_length = generate(ours, ids, mask, max_length=ids.shape[1] + 7, eos_token_id=NO_EOS)
    by_new = generate(ours, ids, mask, max_new_tokens=7, eos_token_id=NO_EOS)
    assert by_length.shape == by_new.shape == (3, ids.shape[1] + 7)
    assert torch.equal(by_length, by_new)
    assert generate(ours, ids, mask, eos_token_id=NO_EOS).shape[1] == ids.shape[1] + 20  # transformers' default


def test_generate_restores_training_mode_and_builds_no_graph(pair, prompts):
    ours, _ = pair
    ours.train()
    try:
        out = generate(ours, prompts[0], prompts[1], max_new_tokens=2)
        assert ours.training and not out.requires_grad
    finally:
        ours.eval()


# --- argument checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(max_length=30, max_new_tokens=5), "only one"),
    (dict(max_length=9), "must exceed the prompt length"),
    (dict(max_new_tokens=0), "at least 1"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(seed=1, generator=torch.Generator()), "either seed or generator"),
])
def test_invalid_arguments_raise_clear_errors(pair, prompts, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(pair[0], *prompts, **kwargs)


def test_greedy_ignores_sampling_temperature(pair, prompts):
    ours, _ = pair
    ids, mask = prompts
    assert torch.equal(generate(ours, ids, mask, max_new_tokens=3, temperature=0.0),
                       generate(ours, ids, mask, max_new_tokens=3))


@pytest.mark.parametrize("make_inputs,message", [
    (lambda ids, mask: (ids[0], None), "non-empty \\(batch, length\\)"),
    (lambda ids, mask: (ids.float(), None), "integer token ids"),
    (lambda ids, mask: (ids, mask[:, :-1]), "must match"),
    (lambda ids, mask: (ids, mask.flip(1)), "Pad prompts on the LEFT"),
])
def test_invalid_inputs_raise_clear_errors(pair, prompts, make_inputs, message):
    with pytest.raises(GenerationError, match=message):
        generate(pair[0], *make_inputs(*prompts))


def test_left_pad_puts_padding_first():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(GenerationError, match="Prompt 1 is empty"):
        left_pad([[1], []], pad_token_id=0)
    with pytest.raises(GenerationError, match="no prompts"):
        left_pad([], pad_token_id=0)


# --- text in, text out --------------------------------------------------------------------------------------
def test_generate_text_returns_the_decoded_continuations():
    torch.manual_seed(0)
    model = build_model(GPTJConfig.preset("tiny"), task="clm")
    tokenizer = GPTJTokenizer.from_pretrained(None)
    prompts = ["Hello there, my friend", "A", ""]
    config = GenerationConfig(max_new_tokens=6, do_sample=True, seed=3)
    completions = generate_text(model, tokenizer, prompts, config)

    # Same batch by hand: an empty prompt starts from <|endoftext|>.
    token_lists = [tokenizer.encode(prompts[0]), tokenizer.encode(prompts[1]), [tokenizer.eos_token_id]]
    ids, mask = left_pad(token_lists, tokenizer.pad_token_id)
    expected = generate(model, ids, mask, max_new_tokens=6, do_sample=True, seed=3)[:, ids.shape[1]:]
    assert len(completions) == 3
    for completion, row in zip(completions, expected.tolist()):
        assert completion.token_ids == row[: len(completion.token_ids)]
        assert completion.ended_with_eos == (len(completion.token_ids) < 6)
        assert completion.text == tokenizer.decode(completion.token_ids)


def test_generate_text_stops_at_eos_and_drops_it():
    model = build_model(GPTJConfig.preset("tiny"), task="clm")
    tokenizer = GPTJTokenizer.from_pretrained(None)
    with torch.no_grad():  # make <|endoftext|> the certain next token
        model.lm_head.bias.zero_()
        model.lm_head.bias[tokenizer.eos_token_id] = 1e4
    [completion] = generate_text(model, tokenizer, ["Once upon"], GenerationConfig(max_new_tokens=5))
    assert completion.ended_with_eos and completion.token_ids == [] and completion.text == ""
