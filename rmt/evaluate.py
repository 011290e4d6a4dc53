"""Extrapolation: a checkpoint's accuracy on inputs of many lengths, up to millions of tokens.

Test examples are never stored: each is streamed from the dataset's generator straight into
the model's streaming inference, one segment at a time, so memory stays flat in length.
One CSV row per length (the columns of ROW_FIELDS); the 95% interval is Wilson's, which
stays inside [0, 1] and is honest at 100% accuracy on few examples.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from rmt.checkpoint import check_fits, trained_segments
from rmt.data.dataset import STREAMED_SPLIT, TaskDataset
from rmt.peak_memory import PeakMemory
from rmt.model.base import WEIGHTS_NAME
from rmt.layout import KIND_ACCURACY
from rmt.utils import claim_output, json_with, progress_bar, resolve_device, text_starts_with, write_atomic

if TYPE_CHECKING:
    from rmt.tracking import Run

ROW_FIELDS = (
    "task", "segment_length", "trained_segments", "evaluated_segments", "tokens", "examples", "accuracy", "ci_low",
    "ci_high", "seconds", "examples_per_second", "peak_memory_mb",
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
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or int(match[1]) < 1 or (match[2] and int(match[2]) < int(match[1])):
            raise ValueError(f"{text!r}: {part.strip()!r} is not a segment count >= 1 or a range LOW-HIGH; "
                             "give e.g. '1-15,16,32'")
        low, high = int(match[1]), int(match[2] or match[1])
        values += range(low, high + 1)
    return sorted(set(values))


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
    UI draws accuracy against length.

    A long evaluation keeps what it finished: each length's row goes to `<output>.partial`
    as it completes, and a rerun of the same checkpoint on the same data continues from the
    first length it lacks."""
    checkpoint, output = Path(checkpoint), Path(output)
    data = TaskDataset(data_dir)
    objective = check_fits(checkpoint, data, option="--checkpoint", same_segment_length=True)
    claim_output(output, kind="an evaluation table", ours=_is_evaluation_table)
    if metrics is not None:
        claim_output(metrics, kind="an evaluation metrics file", ours=_is_metrics_file)
    partial = _Partial(output, checkpoint, data)
    counts = {entry["segments"]: entry["examples"] for entry in data.test_lengths}
    lengths = sorted(segments) if segments else sorted(counts)
    device_ = resolve_device(device)
    model = objective.load(checkpoint, segment_length=data.config.segment_length).to(device_)
    scores = functools.partial(objective.stream_class_logits, model)
    done = {row["evaluated_segments"]: row for row in partial.load()}  # by length
    _ = data.generator  # built now (noise tokenized) so that no length's timing includes it
    for length in progress_bar(lengths, desc="lengths", unit="length", disable=not progress):
        examples = counts.get(length, data.config.test_examples_at(length))
        examples = examples if max_examples is None else min(examples, max_examples)
        if length not in done or done[length]["examples"] != examples:
            done[length] = _evaluate_length(scores, data, checkpoint, length, examples, batch_size, device_,
                                            progress=progress)
            partial.save(list(done.values()))
        if run is not None:  # also the lengths an interrupted attempt finished
            # Against length (step) for the curve, and by name for the runs table (accuracy_4096).
            run.log_metrics({**{key: value for key, value in done[length].items()
                                if key in LOGGED_FIELDS or key.startswith("accuracy_")},
                             f"accuracy_{length}": done[length]["accuracy"]}, step=length)
    rows = [done[length] for length in lengths]
    written = [write_atomic(output, _csv(rows), kind="an evaluation table", ours=_is_evaluation_table)]
    if metrics is not None:
        written.append(write_atomic(metrics, json.dumps(accuracy_metrics(rows), indent=2) + "\n",
                                    kind="an evaluation metrics file", ours=_is_metrics_file))
    partial.remove()
    if run is not None:
        for path in written:
            run.log_artifact(path)
    return rows


LOGGED_FIELDS = ("accuracy", "ci_low", "ci_high", "examples_per_second", "peak_memory_mb")


