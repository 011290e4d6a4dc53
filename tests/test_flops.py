"""The analytic FLOP estimator (rmt.profile.flops): the paper's Figure 3 headline, and agreement
with torch's FlopCounterMode on models run for real (tiny) and on the meta device (OPT-1.3B).

FlopCounterMode counts matrix products only, so the cross-checks use MATMUL_ACCOUNTING. The
backbones use eager attention: the CPU's fused scaled_dot_product_attention kernel is not
counted at all (0 FLOPs), which would hide the quadratic terms.
"""

from __future__ import annotations

import json

import pytest
import torch
import typer
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, OPTConfig, OPTForCausalLM
from typer.testing import CliRunner

from rmt import RMTConfig, RecurrentMemoryDecoder, RecurrentMemoryEncoder
from rmt.profile.commands import profile_app
from rmt.profile.flops import (
    CHINCHILLA_ACCOUNTING,
    HEADLINE_TOKENS,
    MATMUL_ACCOUNTING,
    OPT_MODELS,
    PAPER_HEADLINE_RATIOS,
    SegmentLayout,
    TransformerShape,
    figure3_grid,
    forward_flops,
    full_attention_flops,
    headline_ratio,
    opt_config,
    opt_shape,
    ratios,
    rmt_flops,
    write_grid,
)

VOCAB = 300
CLS, SEP, PAD = 1, 2, 0


def counted_flops(run) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def assert_close(counted: int, estimated: int, tolerance: float = 0.02) -> None:
    assert counted > 0
    assert abs(estimated / counted - 1) <= tolerance, f"estimate {estimated:,} vs FlopCounterMode {counted:,}"


def tiny_bert(**extra) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=128, attn_implementation="eager", **extra)


def tiny_opt() -> OPTConfig:
    # word_embed_proj_dim != hidden_size: exercises OPT's project_in / project_out.
    return OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                     word_embed_proj_dim=32, max_position_embeddings=128, attn_implementation="eager",
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)


def text(batch: int, length: int) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the paper's headline
def test_headline_ratios_within_5_percent_of_the_paper():
    grid = figure3_grid(models=OPT_MODELS)
    at_headline = ratios(grid, HEADLINE_TOKENS)
    assert list(at_headline) == list(OPT_MODELS)
    for model, paper in PAPER_HEADLINE_RATIOS.items():
        assert at_headline[model] == pytest.approx(paper, rel=0.05), (model, at_headline[model])
    # Smaller models gain more: attention is a larger share of their cost.
    assert list(at_headline.values()) == sorted(at_headline.values(), reverse=True)


def test_normalization_is_one_512_token_pass_and_rmt_grows_linearly():
    grid = figure3_grid(models=["opt-125m"], tokens=[512, 2_048_000]).set_index(["tokens", "method"])
    assert grid.loc[(512, "full"), "normalized"] == pytest.approx(1.0)
    assert grid.loc[(512, "rmt"), "normalized"] == pytest.approx(1.0)
    # 4,000 segments, each one 512-position pass under the paper's layout.
    assert grid.loc[(2_048_000, "rmt"), "segments"] == 4000
    assert grid.loc[(2_048_000, "rmt"), "normalized"] == pytest.approx(4000)


def test_how_the_embeddings_are_counted_moves_the_small_model_only():
    """The paper notes: 223x with appendix F's embedding FLOPs, 288x without."""
    small, large = opt_shape("opt-125m"), opt_shape("opt-175b")
    assert headline_ratio(small, accounting=CHINCHILLA_ACCOUNTING) == pytest.approx(223, rel=0.01)
    assert headline_ratio(small) == pytest.approx(288, rel=0.01)
    assert headline_ratio(large, accounting=CHINCHILLA_ACCOUNTING) == pytest.approx(headline_ratio(large), rel=0.01)


