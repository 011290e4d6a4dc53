"""Which test examples a robustness run gets wrong, and what they have in common.

    .venv/bin/python benchmarks/robustness_errors.py \
        results/benchmarks/robustness-work/<label>/<task>/<setting>/seed-<s> --segments 512

Scores the run's last stage (its highest `stage-<n>/best`) on the first `--examples` test
examples of one length, as benchmarks/robustness.py scores them, and keeps per example: how
many segments come after the (first) fact's segment, the label and the prediction. Writes
<run>/errors-<segments>.jsonl and prints accuracy by quarter of that distance and the
errors by label and by prediction, which tell apart a memory that fades with distance
from one that confuses two particular answers.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import typer

STREAM_BATCH = 25


def last_stage(run: Path) -> Path:
    stages = sorted(run.glob("stage-*/best"), key=lambda best: int(best.parent.name.removeprefix("stage-")))
    if not stages:
        raise typer.BadParameter(f"{run} holds no trained stage (stage-<n>/best): give a robustness run's folder, "
                                 "<workdir>/<label>/<task>/<setting>/seed-<s>", param_hint="RUN")
    return stages[-1]


def score_examples(run: Path, segments: int, examples: int) -> list[dict]:
    import numpy as np
    import torch

    from rmt.data.dataset import STREAMED_SPLIT, TaskDataset
    from rmt.evaluate import check_fits

    checkpoint, data = last_stage(run), TaskDataset(run / "data")
    objective = check_fits(checkpoint, data, option="RUN", same_segment_length=True)
    model = objective.load(checkpoint, segment_length=data.config.segment_length).eval()
    length, num_tokens = data.config.segment_length, segments * data.config.segment_length
    rows = []
    with torch.inference_mode():
        for start in range(0, examples, STREAM_BATCH):
            indices = range(start, min(start + STREAM_BATCH, examples))
            labels, chunks = data.stream(segments, indices)
            logits = objective.stream_class_logits(model, (np.asarray(c, dtype=np.int64) for c in chunks),
                                                   num_tokens=num_tokens)
            for index, label, prediction in zip(indices, labels.tolist(), logits.argmax(-1).tolist()):
                fact_segment = data.generator.layout(STREAMED_SPLIT, index, num_tokens).fact_positions[0] // length
                rows.append({"index": index, "segments_after_fact": segments - 1 - fact_segment,
                             "label": label, "prediction": prediction, "correct": label == prediction})
    return rows


def summary(rows: list[dict], classes: tuple[str, ...]) -> str:
    lines = [f"accuracy {sum(r['correct'] for r in rows)}/{len(rows)}"]
    distances = sorted({row["segments_after_fact"] for row in rows})
    if len(distances) == 1:  # a task that always states the fact first (Memorize)
        lines.append(f"every fact {distances[0]} segments before the question")
    else:
        lines += ["by segments after the fact (quarters):", *_by_distance_quarter(rows)]
    wrong = [row for row in rows if not row["correct"]]
    for key in ("label", "prediction"):
        counts = collections.Counter(classes[row[key]] for row in wrong)
        lines.append(f"errors by {key}: " + (", ".join(f"{name} {n}" for name, n in counts.most_common()) or "none"))
    return "\n".join(lines)


def _by_distance_quarter(rows: list[dict]) -> list[str]:
    by_distance = sorted(rows, key=lambda row: row["segments_after_fact"])
    lines = []
    for quarter in range(4):
        part = by_distance[quarter * len(rows) // 4 : (quarter + 1) * len(rows) // 4]
        if part:
            lines.append(f"  {part[0]['segments_after_fact']}-{part[-1]['segments_after_fact']}: "
                         f"{sum(r['correct'] for r in part)}/{len(part)} right")
    return lines


def main(
    run: Path = typer.Argument(..., help="A robustness run's folder: <workdir>/<label>/<task>/<setting>/seed-<s>."),
    segments: int = typer.Option(512, min=1, help="The test length to score."),
    examples: int = typer.Option(100, min=1, help="Test examples, the first of that length."),
) -> None:
    import torch

    from rmt.data.tasks import get_task

    last_stage(run)  # refused before any work
    torch.set_num_threads(1)
    rows = score_examples(run, segments, examples)
    output = run / f"errors-{segments}.jsonl"
    output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = json.loads((run / "data" / "config.json").read_text())["task"]
    print(summary(rows, get_task(task).classes))
    print(f"written {output}")


if __name__ == "__main__":
    typer.run(main)
