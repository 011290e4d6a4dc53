"""Back-propagation through time: full, truncated (bptt_depth) and memory-efficient."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from conftest import make_decoder, make_encoder, random_text

NUM_SEGMENTS = 5


def capture_segment_inputs(model):
    """The inputs_embeds of every backbone call, in order: one per segment."""
    captured = []
    body = model.backbone_body
    body.register_forward_pre_hook(lambda _, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True)
    return captured


def reached(loss, tensors) -> list[bool]:
    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    return [g is not None and bool(g.abs().sum() > 0) for g in grads]


def test_full_bptt_reaches_the_first_memory_embedding():
    model = make_encoder().train()
    out = model([random_text(16 * NUM_SEGMENTS)], labels=torch.tensor([2]))
    out.loss.backward()
    assert model.memory_embeddings.grad is not None
    assert model.memory_embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("depth", [-1, 0, 1, 2, 4, 5, 9])
def test_truncated_bptt_reaches_exactly_the_last_k_segments(depth, memory_efficient):
    """Loss on the last of n segments; bptt_depth k keeps the memory inputs of the last k
    segments, so gradients reach segments n-1-k .. n-1 and nothing before."""
    model = make_encoder(bptt_depth=depth, memory_efficient_backprop=memory_efficient).train()
    captured = capture_segment_inputs(model)
    out = model([random_text(16 * NUM_SEGMENTS)], labels=torch.tensor([2]), output_memory_states=True)
    assert len(captured) == NUM_SEGMENTS
    first_reached = 0 if depth == -1 else max(NUM_SEGMENTS - 1 - depth, 0)
    assert reached(out.loss, captured) == [index >= first_reached for index in range(NUM_SEGMENTS)]
    # memory_states[j] is the memory input of segment j (0 = the memory embeddings): kept for
    # the last k segments only.
    memory_reached = reached(out.loss, out.memory_states[:-1])
    first_kept = 0 if depth == -1 else NUM_SEGMENTS - depth
    assert memory_reached == [index >= first_kept for index in range(NUM_SEGMENTS)]
    out.loss.backward()
    embeddings_trained = model.memory_embeddings.grad is not None and model.memory_embeddings.grad.abs().sum() > 0
    assert embeddings_trained == (depth == -1 or depth >= NUM_SEGMENTS)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_decoder_truncation_window_is_per_example(depth):
    """Examples of different lengths: each one's window is its own last k segments."""
    model = make_decoder(bptt_depth=depth).train()
    lengths = (20, 50)  # 2 and 5 segments of 10 tokens
    texts = [random_text(n, seed=n) for n in lengths]
    out = model(texts, labels=texts, output_memory_states=True)
    for row, length in enumerate(lengths):
        segments = length // 10
        # The memory written by segment j feeds segment j+1, kept iff j+1 >= segments - k.
        grads = torch.autograd.grad(out.loss, out.memory_states[1:segments], retain_graph=True, allow_unused=True)
        flows = [g is not None and bool(g[row].abs().sum() > 0) for g in grads]
        assert flows == [j + 1 >= segments - depth for j in range(segments - 1)], (row, flows)


