"""Packed rows (several examples in one row, `cu_seq_lens`): every example computes what it computes alone."""
import pytest
import torch
import torch.nn.functional as F

from finetune.model import GPTJConfig, build_model
from finetune.model.gptj import PackedSequences, packed_attention, packed_sdpa

TINY = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, num_labels=3)
LENGTHS = [7, 12, 1, 5]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def examples(seed=1, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g) for n in lengths]


def pack(seqs):
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return torch.cat(seqs)[None], cu


def model(task, **overrides):
    torch.manual_seed(0)
    return build_model(GPTJConfig(**{**TINY, **overrides}), task=task).eval()


def per_example_outputs(task, net, ids, cu, **kwargs):
    """Packed outputs split per example: clm logits (L, V), cls logits (num_labels,), qa (start, end) each (L,)."""
    out = net(ids, cu_seq_lens=cu, **kwargs)
    spans = [slice(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]
    if task == "clm":
        return [out.logits[0, s] for s in spans]
    if task == "cls":
        return list(out.logits)
    return [torch.stack([out.start_logits[0, s], out.end_logits[0, s]]) for s in spans]


def alone(task, net, seq):
    out = net(seq[None])
    if task == "clm":
        return out.logits[0]
    if task == "cls":
        return out.logits[0]
    return torch.stack([out.start_logits[0], out.end_logits[0]])


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_each_example_of_a_packed_row_equals_the_example_alone(task):
    net, seqs = model(task), examples()
    ids, cu = pack(seqs)
    with torch.no_grad():
        packed = per_example_outputs(task, net, ids, cu)
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(packed[i], alone(task, net, seq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", ["clm", "cls", "qa"])
def test_no_attention_across_examples(task):
    net, seqs = model(task), examples()
    changed = [s.clone() for s in seqs]
    changed[1] = (changed[1] + 1) % 1000  # every token of example 1 differs
    with torch.no_grad():
        before = per_example_outputs(task, net, *pack(seqs))
        after = per_example_outputs(task, net, *pack(changed))
    for i in (0, 2, 3):
        assert torch.equal(before[i], after[i]), i
    assert not torch.allclose(before[1], after[1])


def test_gptj_6b_layer_shapes():
    # GPT-J 6B's attention geometry: width 4096, 16 heads of 256, rotary on the first 64 dims of each head.
    net = model("cls", n_embd=4096, n_head=16, rotary_dim=64, n_layer=1)
    seqs = examples(lengths=[9, 4, 13])
    with torch.no_grad():
        packed = per_example_outputs("cls", net, *pack(seqs))
        for i, seq in enumerate(seqs):
            torch.testing.assert_close(packed[i], alone("cls", net, seq), rtol=1e-5, atol=1e-5)


def loss_inputs(task, seqs):
    """Each example's label kwargs alone, and the packed batch's."""
    if task == "clm":
        alone = [{"labels": s[None].clone()} for s in seqs]
        labels = torch.cat(seqs).clone()
        labels[torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)[:-1]] = -100  # nothing predicts a first token
        return alone, {"labels": labels[None]}
    if task == "cls":
        labels = torch.tensor([0, 2, 1, 2])
        return [{"labels": labels[i : i + 1]} for i in range(len(seqs))], {"labels": labels}
    # qa: in-span answers, one outside its own example (ignored), one at the example's last token
    starts, ends = torch.tensor([2, 30, 0, 4]), torch.tensor([4, 31, 0, 4])
    alone = [{"start_positions": starts[i : i + 1], "end_positions": ends[i : i + 1]} for i in range(len(seqs))]
    return alone, {"start_positions": starts, "end_positions": ends}


@pytest.mark.parametrize("task,chunked", [("clm", False), ("clm", True), ("cls", False), ("qa", False)])
def test_packed_summed_loss_and_gradients_equal_the_examples_alone(task, chunked):
    net, seqs = model(task), examples()
    net.train()
    if chunked:
        net.loss_chunk_tokens = 4
    alone_kwargs, packed_kwargs = loss_inputs(task, seqs)
    total = sum(net(seq[None], loss_reduction="sum", **kw).loss for seq, kw in zip(seqs, alone_kwargs))
    total.backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    ids, cu = pack(seqs)
    packed = net(ids, cu_seq_lens=cu, loss_reduction="sum", **packed_kwargs).loss
    assert rel(packed, total) < 1e-5
    packed.backward()
    for name, p in net.named_parameters():
        # QA's ln_f.bias and qa_outputs.bias gradients are zero up to rounding (a shift of every position's logit
        # cancels in the softmax): for them only an absolute bound means anything.
        assert rel(p.grad, expected[name]) < 1e-5 or float((p.grad - expected[name]).abs().max()) < 1e-6, name


def test_activation_checkpointing_of_packed_rows():
    net, seqs = model("cls"), examples()
    net.train()
    ids, cu = pack(seqs)
    labels = torch.tensor([0, 2, 1, 2])
    net(ids, cu_seq_lens=cu, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    net.gradient_checkpointing_enable()
    net(ids, cu_seq_lens=cu, labels=labels).loss.backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_qa_mean_loss_ignores_answers_outside_their_example():
    net, seqs = model("qa"), examples()
    _, kw = loss_inputs("qa", seqs)
    ids, cu = pack(seqs)
    with torch.no_grad():
        mean = net(ids, cu_seq_lens=cu, **kw).loss
        total = net(ids, cu_seq_lens=cu, loss_reduction="sum", **kw).loss
    # example 1's answer (30, 31) lies past its 12 tokens: three examples carry a loss
    assert rel(mean, total / 3) < 1e-6


def test_packed_input_errors():
    net = model("clm")
    ids, cu = pack(examples())
    with pytest.raises(ValueError, match="one row"):
        net(ids.expand(2, -1), cu_seq_lens=cu)
    with pytest.raises(ValueError, match="must rise from 0"):
        net(ids, cu_seq_lens=torch.tensor([0, 5, 5, ids.shape[1]]))
    with pytest.raises(ValueError, match="must rise from 0"):
        net(ids, cu_seq_lens=torch.tensor([0, 5, ids.shape[1] - 1]))
    with pytest.raises(ValueError, match="loss_reduction"):
        net(ids, labels=ids, loss_reduction="avg")


# --- packed_attention itself: one kernel call per packed row ------------------------------------------------------
def per_example_attention(q, k, v, lengths, dropout_p=0.0):
    """The reference: SDPA on each example alone (what the packed row must reproduce)."""
    outputs, start = [], 0
    for n in lengths:
        q_i, k_i, v_i = (t[None, start:start + n].transpose(1, 2) for t in (q, k, v))
        outputs.append(F.scaled_dot_product_attention(q_i, k_i, v_i, dropout_p=dropout_p, is_causal=n > 1)[0]
                       .transpose(0, 1))
        start += n
    return torch.cat(outputs)


def attention_rounding_bound(q, k, v, longest):
    """Two fp32 evaluations of softmax(q k^T / sqrt(D)) v that differ only in summation order and blocking differ
    by at most 2 x one's error: each score's dot product errs by <= D u |q||k| / sqrt(D) (u = 2^-24), which moves a
    softmax weight by <= 2 x that relatively; exp, the normalising sum and the weighted sum of v add <= (L + 2) u.
    The output, a convex combination of v rows, errs by <= max|v| times the weights' relative error."""
    u, D = 2.0 ** -24, q.shape[-1]
    score_error = D * u * float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) / D ** 0.5
    return 2 * float(v.abs().max()) * (2 * score_error + (longest + 2) * u)


def qkv(lengths, seed=0, n_head=4, head_dim=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), n_head, head_dim, generator=g) for _ in range(3)]


