"""The decoder RMT (RecurrentMemoryDecoder) on tiny GPT-2, OPT and Llama backbones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import (
    PAD,
    decoder_config,
    encoder_config,
    make_decoder,
    random_text,
    tiny_decoder_backbone,
)
from rmt import RecurrentMemoryDecoder

KINDS = ["gpt2", "opt", "llama"]
L = 10  # decoder_config's segment_length
M = 3  # decoder_config's num_memory_tokens
ATOL = 1e-5


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Ordinary causal LM loss of one text: logits (T, V) predict labels[1:]."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)


# ---------------------------------------------------------------- equivalence with the backbone
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [L, 6])
def test_no_memory_one_segment_matches_backbone(kind, length):
    model = make_decoder(kind, num_memory_tokens=0)
    ids = random_text(length, seed=3)
    with torch.no_grad():
        ours = model(ids[None]).logits
        theirs = model.backbone(ids[None]).logits
    assert ours.shape == theirs.shape == (1, length, 128)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_next_token_cross_entropy_across_segments(kind):
    model = make_decoder(kind)
    ids = torch.stack([random_text(37, seed=4), random_text(37, seed=5)])  # 4 segments, last one partial
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (2, 37, 128)
    # Every token but the last of each row is predicted, including the last token of each
    # segment (which predicts the first token of the next segment).
    assert out.num_predictions == 2 * 36
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    # Only the predictions across segment borders: the last token of each segment predicts
    # the first token of the next one.
    borders = torch.tensor([L, 2 * L, 3 * L])
    labels = torch.full_like(ids, -100)
    labels[:, borders] = ids[:, borders]
    with torch.no_grad():
        across = model(ids, labels=labels)
    assert across.num_predictions == 2 * 3
    expected = F.cross_entropy(out.logits[:, borders - 1].flatten(0, 1), ids[:, borders].flatten())
    torch.testing.assert_close(across.loss, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_ignored_labels_and_num_predictions(kind):
    model = make_decoder(kind)
    ids = random_text(33, seed=6)
    labels = ids.clone()
    labels[[0, 4, 10, 20, 21]] = -100  # label 0 is never a target anyway
    with torch.no_grad():
        out = model(ids[None], labels=labels[None])
        full = model(ids[None], labels=ids[None])
    assert out.num_predictions == 32 - 4
    assert full.num_predictions == 32
    expected = next_token_loss(out.logits[0], labels)
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(out.loss, full.loss, atol=1e-4)
    # Logits do not depend on the labels.
    assert torch.equal(out.logits, full.logits)


def test_num_predictions_in_a_batch_of_lists():
    model = make_decoder("gpt2")
    rows = [random_text(n, seed=n).tolist() for n in (7, 23, 40)]
    labels = [list(r) for r in rows]
    labels[2][5] = -100
    with torch.no_grad():
        out = model(rows, labels=labels)
    assert out.num_predictions == 6 + 22 + 39 - 1


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("kind", KINDS)
def test_memory_carries_first_segment_to_last(kind):
    ids = random_text(35, seed=7)  # 4 segments
    changed = ids.clone()
    changed[:L] = random_text(L, seed=8)
    assert not torch.equal(ids[:L], changed[:L])

    with torch.no_grad():
        model = make_decoder(kind, num_memory_tokens=M)
        a, b = model(ids[None]).logits, model(changed[None]).logits
        assert not torch.allclose(a[0, 30:], b[0, 30:], atol=1e-4)

        model = make_decoder(kind, num_memory_tokens=0)
        a, b = model(ids[None]).logits, model(changed[None]).logits
        assert torch.equal(a[0, L:], b[0, L:])
        assert not torch.allclose(a[0, :L], b[0, :L])


@pytest.mark.parametrize("kind", KINDS)
def test_a_text_read_from_a_given_memory_continues_the_text_that_left_it(kind):
    ids = random_text(35, seed=7)[None]  # 4 segments, the first three full (left alignment)
    with torch.no_grad():
        model = make_decoder(kind, num_memory_tokens=M)
        whole = model(ids).logits
        continued = model(ids[:, 2 * L :], memory=model.read_memory(ids[:, : 2 * L])).logits
    torch.testing.assert_close(continued, whole[:, 2 * L :], atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", KINDS)
def test_batch_padding_does_not_change_results(kind):
    model = make_decoder(kind)
    lengths = (7, 23, 40)
    rows = [random_text(n, seed=10 + n) for n in lengths]
    with torch.no_grad():
        batch = model([r.tolist() for r in rows], labels=[r.tolist() for r in rows])
        alone = [model([r.tolist()], labels=[r.tolist()]) for r in rows]
    assert batch.logits.shape == (3, 40, 128)
    total = 0.0
    for i, (row, single) in enumerate(zip(rows, alone)):
        n = len(row)
        torch.testing.assert_close(batch.logits[i, :n], single.logits[0], atol=ATOL, rtol=0)
        assert torch.all(batch.logits[i, n:] == 0)
        # The example's loss computed from the batch's logits equals its loss alone.
        torch.testing.assert_close(next_token_loss(batch.logits[i, :n], row), single.loss, atol=ATOL, rtol=0)
        assert single.num_predictions == n - 1
        total += float(single.loss) * single.num_predictions
    assert batch.num_predictions == sum(n - 1 for n in lengths)
    assert float(batch.loss) == pytest.approx(total / batch.num_predictions, abs=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_tensor_matches_list_input(kind):
    model = make_decoder(kind)
    lengths = (7, 23, 40)
    rows = [random_text(n, seed=20 + n) for n in lengths]
    ids = torch.full((3, 40), PAD, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 40 - len(row) :] = row
        mask[i, 40 - len(row) :] = 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=ids)
        listed = model([r.tolist() for r in rows], labels=[r.tolist() for r in rows])
    assert padded.logits.shape == (3, 40, 128)
    for i, row in enumerate(rows):
        n = len(row)
        torch.testing.assert_close(padded.logits[i, 40 - n :], listed.logits[i, :n], atol=ATOL, rtol=0)
        assert torch.all(padded.logits[i, : 40 - n] == 0)
    assert padded.num_predictions == listed.num_predictions == sum(n - 1 for n in lengths)
    torch.testing.assert_close(padded.loss, listed.loss, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- positions of the write memory
def manual_write_memory(model: RecurrentMemoryDecoder, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[mem] tokens [mem] through the backbone body, no padding: hidden states of the write block."""
    m, n = memory.shape[1], len(tokens)
    embeddings = model.backbone.get_input_embeddings()(tokens[None])
    inputs = torch.cat([memory, embeddings, memory], dim=1)
    hidden = model.backbone.base_model(inputs_embeds=inputs).last_hidden_state
    return hidden[:, m + n : 2 * m + n]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_write_memory_sits_right_after_the_last_token(kind):
    model = make_decoder(kind)
    short = random_text(6, seed=30)  # one partial segment
    longer = random_text(17, seed=31)  # a full segment, then 7 tokens
    full = random_text(20, seed=32)  # two full segments: batched with `longer`, its row is unpadded
    with torch.no_grad():
        out = model([short.tolist()], output_memory_states=True)
        assert len(out.memory_states) == 2
        expected = manual_write_memory(model, model.initial_memory(1), short)
        torch.testing.assert_close(out.memory_states[1], expected, atol=ATOL, rtol=0)

        out = model([longer.tolist(), full.tolist()], output_memory_states=True)
        assert len(out.memory_states) == 3
        first = manual_write_memory(model, model.initial_memory(1), longer[:L])
        torch.testing.assert_close(out.memory_states[1][:1], first, atol=ATOL, rtol=0)
        second = manual_write_memory(model, out.memory_states[1][:1], longer[L:])
        torch.testing.assert_close(out.memory_states[2][:1], second, atol=ATOL, rtol=0)
        # Memory written at the end of the padded slots instead would differ.
        wrong = model.backbone.base_model(
            inputs_embeds=torch.cat(
                [
                    out.memory_states[1][:1],
                    model.backbone.get_input_embeddings()(torch.cat([longer[L:], torch.zeros(3, dtype=torch.long)]))[None],
                    out.memory_states[1][:1],
                ],
                dim=1,
            )
        ).last_hidden_state[:, M + L :]
        assert not torch.allclose(out.memory_states[2][:1], wrong, atol=1e-4)
        # The other row (no padding) agrees too.
        other = manual_write_memory(model, out.memory_states[1][1:], full[L:])
        torch.testing.assert_close(out.memory_states[2][1:], other, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- generate
def scramble(model: RecurrentMemoryDecoder, std: float = 0.3) -> RecurrentMemoryDecoder:
    """Larger random weights: a freshly initialised tiny LM mostly repeats one token, these
    produce varied continuations."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.backbone.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, std, generator=generator)
    return model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context", [4, 20, 27], ids=["short", "multiple", "several"])
@pytest.mark.parametrize("weights", ["init", "scrambled"])
def test_greedy_generation_matches_forward(kind, context, weights):
    model = make_decoder(kind)
    if weights == "scrambled":
        scramble(model)  # varied continuations instead of one repeated token
    new = 25  # crosses at least two segment borders from every context length
    assert (context + new) // L - (context - 1) // L >= 2
    ids = torch.stack([random_text(context, seed=40), random_text(context, seed=41)])
    out = model.generate(ids, max_new_tokens=new)
    assert out.shape == (2, context + new)
    assert torch.equal(out[:, :context], ids)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, context - 1 :].argmax(-1), out[:, context:])


def test_generate_single_context_1d():
    model = make_decoder("gpt2")
    ids = random_text(13, seed=42)
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (1, 18)
    assert torch.equal(out, model.generate(ids[None], max_new_tokens=5))


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_reproducible_and_top1_is_greedy(kind):
    model = make_decoder(kind)
    ids = torch.stack([random_text(12, seed=43), random_text(12, seed=44)])
    sample = lambda seed, **kw: model.generate(  # noqa: E731
        ids, max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw
    )
    first, again, other = sample(0), sample(0), sample(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    greedy = model.generate(ids, max_new_tokens=20)
    assert not torch.equal(first, greedy)
    assert torch.equal(sample(5, top_k=1), greedy)
    assert torch.equal(sample(5, top_k=1, temperature=0.3), greedy)


@pytest.mark.parametrize("kind", KINDS)
def test_eos_stops_generation(kind):
    model = scramble(make_decoder(kind))
    context, new = 8, 40
    # Find two contexts (rows are independent, so one batched call) whose greedy
    # continuations share a token first produced at different steps, and such that the row
    # that produces it first would not repeat it on its own. That token is the eos.
    pool = torch.stack([random_text(context, seed=100 + i) for i in range(8)])
    continuations = model.generate(pool, max_new_tokens=new)[:, context:].tolist()
    firsts = [{} for _ in continuations]
    for row, tokens in zip(firsts, continuations):
        for step, token in enumerate(tokens):
            row.setdefault(token, step)
    found = None
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            for token in sorted(firsts[i].keys() & firsts[j].keys()):
                f0, f1 = firsts[i][token], firsts[j][token]
                early = i if f0 < f1 else j
                forced_visible = any(t != token for t in continuations[early][min(f0, f1) : max(f0, f1) + 1])
                if f0 != f1 and forced_visible and (found is None or max(f0, f1) < max(found[3:])):
                    found = (i, j, token, f0, f1)
    assert found, "no pair of contexts whose continuations share a token at different steps"
    i, j, eos, f0, f1 = found
    ids = pool[[i, j]]
    greedy = model.generate(ids, max_new_tokens=new)[:, context:]
    assert greedy.tolist() == [continuations[i], continuations[j]]  # batching does not change a row
    stop = max(f0, f1) + 1
    assert stop < new

    out = model.generate(ids, max_new_tokens=new, eos_token_id=eos)
    assert torch.equal(out[:, :context], ids)
    out = out[:, context:]
    assert out.shape == (2, stop)  # stopped early, right after the last row's eos
    for row, f in ((0, f0), (1, f1)):
        assert torch.equal(out[row, : f + 1], greedy[row, : f + 1])  # same as greedy up to its eos
        assert torch.all(out[row, f:] == eos)  # then eos only
    early = 0 if f0 < f1 else 1
    assert not torch.equal(out[early], greedy[early, :stop])  # the finished row was held at eos


def test_eos_never_produced_runs_to_max_new_tokens():
    model = make_decoder("gpt2")
    ids = random_text(8, seed=47)[None]
    greedy = model.generate(ids, max_new_tokens=15)
    unused = next(t for t in range(128) if t not in greedy[0, 8:].tolist())
    assert torch.equal(model.generate(ids, max_new_tokens=15, eos_token_id=unused), greedy)


def test_generate_errors():
    model = make_decoder("gpt2")
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(random_text(5)[None], max_new_tokens=0)


# ---------------------------------------------------------------- stream
def chunked(ids: torch.Tensor, size: int):
    return [ids[..., start : start + size] for start in range(0, ids.shape[-1], size)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [7, 13])
def test_stream_loss_matches_forward(kind, size):
    model = make_decoder(kind)
    ids = random_text(47, seed=50)
    with torch.no_grad():
        expected = model(ids[None], labels=ids[None])
    out = model.stream(iter(chunked(ids, size)), num_tokens=47)
    assert out.num_predictions == expected.num_predictions == 46
    assert float(out.loss) == pytest.approx(float(expected.loss), abs=ATOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [7, 13])
def test_stream_batch_loss_matches_forward(kind, size):
    model = make_decoder(kind)
    ids = torch.stack([random_text(47, seed=51), random_text(47, seed=52)])
    with torch.no_grad():
        expected = model(ids, labels=ids)
    out = model.stream(chunked(ids, size), num_tokens=47)
    assert out.num_predictions == expected.num_predictions == 2 * 46
    assert float(out.loss) == pytest.approx(float(expected.loss), abs=ATOL)


def test_stream_honours_max_segments_as_the_forward_pass_does():
    """Both read the first max_segments segments and score them as a text of that length:
    the token after the cut is never read, not even as the last token's target."""
    model = make_decoder("gpt2", max_segments=2)
    ids = torch.stack([random_text(47, seed=54), random_text(47, seed=55)])
    with torch.no_grad():
        expected = model(ids, labels=ids)
        cut = model(ids[:, : 2 * L], labels=ids[:, : 2 * L])
    assert expected.num_predictions == cut.num_predictions == 2 * (2 * L - 1)
    assert float(expected.loss) == pytest.approx(float(cut.loss), abs=ATOL)
    pulled = []

    def chunks():
        for start in range(0, 47, 7):
            pulled.append(start)
            yield ids[:, start : start + 7]

    out = model.stream(chunks(), num_tokens=47)
    assert out.num_predictions == expected.num_predictions
    assert float(out.loss) == pytest.approx(float(expected.loss), abs=ATOL)
    torch.testing.assert_close(out.logits, expected.logits[:, 2 * L - 1], atol=ATOL, rtol=0)
    assert max(pulled) == 14  # the chunk holding token 2L - 1 is the last one read


def test_stream_length_errors():
    model = make_decoder("gpt2")
    ids = random_text(47, seed=53)
    with pytest.raises(ValueError, match="num_tokens=47"):
        model.stream(chunked(ids[:40], 7), num_tokens=47)
    with pytest.raises(ValueError, match="num_tokens=47"):
        model.stream(chunked(torch.cat([ids, ids[:2]]), 7), num_tokens=47)  # extra in the last chunk
    with pytest.raises(ValueError, match="num_tokens=47"):
        model.stream([ids, ids[:3]], num_tokens=47)  # an extra chunk after the text


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_forward_backward(kind):
    model = make_decoder(kind).train()
    ids = torch.stack([random_text(25, seed=60), random_text(25, seed=61)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # autocast is really in effect
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert model.memory_embeddings.grad is not None
    assert model.memory_embeddings.grad.abs().sum() > 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- errors before work
@pytest.mark.parametrize("kind", KINDS)
def test_segment_too_long_for_positions(kind):
    backbone = tiny_decoder_backbone(kind, positions=96)
    # 2 * 3 memory positions per segment: 90 text tokens fit, 91 do not.
    RecurrentMemoryDecoder(backbone=backbone, config=decoder_config(segment_length=90))
    with pytest.raises(ValueError, match="segment_length to at most 90"):
        RecurrentMemoryDecoder(backbone=backbone, config=decoder_config(segment_length=91))


def test_encoder_config_rejected():
    with pytest.raises(ValueError, match="architecture='decoder'"):
        RecurrentMemoryDecoder(backbone=tiny_decoder_backbone("gpt2"), config=encoder_config())


def test_empty_example_rejected():
    model = make_decoder("gpt2")
    with pytest.raises(ValueError, match="Example 1 has no tokens"):
        model([random_text(5).tolist(), []])
    ids = torch.stack([random_text(5), random_text(5)])
    mask = torch.ones_like(ids)
    mask[0] = 0
    with pytest.raises(ValueError, match="Example 0 has no tokens"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="empty"):
        model([])
