"""The decoder's next-token loss with its gradients taken in the forward pass.

Why: the output layer's logits, (A, L, V) per segment with V the vocabulary (30,522 for the
MiniLM WordPiece vocabulary, 50,257 for GPT-2), are the largest tensors of a decoder's
training step and the output layer its largest matrix product. Plain autograd keeps the
logits' log-probabilities of every segment for the backward pass; memory-efficient
back-propagation rebuilt them there, a second pass through the output layer per segment.
The loss is a sum over segments of terms that each depend on one segment's hidden states,
so its gradient with respect to those hidden states, and the output layer's share of the
weight gradient, are known as soon as the segment's loss is: taking them right away keeps
one (A, L, H) tensor per segment (as large as the segment's token embeddings) and one running
sum of the layer's weight gradient. The backward pass scales both by the gradient it brings
(1 / number of predictions, times whatever the caller applies: a GradScaler's scale, say).

Exact: the same operations as autograd's; only where the final scalar factor is applied
differs (rounding, about 1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmt.model.segments import IGNORE_INDEX


class OutputLayerLoss:
    """The summed next-token losses of one forward call through `layer`, segment by segment.

        head = OutputLayerLoss(layer)
        sums = [head.segment_loss_sum(hidden, labels) for hidden, labels in segments]
        total = head.with_layer_gradients(torch.stack(sums).sum())

    `total` must be the plain sum of the segments' losses: the layer's gradient sum is handed
    to its weights once, scaled by the gradient that reaches `total`.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.parameters = [p for p in layer.parameters() if p.requires_grad]
        self.gradient_sums: list[Tensor | None] = [None] * len(self.parameters)

    def segment_loss_sum(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """() summed cross-entropy of (A, L, H) hidden states against (A, L) labels
        (IGNORE_INDEX where none)."""
        return _SegmentLossSum.apply(hidden, labels, self)

    def with_layer_gradients(self, total: Tensor) -> Tensor:
        """`total` (the sum of every segment_loss_sum), now also differentiable with respect
        to the layer's weights."""
        return _WithLayerGradients.apply(total, self, *self.parameters)

    def _loss_and_gradients(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        # A graph of its own, differentiated at once: saved-tensor hooks of an enclosing context
        # (an activation checkpoint around the whole call, say) must not take its tensors.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            hidden = hidden.detach().requires_grad_(hidden.requires_grad)
            logits = self.layer(hidden)  # (A, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            inputs = ([hidden] if hidden.requires_grad else []) + self.parameters
            gradients = list(torch.autograd.grad(loss, inputs, allow_unused=True)) if inputs else []
        hidden_gradient = gradients.pop(0) if hidden.requires_grad else None
        for index, gradient in enumerate(gradients):
            if gradient is not None:
                total = self.gradient_sums[index]
                self.gradient_sums[index] = gradient if total is None else total.add_(gradient)
        return loss.detach(), hidden_gradient


def _keep(tensor: Tensor) -> Tensor:
    return tensor


class _SegmentLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, labels: Tensor, head: OutputLayerLoss) -> Tensor:
        loss, ctx.hidden_gradient = head._loss_and_gradients(hidden, labels)  # (), (A, L, H)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        gradient = ctx.hidden_gradient
        return (None if gradient is None else grad_loss * gradient), None, None


class _WithLayerGradients(torch.autograd.Function):
    """The identity on the total loss; its backward pass gives the layer's weights their
    gradient, summed over the segments in the forward pass."""

    @staticmethod
    def forward(ctx, total: Tensor, head: OutputLayerLoss, *parameters: Tensor) -> Tensor:
        ctx.head = head
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        sums = ctx.head.gradient_sums
        return grad_total, None, *[None if s is None else grad_total * s for s in sums]
