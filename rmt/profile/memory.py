"""Measured cost of RMT against full attention: peak memory and wall time (`rmt profile memory`).

    results/profile/memory/inference.csv   one row per method and input length
    results/profile/memory/training.csv    one row per number of segments and back-propagation
    results/profile/memory/summary.json    crossover lengths, the flat-memory ratio, the setup

Inference. `rmt` is the model's streaming inference (`RecurrentMemoryEncoder.stream`: one
segment and the memory held at a time) on inputs of 512 to 2,048,000 tokens. `full-<impl>`
is the same backbone over the whole input in ONE pass, with its position table grown to the
input and the attention implementation named: `sdpa` (PyTorch's fused kernel: memory linear
in length, time quadratic) or `eager` (the score matrix is materialised: memory quadratic).
Weights are random: cost does not depend on them, and nothing is downloaded but a config.
Full attention is measured at growing lengths while the next length stays within the
memory and time budgets, projected from the last measurement as if both grew with the
square of the length (an upper bound for every implementation, so the machine never runs
out of memory). Beyond, rows are projections (`measured` False) from a quadratic fitted
by least squares to the measured points (with fewer than three, the bound itself); nothing
is run. RMT is always measured.

Training. One optimizer step (forward, backward, AdamW) on inputs of 1..16 segments, plain
back-propagation through time against memory-efficient back-propagation (segments
recomputed in the backward pass).

Peak memory. Every point runs in a fresh process (`python -m rmt.profile.memory SPEC`) with
glibc told to give freed blocks back at once (rmt.peak_memory.EXACT_CPU_MEMORY_ENV), so that the
resident set follows live tensors; the figure is the peak above the bare runtime (torch and
transformers imported, nothing built): weights, activations, and for training gradients and
optimizer state. On a GPU it is CUDA's max_memory_allocated. Times are wall seconds, the
median of repeats for calls shorter than REPEAT_SECONDS.

Crossover: the shortest length from which RMT costs less than a full-attention method at
every longer length of the grid (measured or projected).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

from rmt.settings import ModelSettings

AttentionImplementation = Literal["sdpa", "eager"]
Kind = Literal["stream", "full_attention", "train_step"]

INFERENCE_FIELDS = ("method", "tokens", "segments", "measured", "peak_memory_mb", "seconds", "us_per_token")
TRAINING_FIELDS = ("segments", "tokens", "backprop", "peak_memory_mb", "step_seconds")
FLAT_MEMORY_REFERENCE_TOKENS = 8192  # the flat-memory ratio: peak at the longest input over the peak here
REPEAT_SECONDS = 0.5  # calls shorter than this are repeated and the median taken
MAX_REPEATS = 20
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Measurement:
    """One point, measured in its own process."""

    kind: Kind
    model: dict  # ModelSettings, as JSON
    segment_length: int
    tokens: int = 0  # inference: tokens per example
    segments: int = 0  # training: segments per example
    attn_implementation: AttentionImplementation = "sdpa"  # full attention only
    memory_efficient: bool = False  # training only
    batch_size: int = 1
    steps: int = 3  # training: timed steps after a warm-up step
    device: str = "auto"

    @property
    def label(self) -> str:
        if self.kind == "train_step":
            return f"train {self.segments} segments ({'memory-efficient' if self.memory_efficient else 'BPTT'})"
        method = "rmt" if self.kind == "stream" else f"full-{self.attn_implementation}"
        return f"{method} {self.tokens:,} tokens"


def backprop_name(memory_efficient: bool) -> str:
    return "memory-efficient" if memory_efficient else "bptt"


# ---------------------------------------------------------------- measuring (child process)
def random_token_chunks(batch: int, total: int, *, vocab_size: int, chunk: int | None = None,
                        seed: int = 0) -> Iterator:
    """Random text token ids, (batch, <= chunk) at a time: a long input is never materialised.
    Without a chunk size, one chunk holds them all."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    low = min(1000, vocab_size // 2)  # past the special and unused ids of WordPiece vocabularies
    chunk = total if chunk is None else chunk
    for start in range(0, total, chunk):
        yield torch.randint(low, vocab_size, (batch, min(chunk, total - start)), generator=generator)


