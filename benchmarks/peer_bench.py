"""Peer benchmark (issue 20): this project's RMT against the independent implementation
recurrent-memory-transformer-pytorch (lucidrains, 0.7.0), at matched size, one thread.

    .venv/bin/pip install -e '.[peer]'                   # the peer (the dev extra includes it)
    .venv/bin/python benchmarks/peer_bench.py            # 18 minutes on 2 cores shared with other work
    .venv/bin/python benchmarks/peer_bench.py --quick    # smaller sizes, a smoke run

Prints one row per figure, both implementations and the ratio rmt / peer, and writes
results/benchmarks/peer.json (with the load average while it ran):

1. Training step time (zero_grad, forward, backward, AdamW), plain back-propagation through
   time, at two numbers of segments (4 and 16, batch 4).
2. The same with each side's memory-saving mode: this project's memory-efficient
   back-propagation (segments recomputed in the backward pass) against the peer's memory
   replay back-propagation (its `memory_replay_backprop`, arXiv 2010.06891).
3. Inference tokens/s streaming a long input (256 segments, 16,384 tokens, batch 1) with the
   next-token loss of the whole text, as RecurrentMemoryDecoder.stream computes it; the peer
   is called segment by segment (its wrapper would hold the logits of the whole input).
4. Peak training memory of one step, both modes, each point in a fresh process as
   `rmt profile memory` measures it (rmt.peak_memory: resident set above the runtime with the
   modeling code loaded, glibc returning freed blocks at once; weights, gradients,
   activations and AdamW state).

Times are interleaved in one process (rmt, peer, rmt, peer, ...; the median of several
repeats after a warm-up call each), so machine noise hits both alike.

What is matched. The peer is a causal language model, so this project's side is its decoder
RMT (RecurrentMemoryDecoder) around the CPU default's backbone (params.yaml: the MiniLM BERT
config cut to 2 layers, width 128, 4 heads, intermediate 512, randomly initialised) made
causal (is_decoder). Both: 2 layers, width 128, 4 heads of 32, the same feed-forward weights
and FLOPs (BERT's GELU MLP 128-512-128; the peer's GEGLU at 2/3 of ff_mult=4, 128-2x341-128),
the MiniLM WordPiece vocabulary (30,522) with an output layer over it at every token,
params.yaml's memory tokens (20; 10 until 2026-12-07) read and written per segment, 64 text
tokens per segment, dropout 0.1 in training, PyTorch's fused attention (sdpa), float32, the next-token loss over every token.

What is not. Each model is otherwise as its authors build it: this project ties the output
layer to the input embedding (4.4M weights); the peer has a separate one (8.2M weights,
whose gradients and AdamW state count in its peak memory). BERT has LayerNorm, biases,
learned positions over the whole segment and a prediction-head transform; the peer has
RMSNorm, no biases, positions on the text only, a null key/value and value-residual mixing.
Two of the peer's defaults that the paper's RMT does not have are turned off: its
Transformer-XL cache of the previous segment (use_xl_memories) and hyper-connections (4
residual streams; 1 here is the plain residual). The CPU default's encoder classifier is not
compared: the peer has no classifier, and a 6-way head on [CLS] against a 30,522-way head at
every token would measure the heads, not the recurrence.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import typer

from common import (ROOT, cpu_default_causal_backbone, cpu_default_task, decoder, interleaved, median_seconds,
                    random_tokens)

OUTPUT = ROOT / "results" / "benchmarks" / "peer.json"
PEER = "recurrent-memory-transformer-pytorch"
PEER_VERSION = "0.7.0"  # the version the `peer` extra pins and the issue measured
IMPLEMENTATIONS = ("rmt", "peer")
MODES = {"bptt": "plain BPTT", "efficient": "memory-efficient / memory replay"}
STREAM_CHUNK = 4096  # tokens per chunk handed to RecurrentMemoryDecoder.stream

app = typer.Typer(add_completion=False, help=__doc__)
# The peer's attention enters torch's deprecated sdp_kernel context on every call; the
# warning says nothing about either measurement.
warnings.filterwarnings("ignore", message=r".*sdp_kernel\(\)` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class Plan:
    batch: int
    segments: tuple[int, ...]
    stream_segments: int
    stream_batch: int
    repeats: int


FULL = Plan(batch=4, segments=(4, 16), stream_segments=256, stream_batch=1, repeats=3)
QUICK = Plan(batch=1, segments=(2,), stream_segments=4, stream_batch=1, repeats=1)


# ---------------------------------------------------------------- the two models
@dataclass(frozen=True)
class Setup:
    """The CPU default's sizes (params.yaml), which both models are built with."""

    backbone: object  # the backbone's transformers config, made causal
    memory_tokens: int
    segment_length: int

    @classmethod
    def cpu_default(cls) -> "Setup":
        task = cpu_default_task()
        return cls(backbone=cpu_default_causal_backbone(), memory_tokens=task.model.num_memory_tokens,
                   segment_length=task.data.segment_length)

    def rmt(self) -> torch.nn.Module:
        return decoder(self.backbone, memory_tokens=self.memory_tokens, segment_length=self.segment_length)

    def peer(self) -> torch.nn.Module:
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

        b = self.backbone
        return RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(
            b.hidden_size, num_tokens=b.vocab_size, depth=b.num_hidden_layers, heads=b.num_attention_heads,
            dim_head=b.hidden_size // b.num_attention_heads,
            ff_mult=b.intermediate_size / b.hidden_size,  # GEGLU at 2/3 of it: BERT's MLP weights and FLOPs
            num_memory_tokens=self.memory_tokens, seq_len=self.segment_length,
            attn_dropout=b.attention_probs_dropout_prob, ff_dropout=b.hidden_dropout_prob,
            use_flash_attn=True,  # F.scaled_dot_product_attention, as the backbone's sdpa
            use_xl_memories=False, num_residual_streams=1,  # the paper's RMT: no XL cache, plain residuals
        ))

    def build(self, implementation: str) -> torch.nn.Module:
        return getattr(self, implementation)()

    def describe(self) -> dict:
        b = self.backbone
        return {"layers": b.num_hidden_layers, "hidden": b.hidden_size, "heads": b.num_attention_heads,
                "intermediate": b.intermediate_size, "vocab": b.vocab_size, "memory_tokens": self.memory_tokens,
                "segment_length": self.segment_length, "dropout": b.hidden_dropout_prob}


