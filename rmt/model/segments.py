"""Cutting long inputs into segments, for a batch in memory or for a stream of chunks.

Alignment decides where a short segment goes:
- "right" (encoder, the paper): the LAST segment is full, the first one holds the remainder;
  in a batch, examples with fewer segments start later so that all of them end together,
  which puts every example's answer on the same, final step.
- "left" (decoder): segments run from the start, the last one holds the remainder (the
  place where generation continues); examples with fewer segments finish earlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

Alignment = Literal["left", "right"]
IGNORE_INDEX = -100


@dataclass
class SegmentStep:
    """One step of the recurrence over a batch: the examples that have a segment now."""

    rows: Tensor  # (A,) indices of the active examples in the batch
    tokens: Tensor  # (A, L) text tokens, padded on the right
    lengths: Tensor  # (A,) number of real tokens in each row of `tokens`
    segment_index: Tensor  # (A,) 0-based index of this segment within its example
    num_segments: Tensor  # (A,) number of segments of each example
    # The same facts on the host, known when the step is scheduled, so that the recurrence
    # never reads them back from the device (a synchronisation per step on a GPU):
    segments_after: tuple[int, int]  # (fewest, most) segments a row has after this one
    length: int | None = None  # the number of real tokens of every row, when they share it
    token_labels: Tensor | None = None  # (A, L) per-token targets, IGNORE_INDEX where none

    @property
    def is_last(self) -> Tensor:  # (A,) bool: the example's final segment
        return self.segment_index == self.num_segments - 1

    @property
    def all_last(self) -> bool:
        """Every row ends its example here."""
        return self.segments_after[1] == 0


def token_rows(
    input_ids: Tensor | Sequence[Sequence[int]],
    attention_mask: Tensor | None = None,
    *,
    drop_token_ids: Iterable[int] = (),
) -> list[Tensor]:
    """The real tokens of every example, as 1-D tensors of different lengths.

    `input_ids` is either a padded (B, T) tensor with its attention mask (any padding side)
    or a list of token sequences. Tokens in `drop_token_ids` are removed (the encoder
    strips the tokenizer's special tokens, as the paper does, and adds its own).
    """
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = list(input_ids)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
                )
            rows = [row[mask.bool()] for row, mask in zip(input_ids, attention_mask)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a padded input_ids tensor, not with a list of sequences")
        rows = [torch.as_tensor(row, dtype=torch.long) for row in input_ids]
    if len(rows) == 0:
        raise ValueError("The batch is empty: give at least one example")
    drop = torch.tensor(sorted(set(drop_token_ids)), dtype=torch.long)
    if drop.numel():
        rows = [row[~torch.isin(row, drop.to(row.device))] for row in rows]
    for index, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(
                f"Example {index} has no tokens (after removing padding and special tokens): every example needs text"
            )
    return rows


def num_segments_for(num_tokens: int, segment_length: int) -> int:
    return -(-num_tokens // segment_length)


def segment_bounds(num_tokens: int, segment_length: int, align: Alignment) -> list[tuple[int, int]]:
    """(start, end) of every segment of an input of `num_tokens` tokens."""
    count = num_segments_for(num_tokens, segment_length)
    if align == "right":
        ends = [num_tokens - (count - 1 - index) * segment_length for index in range(count)]
        return [(max(end - segment_length, 0), end) for end in ends]
    starts = [index * segment_length for index in range(count)]
    return [(start, min(start + segment_length, num_tokens)) for start in starts]


def schedule_segments(
    rows: list[Tensor],
    *,
    segment_length: int,
    align: Alignment,
    token_labels: list[Tensor] | None = None,
) -> list[SegmentStep]:
    """Every step of the recurrence for a batch of examples of any lengths (already cut to
    max_segments by the model, see RecurrentMemoryModel._cut_to_max_segments)."""
    bounds = [segment_bounds(len(row), segment_length, align) for row in rows]
    counts = [len(b) for b in bounds]
    total_steps = max(counts)
    device = rows[0].device
    steps = []
    for step in range(total_steps):
        active, indices = [], []
        for row_index, count in enumerate(counts):
            index = step - (total_steps - count) if align == "right" else step
            if 0 <= index < count:
                active.append(row_index)
                indices.append(index)
        tokens = torch.zeros(len(active), segment_length, dtype=torch.long, device=device)
        labels = None
        if token_labels is not None:
            labels = torch.full_like(tokens, IGNORE_INDEX)
        lengths = []
        for slot, (row_index, index) in enumerate(zip(active, indices)):
            start, end = bounds[row_index][index]
            tokens[slot, : end - start] = rows[row_index][start:end]
            if labels is not None:
                labels[slot, : end - start] = token_labels[row_index][start:end]
            lengths.append(end - start)
        ends = [counts[r] for r in active]
        after = [end - 1 - index for index, end in zip(indices, ends)]
        steps.append(
            SegmentStep(
                rows=torch.tensor(active, device=device),
                tokens=tokens,
                lengths=torch.tensor(lengths, device=device),
                segment_index=torch.tensor(indices, device=device),
                num_segments=torch.tensor(ends, device=device),
                token_labels=labels,
                length=lengths[0] if len(set(lengths)) == 1 else None,
                segments_after=(min(after), max(after)),
            )
        )
    return steps


def first_tokens(chunks: Iterable, limit: int) -> Iterator:
    """The chunks of a stream, (B, c) or (c,), up to its first `limit` tokens per example;
    the rest of the stream is never read."""
    taken = 0
    for chunk in chunks:
        size = chunk.shape[-1]
        if taken + size >= limit:
            yield chunk[..., : limit - taken]
            return
        taken += size
        yield chunk


def stream_segments(
    chunks: Iterable, *, num_tokens: int, segment_length: int, align: Alignment
) -> Iterator[Tensor]:
    """Segments (B, n) of a stream of token chunks, each chunk (B, c) or (c,) for one example.

    Holds at most one segment plus one chunk of tokens, so an input of millions of tokens
    never sits in memory. `num_tokens` (per example) fixes where segments start under
    right alignment, and is checked against what the stream delivers.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens}: a stream needs at least one token")
    iterator = iter(chunks)
    sizes = [end - start for start, end in segment_bounds(num_tokens, segment_length, align)]
    buffered: list[Tensor] = []
    available = 0
    delivered = 0
    next_segment = 0
    while next_segment < len(sizes):
        while available < sizes[next_segment]:
            buffered.append(_stream_chunk(iterator, buffered, delivered + available, num_tokens))
            available += buffered[-1].shape[1]
        # Every segment the buffered tokens hold, cut in one split (a chunk holds many
        # segments, and a slice per segment is a measurable share of a small model's step).
        ready, taken = [], 0
        while next_segment < len(sizes) and taken + sizes[next_segment] <= available:
            ready.append(sizes[next_segment])
            taken += sizes[next_segment]
            next_segment += 1
        joined = torch.cat(buffered, dim=1) if len(buffered) > 1 else buffered[0]
        *segments, remainder = joined.split(ready + [available - taken], dim=1)
        buffered = [remainder] if available > taken else []
        available, delivered = available - taken, delivered + taken
        yield from segments
    leftover = available + sum(torch.as_tensor(chunk).shape[-1] for chunk in iterator)
    if leftover:
        raise ValueError(
            f"The stream holds {num_tokens + leftover} tokens but num_tokens={num_tokens}: pass the stream's true length"
        )


def _stream_chunk(iterator: Iterator, buffered: list[Tensor], received: int, num_tokens: int) -> Tensor:
    """The stream's next chunk as (B, c), checked against the chunks before it."""
    try:
        chunk = next(iterator)
    except StopIteration:
        raise ValueError(
            f"The stream ended after {received} tokens but num_tokens={num_tokens}: pass the stream's true length"
        ) from None
    chunk = torch.as_tensor(chunk, dtype=torch.long)
    chunk = chunk[None] if chunk.dim() == 1 else chunk
    if chunk.dim() != 2:
        raise ValueError(f"Stream chunks must be (tokens,) or (batch, tokens), got shape {tuple(chunk.shape)}")
    if buffered and chunk.shape[0] != buffered[0].shape[0]:
        raise ValueError(
            f"A chunk has {chunk.shape[0]} rows after chunks of {buffered[0].shape[0]}: "
            "every chunk of a stream must have the same batch size"
        )
    return chunk
