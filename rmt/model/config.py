"""The Recurrent Memory Transformer's own settings (the backbone keeps its Hugging Face config)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Architecture = Literal["encoder", "decoder"]


@dataclass(kw_only=True)
class RMTConfig:
    """Settings of the memory wrapper. Defaults are the paper's (bert-base-cased, 512-token
    segments, 10 memory tokens, full back-propagation through time).

    Encoder (`architecture="encoder"`, the paper's model): every segment is
    `[CLS] [MEM]*m [SEP] tokens [SEP] [PAD]...`, the answer is read from the last segment's
    `[CLS]`. Decoder (`"decoder"`, for causal LMs): every segment is
    `[MEM]*m tokens [MEM]*m [PAD]...`, memory read at the start, written at the end.
    """

    architecture: Architecture
    num_memory_tokens: int = 10
    # Text tokens per segment: 512 - 10 memory - 3 special tokens in the paper.
    segment_length: int = 499
    # Longer inputs are cut to max_segments * segment_length tokens, keeping the beginning
    # (the paper's rule). None: no limit.
    max_segments: int | None = None
    # Gradients flow back through the memory inputs of the last k segments only; -1 is
    # full back-propagation through time (the paper's encoder). 0 detaches every memory input.
    bptt_depth: int = -1
    # Recompute each segment but the last in the backward pass instead of keeping its
    # activations, so training memory does not grow with the number of segments (the same
    # gradients). Each recomputed segment costs one more forward pass of the backbone: at the
    # CPU default's size, with dropout, ~1.4x plain BPTT's step time for the encoder at 16
    # segments, ~1.1x for a decoder trained without logits (its output layer is not rebuilt).
    memory_efficient_backprop: bool = False
    # Name or path the backbone came from: provenance only, never used to load weights.
    backbone: str | None = None

    # Encoder only.
    num_labels: int | None = None
    # Train on the answer at every segment, not only the last: the loss is the mean over
    # segments of each segment's mean loss, 1/K sum_k mean_{i in A_k} CE_{i,k}, as the
    # authors' `sum_loss` computes it in their later code (their first versions summed the
    # segments' losses instead). RecurrentMemoryEncoder.forward gives the full formula.
    loss_on_all_segments: bool = False
    classifier_dropout: float = 0.1
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.architecture not in ("encoder", "decoder"):
            problems.append(f"architecture={self.architecture!r}: use 'encoder' (BERT-family) or 'decoder' (causal LMs)")
        if self.num_memory_tokens < 0:
            problems.append(f"num_memory_tokens={self.num_memory_tokens}: must be 0 or more")
        if self.segment_length < 1:
            problems.append(f"segment_length={self.segment_length}: must be at least 1 token")
        if self.max_segments is not None and self.max_segments < 1:
            problems.append(f"max_segments={self.max_segments}: must be at least 1, or None for no limit")
        if self.bptt_depth < -1:
            problems.append(f"bptt_depth={self.bptt_depth}: use -1 for full BPTT or k >= 0 segments")
        if self.architecture == "encoder":
            if self.num_labels is None or self.num_labels < 2:
                problems.append(f"num_labels={self.num_labels}: an encoder RMT classifies, give the number of classes (>= 2)")
            missing = [name for name in ("cls_token_id", "sep_token_id", "pad_token_id") if getattr(self, name) is None]
            if missing:
                problems.append(
                    f"{', '.join(missing)} not set: take them from the backbone's tokenizer "
                    "(RMTConfig.for_tokenizer(tokenizer, ...) does it)"
                )
        if problems:
            raise ValueError("Invalid RMTConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def for_tokenizer(cls, tokenizer, **settings) -> "RMTConfig":
        """An encoder config with the special token ids of `tokenizer` filled in."""
        return cls(**{"architecture": "encoder", **cls.special_token_ids(tokenizer), **settings})

    @staticmethod
    def special_token_ids(tokenizer) -> dict:
        """The encoder's segment tokens, as `tokenizer` numbers them."""
        return dict(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                    pad_token_id=tokenizer.pad_token_id)

    @property
    def num_special_tokens(self) -> int:
        """Positions per segment that are neither text nor memory."""
        if self.architecture == "decoder":
            return 0
        # [CLS] tokens [SEP], plus the [SEP] that closes the memory block when there is one.
        return 3 if self.num_memory_tokens > 0 else 2

    @property
    def memory_positions_per_segment(self) -> int:
        return self.num_memory_tokens * (2 if self.architecture == "decoder" else 1)

    @property
    def segment_positions(self) -> int:
        """Length of one segment as the backbone sees it."""
        return self.segment_length + self.memory_positions_per_segment + self.num_special_tokens

    def replace(self, **changes) -> "RMTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RMTConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown RMTConfig fields {unknown}: the checkpoint was written by a newer rmt, upgrade it")
        return cls(**values)

    @classmethod
    def load_file(cls, path: str | Path) -> "RMTConfig":
        """The RMT settings of a checkpoint written before checkpoints had a model_type of
        their own (rmt/model/auto.py reads both layouts)."""
        return cls.from_dict(json.loads(Path(path).read_text()))