# ---------------------------------------------------------------- what is timed
def train_step(implementation: str, model, tokens: torch.Tensor, *, efficient: bool) -> Callable[[], None]:
    """One optimizer step on (B, T + 1) tokens: T text tokens in T / L segments, the
    next-token loss over all of them (the peer takes the T + 1st token as the last target)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text = tokens[:, :-1]

    def backward():
        if implementation == "rmt":
            model.config = model.config.replace(memory_efficient_backprop=efficient)
            model(text, labels=text, return_logits=False).loss.backward()
        elif efficient:
            model(tokens, memory_replay_backprop=True)  # the peer runs its backward passes itself
        else:
            model(tokens, return_loss=True)[0].backward()

    def step():
        optimizer.zero_grad(set_to_none=False)
        backward()
        optimizer.step()

    return step


def stream(implementation: str, model, tokens: torch.Tensor, segment_length: int) -> Callable[[], None]:
    """Inference over (B, T + 1) tokens, one segment at a time, with the next-token loss."""
    total = tokens.shape[1] - 1
    if implementation == "rmt":
        text = tokens[:, :-1]
        return lambda: model.stream((text[:, s : s + STREAM_CHUNK] for s in range(0, total, STREAM_CHUNK)),
                                    num_tokens=total)

    @torch.inference_mode()
    def run():  # what the peer's own generate() does to read a long prompt: only the memory is carried
        memories = None
        for s in range(0, total, segment_length):
            targets = tokens[:, s + 1 : s + segment_length + 1]
            _, memories, _ = model.transformer(tokens[:, s : s + segment_length], memories, labels=targets)

    return run


# ---------------------------------------------------------------- peak memory (child side)
@app.command(hidden=True)
def child_train_memory(implementation: str = typer.Option(...), mode: str = typer.Option(...),
                       segments: int = typer.Option(...), batch: int = typer.Option(...)):
    from rmt.peak_memory import PeakMemory

    torch.set_num_threads(1)
    setup = Setup.cpu_default()
    # The baseline is the runtime with the modeling code loaded but no model (build one, drop
    # it), as rmt.profile.memory takes it: the peak counts weights, not imports.
    setup.build(implementation)
    gc.collect()
    meter = PeakMemory("cpu")
    model = setup.build(implementation).train()
    tokens = random_tokens(batch, segments * setup.segment_length + 1, setup.backbone.vocab_size)
    step = train_step(implementation, model, tokens, efficient=mode == "efficient")
    step()  # gradients and AdamW state exist from here on, as in a long run
    with meter:
        step()
    print("RESULT " + json.dumps({"peak_mb": meter.peak_mb}), flush=True)


def peak_memory(implementation: str, mode: str, segments: int, batch: int) -> float:
    from rmt.peak_memory import EXACT_CPU_MEMORY_ENV

    args = [sys.executable, __file__, "child-train-memory", "--implementation", implementation, "--mode", mode,
            "--segments", str(segments), "--batch", str(batch)]
    env = {**os.environ, **EXACT_CPU_MEMORY_ENV, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])["peak_mb"]
    raise RuntimeError(f"{' '.join(args)} failed:\n{completed.stderr[-3000:]}")


# ---------------------------------------------------------------- orchestration
def peer_version() -> str:
    try:
        version = metadata.version(PEER)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{PEER} is not installed: `.venv/bin/pip install -e '.[peer]'` (or the dev extra)") from None
    if version != PEER_VERSION:
        print(f"warning: {PEER} {version} installed, the pinned peer is {PEER_VERSION}", file=sys.stderr)
    return version


def row(measure: str, unit: str, values: dict[str, float], better: str) -> dict:
    print(f"  {measure}: rmt {values['rmt']:.4g} {unit}, peer {values['peer']:.4g} {unit}", file=sys.stderr)
    return {"measure": measure, "unit": unit, **values, "ratio": values["rmt"] / values["peer"], "better": better}


def timing_rows(setup: Setup, plan: Plan) -> list[dict]:
    models = {name: setup.build(name) for name in IMPLEMENTATIONS}
    rows = []
    for mode, label in MODES.items():
        for segments in plan.segments:
            tokens = random_tokens(plan.batch, segments * setup.segment_length + 1, setup.backbone.vocab_size)
            steps = {name: train_step(name, model.train(), tokens, efficient=mode == "efficient")
                     for name, model in models.items()}
            seconds = median_seconds(interleaved(steps, plan.repeats))
            rows.append(row(f"train step, {label}, {segments} segments", "s", seconds, "lower"))
    tokens = random_tokens(plan.stream_batch, plan.stream_segments * setup.segment_length + 1,
                           setup.backbone.vocab_size)
    reads = {name: stream(name, model.eval(), tokens, setup.segment_length) for name, model in models.items()}
    seconds = median_seconds(interleaved(reads, plan.repeats))
    read = plan.stream_batch * plan.stream_segments * setup.segment_length
    rows.append(row(f"inference, {plan.stream_segments} segments streamed", "tokens/s",
                    {name: read / s for name, s in seconds.items()}, "higher"))
    return rows


def memory_rows(plan: Plan) -> list[dict]:
    return [row(f"peak training memory, {label}, {segments} segments", "MB",
                {name: peak_memory(name, mode, segments, plan.batch) for name in IMPLEMENTATIONS}, "lower")
            for mode, label in MODES.items() for segments in plan.segments]


def table(rows: list[dict]) -> str:
    header = ["measure", "unit", "rmt", "peer", "rmt/peer", "better"]
    cells = [header] + [[r["measure"], r["unit"], f"{r['rmt']:.4g}", f"{r['peer']:.4g}", f"{r['ratio']:.2f}",
                         r["better"]] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


@app.callback(invoke_without_command=True)
def main(
    context: typer.Context,
    quick: bool = typer.Option(False, help="Tiny sizes: a smoke run of about a minute, not the reported figures."),
    output: Path = typer.Option(OUTPUT, help="Where the JSON goes."),
):
    """Measure both implementations, print the table, write results/benchmarks/peer.json."""
    if context.invoked_subcommand is not None:
        return
    version = peer_version()
    torch.set_num_threads(1)  # the setting: one thread each, so neither gains from the other core
    plan, setup = (QUICK if quick else FULL), Setup.cpu_default()
    load = {"start": os.getloadavg()}
    started = time.perf_counter()
    rows = timing_rows(setup, plan) + memory_rows(plan)
    load["end"] = os.getloadavg()
    parameters = {name: sum(p.numel() for p in setup.build(name).parameters()) for name in IMPLEMENTATIONS}
    print(f"\nrmt (this project, RecurrentMemoryDecoder) against {PEER} {version}; one thread; "
          f"training batch {plan.batch}, inference batch {plan.stream_batch}; weights rmt {parameters['rmt']:,}, "
          f"peer {parameters['peer']:,}; load average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} "
          f"at the end\n")
    print(table(rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "quick": quick, "peer": {"package": PEER, "version": version}, "torch": torch.__version__,
        "shape": setup.describe(), "plan": asdict(plan), "parameters": parameters, "threads": 1,
        "load_average": load, "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }, indent=2) + "\n")
    print(f"\nwritten {output}")


if __name__ == "__main__":
    app()
