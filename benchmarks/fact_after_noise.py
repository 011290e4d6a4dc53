"""Does a run lose a fact because of the noise before it, the noise after it, or both?

    .venv/bin/python benchmarks/fact_after_noise.py \
        results/benchmarks/robustness-work/<label>/detect_and_memorize/<setting>/seed-<s> \
        --before 0 --before 100 --before 250 --before 400 --after 5 --after 25 --after 100

Scores the run's last stage (an encoder's) on built inputs: `before` segments of test-split
noise, then the fact at the start of a segment, then noise, then the question ending the
input, whose segment is `after` segments after the fact's (0: the same segment). Every cell
uses the same --examples facts and questions (the task's own sampler), the same noise before
the fact and the same noise after it (each from its own start, read as far as the cell
needs), so the cells differ in the two distances only. Prints accuracy % per cell (rows:
before, columns: after) and writes it to <run>/fact-after-noise.json.

A test example of the benchmark at 512 segments mixes both distances; this table separates
them. The memory after `before` noise segments is computed once and continued (the model's
`memory=` input), which gives the same answers as reading the whole input at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from robustness_errors import last_stage


def build_inputs(data, *, examples: int, seed: int):
    """`examples` samples (facts, question, label), and per example where its noise before
    the fact and its noise after it start (test-split sentences)."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x6661])
    samples = [data.generator.task.sample(rng) for _ in range(examples)]
    starts = rng.integers(data.generator.noise["test"].num_sentences, size=(2, examples))
    return samples, starts


def noise(data, start: int, length: int):
    import numpy as np

    stream = data.generator.noise["test"]
    return np.concatenate([np.empty(0, dtype=stream.tokens.dtype), *stream.read(int(start), 0, length, length)])


def score(run: Path, before: list[int], after: list[int], examples: int, seed: int) -> dict:
    import numpy as np
    import torch

    from rmt.data.dataset import TaskDataset
    from rmt.evaluate import check_fits

    checkpoint, data = last_stage(run), TaskDataset(run / "data")
    if len(data.generator.task.sample(np.random.default_rng(0)).facts) != 1:
        raise typer.BadParameter(f"{run} is not a one-fact task: use a Detect & Memorize or Memorize run")
    objective = check_fits(checkpoint, data, option="RUN", same_segment_length=True)
    if objective.model_class.architecture != "encoder":
        raise typer.BadParameter(f"{checkpoint} is a {objective.model_class.architecture}: this scores an encoder's "
                                 "classifier")
    length = data.config.segment_length
    samples, (before_starts, after_starts) = build_inputs(data, examples=examples, seed=seed)
    encoded = [(data.generator.encode(s.facts[0]), data.generator.encode(s.question)) for s in samples]
    if min(after) == 0 and max(len(fact) + len(question) for fact, question in encoded) > length:
        raise typer.BadParameter(f"a fact and its question do not fit one segment of {length} tokens: use --after 1 "
                                 "or more", param_hint="--after")
    model = objective.load(checkpoint, segment_length=length).eval()
    labels = torch.tensor([sample.label for sample in samples])
    table = {}
    with torch.no_grad():
        for segments_before in sorted(before):
            prefix = np.stack([noise(data, start, segments_before * length) for start in before_starts])
            memory = model.read_memory(torch.from_numpy(prefix.astype(np.int64))) if segments_before else None
            for segments_after in sorted(after):
                rows = [np.concatenate([fact, noise(data, start, (segments_after + 1) * length - len(fact)
                                                    - len(question)), question]).astype(np.int64)
                        for (fact, question), start in zip(encoded, after_starts)]
                logits = model(torch.from_numpy(np.stack(rows)), memory=memory).logits
                accuracy = (logits.argmax(-1) == labels).float().mean().item()
                table[(segments_before, segments_after)] = round(100 * accuracy, 1)
                print(f"before {segments_before:4d}  after {segments_after:4d}  accuracy {table[(segments_before, segments_after)]:5.1f}%",
                      flush=True)
    return table


def markdown(table: dict, before: list[int], after: list[int]) -> str:
    lines = ["| noise segments before the fact \\ after it | " + " | ".join(map(str, sorted(after))) + " |",
             "|---|" + "---|" * len(after)]
    lines += [f"| {b} | " + " | ".join(f"{table[(b, a)]:.0f}" for a in sorted(after)) + " |" for b in sorted(before)]
    return "\n".join(lines) + "\n"


def main(run: Path = typer.Argument(..., help="A robustness run's folder (<workdir>/<label>/<task>/<setting>/seed-<s>)."),
         before: list[int] = typer.Option([0, 100, 250, 400], help="Noise segments before the fact (repeat)."),
         after: list[int] = typer.Option([5, 25, 100], help="Whole noise segments between fact and question (repeat)."),
         examples: int = typer.Option(50, min=1, help="Facts and questions per cell."),
         seed: int = typer.Option(0, help="Draws the samples and the noise starts.")):
    if min(before) < 0 or min(after) < 0:
        raise typer.BadParameter("segment counts are 0 or more", param_hint="--before/--after")
    import torch

    from rmt.utils import json_with, write_atomic

    torch.set_num_threads(1)
    table = score(run, before, after, examples, seed)
    text = markdown(table, before, after)
    print("\n" + text)
    result = {"examples": examples, "seed": seed, "checkpoint": str(last_stage(run)),
              "accuracy": [{"before": b, "after": a, "accuracy": value} for (b, a), value in sorted(table.items())]}
    write_atomic(run / "fact-after-noise.json", json.dumps(result, indent=2) + "\n", kind="a fact-after-noise table",
                 ours=json_with("examples", "accuracy"))
    print(f"written {run / 'fact-after-noise.json'}")


if __name__ == "__main__":
    typer.run(main)