def gradients(model, run):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks for both runs
    loss = run(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


CASES = {
    "bert": (lambda dropout, **kw: make_encoder("bert", dropout=dropout, **kw),
             lambda m: m([random_text(80, seed=1), random_text(37, seed=2)], labels=torch.tensor([1, 4])).loss),
    "bert-all-segments": (lambda dropout, **kw: make_encoder("bert", dropout=dropout, loss_on_all_segments=True, **kw),
                          lambda m: m([random_text(80, seed=1), random_text(37, seed=2)], labels=torch.tensor([1, 4])).loss),
    "gpt2": (lambda dropout, **kw: make_decoder("gpt2", dropout=dropout, **kw),
             lambda m: m([random_text(45, seed=1), random_text(23, seed=2)], labels=[random_text(45, seed=1), random_text(23, seed=2)]).loss),
    "llama": (lambda dropout, **kw: make_decoder("llama", dropout=dropout, **kw),
              lambda m: m([random_text(45, seed=1), random_text(23, seed=2)], labels=[random_text(45, seed=1), random_text(23, seed=2)]).loss),
    # Training without logits: the output layer's gradients are taken in the forward pass.
    "gpt2-no-logits": (lambda dropout, **kw: make_decoder("gpt2", dropout=dropout, **kw),
                       lambda m: m([random_text(45, seed=1), random_text(23, seed=2)], labels=[random_text(45, seed=1), random_text(23, seed=2)],
                                   return_logits=False).loss),
}


@pytest.mark.parametrize("depth", [-1, 2])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_memory_efficient_backprop_gives_the_same_gradients(case, train, depth):
    build, run = CASES[case]
    dropout = 0.1 if train else 0.0
    plain = build(dropout, bptt_depth=depth).train(train)
    efficient = build(dropout, bptt_depth=depth, memory_efficient_backprop=True).train(train)
    efficient.load_state_dict(plain.state_dict())
    plain_loss, plain_grads = gradients(plain, run)
    efficient_loss, efficient_grads = gradients(efficient, run)
    torch.testing.assert_close(efficient_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert plain_grads.keys() == efficient_grads.keys()
    assert "memory_embeddings" in plain_grads or depth != -1
    for name, grad in plain_grads.items():
        torch.testing.assert_close(efficient_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("all_segments", [False, True], ids=["loss-on-last", "loss-on-all"])
@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_segments_out_of_the_truncation_window_run_without_a_graph(depth, memory_efficient, all_segments):
    """A segment whose output memory only feeds cut memory inputs, and which carries no loss
    of its own, can pass no gradient on: it runs under no_grad (a long truncated example
    costs a forward pass before its window), and the gradients are those of building every
    graph and cutting it. Two examples of 5 and 3 segments: each one's window is its own."""
    def build():
        return make_encoder(dropout=0.1, bptt_depth=depth, memory_efficient_backprop=memory_efficient,
                            loss_on_all_segments=all_segments).train()

    def run(model):
        return model([random_text(16 * NUM_SEGMENTS, seed=3), random_text(16 * 3, seed=4)],
                     labels=torch.tensor([1, 3])).loss

    model, reference = build(), build()
    reference.load_state_dict(model.state_dict())
    reference._out_of_reach = lambda step: False  # every segment builds its graph
    graphs = []
    model.backbone_body.register_forward_pre_hook(lambda *_: graphs.append(torch.is_grad_enabled()))
    loss, grads = gradients(model, run)
    reference_loss, reference_grads = gradients(reference, run)
    # Right-aligned steps: step i holds segment i of the longer example and, from step 2,
    # segment i - 2 of the shorter; a step keeps its graph if any of its rows may need it.
    lengths = {NUM_SEGMENTS: 0, 3: NUM_SEGMENTS - 3}  # segments -> the step it starts at

    def in_reach(segments, index):
        return index + 1 >= segments - depth

    expected = [all_segments or any(in_reach(n, step - start) for n, start in lengths.items() if step >= start)
                for step in range(NUM_SEGMENTS)]
    assert graphs[:NUM_SEGMENTS] == expected  # the first pass (a recomputation may follow)
    torch.testing.assert_close(loss, reference_loss)
    # Only the memory embeddings can miss a gradient: when every step an example starts at
    # runs without a graph. The reference gives them zeros there.
    starts_without_graph = not any(expected[start] for start in lengths.values())
    assert set(reference_grads) - set(grads) == ({"memory_embeddings"} if starts_without_graph else set())
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads.get(name, torch.zeros_like(grad)), grad, msg=name)


def test_asked_for_memory_states_keep_their_graph_under_truncation():
    """output_memory_states: every state the caller gets can still be differentiated."""
    model = make_encoder(bptt_depth=1).train()
    out = model([random_text(16 * NUM_SEGMENTS)], labels=torch.tensor([2]), output_memory_states=True)
    assert all(state.requires_grad for state in out.memory_states)


def saved_bytes_for_backward(model, num_segments) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    with saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model([random_text(16 * num_segments)], labels=torch.tensor([1]))
    out.loss.backward()
    return total


def test_memory_efficient_training_keeps_no_per_segment_activations():
    """What the forward pass keeps for the backward pass grows with every segment's
    activations under plain BPTT; with recomputation a segment costs only its memory input
    (m x H floats per example), which the backward pass needs to rebuild it. The last
    segment keeps its activations: the backward pass starts with it, so rebuilding them would
    cost a forward pass for nothing (the backward pass of one segment holds them anyway)."""
    one_segment, *plain = [saved_bytes_for_backward(make_encoder(), n) for n in (1, 2, 8)]
    model = make_encoder(memory_efficient_backprop=True)
    efficient = [saved_bytes_for_backward(model, n) for n in (2, 8)]
    memory_state_bytes = model.memory_embeddings.numel() * 4
    assert plain[1] > 3 * plain[0]
    assert efficient[1] - efficient[0] <= (8 - 2) * memory_state_bytes
    assert efficient[1] <= one_segment + (8 - 1) * memory_state_bytes


@pytest.mark.parametrize("memory_efficient", [False, True])
@pytest.mark.parametrize("depth", [-1, 2])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "opt"])
def test_output_layer_gradients_taken_in_the_forward_pass_are_exact(kind, depth, memory_efficient):
    """Without logits (training), the decoder takes the loss's gradients with respect to each
    segment's hidden states and the output layer in the forward pass (OutputLayerLoss): the
    same gradients as autograd through the logits, scaled by whatever multiplies the loss."""
    texts = [random_text(45, seed=1), random_text(23, seed=2)]
    reference = make_decoder(kind, dropout=0.1, bptt_depth=depth).train()
    model = make_decoder(kind, dropout=0.1, bptt_depth=depth, memory_efficient_backprop=memory_efficient).train()
    model.load_state_dict(reference.state_dict())
    with_logits = gradients(reference, lambda m: 1024 * m(texts, labels=texts).loss)
    without_logits = gradients(model, lambda m: 1024 * m(texts, labels=texts, return_logits=False).loss)
    torch.testing.assert_close(without_logits[0], with_logits[0], atol=0, rtol=0)
    assert without_logits[1].keys() == with_logits[1].keys()
    for name, grad in with_logits[1].items():  # compared at the loss's own scale, as the other tests
        torch.testing.assert_close(without_logits[1][name] / 1024, grad / 1024, atol=1e-6, rtol=1e-5, msg=name)


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_memory_efficient_backprop_recomputes_every_segment_but_the_last(architecture):
    """n segments: n backbone calls forward, n - 1 more backward (the last segment's
    activations are kept, since the backward pass starts with them); the decoder's output
    layer runs once per segment, its gradients taken in the forward pass."""
    model = (make_encoder if architecture == "encoder" else make_decoder)(memory_efficient_backprop=True).train()
    backbone_calls = count_calls(model.backbone_body)
    text = random_text(16 * NUM_SEGMENTS if architecture == "encoder" else 10 * NUM_SEGMENTS)
    if architecture == "encoder":
        loss = model([text], labels=torch.tensor([2])).loss
    else:
        output_layer_calls = count_calls(model.backbone.get_output_embeddings())
        loss = model([text], labels=[text], return_logits=False).loss
    assert backbone_calls[0] == NUM_SEGMENTS
    loss.backward()
    assert backbone_calls[0] == 2 * NUM_SEGMENTS - 1
    if architecture == "decoder":
        assert output_layer_calls[0] == NUM_SEGMENTS


