"""Memories that have read only noise, carried from step to step (train.drifted_memory_every).

A long test input's memory reads hundreds of noise segments before its fact, and drifts into
states that no stage's length reaches: a fact written from there can be lost where the same
fact read early is kept (docs/robustness.md). A drift step starts each example of its batch
from such a state instead of the initial memory, so that writing the fact is trained from
drifted memories too.

One memory per row of the batch (a process holds those of its rows). On the first drift step each row reads a number of
noise blocks drawn uniformly up to `max_segments` segments; every drift step after it reads
one more block (the stage's number of segments) per row, and a row that would pass
`max_segments` starts again from the initial memory, so the rows keep spanning every amount
of drift. Reading noise runs without gradients and in eval mode (no dropout, as at test
time), on noise drawn from the training split by (seed, step) only, for the whole batch, so
that several processes train as one does; the states are part of the training state, so a
resumed stage continues them exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rmt.data.generator import NoiseStream

DRIFT_DRAWS = 0x6472  # keeps these draws apart from those of the batches


class DriftedMemory:
    def __init__(self, *, noise: NoiseStream, segment_length: int, batch_size: int, block_segments: int,
                 max_segments: int, seed: int, rank: int = 0, world_size: int = 1):
        assert block_segments <= max_segments, f"a block of {block_segments} segments exceeds {max_segments}"
        self.noise, self.segment_length, self.batch_size = noise, segment_length, batch_size
        self.block_segments, self.max_segments, self.seed = block_segments, max_segments, seed
        self.mine = slice(rank, None, world_size)  # this process's rows of the batch
        self.rows = len(range(batch_size)[self.mine])
        self.states: Tensor | None = None  # (rows, m, H), once the first drift step has read noise
        self.segments_read = np.zeros(self.rows, dtype=np.int64)  # noise segments each state has read

    def _noise_block(self, rng: np.random.Generator) -> torch.Tensor:
        """(rows, block_segments * segment_length) token ids: noise from a random sentence per row."""
        length = self.block_segments * self.segment_length
        firsts = rng.integers(self.noise.num_sentences, size=self.batch_size)[self.mine]
        blocks = [np.concatenate(list(self.noise.read(int(first), 0, length, length))) for first in firsts]
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
        states = model.initial_memory(self.rows).detach().clone()
        for block in range(int(blocks.max())):
            still_reading = torch.as_tensor(blocks > block, device=states.device)  # rows that read this block
            read = model.read_memory(self._noise_block(rng), memory=states)
            states = torch.where(still_reading[:, None, None], read, states)
        self.states, self.segments_read = states, blocks * self.block_segments

    def _read_block(self, model, rng: np.random.Generator) -> None:
        restart = self.segments_read + self.block_segments > self.max_segments
        states = self.states
        if restart.any():
            initial = model.initial_memory(self.rows).detach()
            states = torch.where(torch.as_tensor(restart, device=states.device)[:, None, None], initial, states)
            self.segments_read[restart] = 0
        self.states = model.read_memory(self._noise_block(rng), memory=states)
        self.segments_read += self.block_segments

    def state_dict(self) -> dict:
        return {"states": None if self.states is None else self.states.cpu(),
                "segments_read": torch.from_numpy(self.segments_read.copy())}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        states, segments_read = saved["states"], saved["segments_read"].numpy()
        if len(segments_read) != self.rows or (states is not None and states.shape[0] != self.rows):
            raise ValueError(f"the saved drifted memories are for {len(segments_read)} rows, this run has {self.rows} "
                             "per process: resume with the same batch_size and number of processes")
        self.states = None if states is None else states.to(device)
        self.segments_read = segments_read.astype(np.int64)