@torch.inference_mode()
def _evaluate_length(scores: Callable[..., torch.Tensor], data: TaskDataset, checkpoint: Path, length: int,
                     examples: int, batch_size: int, device, *, progress: bool = True) -> dict:
    """One CSV row: accuracy of `examples` test examples of `length` segments, streamed into
    `scores` (chunks -> (B, classes) scores: the objective's view of the model)."""
    hits, started = [], time.perf_counter()
    num_tokens = length * data.config.segment_length
    # One length can take hours (200 examples of 4096 segments on a CPU): a bar of its own,
    # advanced batch by batch, under the bar of lengths; it goes away when the length ends.
    bar = progress_bar(total=examples, desc=f"segments={length}", unit="example", leave=False, disable=not progress)
    with PeakMemory(device) as meter, bar:
        for start in range(0, examples, batch_size):
            indices = range(start, min(start + batch_size, examples))
            labels, chunks = data.stream(length, indices)
            logits = scores((np.asarray(c, dtype=np.int64) for c in chunks), num_tokens=num_tokens)
            hits += (logits.argmax(-1).cpu() == torch.as_tensor(labels)).tolist()
            bar.update(len(indices))
    seconds = time.perf_counter() - started
    correct = sum(hits)
    low, high = wilson_interval(correct, examples)
    return {
        "task": data.config.task, "segment_length": data.config.segment_length,
        "trained_segments": trained_segments(checkpoint), "evaluated_segments": length, "tokens": num_tokens,
        "examples": examples, "accuracy": correct / examples, "ci_low": low, "ci_high": high,
        "seconds": round(seconds, 3), "examples_per_second": round(examples / seconds, 3),
        "peak_memory_mb": round(meter.absolute_mb, 1), **_accuracy_by_kind(data, length, np.array(hits)),
    }


def _accuracy_by_kind(data: TaskDataset, length: int, hits: np.ndarray) -> dict:
    """accuracy_<kind> of each kind of question the task tells apart (none for most tasks)."""
    if not data.generator.task.kinds:
        return {}
    kinds = data.kinds(STREAMED_SPLIT, length, range(len(hits)))
    return {KIND_ACCURACY.format(kind=kind): float(hits[kinds == kind].mean()) if (kinds == kind).any()
            else float("nan") for kind in data.generator.task.kinds}


def _csv(rows: Sequence[dict]) -> str:
    table = io.StringIO(newline="")
    by_kind = sorted({key for row in rows for key in row if key not in ROW_FIELDS})
    writer = csv.DictWriter(table, fieldnames=[*ROW_FIELDS, *by_kind])
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


# rmt's own earlier outputs: a table's header starts with ROW_FIELDS' first column, the
# metrics file has the keys accuracy_metrics writes.
_is_evaluation_table = text_starts_with(f"{ROW_FIELDS[0]},")
_is_metrics_file = json_with("task", "accuracy")


class _Partial:
    """The rows an unfinished evaluation has completed, with what they were measured on (the
    checkpoint's weights and the dataset), so a rerun reuses them only for the same pair."""

    def __init__(self, output: Path, checkpoint: Path, data: TaskDataset):
        self.path = output.with_name(output.name + ".partial")
        weights = hashlib.sha256((checkpoint / WEIGHTS_NAME).read_bytes()).hexdigest()
        self.key = {"weights_sha256": weights, "data_config_hash": data.card["config_hash"]}

        claim_output(self.path, kind="an unfinished evaluation", ours=self._ours)

    _ours = staticmethod(json_with("key", "rows"))

    def load(self) -> list[dict]:
        if not self._ours(self.path):
            return []
        saved = json.loads(self.path.read_text())
        if saved["key"] != self.key:
            return []
        print(f"Continuing the evaluation in {self.path}: {len(saved['rows'])} length(s) done", file=sys.stderr)
        return saved["rows"]

    def save(self, rows: list[dict]) -> None:
        write_atomic(self.path, json.dumps({"key": self.key, "rows": rows}) + "\n", kind="an unfinished evaluation",
                     ours=self._ours)

    def remove(self) -> None:
        if self._ours(self.path):
            self.path.unlink()


def accuracy_metrics(rows: Sequence[dict]) -> dict:
    """The accuracy of every length, keyed by number of segments, as `dvc metrics show` and
    `dvc metrics diff` read it (accuracy.00016, ...). DVC sorts keys as text: the lengths
    are zero-padded to one width so that they sort by length."""
    first = rows[0]
    width = len(str(max(row["evaluated_segments"] for row in rows)))
    return {"task": first["task"], "trained_segments": first["trained_segments"],
            "accuracy": {f"{row['evaluated_segments']:0{width}d}": row["accuracy"] for row in rows},
            "examples": {f"{row['evaluated_segments']:0{width}d}": row["examples"] for row in rows}}