def _timed(call, first_seconds: float) -> float:
    """Median wall time of `call`, repeated when one call is too short to time reliably."""
    if first_seconds >= REPEAT_SECONDS:
        return first_seconds
    repeats = min(MAX_REPEATS, math.ceil(REPEAT_SECONDS / max(first_seconds, 1e-6)))
    times = [first_seconds]
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rmt_model(spec: Measurement):
    from rmt.data.tasks import get_task
    from rmt.objective import new_model

    # Built from its config: the cost of a pretrained backbone is that of its shape (and the
    # fact tasks' six answers, which every task shares).
    settings = ModelSettings(**spec.model).model_copy(
        update={"pretrained": False, "memory_efficient_backprop": spec.memory_efficient})
    return new_model(settings, segment_length=spec.segment_length, classes=get_task("memorize").classes)


def _full_attention_backbone(spec: Measurement):
    from transformers import AutoConfig, AutoModel

    from rmt.hub import resolve

    settings = ModelSettings(**spec.model)
    config = AutoConfig.from_pretrained(resolve(settings.backbone), **settings.backbone_overrides)
    # The whole input is one sequence: the position table grows to it.
    config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, spec.tokens)
    return AutoModel.from_config(config, attn_implementation=spec.attn_implementation)


def _build(spec: Measurement, device):
    if spec.kind == "full_attention":
        return _full_attention_backbone(spec).to(device).eval()
    return _rmt_model(spec).to(device).train(spec.kind == "train_step")


def measure(spec: Measurement) -> dict:
    """Peak memory and time of one point, in this process (run it in a fresh one)."""
    import gc

    import torch

    from rmt.peak_memory import PeakMemory
    from rmt.utils import resolve_device

    device = resolve_device(spec.device)
    # The baseline is the runtime with everything the model needs loaded (modeling code,
    # tokenizer, config) but no model: build one, drop it, then build the measured one.
    # So the peak counts weights, as CUDA's max_memory_allocated does, and not imports.
    _build(spec, device)
    gc.collect()
    meter = PeakMemory(device)
    model = _build(spec, device)
    if spec.kind == "train_step":
        return _measure_train_step(spec, model, device, meter)
    vocab_size = (model.backbone if spec.kind == "stream" else model).config.vocab_size
    with torch.inference_mode():
        if spec.kind == "stream":
            def call():
                chunks = random_token_chunks(spec.batch_size, spec.tokens, vocab_size=vocab_size, chunk=4096)
                model.stream(chunks, num_tokens=spec.tokens)

            # Warm-up, one segment: lazy initialisation off the clock.
            model.stream(random_token_chunks(spec.batch_size, spec.segment_length, vocab_size=vocab_size, chunk=4096),
                         num_tokens=spec.segment_length)
        else:
            input_ids = next(random_token_chunks(spec.batch_size, spec.tokens, vocab_size=vocab_size)).to(device)

            def call():
                model(input_ids=input_ids)

            model(input_ids=input_ids[:, :16])  # warm-up: lazy initialisation off the clock
        started = time.perf_counter()
        with meter:
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = _timed(call, time.perf_counter() - started)
    return {"peak_memory_mb": round(meter.peak_mb, 1), "seconds": seconds, "device": str(device)}


