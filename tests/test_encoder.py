"""The encoder RMT: segment layout, recurrence, batching, streaming, attention maps, errors."""

import pytest
import torch
from torch import nn

from conftest import CLS, PAD, SEP, encoder_config, make_encoder, random_text, tiny_encoder_backbone
from rmt import RMTConfig, RecurrentMemoryEncoder
from rmt.model.segments import schedule_segments, segment_bounds


def test_segments_are_right_aligned_so_the_last_one_is_full():
    assert segment_bounds(40, 16, "right") == [(0, 8), (8, 24), (24, 40)]
    assert segment_bounds(32, 16, "right") == [(0, 16), (16, 32)]
    assert segment_bounds(40, 16, "left") == [(0, 16), (16, 32), (32, 40)]
    # In a batch, the example with fewer segments starts later and both end together.
    steps = schedule_segments([torch.arange(40), torch.arange(10)], segment_length=16, align="right")
    assert [s.rows.tolist() for s in steps] == [[0], [0], [0, 1]]
    assert steps[-1].lengths.tolist() == [16, 10]
    assert steps[-1].is_last.tolist() == [True, True]


def test_segment_layout_is_cls_memory_sep_tokens_sep_pad():
    model = make_encoder(num_memory_tokens=3, segment_length=6)
    step = schedule_segments([torch.tensor([10, 11, 12, 13])], segment_length=6, align="right")[0]
    ids, mask = model._segment_ids(step)
    assert ids[0].tolist() == [CLS, PAD, PAD, PAD, SEP, 10, 11, 12, 13, SEP, PAD, PAD]
    assert mask[0].tolist() == [1] * 10 + [0, 0]
    assert model.config.segment_positions == 12


@pytest.mark.parametrize("num_memory_tokens", [0, 3])
def test_a_segment_whose_rows_share_a_length_reuses_its_layout(num_memory_tokens):
    """Rows of one length (every step of a stream, most of a batch) take the layout built
    once for their shape; it is the general layout's, for every length."""
    model = make_encoder(num_memory_tokens=num_memory_tokens, segment_length=6)
    for length in range(1, 7):
        rows = [random_text(length, seed=seed) for seed in range(2)]
        step = schedule_segments(rows, segment_length=6, align="right")[0]
        assert step.length == length and step.segments_after == (0, 0) and step.all_last
        shared = model._segment_ids(step)
        general = model._build_segment_ids(step.tokens, step.lengths)
        for got, expected in zip(shared, general):
            assert torch.equal(got, expected)
        assert model._segment_ids(step)[1] is shared[1]  # built once
    mixed = schedule_segments([random_text(3), random_text(5)], segment_length=6, align="right")[0]
    assert mixed.length is None


@pytest.mark.parametrize("align", ["left", "right"])
def test_host_side_step_facts_match_the_tensors(align):
    steps = schedule_segments([random_text(n, seed=n) for n in (40, 10, 33)], segment_length=16, align=align)
    for step in steps:
        after = step.num_segments - 1 - step.segment_index
        assert step.segments_after == (int(after.min()), int(after.max()))
        assert step.all_last == bool(step.is_last.all())
        assert step.length == (int(step.lengths[0]) if len(set(step.lengths.tolist())) == 1 else None)


def test_layouts_built_while_streaming_serve_training():
    """The layouts a stream caches are ordinary tensors, not inference-mode ones (which
    autograd refuses to save for the backward pass): a training step of the same shapes
    takes them."""
    model = make_encoder()
    texts = torch.stack([random_text(40, seed=1), random_text(40, seed=2)])  # 8 + 16 + 16 tokens: a padded mask
    model.stream(iter([texts]), num_tokens=40)
    step = schedule_segments(list(texts), segment_length=16, align="right")[0]
    assert not any(t.is_inference() for t in model._segment_ids(step))
    model.train()
    loss = model(texts, labels=torch.tensor([1, 2])).loss
    loss.backward()
    assert model.memory_embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_without_memory_one_segment_equals_the_backbone(kind):
    model = make_encoder(kind, num_memory_tokens=0)
    tokens = random_text(12)
    out = model([tokens])
    cls, sep = model.config.cls_token_id, model.config.sep_token_id
    plain = model.backbone(input_ids=torch.cat([torch.tensor([cls]), tokens, torch.tensor([sep])])[None])
    width = plain.last_hidden_state.shape[1]
    torch.testing.assert_close(out.last_hidden_state[:, :width], plain.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, model.classifier(plain.pooler_output), atol=1e-5, rtol=1e-5)


