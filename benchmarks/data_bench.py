"""Benchmarks of the dataset generator (issue 3): prints a table, writes results/benchmarks/data.json.

    .venv/bin/python benchmarks/data_bench.py           # about a minute on 2 cores
    .venv/bin/python benchmarks/data_bench.py --quick   # smaller sizes, a smoke run

1. Streamed long examples: tokens per second of a batch of 4 examples at 4096 and 32768
   segments (64-token segments: 262,144 and 2,097,152 tokens each), chunk by chunk as the
   evaluator reads them. Target: >= 2,000,000 tokens/s on 2 cores.
2. Tokenization: tokens per second of tokenizing the noise text (done once per generator).
3. Materializing the default curriculum datasets (DataConfig defaults: 1..7 segments,
   10,000 training and 500 validation examples per length) for the three tasks: seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

from rmt.data.dataset import DataConfig, build_dataset
from rmt.data.generator import TaskGenerator
from rmt.data.noise import load_noise
from rmt.data.tasks import TASKS, get_task
from rmt.hub import MINILM, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "results" / "benchmarks" / "data.json"
TARGET_TOKENS_PER_SECOND = 2_000_000


def main(quick: bool = typer.Option(False, help="Smaller sizes: a smoke run, not the reported figures.")):
    tokenizer = load_tokenizer(MINILM)
    noise = load_noise("pydoc")

    start = time.perf_counter()
    encoded = tokenizer(list(noise.sentences), add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - start
    tokenization = {"sentences": len(encoded), "tokens": sum(map(len, encoded)), "seconds": seconds,
                    "tokens_per_second": sum(map(len, encoded)) / seconds}

    streaming = []
    for name in TASKS:
        generator = TaskGenerator(task=get_task(name), noise_sentences=noise.sentences, tokenizer=tokenizer,
                                  segment_length=64)
        for segments in ((512,) if quick else (4096, 32768)):
            num_tokens, batch = segments * 64, 4
            start = time.perf_counter()
            produced = sum(chunk.size for chunk in generator.batch_chunks("test", range(batch), num_tokens))
            seconds = time.perf_counter() - start
            assert produced == batch * num_tokens
            streaming.append({"task": name, "segments": segments, "tokens": produced, "seconds": seconds,
                              "tokens_per_second": produced / seconds})

    materialize = []
    settings = dict(train_examples=500, valid_examples=50) if quick else {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in TASKS:
            config = DataConfig(task=name, **settings)
            start = time.perf_counter()
            build_dataset(config, Path(scratch) / name, progress=False)
            seconds = time.perf_counter() - start
            size = sum(p.stat().st_size for p in (Path(scratch) / name).rglob("*") if p.is_file())
            materialize.append({"task": name, "train_examples": config.train_examples,
                                "valid_examples": config.valid_examples, "lengths": len(config.curriculum_segments),
                                "seconds": seconds, "megabytes": size / 2**20})

    slowest = min(row["tokens_per_second"] for row in streaming)
    print(f"Tokenizing the noise: {tokenization['tokens']:,} tokens in {tokenization['seconds']:.2f} s "
          f"({tokenization['tokens_per_second']:,.0f} tokens/s)")
    print("\nStreamed long examples (batch of 4)")
    print(f"{'task':22s} {'segments':>8s} {'tokens':>12s} {'seconds':>8s} {'tokens/s':>14s}")
    for row in streaming:
        print(f"{row['task']:22s} {row['segments']:8d} {row['tokens']:12,d} {row['seconds']:8.3f} "
              f"{row['tokens_per_second']:14,.0f}")
    print(f"slowest: {slowest:,.0f} tokens/s (target >= {TARGET_TOKENS_PER_SECOND:,}: "
          f"{'met' if slowest >= TARGET_TOKENS_PER_SECOND else 'MISSED'})")
    print("\nMaterializing curriculum datasets")
    for row in materialize:
        print(f"{row['task']:22s} {row['lengths']} lengths x ({row['train_examples']:,} + {row['valid_examples']:,}) "
              f"examples: {row['seconds']:.1f} s, {row['megabytes']:.1f} MB")
    print(f"total: {sum(r['seconds'] for r in materialize):.1f} s")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps({"quick": quick, "tokenization": tokenization, "streaming": streaming,
                                  "materialize": materialize, "slowest_stream_tokens_per_second": slowest,
                                  "target_tokens_per_second": TARGET_TOKENS_PER_SECOND}, indent=2) + "\n")
    print(f"\nwritten {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    typer.run(main)