def _measure_train_step(spec: Measurement, model, device, meter) -> dict:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.001)
    tokens = spec.segments * spec.segment_length
    vocab_size = model.backbone.config.vocab_size
    input_ids = next(random_token_chunks(spec.batch_size, tokens, vocab_size=vocab_size)).to(device)
    labels = torch.arange(spec.batch_size, device=device) % model.config.num_labels

    def step():
        optimizer.zero_grad(set_to_none=False)
        model(input_ids, labels=labels).loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: gradients and optimizer state exist from here on, as in a long run
    with meter:
        step()
    times = []
    for _ in range(spec.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"peak_memory_mb": round(meter.peak_mb, 1), "step_seconds": statistics.median(times),
            "device": str(device)}


def run_measurement(spec: Measurement) -> dict:
    """`measure(spec)` in a fresh process, with the allocator setting that makes its
    resident set exact."""
    from rmt.peak_memory import EXACT_CPU_MEMORY_ENV

    command = [sys.executable, "-m", "rmt.profile.memory", json.dumps(asdict(spec))]
    completed = subprocess.run(command, env={**os.environ, **EXACT_CPU_MEMORY_ENV}, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"Measuring {spec.label} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")


# ---------------------------------------------------------------- planning (parent process)
@dataclass(frozen=True)
class Budget:
    """What full attention may use per measurement; beyond, lengths are projected."""

    memory_mb: float
    seconds: float

    @classmethod
    def default_memory_mb(cls) -> float:
        """A quarter of the memory available now (room for the machine's other work), and
        under SLURM at most half of what the job was given (its limit, not the node's)."""
        import psutil

        budget = psutil.virtual_memory().available / 2**20 / 4
        if os.environ.get("SLURM_MEM_PER_NODE", "").isdigit():
            budget = min(budget, int(os.environ["SLURM_MEM_PER_NODE"]) / 2)
        return budget


def _quadratic_fit(points: list[tuple[int, float]]):
    """value(tokens) ~ a + b*t + c*t^2 by least squares with a, b, c >= 0 (a cost never
    falls with length): the best fit over the subsets of the three terms whose
    unconstrained solution is non-negative, which is the constrained optimum."""
    import itertools

    import numpy as np

    tokens = np.array([t for t, _ in points], dtype=float)
    values = np.array([v for _, v in points], dtype=float)
    scale = tokens.max()  # conditioning: fit on t / scale
    design = np.stack([np.ones_like(tokens), tokens / scale, (tokens / scale) ** 2], axis=1)
    best, best_error = np.zeros(3), float(np.sum(values**2))
    for size in (1, 2, 3):
        for terms in map(list, itertools.combinations(range(3), size)):
            solution = np.linalg.lstsq(design[:, terms], values, rcond=None)[0]
            error = float(np.sum((design[:, terms] @ solution - values) ** 2))
            if (solution >= 0).all() and error < best_error:
                best, best_error = np.zeros(3), error
                best[terms] = solution
    return lambda t: float(best @ np.array([1.0, t / scale, (t / scale) ** 2]))


def _upper_bound(last: tuple[int, float], tokens: int) -> float:
    """The cost at `tokens` if it grew with the square of the length from the last point."""
    last_tokens, last_value = last
    return last_value * (tokens / last_tokens) ** 2


def _inference_row(method: str, tokens: int, segment_length: int, *, measured: bool, peak_memory_mb: float,
                   seconds: float) -> dict:
    return {"method": method, "tokens": tokens, "segments": math.ceil(tokens / segment_length) if method == "rmt" else 1,
            "measured": measured, "peak_memory_mb": round(peak_memory_mb, 1), "seconds": round(seconds, 4),
            "us_per_token": round(1e6 * seconds / tokens, 3)}