def test_memory_positions_cost_linearly():
    shape = opt_shape("opt-125m")
    plain = rmt_flops(shape, 5120).total
    with_memory = rmt_flops(shape, 5120, layout=SegmentLayout(segment_length=512, num_memory_tokens=10,
                                                              memory_writes=True)).total
    assert plain < with_memory < plain * (532 / 512) ** 2


# ---------------------------------------------------------------- shapes from configs
def test_opt_configs_are_built_locally_with_the_published_shapes():
    published = {"opt-125m": (12, 768, 12), "opt-1.3b": (24, 2048, 32), "opt-6.7b": (32, 4096, 32),
                 "opt-30b": (48, 7168, 56), "opt-175b": (96, 12288, 96)}
    for name, (layers, width, heads) in published.items():
        config = opt_config(name)
        assert isinstance(config, OPTConfig)
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (layers, width, heads)
        assert (config.ffn_dim, config.vocab_size, config.max_position_embeddings) == (4 * width, 50272, 2048)
        assert TransformerShape.from_config(config, name=name) == opt_shape(name)


def test_shape_from_other_config_families():
    gpt2 = TransformerShape.from_config(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB))
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.ffn_dim, gpt2.embedding_dim) == (3, 64, 256, 64)
    bert = TransformerShape.from_config(tiny_bert().to_dict())
    assert (bert.ffn_dim, bert.head_dim, bert.max_positions) == (128, 16, 128)
    with pytest.raises(ValueError, match="num_attention_heads"):
        TransformerShape.from_config({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 10})


# ---------------------------------------------------------------- FlopCounterMode, run for real
def test_full_attention_matches_flop_counter_on_a_tiny_bert_classifier():
    config = tiny_bert(num_labels=6)
    model = BertForSequenceClassification(config).eval()
    ids = text(2, 100)
    estimate = 2 * full_attention_flops(TransformerShape.from_config(config), 100, accounting=MATMUL_ACCOUNTING,
                                        head="classifier", num_labels=6).total
    assert_close(counted_flops(lambda: model(input_ids=ids)), estimate)


def test_full_attention_matches_flop_counter_on_a_tiny_opt():
    config = tiny_opt()
    model = OPTForCausalLM(config).eval()
    ids = text(2, 100)
    estimate = 2 * full_attention_flops(TransformerShape.from_config(config), 100, accounting=MATMUL_ACCOUNTING).total
    assert_close(counted_flops(lambda: model(input_ids=ids)), estimate)


def test_rmt_encoder_recurrence_matches_flop_counter():
    torch.manual_seed(0)
    config = RMTConfig(architecture="encoder", num_memory_tokens=4, segment_length=24, num_labels=6,
                       cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)
    backbone_config = tiny_bert()
    model = RecurrentMemoryEncoder(backbone=BertModel(backbone_config), config=config).eval()
    ids = text(2, 3 * 24 - 5)  # 3 segments, the first one short (padded, as the model computes it)
    layout = SegmentLayout.for_rmt_config(config)
    assert layout.positions == 24 + 4 + 3
    estimate = 2 * rmt_flops(TransformerShape.from_config(backbone_config), 3 * 24 - 5, layout=layout,
                             accounting=MATMUL_ACCOUNTING, head="classifier", num_labels=6).total
    assert_close(counted_flops(lambda: model(ids)), estimate)


def test_rmt_decoder_recurrence_matches_flop_counter():
    torch.manual_seed(0)
    config = RMTConfig(architecture="decoder", num_memory_tokens=5, segment_length=20)
    backbone_config = tiny_opt()
    model = RecurrentMemoryDecoder(backbone=OPTForCausalLM(backbone_config), config=config).eval()
    ids = text(2, 4 * 20 - 7)  # 4 segments, the last one short
    layout = SegmentLayout.for_rmt_config(config)
    assert layout.positions == 20 + 2 * 5
    estimate = 2 * rmt_flops(TransformerShape.from_config(backbone_config), 4 * 20 - 7, layout=layout,
                             accounting=MATMUL_ACCOUNTING).total
    assert_close(counted_flops(lambda: model(ids, return_logits=False)), estimate)


