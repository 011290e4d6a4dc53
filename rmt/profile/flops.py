"""Analytic forward-pass FLOPs of full attention and of the RMT recurrence (the paper's Figure 3).

Why analytic: the paper's claim is about inputs of up to 2,048,000 tokens on OPT-175B, which
nobody runs for a plot. The counts follow Hoffmann et al. 2022 (Chinchilla), appendix F, and
are checked against torch's FlopCounterMode on small models run for real (tests/test_flops.py).

Terms, for one sequence of P positions through a backbone with L layers, width d, embedding
width e (OPT's word_embed_proj_dim, else d), vocabulary V, h heads of size k, feed-forward
width f (a multiply-add is 2 FLOPs):

    embeddings         2 * P * V * e            the token lookup as a one-hot matmul
    per layer, x L:
      attention_qkv    2 * P * d * 3(h*k)       key, query, value projections
      attention_logits 2 * P * P * (h*k)        key @ query
      attention_softmax 3 * h * P * P           softmax
      attention_reduce 2 * P * P * (h*k)        softmax @ value
      attention_output 2 * P * (h*k) * d        final linear
      feed_forward     2 * P * (d*f + f*d)      dense block (two matrices)
    head               2 * P_out * e * V        final logits over the P_out predicted positions

Accounting choices, all stated by `Accounting` (a keyword argument of every estimator) and
written to the results:
- `embeddings`: Chinchilla counts the input embedding as a one-hot matmul; real models do a
  table lookup (0 FLOPs). Default: not counted.
- `logits`: the output head (the vocabulary projection of a language model; the pooler and
  linear classifier of an encoder classifier). Default: counted.
- `softmax`: the 3*h*P*P term. Default: counted.
Presets: `CHINCHILLA_ACCOUNTING` (appendix F as written: all three), `PAPER_ACCOUNTING` (the
default, no embeddings) and `MATMUL_ACCOUNTING` (no embeddings, no softmax: matrix products
only, which is what torch's FlopCounterMode counts, hence the accounting to compare with it).
Always, whatever the accounting:
- Attention is the full P x P square in every layer: no causal halving (appendix F does not
  halve it, and eager attention computes the square and masks afterwards).
- Not counted (as in appendix F): biases, layer norms, activations, residual additions,
  position embeddings, the attention scaling and masking.
- Counted beyond appendix F because they are real matmuls: OPT's project_in/project_out when
  word_embed_proj_dim differs from hidden_size (2*P*e*d each), and grouped-query attention
  (keys and values with num_key_value_heads heads).
- Not modelled: gated feed-forwards (LLaMA's SwiGLU has three matrices, not two), which this
  undercounts by a third of the dense block.

Full attention reads the whole input of N tokens in ONE pass of P = N positions, with the
head on all N positions, even past the backbone's max_position_embeddings (2048 for OPT): it
is the hypothetical quadratic baseline of the paper. RMT reads it in ceil(N / L) segments of
L text tokens; every segment is a full pass over `SegmentLayout.positions` positions (text,
memory, special tokens; a short last segment is padded, as rmt.model computes it), with the
head on the L text positions (decoder) or the classifier on one position (encoder).
`normalized` divides by one 512-position full-attention pass of the same model under the same
accounting (the paper's Figure 3 unit).

The paper's headline (at 2,048,000 tokens, 4,000 segments: RMT needs ~295x fewer FLOPs than
full attention on OPT-125M, ~29x on OPT-175B) is reproduced within 5% by `PAPER_ACCOUNTING`
with `PAPER_LAYOUT`: embeddings not counted (a lookup), logits and softmax counted, and every
RMT segment costing exactly one 512-position pass (memory positions not added on top), which
gives 287.9x and 28.64x (counting the embeddings but not the logits gives the same numbers:
both are 2*V*e per position). Counting the embeddings as well (plain appendix F) gives 223.4x for
OPT-125M (28.55x for OPT-175B); adding 10 read-only memory positions per segment gives
283.5x / 28.09x (still within 5%); 10 read and 10 write positions (the decoder layout)
279.3x / 27.56x, 5.3% under the paper for OPT-125M. The closest match of all is the same
accounting at 4,096 segments of 512 (2,097,152 tokens): 294.8x / 29.31x; the paper's figure may
have used that grid point. `headline_sensitivity()` tabulates these.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from rmt.paper import FIGURE3_TOKENS
from rmt.utils import json_with, text_starts_with, write_atomic

Head = Literal["lm", "classifier", "none"]

# The paper's Figure 3 unit: one forward pass over 512 positions with full attention.
REFERENCE_TOKENS = 512
HEADLINE_TOKENS = 2_048_000
# Figure 3a spans 512 to 32,000 tokens, 3b 32,000 to 2,048,000.
# The paper's ratios at HEADLINE_TOKENS (full attention FLOPs / RMT FLOPs).
PAPER_HEADLINE_RATIOS = {"opt-125m": 295.0, "opt-175b": 29.0}


# ---------------------------------------------------------------- shapes
@dataclass(frozen=True)
class TransformerShape:
    """The dimensions that set a backbone's FLOPs, read from any Hugging Face config."""

    name: str
    num_layers: int
    hidden_size: int  # d: the width of the residual stream
    num_heads: int
    head_dim: int
    num_key_value_heads: int
    ffn_dim: int  # f
    vocab_size: int  # V
    embedding_dim: int  # e: OPT's word_embed_proj_dim; equal to d for most models
    max_positions: int | None = None  # what the backbone was trained for; the estimates ignore it

    @property
    def attention_width(self) -> int:
        """h*k, Chinchilla's heads x key size (d for most models)."""
        return self.num_heads * self.head_dim

    @property
    def key_value_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any, *, name: str | None = None) -> "TransformerShape":
        """From a transformers PretrainedConfig or a plain mapping of its fields. Understands
        the BERT/LLaMA names (hidden_size, intermediate_size), OPT's (ffn_dim,
        word_embed_proj_dim) and GPT-2's (n_embd, n_layer, n_head, n_inner)."""
        values: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()

        def first(*keys: str) -> Any:
            return next((values[key] for key in keys if values.get(key) is not None), None)

        hidden = first("hidden_size", "d_model", "n_embd")
        layers = first("num_hidden_layers", "num_layers", "n_layer")
        heads = first("num_attention_heads", "num_heads", "n_head")
        vocab = first("vocab_size")
        missing = [label for label, value in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                              ("num_attention_heads", heads), ("vocab_size", vocab)) if value is None]
        if missing:
            raise ValueError(f"The config has no {', '.join(missing)} (nor a GPT-2/T5 synonym): cannot count FLOPs")
        head_dim = first("head_dim") or hidden // heads
        return cls(
            name=name or first("name_or_path", "_name_or_path", "model_type") or "model",
            num_layers=int(layers),
            hidden_size=int(hidden),
            num_heads=int(heads),
            head_dim=int(head_dim),
            num_key_value_heads=int(first("num_key_value_heads") or heads),
            # GPT-2 leaves n_inner None for the usual 4*d.
            ffn_dim=int(first("intermediate_size", "ffn_dim", "n_inner", "d_ff") or 4 * hidden),
            vocab_size=int(vocab),
            embedding_dim=int(first("word_embed_proj_dim", "embedding_size") or hidden),
            max_positions=first("max_position_embeddings", "n_positions"),
        )