def _full_attention_rows(implementation: str, lengths: list[int], measure_point, *, segment_length: int,
                         budget: Budget) -> list[dict]:
    method = f"full-{implementation}"
    rows, measured = [], []
    for tokens in lengths:
        within = not measured or (
            _upper_bound((measured[-1]["tokens"], measured[-1]["peak_memory_mb"]), tokens) <= budget.memory_mb
            and _upper_bound((measured[-1]["tokens"], measured[-1]["seconds"]), tokens) <= budget.seconds)
        if not within:
            break
        result = measure_point(tokens, implementation)
        measured.append(_inference_row(method, tokens, segment_length, measured=True, **result))
    rows += measured
    remaining = [tokens for tokens in lengths if tokens > measured[-1]["tokens"]]
    if remaining:
        if len(measured) >= 3:
            memory = _quadratic_fit([(row["tokens"], row["peak_memory_mb"]) for row in measured])
            seconds = _quadratic_fit([(row["tokens"], row["seconds"]) for row in measured])
        else:  # too few points to fit: the bound the measurements stopped at
            last = measured[-1]
            memory = lambda t: _upper_bound((last["tokens"], last["peak_memory_mb"]), t)  # noqa: E731
            seconds = lambda t: _upper_bound((last["tokens"], last["seconds"]), t)  # noqa: E731
        rows += [_inference_row(method, tokens, segment_length, measured=False, peak_memory_mb=memory(tokens),
                                seconds=seconds(tokens)) for tokens in remaining]
    return rows


def crossover_tokens(rmt: list[dict], full: list[dict], column: str) -> int | None:
    """The shortest length from which RMT's `column` is below full attention's at every
    longer length of the grid; None if full attention is cheaper at the longest."""
    full_by_tokens = {row["tokens"]: row[column] for row in full}
    common = sorted((row["tokens"], row[column] < full_by_tokens[row["tokens"]]) for row in rmt
                    if row["tokens"] in full_by_tokens)
    crossover = None
    for tokens, rmt_cheaper in reversed(common):
        if not rmt_cheaper:
            break
        crossover = tokens
    return crossover


def flat_memory_ratio(rmt: list[dict]) -> dict | None:
    """RMT's peak at the longest input over its peak at 8192 tokens (or the next length above)."""
    reference = [row for row in rmt if row["tokens"] >= FLAT_MEMORY_REFERENCE_TOKENS]
    if len(reference) < 2:
        return None
    low, high = min(reference, key=lambda r: r["tokens"]), max(reference, key=lambda r: r["tokens"])
    return {"tokens": high["tokens"], "reference_tokens": low["tokens"],
            "ratio": round(high["peak_memory_mb"] / low["peak_memory_mb"], 4)}


@dataclass
class MemoryProfile:
    inference: list[dict] = field(default_factory=list)
    training: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def profile_memory(
    *,
    model: ModelSettings,
    segment_length: int,
    tokens: Iterable[int],
    full_attention: Iterable[AttentionImplementation] = ("sdpa", "eager"),
    budget: Budget,
    batch_size: int = 1,
    train_segments: Iterable[int] = (1, 2, 4, 8, 16),
    train_batch_size: int = 8,
    train_steps: int = 3,
    device: str = "auto",
    progress: bool = True,
    measure_point=run_measurement,
) -> MemoryProfile:
    """Every measurement of the study (each in its own process), projections and summary.
    `measure_point` is `run_measurement`; tests may pass another."""
    from rmt.utils import progress_bar

    lengths, full_attention = sorted(set(tokens)), list(dict.fromkeys(full_attention))
    train_segments = sorted(set(train_segments))
    common = dict(model=model.model_dump(mode="json"), segment_length=segment_length, device=device)
    bar = progress_bar(total=len(lengths) * (1 + len(full_attention)) + 2 * len(train_segments), desc="profile",
                       unit="point", disable=not progress)

    devices = []

    def point(spec: Measurement) -> dict:
        bar.set_postfix_str(spec.label)
        result = measure_point(spec)
        devices.append(result.get("device", device))
        bar.update()
        return result

    def inference_point(tokens: int, implementation: str | None) -> dict:
        kind = "stream" if implementation is None else "full_attention"
        result = point(Measurement(kind=kind, tokens=tokens, batch_size=batch_size,
                                   attn_implementation=implementation or "sdpa", **common))
        return {"peak_memory_mb": result["peak_memory_mb"], "seconds": result["seconds"]}

    profile = MemoryProfile()
    rmt = [_inference_row("rmt", tokens, segment_length, measured=True, **inference_point(tokens, None))
           for tokens in lengths]
    profile.inference += rmt
    for implementation in full_attention:
        rows = _full_attention_rows(implementation, lengths, inference_point, segment_length=segment_length,
                                    budget=budget)
        bar.update(sum(not row["measured"] for row in rows))  # projected: nothing to run
        profile.inference += rows
    profile.training += [_training_row(point(Measurement(
        kind="train_step", segments=segments, memory_efficient=memory_efficient, batch_size=train_batch_size,
        steps=train_steps, **common)), segments, segment_length, memory_efficient=memory_efficient)
        for segments in train_segments for memory_efficient in (False, True)]
    bar.close()
    profile.summary = summarize(profile, model=model, segment_length=segment_length, budget=budget,
                                batch_size=batch_size, train_batch_size=train_batch_size, device=devices[0])
    return profile


