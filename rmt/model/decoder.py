"""Decoder RMT for causal language models (GPT-2, OPT, Llama-style): language modelling and
generation over texts of any length.

A segment, as the backbone sees it (m memory tokens, n <= L text tokens):

    [MEM_read]*m tokens [MEM_write]*m [PAD]...

Both memory blocks carry the incoming memory vectors; causal attention lets the read block
inform every token and the write block see the whole segment. The last-layer hidden states
at the write positions are the next segment's memory.

Positions. Every segment is a separate forward call whose positions restart at 0: read
memory at 0..m-1, text at m..m+n-1, write memory right after the last text token at
m+n..2m+n-1 (padding, if any, comes after and is masked). Under rotary embeddings this
means the read memory is always "just before" the text and the write memory "just after"
it, whatever the segment's place in the document; no position ever exceeds 2m + L - 1, so
inputs of any length stay within the positions the backbone was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM
from transformers.utils import ModelOutput

from rmt.model.auto import RecurrentMemoryDecoderConfig
from rmt.model.base import RecurrentMemoryModel, SegmentResult
from rmt.model.config import RMTConfig
from rmt.model.output_loss import OutputLayerLoss
from rmt.model.segments import IGNORE_INDEX, SegmentStep, schedule_segments, token_rows
from rmt.utils import exists


@dataclass
class RMTDecoderOutput(ModelOutput):
    loss: Tensor | None = None  # () mean next-token cross-entropy over every predicted token
    logits: Tensor | None = None  # (B, T, V) at the input's token positions; stream: (B, V) after the text
    memory_states: tuple[Tensor, ...] | None = None  # (B, m, H) before the first segment and after each one
    attentions: tuple[tuple[Tensor, ...], ...] | None = None  # per segment, per layer (A, heads, S, S)
    num_predictions: int | None = None  # tokens the loss averages over


class RecurrentMemoryDecoder(RecurrentMemoryModel):
    architecture = "decoder"
    align = "left"
    auto_model_class = AutoModelForCausalLM  # of the backbone
    config_class = RecurrentMemoryDecoderConfig  # of the checkpoint, for the Auto classes

    def __init__(self, *, backbone: nn.Module, config: RMTConfig):
        super().__init__(backbone=backbone, config=config)
        head = backbone.get_output_embeddings()
        if head is None or head.in_features != self.embedding_dim:
            raise ValueError(
                f"The backbone {type(backbone).__name__} must be a causal LM whose last hidden states have the "
                "width of its input embeddings (load it with AutoModelForCausalLM)"
            )

    @property
    def backbone_body(self) -> nn.Module:
        return self.backbone.base_model

    def _segment_embeds(self, memory: Tensor, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """inputs_embeds (A, S, H), attention mask (A, S), write positions (A, m)."""
        m = self.config.num_memory_tokens
        token_embeddings = self.backbone.get_input_embeddings()(tokens)  # (A, n, H)
        rows, width = tokens.shape[0], token_embeddings.shape[-1]
        memory = memory.to(token_embeddings.dtype)
        inputs_embeds = torch.cat([memory, token_embeddings, torch.zeros_like(memory)], dim=1)  # (A, S, H)
        write_positions = m + lengths[:, None] + torch.arange(m, device=tokens.device)  # (A, m)
        if m:
            inputs_embeds = inputs_embeds.scatter(1, write_positions[..., None].expand(rows, m, width), memory)
        index = torch.arange(inputs_embeds.shape[1], device=tokens.device)[None]
        attention_mask = (index < (2 * m + lengths)[:, None]).long()
        return inputs_embeds, attention_mask, write_positions

    def _every_segment_scored(self) -> bool:
        return True  # a language model predicts the tokens of every segment

    def _segment_forward(
        self,
        memory: Tensor,
        step: SegmentStep,
        *,
        output_attentions: bool = False,
        return_logits: bool = True,
        output_layer: bool = True,
    ) -> tuple[Tensor, SegmentResult]:
        """output_layer=False: the text positions' hidden states (A, L, H) instead of logits
        and loss, for a caller that applies the output layer itself (OutputLayerLoss)."""
        m, length = self.config.num_memory_tokens, self.config.segment_length
        inputs_embeds, attention_mask, write_positions = self._segment_embeds(memory, step.tokens, step.lengths)
        outputs = self.backbone_body(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            use_cache=False,
        )
        hidden_states = outputs.last_hidden_state  # (A, S, H)
        width = hidden_states.shape[-1]
        new_memory = hidden_states.gather(1, write_positions[..., None].expand(-1, -1, width))  # (A, m, H)
        attentions = outputs.attentions if output_attentions else None
        if not output_layer:
            return new_memory, SegmentResult(last_hidden_state=hidden_states[:, m : m + length], attentions=attentions)
        logits = self.backbone.get_output_embeddings()(hidden_states[:, m : m + length])  # (A, L, V)
        loss_sum = None
        if exists(step.token_labels):
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), step.token_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return new_memory, SegmentResult(
            loss_sum=loss_sum,
            logits=logits if return_logits else None,
            attentions=attentions,
        )

    def read_memory(self, input_ids, *, memory: Tensor | None = None) -> Tensor:
        # Without logits: no (B, T, V) tensor is kept for a memory that is all the caller wants.
        return self(input_ids, memory=memory, output_memory_states=True, return_logits=False).memory_states[-1]

    def forward(
        self,
        input_ids: Tensor | Sequence[Sequence[int]],
        attention_mask: Tensor | None = None,
        labels: Tensor | Sequence[Sequence[int]] | None = None,
        *,
        return_logits: bool = True,
        output_attentions: bool = False,
        output_memory_states: bool = False,
        memory: Tensor | None = None,
    ) -> RMTDecoderOutput:
        """Language modelling over a batch of texts of any lengths.

        labels: like input_ids (usually input_ids itself), IGNORE_INDEX (-100) where no loss
        is wanted; token t+1's label is predicted at token t across segment borders, so the
        loss is the ordinary next-token loss of the whole text. return_logits=False saves
        the (B, T, V) logits tensor during training. With max_segments, the text is its first
        max_segments * segment_length tokens: the loss and the logits cover those only.
        memory: (B, m, H) to start from instead of the learned initial memory (as the
        encoder's forward takes it).
        """
        rows = [row.to(self.device) for row in token_rows(input_ids, attention_mask)]
        targets = self._next_token_targets(labels, attention_mask, rows) if exists(labels) else None
        rows = self._cut_to_max_segments(rows)
        steps = schedule_segments(
            rows,
            segment_length=self.config.segment_length,
            align=self.align,
            token_labels=targets,
        )
        # Training without logits: the output layer runs outside the recurrence, its gradients
        # taken at once (OutputLayerLoss), so no segment keeps (A, L, V) logits for the backward
        # pass and memory-efficient back-propagation rebuilds the backbone only.
        head = OutputLayerLoss(self.backbone.get_output_embeddings()) if (
            exists(targets) and not return_logits and torch.is_grad_enabled()) else None
        with self._attention_for(output_attentions):
            results, memory_states = self._recur(
                steps,
                len(rows),
                memory=memory,
                output_memory_states=output_memory_states,
                output_attentions=output_attentions,
                return_logits=return_logits,
                output_layer=head is None,
            )
        loss = num_predictions = None
        if exists(targets):
            num_predictions = int(sum((t != IGNORE_INDEX).sum() for t in targets))
            loss = self._loss_sum(steps, results, head) / max(num_predictions, 1)
        logits = self._gather_logits(steps, results, input_ids, attention_mask, rows) if return_logits else None
        return RMTDecoderOutput(
            loss=loss,
            logits=logits,
            memory_states=memory_states,
            attentions=tuple(r.attentions for r in results) if output_attentions else None,
            num_predictions=num_predictions,
        )

    @staticmethod
    def _loss_sum(steps: list[SegmentStep], results: list[SegmentResult], head: OutputLayerLoss | None) -> Tensor:
        """() the next-token loss summed over every segment."""
        if head is None:
            return torch.stack([r.loss_sum for r in results]).sum()
        sums = [head.segment_loss_sum(r.last_hidden_state, step.token_labels) for r, step in zip(results, steps)]
        return head.with_layer_gradients(torch.stack(sums).sum())

    def _next_token_targets(self, labels, attention_mask, rows: list[Tensor]) -> list[Tensor]:
        """Per example, the label of the token that follows each token read, IGNORE_INDEX after
        the last one: the text is cut to max_segments first, so the token after the cut is
        not a target (as in stream(), which never reads it)."""
        label_rows = [row.to(self.device) for row in token_rows(labels, attention_mask)]
        if [len(r) for r in label_rows] != [len(r) for r in rows]:
            raise ValueError("labels must have the shape of input_ids")
        ignore = torch.tensor([IGNORE_INDEX], device=self.device)
        return [torch.cat([row[1:], ignore]) for row in self._cut_to_max_segments(label_rows)]

    def _gather_logits(self, steps, results, input_ids, attention_mask, rows) -> Tensor:
        """Per-segment logits put back at the positions of the tokens they belong to."""
        pieces: list[list[Tensor]] = [[] for _ in rows]
        for step, result in zip(steps, results):
            for slot, (row, length) in enumerate(zip(step.rows.tolist(), step.lengths.tolist())):
                pieces[row].append(result.logits[slot, :length])
        per_row = [torch.cat(p) for p in pieces]  # (n_i, V)
        if isinstance(input_ids, Tensor) and input_ids.dim() == 2:
            total = input_ids.shape[1]
            mask = attention_mask if exists(attention_mask) else torch.ones_like(input_ids)
            positions = [m.nonzero().squeeze(1)[: len(r)].to(self.device) for m, r in zip(mask, per_row)]
        else:
            total = max(len(r) for r in per_row)
            positions = [torch.arange(len(r), device=self.device) for r in per_row]
        out = per_row[0].new_zeros(len(rows), total, per_row[0].shape[-1])  # (B, T, V)
        row_index = torch.cat([torch.full_like(p, i) for i, p in enumerate(positions)])
        return out.index_put((row_index, torch.cat(positions)), torch.cat(per_row))

    @torch.inference_mode()
    def stream(self, chunks: Iterable, *, num_tokens: int) -> RMTDecoderOutput:
        """Read a text far too long to hold: `chunks` yields token chunks, (B, c) or (c,), that
        make `num_tokens` tokens per example. Returns the mean next-token loss over the text and
        the logits (B, V) of the token that would follow it (a prompt's answer). One segment is
        kept at a time (plus the first token of the next one, the target of the segment's last
        token). With max_segments, as in forward(), the text is its first max_segments segments."""
        count = self._num_stream_segments(num_tokens)
        segments = self._stream_segments(chunks, num_tokens)
        current = next(segments)
        memory, loss_sum, predictions = None, 0.0, 0
        for index, following in enumerate(chain(segments, [None])):
            tokens = current.to(self.device)
            batch, length = tokens.shape
            last = tokens.new_full((batch, 1), IGNORE_INDEX) if following is None else following[:, :1].to(self.device)
            targets = torch.full((batch, self.config.segment_length), IGNORE_INDEX, device=self.device)
            targets[:, :length] = torch.cat([tokens[:, 1:], last], dim=1)
            step = self._full_batch_step(tokens, index, count, token_labels=targets)
            memory = self.initial_memory(batch) if memory is None else memory
            memory, result = self._step(memory, step, return_logits=following is None)
            loss_sum += float(result.loss_sum)
            predictions += int((targets != IGNORE_INDEX).sum())
            current = following
        return RMTDecoderOutput(loss=torch.tensor(loss_sum / max(predictions, 1)), num_predictions=predictions,
                                logits=result.logits[:, length - 1])  # (B, V) after the last token

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue (B, T) contexts of equal length, any T: returns (B, T + new tokens).

        The context is read segment by segment; generation fills the open last segment with
        a key/value cache and, when it is full, writes memory and opens a new one, exactly as
        forward() would segment the whole text.
        """
        input_ids = torch.as_tensor(input_ids, device=self.device)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate needs (batch, tokens) contexts with at least one token, got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
        length = self.config.segment_length
        batch, total = input_ids.shape
        closed = (total - 1) // length  # full segments before the open one (which has 1..L tokens)
        memory = self.initial_memory(batch)
        for index in range(closed):
            tokens = input_ids[:, index * length : (index + 1) * length]
            memory, _ = self._step(memory, self._full_batch_step(tokens, index, closed + 1), return_logits=False)
        open_tokens = input_ids[:, closed * length :]
        logits, cache = self._open_segment(memory, open_tokens)
        generated = []
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            next_token = self._pick(logits, do_sample, temperature, top_k, generator)  # (B,)
            if exists(eos_token_id):
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            generated.append(next_token)
            if exists(eos_token_id) and bool(finished.all()):
                break
            if open_tokens.shape[1] == length:  # the open segment is full: write memory, open a new one
                memory = self._write_memory(memory, cache, open_tokens)
                open_tokens = next_token[:, None]
                logits, cache = self._open_segment(memory, open_tokens)
            else:
                open_tokens = torch.cat([open_tokens, next_token[:, None]], dim=1)
                logits, cache = self._extend(cache, next_token[:, None])
        return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)

    def _open_segment(self, memory: Tensor, tokens: Tensor):
        """Run [MEM_read] tokens with a cache; logits (B, V) for the token after them."""
        token_embeddings = self.backbone.get_input_embeddings()(tokens)
        inputs_embeds = torch.cat([memory.to(token_embeddings.dtype), token_embeddings], dim=1)
        outputs = self.backbone_body(inputs_embeds=inputs_embeds, use_cache=True)
        return self.backbone.get_output_embeddings()(outputs.last_hidden_state[:, -1]), outputs.past_key_values

    def _extend(self, cache, tokens: Tensor):
        outputs = self.backbone_body(
            inputs_embeds=self.backbone.get_input_embeddings()(tokens), past_key_values=cache, use_cache=True
        )
        return self.backbone.get_output_embeddings()(outputs.last_hidden_state[:, -1]), outputs.past_key_values

    def _write_memory(self, memory: Tensor, cache, tokens: Tensor) -> Tensor:
        """The write block after a full segment whose [MEM_read] + tokens are in `cache`."""
        if self.config.num_memory_tokens == 0:
            return memory
        dtype = self.backbone.get_input_embeddings().weight.dtype
        outputs = self.backbone_body(inputs_embeds=memory.to(dtype), past_key_values=cache, use_cache=True)
        return outputs.last_hidden_state  # (B, m, H)

    @staticmethod
    def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, generator) -> Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if exists(top_k):
            threshold = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


# AutoModelForCausalLM.from_pretrained(<an decoder RMT checkpoint>) returns this class.
AutoModelForCausalLM.register(RecurrentMemoryDecoderConfig, RecurrentMemoryDecoder, exist_ok=True)