# OPT's published shapes (Zhang et al. 2022, table 1): layers, width, heads; ffn 4*d, vocabulary
# 50272, 2048 positions. Kept as data so that the estimates never download or import torch.
OPT_ARCHITECTURES: dict[str, dict[str, int]] = {
    "opt-125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32),
    "opt-6.7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32),
    "opt-30b": dict(num_hidden_layers=48, hidden_size=7168, num_attention_heads=56),
    "opt-175b": dict(num_hidden_layers=96, hidden_size=12288, num_attention_heads=96),
}
OPT_MODELS = tuple(OPT_ARCHITECTURES)


def opt_config_values(name: str) -> dict[str, Any]:
    """The OPTConfig fields of one published OPT model."""
    key = name.lower().removeprefix("facebook/")
    if key not in OPT_ARCHITECTURES:
        raise ValueError(f"Unknown OPT model {name!r}: choose from {', '.join(OPT_MODELS)}")
    shape = OPT_ARCHITECTURES[key]
    width = shape["hidden_size"]
    return dict(**shape, ffn_dim=4 * width, word_embed_proj_dim=width, vocab_size=50272,
                max_position_embeddings=2048, _name_or_path=f"facebook/{key}")


def opt_config(name: str, **overrides):
    """A transformers.OPTConfig of a published OPT model, built locally (no download).
    overrides: e.g. attn_implementation="eager" to count a model built from it."""
    from transformers import OPTConfig  # imports torch: only when a config object is wanted

    return OPTConfig(**{**opt_config_values(name), **overrides})


