"""Encoder RMT (the paper's model) for BERT-family backbones: sequence classification of
inputs of any length, answered from the last segment's [CLS].

A segment, as the backbone sees it (m memory tokens, L text tokens, S = L + m + 3):

    [CLS] [MEM]*m [SEP] tokens [SEP] [PAD]...

The [MEM] positions hold memory vectors instead of token embeddings and get the backbone's
own position embeddings there (positions 1..m). The last-layer hidden states at those
positions are the next segment's memory. With m = 0 the memory block and its [SEP]
disappear, leaving the backbone's usual `[CLS] tokens [SEP]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import ModelOutput

from rmt.model.auto import RecurrentMemoryEncoderConfig
from rmt.model.base import RecurrentMemoryModel, SegmentResult
from rmt.model.config import RMTConfig
from rmt.model.segments import SegmentStep, schedule_segments, token_rows
from rmt.utils import exists


@dataclass
class RMTEncoderOutput(ModelOutput):
    loss: Tensor | None = None  # () mean over the batch
    logits: Tensor | None = None  # (B, num_labels) from the last segment's [CLS]
    last_hidden_state: Tensor | None = None  # (B, S, H) of the last segment
    # (B, m, H) before the first segment and after each one (output_memory_states=True).
    memory_states: tuple[Tensor, ...] | None = None
    # Per segment, per layer (A, heads, S, S); A = the examples that have that segment, all
    # of them when the examples have the same number of segments (output_attentions=True).
    attentions: tuple[tuple[Tensor, ...], ...] | None = None


class RecurrentMemoryEncoder(RecurrentMemoryModel):
    architecture = "encoder"
    align = "right"
    auto_model_class = AutoModel  # of the backbone
    config_class = RecurrentMemoryEncoderConfig  # of the checkpoint, for the Auto classes

    def __init__(self, *, backbone: nn.Module, config: RMTConfig):
        super().__init__(backbone=backbone, config=config)
        hidden_size = backbone.config.hidden_size
        if hidden_size != self.embedding_dim:
            raise ValueError(
                f"The backbone's hidden states ({hidden_size}) are wider than its embeddings ({self.embedding_dim}), "
                "so they cannot be fed back as memory: use a backbone whose hidden size equals its embedding size"
            )
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)  # on the pooled [CLS]
        self.classifier.weight.data.normal_(0.0, getattr(backbone.config, "initializer_range", 0.02))
        self.classifier.bias.data.zero_()

    @classmethod
    def _settings_from_backbone(cls, name_or_path: str) -> dict:
        return RMTConfig.special_token_ids(AutoTokenizer.from_pretrained(name_or_path))

    @property
    def text_start(self) -> int:
        """Position of the first text token in a segment."""
        m = self.config.num_memory_tokens
        return 1 + m + (1 if m else 0)

    def _segment_ids(self, step: SegmentStep) -> tuple[Tensor, Tensor]:
        """Token ids (A, S) of the segment layout (memory slots hold [PAD], replaced by
        memory vectors) and its attention mask (A, S)."""
        if exists(step.length):  # every row has as many tokens: only the text changes
            tokens, length = step.tokens, step.length
            before, after, attention_mask = self._layout(tokens.shape[0], length, tokens.device)
            text = tokens if length == tokens.shape[1] else tokens[:, :length]
            return torch.cat((before, text, after), dim=1), attention_mask
        return self._build_segment_ids(step.tokens, step.lengths)

    def _layout(self, rows: int, length: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The ids (A, ·) before and after the text of a segment whose rows all hold `length`
        tokens, and its attention mask (A, S). Built once per shape (a stream asks for the same
        one at every segment) by the general layout, so both agree by construction."""
        config = self.config
        key = ("layout", rows, length, device, config.segment_length, config.num_memory_tokens,
               config.cls_token_id, config.sep_token_id, config.pad_token_id)

        def build():
            ids, attention_mask = self._build_segment_ids(
                torch.zeros(rows, config.segment_length, dtype=torch.long, device=device),
                torch.full((rows,), length, device=device))
            return ids[:, : self.text_start], ids[:, self.text_start + length :], attention_mask

        return self._cached(key, build)

    def _build_segment_ids(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """_segment_ids for (A, L) tokens of (A,) lengths each, whatever they are."""
        config = self.config
        rows, positions = tokens.shape[0], config.segment_positions
        ids = torch.full((rows, positions), config.pad_token_id, dtype=torch.long, device=tokens.device)
        ids[:, 0] = config.cls_token_id
        if config.num_memory_tokens:
            ids[:, config.num_memory_tokens + 1] = config.sep_token_id
        start = self.text_start
        index = torch.arange(positions, device=ids.device)[None]  # (1, S)
        text_end = start + lengths[:, None]  # (A, 1)
        ids[:, start : start + config.segment_length] = tokens
        ids = torch.where(index >= text_end, config.pad_token_id, ids)
        ids = ids.scatter(1, text_end, config.sep_token_id)
        return ids, (index <= text_end).long()

    def _every_segment_scored(self) -> bool:
        return self.config.loss_on_all_segments

    def _segment_forward(
        self,
        memory: Tensor,
        step: SegmentStep,
        *,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        classify: bool = True,
    ) -> tuple[Tensor, SegmentResult]:
        """classify=False skips the classifier (a stream reads the last segment's answer only)."""
        m = self.config.num_memory_tokens
        input_ids, attention_mask = self._segment_ids(step)  # (A, S)
        inputs_embeds = self.backbone.get_input_embeddings()(input_ids)  # (A, S, H)
        if m:  # the memory slots' [PAD] embeddings give way to the memory, in place (no copy of the rest)
            inputs_embeds[:, 1 : 1 + m] = memory
        outputs = self.backbone(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, output_attentions=output_attentions
        )
        hidden_states = outputs.last_hidden_state  # (A, S, H)
        result = SegmentResult(last_hidden_state=hidden_states if step.all_last else None,
                               attentions=outputs.attentions if output_attentions else None)
        if classify:
            pooled = getattr(outputs, "pooler_output", None)
            pooled = pooled if exists(pooled) else hidden_states[:, 0]  # (A, H)
            result.logits = self.classifier(self.dropout(pooled))  # (A, num_labels)
        # Right alignment: a step holds every example's last segment or none's, so which rows
        # are scored is known on the host (a boolean mask would synchronise a GPU per step).
        if classify and exists(labels) and (self.config.loss_on_all_segments or step.all_last):
            result.loss_sum = F.cross_entropy(result.logits, labels[step.rows], reduction="sum")
        return hidden_states[:, 1 : 1 + m], result

    def _token_rows(self, input_ids, attention_mask=None) -> list[Tensor]:
        special = (self.config.cls_token_id, self.config.sep_token_id, self.config.pad_token_id)
        rows = token_rows(input_ids, attention_mask, drop_token_ids=special)
        return [row.to(self.device) for row in rows]

    def forward(
        self,
        input_ids: Tensor | Sequence[Sequence[int]],
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        output_attentions: bool = False,
        output_memory_states: bool = False,
        memory: Tensor | None = None,
    ) -> RMTEncoderOutput:
        """Classify a batch of inputs of any lengths.

        input_ids: (B, T) with attention_mask (either padding side), or a list of token
        sequences. The tokenizer's [CLS]/[SEP]/[PAD] are removed (the paper's rule) and each
        segment gets its own. labels: (B,) class indices. memory: (B, m, H) to start from
        instead of the learned initial memory, e.g. another input's last memory state
        (output_memory_states, read_memory): the input then continues that one, when that
        one holds a whole number of segments (segments are aligned from the right).

        The loss, with K steps (segments counted from the end, where every example's last
        segment is) and A_k the examples that have a segment at step k:
        - by default, the mean over the batch of each example's loss on its last segment;
        - with config.loss_on_all_segments, the authors' `sum_loss` (their later code averages,
          their first versions summed): the mean over steps of each step's mean loss,
              loss = 1/K * sum_k [ 1/|A_k| * sum_{i in A_k} CE(logits_{i,k}, labels_i) ].
          Each step weighs the same, so the early steps, which only the longest examples
          reach, count as much as the last one, where every example is.
        """
        rows = self._cut_to_max_segments(self._token_rows(input_ids, attention_mask))
        steps = schedule_segments(rows, segment_length=self.config.segment_length, align=self.align)
        if exists(labels):
            labels = torch.as_tensor(labels, device=self.device)
            if labels.shape != (len(rows),):
                raise ValueError(f"labels must be ({len(rows)},) class indices, got shape {tuple(labels.shape)}")
        with self._attention_for(output_attentions):
            results, memory_states = self._recur(
                steps,
                len(rows),
                memory=memory,
                output_memory_states=output_memory_states,
                labels=labels,
                output_attentions=output_attentions,
            )
        loss = None
        if exists(labels) and self.config.loss_on_all_segments:
            # The authors' definition: the mean over segments of each segment's loss (itself
            # the mean over the examples that have that segment).
            loss = torch.stack([r.loss_sum / len(step.rows) for r, step in zip(results, steps)]).mean()
        elif exists(labels):
            loss = torch.stack([r.loss_sum for r in results if exists(r.loss_sum)]).sum() / len(rows)
        final = results[-1]  # right alignment: every example ends on the last step
        return RMTEncoderOutput(
            loss=loss,
            logits=final.logits,
            last_hidden_state=final.last_hidden_state,
            memory_states=memory_states,
            attentions=tuple(r.attentions for r in results) if output_attentions else None,
        )

    @torch.inference_mode()
    def stream(self, chunks: Iterable, *, num_tokens: int) -> RMTEncoderOutput:
        """Classify inputs far too long to hold: `chunks` yields token chunks, (B, c) or (c,),
        that together make `num_tokens` tokens per example (no special tokens). Only the
        current segment and the memory are kept, so memory use is flat in the length. With
        max_segments, as in forward(), only the first max_segments segments are read."""
        count, device = self._num_stream_segments(num_tokens), self.device
        memory, result = None, None
        for index, tokens in enumerate(self._stream_segments(chunks, num_tokens)):
            step = self._full_batch_step(tokens.to(device), index, count)
            memory = self.initial_memory(len(step.rows)) if memory is None else memory
            memory, result = self._step(memory, step, classify=index == count - 1)
        return RMTEncoderOutput(logits=result.logits)


# AutoModel.from_pretrained(<an encoder RMT checkpoint>) returns this class.
AutoModel.register(RecurrentMemoryEncoderConfig, RecurrentMemoryEncoder, exist_ok=True)