def test_memory_carries_the_first_segment_to_the_answer():
    text = random_text(64)
    changed = text.clone()
    changed[:8] = random_text(8, seed=5)  # only the first of four segments differs
    with_memory = make_encoder(num_memory_tokens=4)
    assert not torch.allclose(with_memory([text]).logits, with_memory([changed]).logits)
    without_memory = make_encoder(num_memory_tokens=0)
    torch.testing.assert_close(without_memory([text]).logits, without_memory([changed]).logits)


def test_an_input_read_from_a_given_memory_continues_the_input_that_left_it():
    model = make_encoder()
    texts = torch.stack([random_text(80, seed=1), random_text(80, seed=2)])  # 5 segments each
    whole = model(texts)
    with torch.no_grad():
        memory = model.read_memory(texts[:, :48])  # (2, m, H) after the first 3 segments
    assert memory.shape == (2, 4, model.embedding_dim)
    continued = model(texts[:, 48:], memory=memory, labels=torch.tensor([1, 2]))
    torch.testing.assert_close(continued.logits, whole.logits)
    continued.loss.backward()  # a memory read without a graph passes no gradient on; the weights get theirs
    assert model.memory_embeddings.grad is None and model.backbone.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match=r"memory must be \(batch, memory tokens, hidden\) = \(2, 4, "):
        model(texts, memory=memory[:1])


def test_special_tokens_of_the_tokenizer_are_replaced_by_the_models_own():
    model = make_encoder()
    text = random_text(30)
    with_specials = torch.cat([torch.tensor([CLS]), text, torch.tensor([SEP, PAD, PAD])])
    torch.testing.assert_close(model([text]).logits, model([with_specials]).logits)


def test_padding_never_changes_an_example():
    model = make_encoder()
    texts = [random_text(n, seed=n) for n in (5, 16, 37, 64)]  # 1, 1, 3 and 4 segments
    batch = model(texts).logits
    for index, text in enumerate(texts):
        torch.testing.assert_close(batch[index], model([text]).logits[0], atol=1e-5, rtol=1e-5)
    # A padded tensor with an attention mask, padded on either side, is the same batch.
    width = 70
    left = torch.full((len(texts), width), PAD)
    mask = torch.zeros_like(left)
    for index, text in enumerate(texts):
        left[index, width - len(text):] = text
        mask[index, width - len(text):] = 1
    torch.testing.assert_close(model(left, attention_mask=mask).logits, batch, atol=1e-5, rtol=1e-5)


def test_max_segments_keeps_the_beginning():
    model = make_encoder(max_segments=2)
    text = random_text(70)
    torch.testing.assert_close(model([text]).logits, model([text[:32]]).logits)


def test_loss_is_on_the_last_segment_unless_summed_over_all():
    texts = [random_text(40, seed=1), random_text(20, seed=2)]
    labels = torch.tensor([3, 1])
    model = make_encoder()
    out = model(texts, labels=labels)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))

    # A prefix that ends on a segment border is split the same way (right alignment), so
    # its logits are the ones the full input produces at that segment.
    # With every segment scored, the loss is the mean over segments (counted from the end,
    # where every example finishes) of the mean loss of the examples that have that segment.
    every = make_encoder(loss_on_all_segments=True)
    per_step: dict[int, list[torch.Tensor]] = {}
    for text, label in zip(texts, labels):
        ends = list(range(len(text) % 16 or 16, len(text) + 1, 16))
        for from_last, end in enumerate(reversed(ends)):
            per_step.setdefault(from_last, []).append(nn.functional.cross_entropy(every([text[:end]]).logits, label[None]))
    expected = torch.stack([torch.stack(losses).mean() for losses in per_step.values()]).mean()
    torch.testing.assert_close(every(texts, labels=labels).loss, expected)


def test_outputs_are_deterministic():
    texts = [random_text(40), random_text(25, seed=3)]
    first, second = make_encoder(dropout=0.1), make_encoder(dropout=0.1)
    torch.testing.assert_close(first(texts).logits, second(texts).logits, atol=0, rtol=0)
    first.train(), second.train()
    torch.manual_seed(7)
    a = first(texts, labels=torch.tensor([0, 1])).loss
    torch.manual_seed(7)
    b = second(texts, labels=torch.tensor([0, 1])).loss
    assert a.item() == b.item()