def test_output_layer_gradients_under_bf16_autocast():
    model = make_decoder("gpt2").train()
    reference = make_decoder("gpt2").train()
    ids = torch.stack([random_text(25, seed=60), random_text(25, seed=61)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected = gradients(reference, lambda m: m(ids, labels=ids).loss)
        _, grads = gradients(model, lambda m: m(ids, labels=ids, return_logits=False).loss)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-2, rtol=1e-2, msg=name)


def test_output_layer_gradients_inside_an_enclosing_activation_checkpoint():
    """A checkpoint around the whole call, whose backward pass runs the forward pass (and so
    the output layer's gradients) again, gives the same gradients: the layer's gradient sum
    is handed over once."""
    from torch.utils.checkpoint import checkpoint

    texts = [random_text(45, seed=1), random_text(23, seed=2)]
    model = make_decoder("gpt2").train()
    _, expected = gradients(model, lambda m: m(texts, labels=texts, return_logits=False).loss)
    _, grads = gradients(model, lambda m: checkpoint(
        lambda: m(texts, labels=texts, return_logits=False).loss, use_reentrant=False))
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("align", ["left", "right"])
@pytest.mark.parametrize("depth", [-1, 0, 1, 2, 4, 5])
def test_the_window_is_read_from_the_host_as_from_the_tensors(depth, align):
    """Which memory inputs are cut and which segments are out of reach are decided from the
    step's host-side counts, so that a GPU does not synchronise per segment; they must say
    what the definitions on the device tensors say. Steps of examples of different lengths
    (left-aligned, the decoder's: rows in one step have different numbers of segments left),
    and of a full batch."""
    from rmt.model.segments import schedule_segments

    model = make_encoder(bptt_depth=depth).train()
    rows = [random_text(16 * n, seed=n) for n in (6, 2, 4)]
    steps = schedule_segments(rows, segment_length=16, align=align)
    steps += [model._full_batch_step(torch.zeros(3, 16, dtype=torch.long), index, 6) for index in range(6)]
    for step in steps:
        index, count = step.segment_index, step.num_segments
        cut = index < count - depth  # the memory input of a segment before the example's window
        next_cut = index + 1 < count - depth  # ... and that of the segment after it
        assert model._out_of_reach(step) == (depth >= 0 and bool(next_cut.all()))
        got = model._memory_cut(step)
        if depth < 0 or not cut.any():
            assert got is None
        else:
            assert torch.equal(got, cut)
