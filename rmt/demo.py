"""A short demonstration of the memory wrapper on the CPU, until the full pipeline exists.

A fact token (one of 6) opens a long input of random noise tokens; the model must name it
from the last segment's [CLS]. A 2-layer BERT learns it with the paper's curriculum: one
segment, then two, ... up to seven, each stage starting from the previous one. The trained
model is then tried on longer inputs than it saw, and streams a long input segment by
segment, with flat memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import BertConfig, BertModel

from rmt.memory import PeakMemory
from rmt.model import RMTConfig, RecurrentMemoryEncoder
from rmt.utils import resolve_device

VOCAB = 1000
FACT_TOKENS = torch.arange(900, 906)  # the 6 answers
NOISE_TOKENS = (200, 800)
CLS, SEP, PAD = 101, 102, 0


@dataclass(kw_only=True)
class DemoSettings:
    segment_length: int = 32
    max_segments: int = 7  # the paper's curriculum length
    steps_per_stage: int = 300
    batch_size: int = 32
    learning_rate: float = 5e-4
    target_accuracy: float = 0.99
    stream_tokens: int = 200_000
    seed: int = 0
    device: str = "auto"


def sample_batch(size: int, num_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, len(FACT_TOKENS), (size,), generator=generator)
    tokens = torch.randint(*NOISE_TOKENS, (size, num_tokens), generator=generator)
    tokens[:, 0] = FACT_TOKENS[labels]
    return tokens, labels


def stream_with_fact(label: int, num_tokens: int, chunk: int, seed: int):
    """The same task, `num_tokens` long, produced chunk by chunk."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_tokens, chunk):
        tokens = torch.randint(*NOISE_TOKENS, (min(chunk, num_tokens - start),), generator=generator)
        if start == 0:
            tokens[0] = FACT_TOKENS[label]
        yield tokens


def build_model(settings: DemoSettings) -> RecurrentMemoryEncoder:
    torch.manual_seed(settings.seed)
    backbone = BertModel(
        BertConfig(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=128,
        )
    )
    config = RMTConfig(
        architecture="encoder", segment_length=settings.segment_length, num_labels=len(FACT_TOKENS),
        cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
    )
    return RecurrentMemoryEncoder(backbone=backbone, config=config)


@torch.no_grad()
def accuracy(model: RecurrentMemoryEncoder, num_segments: int, settings: DemoSettings, device) -> float:
    model.eval()
    tokens, labels = sample_batch(256, num_segments * settings.segment_length, torch.Generator().manual_seed(10_000))
    predictions = model(tokens.to(device)).logits.argmax(-1).cpu()
    model.train()
    return float((predictions == labels).float().mean())


def run_demo(settings: DemoSettings, output: Path | None = None) -> dict:
    device = resolve_device(settings.device)
    model = build_model(settings).to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    stages = []
    for num_segments in range(1, settings.max_segments + 1):
        # A fresh optimizer per stage, as a curriculum stage starting from a checkpoint would.
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.001)
        start, reached = time.perf_counter(), 0.0
        progress = tqdm(range(settings.steps_per_stage), desc=f"stage {num_segments} segment(s)", unit="step")
        for step in progress:
            tokens, labels = sample_batch(settings.batch_size, num_segments * settings.segment_length, generator)
            loss = model(tokens.to(device), labels=labels.to(device)).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 5.0)
            optimizer.step()
            if step % 25 == 24:
                reached = accuracy(model, num_segments, settings, device)
                progress.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{reached:.3f}")
                if reached >= settings.target_accuracy:
                    break
        progress.close()
        stages.append(
            dict(segments=num_segments, steps=step + 1, accuracy=reached, seconds=round(time.perf_counter() - start, 1))
        )

    # Extrapolation: longer inputs than any seen in training.
    lengths = [settings.max_segments * factor for factor in (1, 2, 4)]
    extrapolation = [dict(segments=n, accuracy=accuracy(model, n, settings, device)) for n in lengths]

    model.eval()
    label = 3
    start = time.perf_counter()
    with PeakMemory(device) as meter:
        logits = model.stream(
            tqdm(stream_with_fact(label, settings.stream_tokens, 4096, settings.seed), desc="streaming", unit="chunk",
                 total=-(-settings.stream_tokens // 4096)),
            num_tokens=settings.stream_tokens,
        ).logits
    seconds = time.perf_counter() - start
    streamed = dict(
        tokens=settings.stream_tokens,
        segments=-(-settings.stream_tokens // settings.segment_length),
        seconds=round(seconds, 1),
        tokens_per_second=round(settings.stream_tokens / seconds),
        peak_memory_growth_mb=round(meter.growth_mb, 1),
        predicted=int(logits.argmax(-1)),
        answer=label,
    )
    summary = dict(
        settings=asdict(settings), device=str(device), curriculum=stages, extrapolation=extrapolation, stream=streamed
    )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