def opt_shape(name: str) -> TransformerShape:
    key = name.lower().removeprefix("facebook/")
    return TransformerShape.from_config(opt_config_values(key), name=key)


# ---------------------------------------------------------------- accounting
@dataclass(frozen=True)
class Accounting:
    """Which optional terms a FLOP count includes (see the module docstring)."""

    embeddings: bool = False  # the input embedding as a one-hot matmul, 2*V*e per position
    logits: bool = True  # the output head: vocabulary logits, or an encoder's pooler + classifier
    softmax: bool = True  # 3 * heads * P * P per layer

    def describe(self) -> str:
        counted = [name for name in ("embeddings", "logits", "softmax") if getattr(self, name)]
        skipped = [name for name in ("embeddings", "logits", "softmax") if not getattr(self, name)]
        return (f"matmuls of attention and dense blocks (full P x P attention, no causal halving); "
                f"counted: {', '.join(counted) or 'nothing else'}; not counted: {', '.join(skipped) or 'nothing'}")


# Appendix F as written.
CHINCHILLA_ACCOUNTING = Accounting(embeddings=True, logits=True, softmax=True)
# What reproduces the paper's ratios: an embedding is a lookup.
PAPER_ACCOUNTING = Accounting(embeddings=False, logits=True, softmax=True)
# Matrix products only: what torch.utils.flop_counter.FlopCounterMode counts.
MATMUL_ACCOUNTING = Accounting(embeddings=False, logits=True, softmax=False)


@dataclass(frozen=True)
class SegmentLayout:
    """What one RMT segment puts through the backbone."""

    segment_length: int = 512  # text tokens per segment
    num_memory_tokens: int = 0  # m
    memory_writes: bool = False  # decoder: m read positions at the start AND m write positions at the end
    num_special_tokens: int = 0  # encoder: [CLS] [MEM]*m [SEP] tokens [SEP] has 3

    def __post_init__(self) -> None:
        if self.segment_length < 1 or self.num_memory_tokens < 0 or self.num_special_tokens < 0:
            raise ValueError(f"Invalid segment layout {self}: segment_length >= 1, memory and special tokens >= 0")

    @property
    def memory_positions(self) -> int:
        return self.num_memory_tokens * (2 if self.memory_writes else 1)

    @property
    def positions(self) -> int:
        """P of one segment's forward pass."""
        return self.segment_length + self.memory_positions + self.num_special_tokens

    @classmethod
    def for_rmt_config(cls, config: Any) -> "SegmentLayout":
        """The layout rmt.model builds for an RMTConfig (duck-typed: no torch import)."""
        return cls(
            segment_length=config.segment_length,
            num_memory_tokens=config.num_memory_tokens,
            memory_writes=config.architecture == "decoder",
            num_special_tokens=config.num_special_tokens,
        )

    def describe(self) -> str:
        memory = (f"{self.num_memory_tokens} memory tokens"
                  + (" read and written (2x positions)" if self.memory_writes else " read") if self.num_memory_tokens
                  else "no memory positions added")
        return (f"segments of {self.segment_length} text tokens, {memory}, {self.num_special_tokens} special tokens: "
                f"{self.positions} positions per pass; a short last segment is padded")


# The paper's Figure 3: 2,048,000 tokens are 4,000 segments of 512, each costing one
# 512-position pass (so RMT's normalized cost is its number of segments).
PAPER_LAYOUT = SegmentLayout(segment_length=512)


