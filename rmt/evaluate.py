"""Extrapolation: a checkpoint's accuracy on inputs of many lengths, up to millions of tokens.

Test examples are never stored: each is streamed from the dataset's generator straight into
the model's streaming inference, one segment at a time, so memory stays flat in length.
One CSV row per length (the columns of ROW_FIELDS); the 95% interval is Wilson's, which
stays inside [0, 1] and is honest at 100% accuracy on few examples.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rmt.data.dataset import TaskDataset, vocabulary_sha256
from rmt.hub import load_tokenizer
from rmt.memory import PeakMemory
from rmt.model import RecurrentMemoryEncoder
from rmt.utils import resolve_device, write_atomic

if TYPE_CHECKING:
    from rmt.tracking import Run

ROW_FIELDS = (
    "task", "trained_segments", "evaluated_segments", "tokens", "examples", "accuracy", "ci_low", "ci_high",
    "seconds", "examples_per_second", "peak_memory_mb",
)


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_segments(text: str) -> list[int]:
    """'1-15,16,32' -> [1, ..., 15, 16, 32]."""
    values = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        values += list(range(int(low), int(high) + 1)) if dash else [int(low)]
    if not values or min(values) < 1:
        raise ValueError(f"{text!r}: give segment counts >= 1, e.g. '1-15,16,32'")
    return sorted(set(values))


def stage_settings(checkpoint: Path) -> dict | None:
    """The resolved settings of the stage a checkpoint (stage/best) comes from, if any."""
    config = Path(checkpoint).parent / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def trained_segments(checkpoint: Path) -> int | None:
    """A stage's checkpoint (stage/best) knows how many segments it was trained on."""
    stage = stage_settings(checkpoint)
    return stage["segments"] if stage else None


def evaluate_checkpoint(
    *,
    checkpoint: str | Path,
    data_dir: str | Path,
    output: str | Path,
    metrics: str | Path | None = None,
    segments: Sequence[int] | None = None,
    max_examples: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    run: "Run | None" = None,
) -> list[dict]:
    """Accuracy at every length in `segments` (default: the dataset's test lengths): a CSV row
    per length in `output`, and the accuracies as a JSON of metrics in `metrics`. With an
    MLflow `run`, each length's figures are logged with step = number of segments, so the
    UI draws accuracy against length."""
    checkpoint, output = Path(checkpoint), Path(output)
    data = TaskDataset(data_dir)
    if not (checkpoint / "rmt_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not an RMT checkpoint (no rmt_config.json): give a stage's best/ folder")
    if vocabulary_sha256(load_tokenizer(str(checkpoint))) != data.card["tokenizer"]["vocabulary_sha256"]:
        raise ValueError(f"{checkpoint} uses another vocabulary than the data in {data_dir} was tokenized with")
    counts = {entry["segments"]: entry["examples"] for entry in data.test_lengths}
    lengths = sorted(segments) if segments else sorted(counts)
    device_ = resolve_device(device)
    model = RecurrentMemoryEncoder.from_pretrained(checkpoint, segment_length=data.config.segment_length).to(device_)
    trained = trained_segments(checkpoint)
    _ = data.generator  # built now (noise tokenized) so that no length's timing includes it
    rows = []
    for length in tqdm(lengths, desc="lengths", unit="length", disable=not progress):
        examples = counts.get(length, data.config.test_examples_at(length))
        examples = examples if max_examples is None else min(examples, max_examples)
        correct, started = 0, time.perf_counter()
        num_tokens = length * data.config.segment_length
        with PeakMemory(device_) as meter:
            for start in range(0, examples, batch_size):
                indices = range(start, min(start + batch_size, examples))
                labels, chunks = data.stream(length, indices)
                logits = model.stream((np.asarray(c, dtype=np.int64) for c in chunks), num_tokens=num_tokens).logits
                correct += int((logits.argmax(-1).cpu() == torch.as_tensor(labels)).sum())
        seconds = time.perf_counter() - started
        low, high = wilson_interval(correct, examples)
        rows.append({
            "task": data.config.task, "trained_segments": trained, "evaluated_segments": length, "tokens": num_tokens,
            "examples": examples, "accuracy": correct / examples, "ci_low": low, "ci_high": high,
            "seconds": round(seconds, 3), "examples_per_second": round(examples / seconds, 3),
            "peak_memory_mb": round(meter.growth_mb, 1),
        })
        if run is not None:
            run.log_metrics({key: rows[-1][key] for key in ("accuracy", "ci_low", "ci_high", "examples_per_second",
                                                            "peak_memory_mb")}, step=length)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=ROW_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    written = [write_atomic(output, table.getvalue())]
    if metrics is not None:
        written.append(write_atomic(metrics, json.dumps(accuracy_metrics(rows), indent=2) + "\n"))
    if run is not None:
        for path in written:
            run.log_artifact(path)
    return rows


def accuracy_metrics(rows: Sequence[dict]) -> dict:
    """The accuracy of every length, keyed by number of segments, as `dvc metrics show` and
    `dvc metrics diff` read it (accuracy.4096, ...)."""
    first = rows[0]
    return {"task": first["task"], "trained_segments": first["trained_segments"],
            "accuracy": {str(row["evaluated_segments"]): row["accuracy"] for row in rows},
            "examples": {str(row["evaluated_segments"]): row["examples"] for row in rows}}
