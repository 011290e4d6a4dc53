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
