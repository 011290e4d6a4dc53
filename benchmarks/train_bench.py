"""Benchmark of the training and evaluation commands (issue 4) on the CPU default
(params.yaml): writes results/benchmarks/train.json and prints a table.

    .venv/bin/python benchmarks/train_bench.py --tasks memorize --tasks detect_and_memorize
    .venv/bin/python benchmarks/train_bench.py --tasks reasoning --last-stage 1

For each task: generate its data, run the curriculum (stage n starts from stage n-1's best
checkpoint, stopping at the target validation accuracy), then evaluate the last stage at a
few lengths. Reports the wall time of every stage, the training step time per segment (ms),
and evaluation examples per second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from rmt.config import load_config
from rmt.data.dataset import build_dataset
from rmt.evaluate import evaluate_checkpoint
from rmt.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "benchmarks" / "train.json"


def main(
    tasks: list[str] = typer.Option(["memorize"], help="Tasks to run (repeat the option)."),
    configs: list[Path] = typer.Option([ROOT / "params.yaml"], "--config", help="Configuration files, in order."),
    last_stage: int = typer.Option(7, min=1, help="Stop the curriculum after this many segments."),
    evaluate_segments: list[int] = typer.Option([1, 7, 16, 64, 512], help="Lengths for the last stage."),
    evaluate_examples: int = typer.Option(64, min=1),
    workdir: Path = typer.Option(ROOT / "results" / "benchmarks" / "train-work"),
):
    config = load_config(*configs)
    report = {}
    for task in tasks:
        settings = config.for_task(task)
        started = time.perf_counter()
        data = build_dataset(settings.data, workdir / task / "data", progress=False)
        data_seconds = time.perf_counter() - started
        stages, init = [], None
        for segments in [n for n in settings.curriculum if n <= last_stage]:
            folder = workdir / task / f"stage-{segments}"
            started = time.perf_counter()
            metrics = train_stage(data_dir=data, segments=segments, output=folder, model=settings.model,
                                  train=settings.train_for(segments), init=init, progress=False)
            seconds = time.perf_counter() - started
            history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
            evaluations = len(history)
            stages.append({
                "segments": segments, "steps": metrics["steps"], "best_valid_accuracy": metrics["best_valid_accuracy"],
                "stop_reason": metrics["stop_reason"], "seconds": round(seconds, 1),
                "ms_per_step_per_segment": round(1000 * seconds / metrics["steps"] / segments, 1),
                "evaluations": evaluations,
            })
            print(f"{task} stage {segments}: {metrics['best_valid_accuracy']:.3f} after {metrics['steps']} steps "
                  f"({metrics['stop_reason']}), {seconds:.1f} s", flush=True)
            init = folder / "best"
        rows = evaluate_checkpoint(checkpoint=init, data_dir=data, output=workdir / task / "evaluation.csv",
                                   segments=evaluate_segments, max_examples=evaluate_examples, batch_size=32,
                                   progress=False)
        report[task] = {"data_seconds": round(data_seconds, 1), "stages": stages,
                        "curriculum_seconds": round(sum(s["seconds"] for s in stages), 1),
                        "evaluation": [{k: r[k] for k in ("evaluated_segments", "examples", "accuracy", "ci_low",
                                                          "ci_high", "examples_per_second")} for r in rows]}
        print(f"\n{task}: data {data_seconds:.1f} s, curriculum {report[task]['curriculum_seconds']} s")
        print(f"{'segments':>8} {'steps':>6} {'accuracy':>9} {'seconds':>8} {'ms/step/segment':>16}")
        for stage in stages:
            print(f"{stage['segments']:8d} {stage['steps']:6d} {stage['best_valid_accuracy']:9.3f} "
                  f"{stage['seconds']:8.1f} {stage['ms_per_step_per_segment']:16.1f}")
        print(f"{'evaluated':>9} {'examples':>8} {'accuracy':>9} {'95% CI':>17} {'examples/s':>11}")
        for row in rows:
            print(f"{row['evaluated_segments']:9d} {row['examples']:8d} {row['accuracy']:9.3f} "
                  f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] {row['examples_per_second']:11.1f}")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else {}
    OUTPUT.write_text(json.dumps({**previous, **report}, indent=2) + "\n")
    print(f"\nwritten {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    typer.run(main)
