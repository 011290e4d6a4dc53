"""save_pretrained / from_pretrained: checkpoints, backbones from a directory, the pretrained
MiniLM, and the errors of a checkpoint that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

import rmt.model.base
from conftest import (
    make_decoder,
    make_encoder,
    random_text,
    tiny_decoder_backbone,
    tiny_encoder_backbone,
)
from rmt import RecurrentMemoryDecoder, RecurrentMemoryEncoder

FILES = {"config.json", "model.safetensors"}  # a Hugging Face model folder


def encoder_inputs() -> list[list[int]]:
    # Several segments of 16 tokens, different lengths; the ids stay clear of CLS/SEP/PAD.
    return [random_text(n, seed=n).tolist() for n in (9, 40, 57)]


def encoder_outputs(model: RecurrentMemoryEncoder):
    with torch.no_grad():
        out = model(encoder_inputs(), labels=torch.tensor([0, 3, 5]), output_memory_states=True)
    return out


def assert_same_encoder_outputs(a, b):
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert len(a.memory_states) == len(b.memory_states)
    assert all(torch.equal(x, y) for x, y in zip(a.memory_states, b.memory_states))


def decoder_outputs(model: RecurrentMemoryDecoder):
    rows = [random_text(n, seed=n).tolist() for n in (7, 23, 40)]
    with torch.no_grad():
        return model(rows, labels=rows, output_memory_states=True)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_round_trip(tmp_path, kind):
    model = make_encoder(kind)
    before = encoder_outputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == FILES
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt"}

    loaded = RecurrentMemoryEncoder.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded.backbone) is type(model.backbone)
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert_same_encoder_outputs(before, encoder_outputs(loaded))
    # A str path works as well as a Path.
    again = RecurrentMemoryEncoder.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert_same_encoder_outputs(before, encoder_outputs(again))


def test_decoder_round_trip_with_tied_embeddings(tmp_path):
    model = make_decoder("gpt2")
    assert model.backbone.lm_head.weight is model.backbone.transformer.wte.weight
    before = decoder_outputs(model)
    context = random_text(13, seed=1)[None]
    generated = model.generate(context, max_new_tokens=12)
    model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == FILES
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    # The tied matrix is stored once.
    assert len(names & {"backbone.lm_head.weight", "backbone.transformer.wte.weight"}) == 1
    assert "memory_embeddings" in names

    loaded = RecurrentMemoryDecoder.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.backbone.lm_head.weight is loaded.backbone.transformer.wte.weight  # still tied
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    after = decoder_outputs(loaded)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)
    assert all(torch.equal(x, y) for x, y in zip(before.memory_states, after.memory_states))
    assert torch.equal(loaded.generate(context, max_new_tokens=12), generated)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_decoder_round_trip_other_backbones(tmp_path, kind):
    model = make_decoder(kind)
    before = decoder_outputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RecurrentMemoryDecoder.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded.backbone) is type(model.backbone)
    assert torch.equal(before.logits, decoder_outputs(loaded).logits)


def test_checkpoint_loads_in_eval_mode(tmp_path):
    """Like Hugging Face's from_pretrained, a loaded model is ready for inference: dropout
    off, so two calls on the same input give the same answer."""
    make_encoder("bert").save_pretrained(tmp_path / "ckpt")
    loaded = RecurrentMemoryEncoder.from_pretrained(tmp_path / "ckpt")
    assert {module.training for module in loaded.modules()} == {False}
    with torch.no_grad():
        assert torch.equal(encoder_outputs(loaded).logits, encoder_outputs(loaded).logits)


def test_backbone_directory_loads_in_one_mode(tmp_path, minilm_path):
    """The backbone comes back from Hugging Face in eval mode; the wrapper around it (its
    classifier dropout) must not be left in training mode."""
    tiny_encoder_backbone("bert").save_pretrained(tmp_path / "backbone")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "backbone")
    wrapped = RecurrentMemoryEncoder.from_pretrained(tmp_path / "backbone", num_labels=6, segment_length=16)
    assert wrapped.backbone.training is False
    assert {module.training for module in wrapped.modules()} == {False}


# ---------------------------------------------------------------- atomic saving
def test_save_over_existing_checkpoint_replaces_it(tmp_path):
    target = tmp_path / "ckpt"
    first = make_encoder("bert")
    first.save_pretrained(target)
    (target / "stale.txt").write_text("left from before")

    second = make_encoder("bert")
    with torch.no_grad():
        second.memory_embeddings.add_(1.0)
        second.classifier.bias.add_(0.5)
    expected = encoder_outputs(second)
    assert not torch.equal(expected.logits, encoder_outputs(first).logits)
    second.save_pretrained(target)

    assert {p.name for p in target.iterdir()} == FILES  # the old directory is gone, not merged
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt"}  # no staging or retired dirs
    loaded = RecurrentMemoryEncoder.from_pretrained(target).eval()
    assert_same_encoder_outputs(expected, encoder_outputs(loaded))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    first = make_encoder("bert")
    expected = encoder_outputs(first)
    first.save_pretrained(target)
    files_before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rmt.model.base, "save_model", broken_save)
    second = make_encoder("bert", num_memory_tokens=2)
    with pytest.raises(RuntimeError, match="disk full"):
        second.save_pretrained(target)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == files_before
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt"}  # no temporary directories left
    loaded = RecurrentMemoryEncoder.from_pretrained(target).eval()
    assert loaded.config.num_memory_tokens == 4
    assert_same_encoder_outputs(expected, encoder_outputs(loaded))


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rmt.model.base, "save_model", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        make_decoder("gpt2").save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- backbones from a directory
def test_encoder_from_backbone_directory(tmp_path, minilm_path):
    backbone = tiny_encoder_backbone("bert")
    backbone.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "bert")

    model = RecurrentMemoryEncoder.from_pretrained(
        tmp_path / "bert", num_labels=6, num_memory_tokens=4, segment_length=16
    )
    config = model.config
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id) == (101, 102, 0)
    assert config.backbone == str(tmp_path / "bert")
    assert (config.architecture, config.num_labels, config.num_memory_tokens, config.segment_length) == (
        "encoder",
        6,
        4,
        16,
    )
    assert model.memory_embeddings.shape == (4, 32)
    assert_same_state(backbone, model.backbone)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        out = model.eval()([[5, 6, 7, 8] * 10])
    assert out.logits.shape == (1, 6)


def test_decoder_from_backbone_directory(tmp_path):
    backbone = tiny_decoder_backbone("gpt2")
    backbone.save_pretrained(tmp_path / "gpt2")
    model = RecurrentMemoryDecoder.from_pretrained(tmp_path / "gpt2", num_memory_tokens=0, segment_length=10)
    assert model.config.backbone == str(tmp_path / "gpt2")
    assert model.config.architecture == "decoder"
    assert type(model.backbone) is type(backbone)
    assert_same_state(backbone, model.backbone)
    ids = random_text(10, seed=2)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, backbone.eval()(ids).logits, atol=1e-5, rtol=0)


def test_backbone_saved_in_bf16_loads_in_float32(tmp_path):
    tiny_decoder_backbone("llama").to(torch.bfloat16).save_pretrained(tmp_path / "llama")
    model = RecurrentMemoryDecoder.from_pretrained(tmp_path / "llama", segment_length=10)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------- the pretrained MiniLM
def test_minilm_loads_offline_with_the_longest_segment(minilm_path):
    model = RecurrentMemoryEncoder.from_pretrained(minilm_path, num_labels=6, segment_length=499)
    assert model.config.num_memory_tokens == 10
    assert model.config.segment_positions == 512 == model.backbone.config.max_position_embeddings
    assert (model.config.cls_token_id, model.config.sep_token_id, model.config.pad_token_id) == (101, 102, 0)
    assert model.config.backbone == minilm_path
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="at most 499"):
        RecurrentMemoryEncoder.from_pretrained(minilm_path, num_labels=6, segment_length=500)


@pytest.mark.parametrize("padded", [False, True])
def test_minilm_without_memory_is_the_backbone(minilm_path, padded):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = tokenizer("Recurrent memory lets a transformer read a long document.", return_tensors="pt")
    ids = encoded.input_ids  # [CLS] tokens [SEP]
    n = ids.shape[1] - 2
    segment_length = n + 7 if padded else n
    model = RecurrentMemoryEncoder.from_pretrained(
        minilm_path, num_labels=6, num_memory_tokens=0, segment_length=segment_length
    ).eval()
    backbone = AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        ours = model(ids, attention_mask=encoded.attention_mask)
        theirs = backbone(input_ids=ids)
    assert ours.last_hidden_state.shape == (1, segment_length + 2, 384)
    torch.testing.assert_close(ours.last_hidden_state[:, : n + 2], theirs.last_hidden_state, atol=1e-5, rtol=0)
    expected_logits = model.classifier(theirs.pooler_output)
    torch.testing.assert_close(ours.logits, expected_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- checkpoints that do not fit
@pytest.fixture
def encoder_checkpoint(tmp_path) -> Path:
    make_encoder("bert").save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


def test_structural_mismatch_errors(encoder_checkpoint):
    with pytest.raises(ValueError, match=r"num_memory_tokens: checkpoint 4, asked 2"):
        RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint, num_memory_tokens=2)
    with pytest.raises(ValueError, match=r"num_labels: checkpoint 6, asked 3"):
        RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint, num_labels=3)
    # Asking for the saved values is fine.
    model = RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint, num_memory_tokens=4, num_labels=6)
    assert model.config.num_memory_tokens == 4


def test_wrong_architecture_errors(tmp_path, encoder_checkpoint):
    with pytest.raises(ValueError, match="encoder RMT.*RecurrentMemoryEncoder.from_pretrained"):
        RecurrentMemoryDecoder.from_pretrained(encoder_checkpoint)
    make_decoder("gpt2").save_pretrained(tmp_path / "decoder")
    with pytest.raises(ValueError, match="decoder RMT.*RecurrentMemoryDecoder.from_pretrained"):
        RecurrentMemoryEncoder.from_pretrained(tmp_path / "decoder")


def test_edited_backbone_config_errors(encoder_checkpoint):
    path = encoder_checkpoint / "config.json"
    values = json.loads(path.read_text())
    assert values["backbone_config"]["hidden_size"] == 32
    values["backbone_config"]["hidden_size"] = 64
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="do not match its config files"):
        RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint)


def test_unknown_rmt_config_field_errors(encoder_checkpoint):
    path = encoder_checkpoint / "config.json"
    values = json.loads(path.read_text())
    values["rmt_config"]["future_setting"] = 1
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="future_setting"):
        RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint)


def test_non_structural_overrides(encoder_checkpoint):
    original = RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint).eval()
    model = RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint, segment_length=8, bptt_depth=1).eval()
    assert model.config.segment_length == 8
    assert model.config.bptt_depth == 1
    assert model.config.num_memory_tokens == 4
    assert model.config == original.config.replace(segment_length=8, bptt_depth=1)
    assert_same_state(original, model)
    with torch.no_grad():
        # One segment either way: only the padding differs.
        short = [random_text(8, seed=3).tolist()]
        torch.testing.assert_close(model(short).logits, original(short).logits, atol=1e-5, rtol=0)
        # A longer text is cut into different segments now.
        long = [random_text(40, seed=4).tolist()]
        out = model(long, output_memory_states=True)
        assert len(out.memory_states) == 1 + 5
        before = original(long, output_memory_states=True)
        assert len(before.memory_states) == 1 + 3
        assert not torch.allclose(out.memory_states[-1], before.memory_states[-1], atol=1e-3)
    with pytest.raises(ValueError, match="segment_length to at most"):
        RecurrentMemoryEncoder.from_pretrained(encoder_checkpoint, segment_length=200)


def test_decoder_checkpoint_override(tmp_path):
    make_decoder("llama").save_pretrained(tmp_path / "ckpt")
    model = RecurrentMemoryDecoder.from_pretrained(tmp_path / "ckpt", segment_length=6, max_segments=2)
    assert (model.config.segment_length, model.config.max_segments) == (6, 2)
    with pytest.raises(ValueError, match="num_memory_tokens"):
        RecurrentMemoryDecoder.from_pretrained(tmp_path / "ckpt", num_memory_tokens=0)


# ---------------------------------------------------------------- unknown backbones
@pytest.mark.parametrize("cls", [RecurrentMemoryEncoder, RecurrentMemoryDecoder])
def test_unknown_backbone_name(cls):
    settings = dict(num_labels=6) if cls is RecurrentMemoryEncoder else {}
    with pytest.raises(OSError, match="Could not load the backbone 'no-such-org/no-such-model'"):
        cls.from_pretrained("no-such-org/no-such-model", **settings)


def test_missing_local_directory(tmp_path):
    with pytest.raises(OSError, match="Could not load"):
        RecurrentMemoryDecoder.from_pretrained(tmp_path / "nothing-here")


def test_the_auto_classes_load_a_checkpoint_as_the_rmt_it_is(tmp_path):
    """Not as the bare backbone with re-initialised weights: config.json is the RMT's own
    (model_type rmt_encoder / rmt_decoder, the backbone's config nested)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    encoder, decoder = make_encoder(), make_decoder("gpt2")
    encoder.save_pretrained(tmp_path / "encoder")
    decoder.save_pretrained(tmp_path / "decoder")
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["model_type"] == "rmt_encoder"
    assert AutoConfig.from_pretrained(tmp_path / "decoder").backbone().model_type == "gpt2"
    loaded = AutoModel.from_pretrained(tmp_path / "encoder")
    assert type(loaded) is RecurrentMemoryEncoder
    assert_same_encoder_outputs(encoder_outputs(encoder), encoder_outputs(loaded))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "decoder")
    assert type(loaded) is RecurrentMemoryDecoder
    assert_same_state(decoder, loaded)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModel.from_pretrained(tmp_path / "decoder")  # loudly: a decoder is no AutoModel


