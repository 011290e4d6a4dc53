"""Attention maps of a trained model on one multi-segment example: the paper's Figure 6.

For every segment, the last layer's attention (mean over heads) of [CLS] and of the memory
positions over [memory, text tokens], with the fact tokens marked. On a Reasoning or
Detect & Memorize model it shows a segment with a fact writing it into memory, a segment
without one leaving memory as it was, a second fact joining the first, and [CLS] reading
memory to answer.

Written as JSON (results/profile/attention-<task>.json); rmt report draws the figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rmt.data.dataset import TaskDataset
from rmt.utils import claim_output, json_with, write_atomic

if TYPE_CHECKING:
    import torch


def _pick_example(data: TaskDataset, segments: int, search: int = 500) -> int:
    """A test example whose facts each sit whole in one segment, in different segments,
    none in the last one (so that memory must carry every fact), preferring facts spread
    far apart."""
    generator, length, size = data.generator, segments * data.config.segment_length, data.config.segment_length
    best, best_spread = 0, -1
    for index in range(min(search, data.config.test_examples)):
        layout = generator.layout("test", index, length)
        spans = [(start // size, (start + len(ids) - 1) // size) for start, ids in zip(layout.fact_positions,
                                                                                      layout.fact_ids)]
        fact_segments = [first for first, last in spans]
        whole = all(first == last for first, last in spans)
        if whole and len(set(fact_segments)) == len(fact_segments) and max(fact_segments) < segments - 1:
            spread = max(fact_segments) - min(fact_segments) + (segments - 1 - max(fact_segments))
            if spread > best_spread:
                best, best_spread = index, spread
    return best


def attention_maps(*, checkpoint: str | Path, data_dir: str | Path, segments: int = 4,
                   index: int | None = None, device: "str | torch.device" = "cpu") -> dict:
    """The maps of one test example with `segments` segments (picked when index is None),
    computed on `device`."""
    import torch

    from rmt.model import RecurrentMemoryEncoder

    data = TaskDataset(data_dir)
    length, segment_length = segments * data.config.segment_length, data.config.segment_length
    index = _pick_example(data, segments) if index is None else index
    layout, tokens = data.generator.example("test", index, length)
    model = RecurrentMemoryEncoder.from_pretrained(checkpoint, segment_length=segment_length).to(device).eval()
    memory_size = model.config.num_memory_tokens
    with torch.no_grad():
        output = model(torch.as_tensor(tokens, dtype=torch.long, device=model.device)[None], output_attentions=True)
    # Encoder segment layout: [CLS] [MEM]*m [SEP] tokens [SEP]; rows [CLS] + memory, columns
    # memory + tokens.
    rows = [0, *range(1, memory_size + 1)]
    columns = [*range(1, memory_size + 1), *range(memory_size + 2, memory_size + 2 + segment_length)]
    maps = []
    for segment_attentions in output.attentions:
        last_layer = segment_attentions[-1][0].float().mean(0)  # (S, S), mean over heads
        maps.append(last_layer[rows][:, columns].tolist())
    fact_tokens = [[] for _ in range(segments)]
    for position, ids in zip(layout.fact_positions, layout.fact_ids):
        for offset in range(len(ids)):
            segment, column = divmod(position + offset, segment_length)
            fact_tokens[segment].append(memory_size + column)
    predicted = int(output.logits.argmax(-1)[0])
    return {
        "task": data.config.task, "checkpoint": str(checkpoint), "example": index, "segments": segments,
        "segment_length": segment_length, "num_memory_tokens": memory_size,
        "facts": list(layout.sample.facts), "question": layout.sample.question, "answer": layout.sample.answer,
        "predicted": data.card["classes"][predicted], "fact_columns": fact_tokens,
        "rows": ["[CLS]", *(f"mem {i}" for i in range(memory_size))], "maps": maps,
    }


def write_attention_maps(output: str | Path, **kwargs) -> Path:
    claim_output(output, kind="an attention map", ours=json_with("maps", "rows"))  # before the work
    return write_atomic(output, json.dumps(attention_maps(**kwargs)) + "\n", kind="an attention map",
                        ours=json_with("maps", "rows"))