def test_bf16_autocast_runs_on_the_cpu():
    model = make_encoder().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([random_text(40), random_text(12)], labels=torch.tensor([1, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.memory_embeddings.grad.abs().sum() > 0


def test_attention_maps_on_request():
    model = make_encoder(num_memory_tokens=4, segment_length=16)
    assert model.backbone.config._attn_implementation == "sdpa"
    out = model([random_text(40)], output_attentions=True)
    assert len(out.attentions) == 3  # segments
    assert len(out.attentions[0]) == 2  # layers
    positions = model.config.segment_positions
    for segment in out.attentions:
        for layer in segment:
            assert layer.shape == (1, 4, positions, positions)
            torch.testing.assert_close(layer.sum(-1), torch.ones(1, 4, positions))
    # The first segment holds 8 tokens: the 8 padded positions after its [SEP] get no attention.
    first = out.attentions[0][0]
    assert first[..., model.text_start + 8 + 1 :].abs().max() == 0
    # The backbone goes back to its fast attention afterwards, with the same results.
    assert model.backbone.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model([random_text(40)]).logits, out.logits, atol=1e-5, rtol=1e-5)


def test_streaming_equals_the_forward_pass_for_any_chunking():
    model = make_encoder()
    texts = torch.stack([random_text(75, seed=1), random_text(75, seed=2)])
    expected = model(texts).logits
    for size in (1, 7, 16, 50, 75):
        chunks = (texts[:, start : start + size] for start in range(0, 75, size))
        torch.testing.assert_close(model.stream(chunks, num_tokens=75).logits, expected, atol=1e-5, rtol=1e-5)
    single = model.stream(iter([texts[0, :30].tolist(), texts[0, 30:].tolist()]), num_tokens=75).logits
    torch.testing.assert_close(single[0], expected[0], atol=1e-5, rtol=1e-5)


def test_streaming_honours_max_segments_as_the_forward_pass_does():
    model = make_encoder(segment_length=16, max_segments=2)
    texts = torch.stack([random_text(75, seed=1), random_text(75, seed=2)])
    expected = model(texts).logits  # the first 32 tokens: the beginning is kept
    pulled = []

    def chunks():
        for start in range(0, 75, 10):
            pulled.append(start)
            yield texts[:, start : start + 10]

    torch.testing.assert_close(model.stream(chunks(), num_tokens=75).logits, expected, atol=1e-5, rtol=1e-5)
    assert max(pulled) == 30  # the rest of the stream is never read


def test_streaming_reads_the_input_lazily():
    """Only about one segment of the stream is held: the backbone runs on segment k before the
    stream has delivered much more than k + 1 segments."""
    model = make_encoder(segment_length=16)
    pulled = []

    def chunks():
        for start in range(0, 16 * 40, 5):
            pulled.append(start + 5)
            yield random_text(5, seed=start)

    seen = []
    model.backbone.register_forward_pre_hook(lambda *_: seen.append(pulled[-1]))
    model.stream(chunks(), num_tokens=16 * 40)
    assert len(seen) == 40
    for index, tokens_pulled in enumerate(seen):
        assert tokens_pulled <= 16 * (index + 1) + 5


def test_stream_length_must_match():
    model = make_encoder()
    with pytest.raises(ValueError, match="num_tokens=50"):
        model.stream(iter([random_text(40)]), num_tokens=50)
    with pytest.raises(ValueError, match="num_tokens=30"):
        model.stream(iter([random_text(40)]), num_tokens=30)


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="segment_length to at most 80"):
        RecurrentMemoryEncoder(backbone=tiny_encoder_backbone("bert", positions=87), config=encoder_config(segment_length=81))
    # RoBERTa loses two positions to its padding offset.
    with pytest.raises(ValueError, match="segment_length to at most 89"):
        RecurrentMemoryEncoder(backbone=tiny_encoder_backbone("roberta", positions=96), config=encoder_config(segment_length=90))

    class NoEmbedsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_encoder_backbone()
            self.config = self.inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(TypeError, match="inputs_embeds"):
        RecurrentMemoryEncoder(backbone=NoEmbedsInput(), config=encoder_config())
    with pytest.raises(ValueError, match="needs architecture='encoder'"):
        RecurrentMemoryEncoder(backbone=tiny_encoder_backbone(), config=RMTConfig(architecture="decoder"))
    with pytest.raises(ValueError, match="num_labels"):
        RMTConfig(architecture="encoder", cls_token_id=1, sep_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="for_tokenizer"):
        RMTConfig(architecture="encoder", num_labels=6)

    model = make_encoder()
    with pytest.raises(ValueError, match="Example 1 has no tokens"):
        model([random_text(5), []])
    with pytest.raises(ValueError, match="Example 0 has no tokens"):
        model([torch.tensor([CLS, SEP])])
    with pytest.raises(ValueError, match="empty"):
        model([])
    with pytest.raises(ValueError, match="labels must be"):
        model([random_text(5)], labels=torch.tensor([1, 2]))
