"""What a stage trains its model to do: the seam between the training loop and the model kind.

The tasks store examples as token ids with a class label (the answer). An objective builds or
loads the model of its kind, turns a batch of those examples into a loss, and scores the
model as class logits, so that the loop, validation, stopping, streamed evaluation and the
report are the same for every kind (`model.architecture` in the configuration):

    encoder   RecurrentMemoryEncoder, the paper's model: a classifier on the last segment's
              [CLS]; cross-entropy over the classes.
    decoder   RecurrentMemoryDecoder around a causal LM: the answer's word is the text's next
              token; next-token cross-entropy on that token only, and the model's choice is
              the likeliest of the classes' words (each class must be one token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig

from rmt.hub import load_tokenizer, resolve
from rmt.model import RecurrentMemoryDecoder, RecurrentMemoryEncoder, RMTConfig
from rmt.model.base import RecurrentMemoryModel
from rmt.model.segments import IGNORE_INDEX
from rmt.settings import ModelSettings, decoder_smoothing_problem


class Objective:
    """An encoder classifier (the paper's)."""

    model_class: type[RecurrentMemoryModel] = RecurrentMemoryEncoder

    def __init__(self, *, classes: Sequence[str], tokenizer) -> None:
        self.classes, self.tokenizer = list(classes), tokenizer

    def wrapper_config(self) -> dict:
        """RMTConfig fields of a new model that its settings do not hold."""
        return {"num_labels": len(self.classes), **RMTConfig.special_token_ids(self.tokenizer)}

    def new_model(self, settings: ModelSettings, *, segment_length: int) -> RecurrentMemoryModel:
        """A first stage's model: the backbone's weights, or its config randomly initialised."""
        rmt = {**settings.wrapper_settings(), "segment_length": segment_length,
               **self.wrapper_config()}
        location = resolve(settings.backbone)
        if settings.pretrained:
            model = self.model_class.from_pretrained(location, backbone_kwargs=settings.backbone_overrides, **rmt)
            model.config = model.config.replace(backbone=settings.backbone)  # the name, not this machine's path
            return model
        backbone_config = AutoConfig.from_pretrained(location, **settings.backbone_overrides)
        backbone = self.model_class.auto_model_class.from_config(backbone_config)
        config = RMTConfig(architecture=self.model_class.architecture, backbone=settings.backbone, **rmt)
        return self.model_class(backbone=backbone, config=config)

    def load(self, checkpoint: str | Path, **settings) -> RecurrentMemoryModel:
        """A checkpoint of this kind; `settings` are RMTConfig fields that keep its weights."""
        return self.model_class.from_pretrained(checkpoint, **settings)

    def loss(self, network, tokens: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
             memory: Tensor | None = None) -> Tensor:
        """() mean loss of (B, T) token ids whose answers are the (B,) class indices `labels`,
        read from `memory` (B, m, H) when given. `network` may be the model wrapped for
        data-parallel training."""
        if not label_smoothing:
            return network(tokens, labels=labels, memory=memory).loss
        logits = network(tokens, memory=memory).logits  # (B, classes): each example's last segment
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    def class_logits(self, model, tokens: Tensor) -> Tensor:
        """(B, classes) scores of (B, T) token ids held in memory."""
        return model(tokens).logits

    def stream_class_logits(self, model, chunks: Iterable, *, num_tokens: int) -> Tensor:
        """(B, classes) scores of inputs streamed in chunks (any length)."""
        return model.stream(chunks, num_tokens=num_tokens).logits


class AnswerObjective(Objective):
    """A decoder LM that writes the answer's word after the question."""

    model_class = RecurrentMemoryDecoder

    def __init__(self, *, classes: Sequence[str], tokenizer) -> None:
        super().__init__(classes=classes, tokenizer=tokenizer)
        ids = [tokenizer.encode(name, add_special_tokens=False) for name in self.classes]
        several = [name for name, pieces in zip(self.classes, ids) if len(pieces) != 1]
        if several:
            raise ValueError(f"A decoder answers with one token, but the tokenizer splits the answers {several}: "
                             "use a tokenizer whose vocabulary holds each answer whole, or the encoder")
        self.answer_ids = torch.tensor([pieces[0] for pieces in ids])  # (classes,) token id of each answer

    def wrapper_config(self) -> dict:
        return {}

    def loss(self, network, tokens: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
             memory: Tensor | None = None) -> Tensor:
        if label_smoothing:
            raise ValueError(decoder_smoothing_problem(label_smoothing))
        answers = self.answer_ids.to(tokens.device)[labels][:, None]  # (B, 1)
        text = torch.cat([tokens, answers], dim=1)  # (B, T + 1): the answer is the next token
        targets = torch.full_like(text, IGNORE_INDEX)
        targets[:, -1] = answers[:, 0]
        return network(text, labels=targets, return_logits=False, memory=memory).loss

    def class_logits(self, model, tokens: Tensor) -> Tensor:
        return self.stream_class_logits(model, [tokens], num_tokens=tokens.shape[1])

    def stream_class_logits(self, model, chunks: Iterable, *, num_tokens: int) -> Tensor:
        next_token = model.stream(chunks, num_tokens=num_tokens).logits  # (B, V)
        return next_token[:, self.answer_ids.to(next_token.device)]


OBJECTIVES = {objective.model_class.architecture: objective for objective in (Objective, AnswerObjective)}


def objective_for(architecture: str, *, classes: Sequence[str], tokenizer) -> Objective:
    if architecture not in OBJECTIVES:
        raise ValueError(f"model.architecture {architecture!r}: use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[architecture](classes=classes, tokenizer=tokenizer)


def new_model(settings: ModelSettings, *, segment_length: int, classes: Sequence[str]) -> RecurrentMemoryModel:
    """A first stage's model of the kind `settings.architecture` names, for these answers."""
    objective = objective_for(settings.architecture, classes=classes, tokenizer=load_tokenizer(settings.backbone))
    return objective.new_model(settings, segment_length=segment_length)
