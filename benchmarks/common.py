"""What the benchmarks that compare two ways of doing one thing share: models of the CPU
default's size (params.yaml), and timing the ways in turn, so that a shared machine's load
hits them alike."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_default_task():
    """params.yaml's first task, whose model `rmt profile memory` measures."""
    from rmt.config import load_config

    config = load_config(ROOT / "params.yaml")
    return config.for_task(next(iter(config.tasks)))


def cpu_default_causal_backbone():
    """The CPU default's backbone config, made causal (a decoder of the same size)."""
    from transformers import AutoConfig

    from rmt.hub import resolve

    model = cpu_default_task().model
    return AutoConfig.from_pretrained(resolve(model.backbone), **model.backbone_overrides, is_decoder=True)


def cpu_default_encoder():
    """params.yaml's model for its first task, randomly initialised."""
    from rmt.data.tasks import get_task
    from rmt.objective import new_model

    task = cpu_default_task()
    return new_model(task.model, segment_length=task.data.segment_length, classes=get_task(task.task).classes)


def decoder(backbone, *, memory_tokens: int, segment_length: int, memory_efficient_backprop: bool = False):
    """A causal LM RMT around a randomly initialised `backbone` (a causal transformers config)."""
    from transformers import AutoModelForCausalLM

    from rmt import RecurrentMemoryDecoder, RMTConfig

    config = RMTConfig(architecture="decoder", num_memory_tokens=memory_tokens, segment_length=segment_length,
                       memory_efficient_backprop=memory_efficient_backprop)
    return RecurrentMemoryDecoder(backbone=AutoModelForCausalLM.from_config(backbone), config=config)


def cpu_default_decoder(*, memory_efficient_backprop: bool = False):
    """The CPU default's model made a causal LM: its backbone, memory and segment sizes."""
    task = cpu_default_task()
    return decoder(cpu_default_causal_backbone(), memory_tokens=task.model.num_memory_tokens,
                   segment_length=task.data.segment_length, memory_efficient_backprop=memory_efficient_backprop)


def random_tokens(batch: int, count: int, vocab_size: int) -> "torch.Tensor":
    """(batch, count) random text token ids, the same on every call."""
    from rmt.profile.memory import random_token_chunks

    return next(random_token_chunks(batch, count, vocab_size=vocab_size))


def interleaved(calls: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Each call's wall and CPU seconds over `repeats` rounds, the calls run in turn after a
    warm-up call each (lazy initialisation and optimizer state off the clock)."""
    for call in calls.values():
        call()
    times = {name: {"wall": [], "cpu": []} for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def median_seconds(times: dict[str, dict[str, list[float]]], clock: str = "wall") -> dict[str, float]:
    return {name: statistics.median(clocks[clock]) for name, clocks in times.items()}


def paired_ratios(times: dict[str, dict[str, list[float]]], first: str, second: str) -> dict:
    """Each clock's median seconds per call, and the median over the rounds of second / first
    (a ratio per round: both sides of one round met the same load), with the load average."""
    result = {"load_average": os.getloadavg()}
    for clock in ("wall", "cpu"):
        for name in (first, second):
            result[f"{name}_{clock}_seconds"] = statistics.median(times[name][clock])
        result[f"{clock}_ratio"] = statistics.median(
            b / a for a, b in zip(times[first][clock], times[second][clock]))
    return result
