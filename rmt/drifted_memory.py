"""Memories that have read only noise, carried from step to step (train.drifted_memory_every).

A long test input's memory reads hundreds of noise segments before its fact, and drifts into
states that no stage's length reaches: a fact written from there can be lost where the same
fact read early is kept (docs/robustness.md). A drift step starts each example of its batch
from such a state instead of the initial memory, so that writing the fact is trained from
drifted memories too.

One memory per row of the batch (a process holds those of its rows), each block of noise it
reads taken from a random sentence of the training split. On the first drift step each row
reads a number of noise blocks (a block is the stage's number of segments) drawn uniformly
up to `max_segments` segments (rounded down to whole blocks); every drift step after it reads
one more block per row, and a row that would pass `max_segments` starts again from the
initial memory and reads its first block, so the rows keep spanning one block to the most.
The blocks of a memory are read by the weights of the steps they were read at, not all by
the current ones: at a stage's low learning rate they differ little. With
`window_sentences`, a row reads a window of that many sentences over and over instead (a new
window when it starts again): a long test input cycles its split's noise the same way when
the noise text is small (pydoc's test split: 192 sentences, 5,286 tokens), and a model that
holds on noise read on can drift under a repeated one (docs/robustness.md).
Reading noise runs without gradients and in eval mode (no dropout, as at test time); the
draws are a function of (seed, step) only, for the whole batch, so that several processes
train as one does; the states are part of the training state, so a resumed stage continues
them exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rmt.data.generator import NoiseStream

DRIFT_DRAWS = 0x6472  # keeps these draws apart from those of the batches


class DriftedMemory:
    def __init__(self, *, noise: NoiseStream, segment_length: int, batch_size: int, block_segments: int,
                 max_segments: int, seed: int, window_sentences: int | None = None, rank: int = 0,
                 world_size: int = 1):
        assert block_segments <= max_segments, f"a block of {block_segments} segments exceeds {max_segments}"
        assert window_sentences is None or window_sentences <= noise.num_sentences, "a window beyond the noise"
        self.noise, self.segment_length, self.batch_size = noise, segment_length, batch_size
        self.block_segments, self.max_segments, self.seed = block_segments, max_segments, seed
        self.window_sentences = window_sentences
        self.mine = slice(rank, None, world_size)  # this process's rows of the batch
        self.rows = len(range(batch_size)[self.mine])
        self.states: Tensor | None = None  # (rows, m, H), once the first drift step has read noise
        self.segments_read = np.zeros(self.rows, dtype=np.int64)  # noise segments each state has read
        self.first_sentence = np.zeros(self.rows, dtype=np.int64)  # each row's window (window_sentences)

    def _draw_windows(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        """New windows for `rows` (a mask): a random first sentence of a window that fits."""
        if self.window_sentences is not None:
            choices = self.noise.num_sentences - self.window_sentences + 1
            self.first_sentence[rows] = rng.integers(choices, size=self.batch_size)[self.mine][rows]

    def _window_noise(self, first: int, offset: int, length: int) -> np.ndarray:
        """`length` tokens from `offset` of the window of sentences from `first`, read over and over."""
        begin = int(self.noise.starts[first])
        last = first + self.window_sentences
        end = int(self.noise.starts[last]) if last < self.noise.num_sentences else len(self.noise.tokens)
        window = self.noise.tokens[begin:end]
        return np.resize(np.roll(window, -(offset % len(window))), length)  # the window cycled from `offset`

    def _noise_block(self, rng: np.random.Generator) -> torch.Tensor:
        """(rows, block_segments * segment_length) token ids: each row's next noise, from a
        random sentence (without windows), or its window's next tokens."""
        length = self.block_segments * self.segment_length
        if self.window_sentences is None:
            firsts = rng.integers(self.noise.num_sentences, size=self.batch_size)[self.mine]
            blocks = [np.concatenate(list(self.noise.read(int(first), 0, length, length))) for first in firsts]
        else:
            blocks = [self._window_noise(int(first), int(read) * self.segment_length, length)
                      for first, read in zip(self.first_sentence, self.segments_read)]
        return torch.from_numpy(np.stack(blocks).astype(np.int64))

    @torch.no_grad()
    def advance(self, model, *, step: int) -> Tensor:
        """The (rows, m, H) states this drift step starts its examples from, after each has
        read one more noise block (on the first drift step: a drawn number of blocks)."""
        rng = np.random.default_rng([self.seed, DRIFT_DRAWS, step])
        training = model.training
        model.eval()
        try:
            if self.states is None:
                self._spread(model, rng)
            else:
                self._read_block(model, rng)
        finally:
            model.train(training)
        return self.states

    def _spread(self, model, rng: np.random.Generator) -> None:
        """Each row reads 0..max_segments // block_segments blocks, drawn uniformly."""
        blocks = rng.integers(self.max_segments // self.block_segments + 1, size=self.batch_size)[self.mine]
        self._draw_windows(rng, np.ones(self.rows, dtype=bool))
        states = model.initial_memory(self.rows).detach().clone()
        for block in range(int(blocks.max())):
            still_reading = blocks > block  # rows that read this block
            read = model.read_memory(self._noise_block(rng), memory=states)
            states = torch.where(torch.as_tensor(still_reading, device=states.device)[:, None, None], read, states)
            self.segments_read += np.where(still_reading, self.block_segments, 0)
        self.states = states

    def _read_block(self, model, rng: np.random.Generator) -> None:
        restart = self.segments_read + self.block_segments > self.max_segments
        self._draw_windows(rng, restart)
        states = self.states
        if restart.any():
            initial = model.initial_memory(self.rows).detach()
            states = torch.where(torch.as_tensor(restart, device=states.device)[:, None, None], initial, states)
            self.segments_read[restart] = 0
        self.states = model.read_memory(self._noise_block(rng), memory=states)
        self.segments_read += self.block_segments

    def state_dict(self) -> dict:
        return {"states": None if self.states is None else self.states.cpu(),
                "segments_read": torch.from_numpy(self.segments_read.copy()),
                "first_sentence": torch.from_numpy(self.first_sentence.copy())}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        states, segments_read = saved["states"], saved["segments_read"].numpy()
        if len(segments_read) != self.rows or (states is not None and states.shape[0] != self.rows):
            raise ValueError(f"the saved drifted memories are for {len(segments_read)} rows, this run has {self.rows} "
                             "per process: resume with the same batch_size and number of processes")
        self.states = None if states is None else states.to(device)
        self.segments_read = segments_read.astype(np.int64)
        self.first_sentence = saved["first_sentence"].numpy().astype(np.int64)
