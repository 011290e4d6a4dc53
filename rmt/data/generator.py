"""Examples of a task as token ids: a pure function of (task, seed, split, index, length).

An example of `num_tokens` text tokens is laid out as

    noise ... fact ... noise ... [fact ... noise ...] question

and is never built as text: facts and questions are tokenized once per distinct sentence,
and each split's noise is tokenized once, its sentences shuffled and laid end to end; an
example reads that noise cyclically from a random sentence. So an example of millions of
tokens is a handful of array slices, produced chunk by chunk without being held whole.

Splits never share noise: every sentence belongs to one split by a hash of its text, so a
validation or test example is never a training example.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from rmt.data.tasks import Sample, Task

GENERATOR_VERSION = 1  # bump when the same settings would give other examples
SPLITS = ("train", "valid", "test")
# Percent of the noise sentences each split gets, by a hash of the sentence.
SPLIT_BUCKETS = {"train": range(0, 80), "valid": range(80, 90), "test": range(90, 100)}
MIN_NOISE_SENTENCES = 50
Placement = Literal["sentence", "segment"]
_WORD = re.compile(r"[a-z]+")


def stable_int(text: str) -> int:
    """A number from text that is the same on every machine and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def split_of(sentence: str) -> str:
    bucket = stable_int(sentence) % 100
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


@dataclass(frozen=True)
class NoiseStream:
    """One split's noise: sentences tokenized and laid end to end, read cyclically."""

    tokens: np.ndarray  # (P,) every sentence, in shuffled order
    starts: np.ndarray  # (n,) where each sentence starts in `tokens`

    @property
    def num_sentences(self) -> int:
        return len(self.starts)

    def _offset(self, first: int, sentence: int) -> int:
        """Start of the `sentence`-th sentence read after `first`, relative to `first`."""
        cycle, position = divmod(first + sentence, self.num_sentences)
        return cycle * len(self.tokens) + int(self.starts[position]) - int(self.starts[first])

    def sentence_starts_within(self, first: int, budget: int) -> int:
        """How many sentences start at an offset <= budget when reading from `first`."""
        target = budget + int(self.starts[first])
        cycle, rest = divmod(target, len(self.tokens))
        within_cycle = int(np.searchsorted(self.starts, rest, side="right"))
        return cycle * self.num_sentences + within_cycle - first

    def random_sentence_start(self, first: int, budget: int, rng: np.random.Generator) -> int:
        return self._offset(first, int(rng.integers(self.sentence_starts_within(first, budget))))

    def read(self, first: int, start: int, length: int, chunk_size: int) -> Iterator[np.ndarray]:
        """`length` tokens from offset `start` (relative to sentence `first`), in slices."""
        position = (int(self.starts[first]) + start) % len(self.tokens)
        while length > 0:
            take = min(length, chunk_size, len(self.tokens) - position)
            yield self.tokens[position : position + take]
            position, length = (position + take) % len(self.tokens), length - take


@dataclass(frozen=True)
class ExampleLayout:
    """Where everything goes in one example; the tokens follow from it."""

    sample: Sample
    first_sentence: int  # the noise sentence the example starts reading from
    fact_ids: tuple[np.ndarray, ...]
    question_ids: np.ndarray
    noise_offsets: tuple[int, ...]  # where each fact is inserted, in noise tokens read so far
    noise_length: int

    @property
    def fact_positions(self) -> tuple[int, ...]:
        """Token position of each fact in the example."""
        lengths = np.cumsum([0] + [len(ids) for ids in self.fact_ids[:-1]])
        return tuple(int(offset + before) for offset, before in zip(self.noise_offsets, lengths))