# ---------------------------------------------------------------- FlopCounterMode on the meta device
@pytest.mark.parametrize("positions", [512, 4096])
def test_full_attention_matches_flop_counter_on_opt_1_3b_on_the_meta_device(positions):
    """Shapes only: nothing is allocated or computed, so a 1.3B model and 4,096 positions are cheap."""
    config = opt_config("opt-1.3b", attn_implementation="eager")
    with torch.device("meta"):
        model = OPTForCausalLM(config).eval()
        ids = torch.zeros(1, positions, dtype=torch.long)
    estimate = full_attention_flops(opt_shape("opt-1.3b"), positions, accounting=MATMUL_ACCOUNTING).total
    assert_close(counted_flops(lambda: model(input_ids=ids)), estimate)


def test_rmt_decoder_on_opt_1_3b_on_the_meta_device():
    """The project's RecurrentMemoryDecoder itself, 3 segments of 10 read + 512 text + 10 write
    positions on OPT-1.3B: the recurrence at a real model size, shapes only."""
    config = RMTConfig(architecture="decoder", num_memory_tokens=10, segment_length=512)
    with torch.device("meta"):
        model = RecurrentMemoryDecoder(backbone=OPTForCausalLM(opt_config("opt-1.3b", attn_implementation="eager")),
                                       config=config).eval()
    ids = text(1, 3 * 512)
    layout = SegmentLayout.for_rmt_config(config)
    estimate = rmt_flops(opt_shape("opt-1.3b"), 3 * 512, layout=layout, accounting=MATMUL_ACCOUNTING).total
    assert estimate == 3 * forward_flops(opt_shape("opt-1.3b"), 532, accounting=MATMUL_ACCOUNTING,
                                         head_positions=512).total
    assert_close(counted_flops(lambda: model(ids, return_logits=False)), estimate)


# ---------------------------------------------------------------- files and the command
def test_grid_files(tmp_path):
    grid = figure3_grid(models=["opt-125m", "opt-175b"], tokens=[512, HEADLINE_TOKENS])
    assert list(grid.columns[:5]) == ["model", "tokens", "method", "flops", "normalized"]
    assert len(grid) == 2 * 2 * 2
    csv = write_grid(grid, tmp_path / "grid.csv")
    assert csv.read_text().splitlines()[0].startswith("model,tokens,method,flops,normalized")
    document = json.loads(write_grid(grid, tmp_path / "out" / "grid.json").read_text())
    assert document["accounting"] == {"embeddings": False, "logits": True, "softmax": True}
    assert document["layout"]["segment_length"] == 512 and len(document["rows"]) == 8
    assert document["ratios_at_longest_input"]["opt-175b"] == pytest.approx(29, rel=0.05)
    with pytest.raises(ValueError, match="csv or .json"):
        write_grid(grid, tmp_path / "grid.txt")


def test_profile_flops_command(tmp_path):
    """Through a parent app, as rmt/cli.py registers it: `rmt profile flops`."""
    app = typer.Typer()
    app.add_typer(profile_app, name="profile")
    output = tmp_path / "profile" / "flops.csv"
    result = CliRunner().invoke(app, ["profile", "flops", "--output", str(output), "--models", "opt-125m,opt-175b",
                                              "--tokens", "512", "--tokens", "2048000"])
    assert result.exit_code == 0, result.output
    assert "opt-125m" in result.output and "paper ~295x" in result.output and "paper ~29x" in result.output
    assert len(output.read_text().splitlines()) == 1 + 8
    result = CliRunner().invoke(app, ["profile", "flops", "--output", str(output), "--models", "opt-7b"])
    assert result.exit_code != 0 and "Unknown OPT model" in result.output