# ---------------------------------------------------------------- estimates
TERMS = ("embeddings", "embedding_projections", "attention_qkv", "attention_logits", "attention_softmax",
         "attention_reduce", "attention_output", "feed_forward", "head")


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs per term (Python ints: exact, no overflow at 10^21)."""

    embeddings: int = 0
    embedding_projections: int = 0  # OPT's project_in / project_out
    attention_qkv: int = 0
    attention_logits: int = 0
    attention_softmax: int = 0
    attention_reduce: int = 0
    attention_output: int = 0
    feed_forward: int = 0
    head: int = 0  # vocabulary logits, or pooler + classifier

    @property
    def total(self) -> int:
        return sum(getattr(self, term) for term in TERMS)

    def __mul__(self, times: int) -> "FlopBreakdown":
        return FlopBreakdown(**{term: getattr(self, term) * times for term in TERMS})

    __rmul__ = __mul__

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        return FlopBreakdown(**{term: getattr(self, term) + getattr(other, term) for term in TERMS})

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def forward_flops(
    shape: TransformerShape,
    positions: int,
    *,
    accounting: Accounting = PAPER_ACCOUNTING,
    head: Head = "lm",
    head_positions: int | None = None,
    num_labels: int = 2,
) -> FlopBreakdown:
    """One forward pass of one sequence of `positions` positions.

    head: "lm" projects `head_positions` positions (default: all) to the vocabulary;
    "classifier" is BERT's sequence classifier on [CLS] (pooler d x d, then d x num_labels);
    "none" stops at the hidden states.
    """
    p, d, e, v = positions, shape.hidden_size, shape.embedding_dim, shape.vocab_size
    if p < 1:
        raise ValueError(f"positions={p}: a forward pass needs at least one position")
    width, kv_width, layers = shape.attention_width, shape.key_value_width, shape.num_layers
    if head == "lm":
        out = p if head_positions is None else head_positions
        head_flops = 2 * out * e * v
    elif head == "classifier":
        head_flops = 2 * d * d + 2 * d * num_labels
    elif head == "none":
        head_flops = 0
    else:
        raise ValueError(f"head={head!r}: use 'lm', 'classifier' or 'none'")
    return FlopBreakdown(
        embeddings=2 * p * v * e if accounting.embeddings else 0,
        embedding_projections=2 * (2 * p * e * d) if e != d else 0,
        attention_qkv=layers * 2 * p * d * (width + 2 * kv_width),
        attention_logits=layers * 2 * p * p * width,
        attention_softmax=layers * 3 * shape.num_heads * p * p if accounting.softmax else 0,
        attention_reduce=layers * 2 * p * p * width,
        attention_output=layers * 2 * p * width * d,
        feed_forward=layers * 2 * p * (d * shape.ffn_dim + shape.ffn_dim * d),
        head=head_flops if accounting.logits else 0,
    )


def full_attention_flops(
    shape: TransformerShape, num_tokens: int, *, accounting: Accounting = PAPER_ACCOUNTING,
    head: Head = "lm", num_labels: int = 2,
) -> FlopBreakdown:
    """The whole input in one pass with full attention (the quadratic baseline)."""
    return forward_flops(shape, num_tokens, accounting=accounting, head=head, num_labels=num_labels)


def num_segments(num_tokens: int, layout: SegmentLayout) -> int:
    return math.ceil(num_tokens / layout.segment_length)


def rmt_flops(
    shape: TransformerShape, num_tokens: int, *, layout: SegmentLayout = PAPER_LAYOUT,
    accounting: Accounting = PAPER_ACCOUNTING, head: Head = "lm", num_labels: int = 2,
) -> FlopBreakdown:
    """The input read segment by segment: n_segments x one pass over a segment with its memory.
    The LM head sees the segment's text positions only (as RecurrentMemoryDecoder computes it);
    the classifier runs once per segment (as RecurrentMemoryEncoder computes it)."""
    per_segment = forward_flops(shape, layout.positions, accounting=accounting, head=head,
                                head_positions=layout.segment_length, num_labels=num_labels)
    return per_segment * num_segments(num_tokens, layout)


def headline_ratio(
    shape: TransformerShape, num_tokens: int = HEADLINE_TOKENS, *, layout: SegmentLayout = PAPER_LAYOUT,
    accounting: Accounting = PAPER_ACCOUNTING,
) -> float:
    """How many times fewer FLOPs RMT needs than full attention on `num_tokens` tokens."""
    full = full_attention_flops(shape, num_tokens, accounting=accounting).total
    return full / rmt_flops(shape, num_tokens, layout=layout, accounting=accounting).total


# ---------------------------------------------------------------- Figure 3
def figure3_rows(
    models: Iterable[str | TransformerShape] = OPT_MODELS,
    tokens: Iterable[int] = FIGURE3_TOKENS,
    *,
    layout: SegmentLayout = PAPER_LAYOUT,
    accounting: Accounting = PAPER_ACCOUNTING,
    reference_tokens: int = REFERENCE_TOKENS,
) -> list[dict[str, Any]]:
    """One row per model, input length and method, FLOPs normalized to one
    `reference_tokens`-position full-attention pass of the same model."""
    rows = []
    for model in models:
        shape = model if isinstance(model, TransformerShape) else opt_shape(model)
        unit = full_attention_flops(shape, reference_tokens, accounting=accounting).total
        for count in tokens:
            estimates = {"full": (full_attention_flops(shape, count, accounting=accounting), 1),
                         "rmt": (rmt_flops(shape, count, layout=layout, accounting=accounting),
                                 num_segments(count, layout))}
            for method, (flops, segments) in estimates.items():
                rows.append(dict(model=shape.name, tokens=count, method=method, flops=float(flops.total),
                                 normalized=flops.total / unit, segments=segments,
                                 positions_per_pass=count if method == "full" else layout.positions))
    return rows


def figure3_grid(
    models: Iterable[str | TransformerShape] = OPT_MODELS,
    tokens: Iterable[int] = FIGURE3_TOKENS,
    *,
    layout: SegmentLayout = PAPER_LAYOUT,
    accounting: Accounting = PAPER_ACCOUNTING,
    reference_tokens: int = REFERENCE_TOKENS,
):
    """figure3_rows as a pandas DataFrame (flops as float: they pass int64's range); the
    accounting and layout travel in `.attrs` and into the JSON file."""
    import pandas as pd

    grid = pd.DataFrame(figure3_rows(models, tokens, layout=layout, accounting=accounting,
                                     reference_tokens=reference_tokens))
    grid.attrs.update(grid_metadata(layout=layout, accounting=accounting, reference_tokens=reference_tokens))
    return grid


def grid_metadata(*, layout: SegmentLayout, accounting: Accounting, reference_tokens: int) -> dict[str, Any]:
    return dict(
        method="forward-pass FLOPs after Hoffmann et al. 2022 appendix F (see rmt/profile/flops.py)",
        accounting=dataclasses.asdict(accounting), accounting_text=accounting.describe(),
        layout=dataclasses.asdict(layout), layout_text=layout.describe(),
        reference_tokens=reference_tokens,
        normalized=f"FLOPs / one {reference_tokens}-position full-attention forward pass of the same model",
    )


def ratios(grid, num_tokens: int | None = None) -> dict[str, float]:
    """Full-attention FLOPs / RMT FLOPs per model at `num_tokens` (default: the longest input)."""
    num_tokens = int(grid["tokens"].max()) if num_tokens is None else num_tokens
    at = grid[grid["tokens"] == num_tokens].pivot(index="model", columns="method", values="flops")
    if at.empty:
        raise ValueError(f"The grid has no rows at {num_tokens} tokens")
    models = list(dict.fromkeys(grid["model"]))  # the grid's order, not alphabetical
    return {model: float(at.loc[model, "full"] / at.loc[model, "rmt"]) for model in models if model in at.index}


def write_grid(grid, path: str | Path) -> Path:
    """CSV (the rows) or JSON (the accounting, layout and rows), chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".csv":
        text, ours = grid.to_csv(index=False), text_starts_with(",".join(map(str, grid.columns[:2])))
    elif path.suffix == ".json":
        document = {**grid.attrs, "ratios_at_longest_input": ratios(grid), "rows": grid.to_dict(orient="records")}
        text, ours = json.dumps(document, indent=2) + "\n", json_with("ratios_at_longest_input", "rows")
    else:
        raise ValueError(f"{path}: write the grid as .csv or .json")
    return write_atomic(path, text, kind="a FLOP grid", ours=ours)


def headline_sensitivity(num_tokens: int = HEADLINE_TOKENS) -> list[dict[str, Any]]:
    """The headline ratios (OPT-125M, OPT-175B) under alternative accountings: what moves them."""
    memory10 = SegmentLayout(segment_length=512, num_memory_tokens=10)
    variants = [
        ("paper: no embeddings, logits, softmax; 512 positions per segment", PAPER_ACCOUNTING, PAPER_LAYOUT),
        ("appendix F as written: embeddings counted too", CHINCHILLA_ACCOUNTING, PAPER_LAYOUT),
        ("matmuls only (no embeddings, no softmax)", MATMUL_ACCOUNTING, PAPER_LAYOUT),
        ("paper + 10 read-only memory positions per segment", PAPER_ACCOUNTING, memory10),
        ("paper + 10 read and 10 write memory positions (decoder)", PAPER_ACCOUNTING,
         dataclasses.replace(memory10, memory_writes=True)),
    ]
    rows = []
    for label, accounting, layout in variants:
        row = {"variant": label, "tokens": num_tokens}
        for model in PAPER_HEADLINE_RATIOS:
            row[model] = headline_ratio(opt_shape(model), num_tokens, layout=layout, accounting=accounting)
        rows.append(row)
    return rows