def test_a_checkpoint_loads_from_a_hub_repository(tmp_path):
    """By repository id through the hub's cache, offline: a local mirror of a hub repo."""
    encoder = make_encoder()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--rmt-tiny"
    encoder.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for load in (RecurrentMemoryEncoder.from_pretrained, AutoModel.from_pretrained):
        loaded = load("someone/rmt-tiny", cache_dir=str(tmp_path / "cache"), local_files_only=True)
        assert type(loaded) is RecurrentMemoryEncoder
        assert_same_encoder_outputs(encoder_outputs(encoder), encoder_outputs(loaded))


def test_a_checkpoint_of_the_earlier_layout_still_loads(tmp_path):
    """Before model_type: the backbone's config.json beside rmt_config.json."""
    from safetensors.torch import save_model

    encoder = make_encoder()
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "rmt_config.json").write_text(json.dumps(encoder.config.to_dict()))
    encoder.backbone.config.save_pretrained(folder)
    save_model(encoder, str(folder / "model.safetensors"))
    assert_same_encoder_outputs(encoder_outputs(encoder), encoder_outputs(RecurrentMemoryEncoder.from_pretrained(folder)))
    assert rmt.model.base.read_checkpoint_config(folder) == encoder.config
    encoder.save_pretrained(folder)  # an RMT checkpoint: rmt may replace it
    assert {p.name for p in folder.iterdir()} == FILES