class TaskGenerator:
    """Examples of `task` with `noise_sentences` as filler, in the ids of `tokenizer`."""

    def __init__(
        self,
        *,
        task: Task,
        noise_sentences: Sequence[str],
        tokenizer,
        segment_length: int,
        placement: Placement = "sentence",
        seed: int = 0,
    ):
        if placement not in ("sentence", "segment"):
            raise ValueError(f"placement={placement!r}: use 'sentence' (default) or 'segment' (the authors' code)")
        self.task, self.tokenizer = task, tokenizer
        self.segment_length, self.placement, self.seed = segment_length, placement, seed
        self.dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
        self._ids: dict[str, np.ndarray] = {}
        # Sentences are tokenized one by one and laid side by side. Byte-level BPE (GPT-2,
        # OPT) marks a word's leading space in its token, so each sentence is encoded as it
        # appears mid-text, after a space; WordPiece and SentencePiece need nothing.
        fused = tokenizer.decode(self._encode_raw("One.") + self._encode_raw("Two.")).strip()
        self.space_prefix = " " if fused.replace(" ", "") == fused else ""
        self._check_sizes()
        self.noise = {split: self._noise_stream(noise_sentences, split) for split in SPLITS}

    def _encode_raw(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> np.ndarray:
        if text not in self._ids:
            self._ids[text] = np.asarray(self._encode_raw(self.space_prefix + text), dtype=self.dtype)
        return self._ids[text]

    def _check_sizes(self) -> None:
        longest = max(self.task.all_texts(), key=lambda text: len(self.encode(text)))
        if len(self.encode(longest)) > self.segment_length:
            raise ValueError(
                f"The {self.task.name} sentence {longest!r} takes {len(self.encode(longest))} tokens, more than a "
                f"segment's {self.segment_length}: raise segment_length"
            )

    @property
    def min_tokens(self) -> int:
        """The shortest length that holds any sample's facts and question."""
        return max(len(self.encode(text)) for text in self.task.all_texts()) * (self.task.num_facts + 1)

    def _noise_stream(self, sentences: Sequence[str], split: str) -> NoiseStream:
        reserved = self.task.reserved_words
        usable = [s for s in sentences if split_of(s) == split and reserved.isdisjoint(_WORD.findall(s.lower()))]
        if len(usable) < MIN_NOISE_SENTENCES:
            raise ValueError(
                f"The noise text leaves {len(usable)} usable sentences for the {split} split of {self.task.name} "
                f"(need {MIN_NOISE_SENTENCES}): use a longer noise source"
            )
        order = np.random.default_rng([self.seed, SPLITS.index(split), stable_int(self.task.name)]).permutation(len(usable))
        encoded = self.tokenizer([self.space_prefix + usable[i] for i in order], add_special_tokens=False)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        tokens = np.fromiter((t for ids in encoded for t in ids), dtype=self.dtype, count=int(lengths.sum()))
        return NoiseStream(tokens=tokens, starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]))

    def for_form(self, form: Task) -> "TaskGenerator":
        """This generator for a simpler form of its task: the same noise, tokenizer and seed,
        so an example differs from the task's own at that index only in what the form fixes."""
        if (form.name, form.classes, form.num_facts) != (self.task.name, self.task.classes, self.task.num_facts):
            raise ValueError(f"{form} is not a form of the task {self.task.name}: its name, classes and number of "
                             "facts must be the task's")
        twin = copy.copy(self)
        twin.task = form
        return twin

    # ---------------------------------------------------------------- one example
    def layout(self, split: str, index: int, num_tokens: int) -> ExampleLayout:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index, num_tokens, stable_int(self.task.name)])
        sample = self.task.sample(rng)
        fact_ids = tuple(self.encode(fact) for fact in sample.facts)
        question_ids = self.encode(sample.question)
        noise_length = num_tokens - sum(len(ids) for ids in fact_ids) - len(question_ids)
        if noise_length < 0:
            raise ValueError(
                f"{num_tokens} tokens cannot hold the facts and question of {self.task.name} "
                f"({num_tokens - noise_length} tokens): use longer examples"
            )
        noise = self.noise[split]
        first = int(rng.integers(noise.num_sentences))
        if self.task.fact_position == "first":
            offsets = [0] * len(fact_ids)
        elif self.placement == "sentence":
            offsets = sorted(noise.random_sentence_start(first, noise_length, rng) for _ in fact_ids)
        else:
            offsets = self._segment_start_offsets(fact_ids, num_tokens, noise_length, rng)
        return ExampleLayout(sample, first, fact_ids, question_ids, tuple(offsets), noise_length)

    def _segment_start_offsets(self, fact_ids, num_tokens: int, noise_length: int, rng) -> list[int]:
        """Facts at the start of random segments (segments are right-aligned, as the encoder
        cuts them); two facts in a one-segment example follow each other."""
        count = -(-num_tokens // self.segment_length)
        starts = [max(num_tokens - (count - j) * self.segment_length, 0) for j in range(count)]
        chosen = sorted(rng.choice(count, size=len(fact_ids), replace=count < len(fact_ids)))
        offsets, placed = [], 0
        for segment, ids in zip(chosen, fact_ids):
            offsets.append(min(max(starts[segment] - placed, offsets[-1] if offsets else 0), noise_length))
            placed += len(ids)
        return offsets

    def chunks(self, split: str, index: int, num_tokens: int, chunk_size: int = 1 << 16) -> Iterator[np.ndarray]:
        """The example's tokens in order, in pieces of at most `chunk_size`."""
        return self._chunks(self.layout(split, index, num_tokens), split, chunk_size)

    def _chunks(self, layout: ExampleLayout, split: str, chunk_size: int) -> Iterator[np.ndarray]:
        noise = self.noise[split]
        read = 0
        for offset, ids in zip(layout.noise_offsets, layout.fact_ids):
            yield from noise.read(layout.first_sentence, read, offset - read, chunk_size)
            yield ids
            read = offset
        yield from noise.read(layout.first_sentence, read, layout.noise_length - read, chunk_size)
        yield layout.question_ids

    def example(self, split: str, index: int, num_tokens: int) -> tuple[ExampleLayout, np.ndarray]:
        """The layout and the (num_tokens,) token ids of one example."""
        layout = self.layout(split, index, num_tokens)
        return layout, np.concatenate(list(self._chunks(layout, split, num_tokens)))

    def label(self, split: str, index: int, num_tokens: int) -> int:
        return self.layout(split, index, num_tokens).sample.label

    def batch_chunks(
        self, split: str, indices: Sequence[int], num_tokens: int, chunk_size: int = 1 << 16
    ) -> Iterator[np.ndarray]:
        """Several examples of the same length side by side: chunks (B, c), for the model's
        streaming inference."""
        readers = [_Reader(self.chunks(split, index, num_tokens, chunk_size)) for index in indices]
        for start in range(0, num_tokens, chunk_size):
            size = min(chunk_size, num_tokens - start)
            yield np.stack([reader.take(size) for reader in readers])


class _Reader:
    """Exactly n tokens at a time from a stream of chunks of any sizes."""

    def __init__(self, chunks: Iterator[np.ndarray]):
        self.chunks, self.pending = chunks, []

    def take(self, size: int) -> np.ndarray:
        pieces, have = [], 0
        while have < size:
            piece = self.pending.pop() if self.pending else next(self.chunks)
            if have + len(piece) > size:
                piece, rest = piece[: size - have], piece[size - have :]
                self.pending.append(rest)
            pieces.append(piece)
            have += len(piece)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