def _training_row(result: dict, segments: int, segment_length: int, *, memory_efficient: bool) -> dict:
    return {"segments": segments, "tokens": segments * segment_length, "backprop": backprop_name(memory_efficient),
            "peak_memory_mb": result["peak_memory_mb"], "step_seconds": round(result["step_seconds"], 4)}


def summarize(profile: MemoryProfile, *, model: ModelSettings, segment_length: int, budget: Budget,
              batch_size: int, train_batch_size: int, device: str) -> dict:
    rmt = [row for row in profile.inference if row["method"] == "rmt"]
    methods = [m for m in dict.fromkeys(row["method"] for row in profile.inference) if m != "rmt"]
    crossovers = {}
    for method in methods:
        full = [row for row in profile.inference if row["method"] == method]
        crossovers[method] = {
            "memory_from_tokens": crossover_tokens(rmt, full, "peak_memory_mb"),
            "time_from_tokens": crossover_tokens(rmt, full, "seconds"),
            "longest_measured_tokens": max(row["tokens"] for row in full if row["measured"]),
        }
    training = {}
    for backprop in dict.fromkeys(row["backprop"] for row in profile.training):
        rows = sorted((row for row in profile.training if row["backprop"] == backprop), key=lambda r: r["segments"])
        training[backprop] = {"segments": [rows[0]["segments"], rows[-1]["segments"]],
                              "peak_ratio": round(rows[-1]["peak_memory_mb"] / rows[0]["peak_memory_mb"], 4)}
    return {
        "model": model.model_dump(mode="json"), "segment_length": segment_length, "batch_size": batch_size,
        "train_batch_size": train_batch_size, "device": device,
        "budget": {"memory_mb": round(budget.memory_mb, 1), "seconds": budget.seconds},
        "crossover": crossovers, "flat_memory_ratio": flat_memory_ratio(rmt), "training": training,
    }


PROFILE_MARKER = "summary.json"  # every profile folder has one


def write_profile(profile: MemoryProfile, folder: str | Path) -> list[Path]:
    """inference.csv, training.csv and summary.json, written all at once."""
    import pandas as pd

    from rmt.utils import atomic_directory

    folder = Path(folder)
    with atomic_directory(folder, marker=PROFILE_MARKER, kind="a memory profile") as staging:
        pd.DataFrame(profile.inference, columns=INFERENCE_FIELDS).to_csv(staging / "inference.csv", index=False)
        pd.DataFrame(profile.training, columns=TRAINING_FIELDS).to_csv(staging / "training.csv", index=False)
        (staging / PROFILE_MARKER).write_text(json.dumps(profile.summary, indent=2) + "\n")
    return [folder / name for name in ("inference.csv", "training.csv", "summary.json")]


if __name__ == "__main__":
    # The child side of run_measurement: one point, its result on stdout.
    result = measure(Measurement(**json.loads(sys.argv[1])))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