def packed_of(lengths):
    return PackedSequences.from_cu_seq_lens(torch.tensor([0, *lengths]).cumsum(0).int(), sum(lengths))


@pytest.mark.parametrize("lengths,block_diagonal", [
    ([7, 12, 1, 5], False),           # similar lengths: the padded layout
    ([19] * 8, False),                # bundled qa's short features
    ([1], False),
    ([300, 3, 4, 5, 2], True),        # one long example: a block-diagonal mask costs less than padding to 300
])
def test_packed_attention_is_one_call_equal_to_each_example_alone(lengths, block_diagonal, monkeypatch):
    q, k, v = qkv(lengths)
    packed = packed_of(lengths)
    assert (packed.block_mask is not None) == block_diagonal
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    y = packed_attention(q, k, v, packed)
    assert len(calls) == 1  # no loop over the examples
    monkeypatch.undo()
    expected = per_example_attention(q, k, v, lengths)
    assert y.shape == expected.shape
    assert float((y - expected).abs().max()) <= attention_rounding_bound(q, k, v, max(lengths))


def test_packed_attention_dropout_stays_within_each_example():
    lengths = [7, 12, 5]
    q, k, v = qkv(lengths)
    packed = packed_of(lengths)
    changed = v.clone()
    changed[7:19] += 1  # example 1's values
    torch.manual_seed(3)
    dropped = packed_attention(q, k, v, packed, dropout_p=0.5)
    torch.manual_seed(3)
    dropped_changed = packed_attention(q, k, changed, packed, dropout_p=0.5)
    kept = packed_attention(q, k, v, packed)
    assert torch.isfinite(dropped).all() and not torch.allclose(dropped, kept)
    # same dropout draws: the other examples' outputs do not see example 1's values
    assert torch.equal(dropped[:7], dropped_changed[:7]) and torch.equal(dropped[19:], dropped_changed[19:])
    assert not torch.equal(dropped[7:19], dropped_changed[7:19])


def test_documents_inside_examples_attend_within_their_document():
    # two examples; the second holds two documents (positions restart at 0 inside it)
    lengths, documents = [6, 9], [6, 4, 5]
    positions = torch.cat([torch.arange(n) for n in documents])[None]
    finer = PackedSequences.from_position_ids(positions, packed_of(lengths))
    assert finer.lengths == tuple(documents)
    assert PackedSequences.from_position_ids(torch.cat([torch.arange(n) for n in lengths])[None],
                                             packed_of(lengths)).lengths == tuple(lengths)
    q, k, v = qkv(documents)
    y = packed_attention(q, k, v, finer)
    assert float((y - per_example_attention(q, k, v, documents)).abs().max()) <= attention_rounding_bound(q, k, v, 6)


@pytest.mark.slow
def test_packed_attention_compiles_as_one_graph_without_host_reads():
    # fullgraph: a host read (.tolist(), bool(tensor)) or an unsupported op inside would raise here. aot_eager:
    # the capture is what is tested, not inductor's C++ code generation (which depends on the machine's compiler)
    compiled = torch.compile(packed_sdpa, fullgraph=True, backend="aot_eager")
    for lengths in ([7, 12, 1, 5], [3, 9, 4], [300, 3, 4, 5, 2]):  # the last: the block-diagonal layout
        q, k, v = qkv(lengths)
        packed = packed_of(lengths)
        expected = packed_attention(q, k, v, packed)
        assert float((compiled(q, k, v, packed) - expected).abs().max()) <= attention_rounding_bound(q, k, v, max(lengths))
