"""Datasets on disk: layout, data card, byte-identical rebuilds, errors before any file."""

import json

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from rmt.cli import app
from rmt.data.dataset import DataConfig, TaskDataset, build_dataset

SMALL = dict(
    train_examples=40, valid_examples=20, curriculum_segments=[1, 2, 3], test_segments=[1, 2, 16, 4096],
    test_examples=10, long_test_from_segments=16, long_test_examples=4, samples=2,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        name: build_dataset(DataConfig(task=name, **SMALL), root / name, progress=False)
        for name in ("memorize", "reasoning")
    }


def files_of(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_layout_and_contents(built):
    directory = built["reasoning"]
    names = set(files_of(directory))
    assert {"card.json", "config.json", "noise.txt", "samples.jsonl", "test.json"} <= names
    for split in ("train", "valid"):
        for segments in (1, 2, 3):
            assert f"{split}/segments-{segments}/tokens.npy" in names
    data = TaskDataset(directory)
    tokens, labels = data.arrays("train", 3)
    assert tokens.shape == (40, 3 * 64) and tokens.dtype == np.uint16 and labels.shape == (40,)
    assert isinstance(tokens, np.memmap)
    # Every stored row is the generator's example, and its label is the answer.
    for index in (0, 17, 39):
        layout, expected = data.generator.example("train", index, 3 * 64)
        assert np.array_equal(tokens[index], expected)
        assert labels[index] == layout.sample.label
    with pytest.raises(FileNotFoundError, match=r"has \[1, 2, 3\]"):
        data.arrays("train", 5)


def test_data_card_describes_the_data(built):
    card = json.loads((built["memorize"] / "card.json").read_text())
    assert card["task"] == "memorize" and card["classes"][0] == "bathroom"
    length = card["splits"]["train"]["2"]
    assert length["examples"] == 40 and length["tokens_per_example"] == 128
    assert sum(length["label_counts"].values()) == 40
    assert length["fact_position_fraction"]["max"] == 0.0  # Memorize: the fact opens the input
    assert card["noise"]["source"] == "pydoc" and "Python" in card["noise"]["license"]
    assert card["noise"]["sentences"] > 1000 and len(card["noise"]["sha256"]) == 64
    assert card["tokenizer"]["vocab_size"] == 30522
    assert [entry["examples"] for entry in card["test"]] == [10, 10, 4, 4]
    reasoning = json.loads((built["reasoning"] / "card.json").read_text())
    assert reasoning["splits"]["valid"]["3"]["fact_position_fraction"]["max"] > 0.5


def test_samples_are_readable_text(built):
    records = [json.loads(line) for line in (built["reasoning"] / "samples.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "train", "valid", "valid", "test", "test"]
    for record in records:
        assert record["question"].lower() in record["text"]
        for fact in record["facts"]:
            assert fact.lower().rstrip(".") in record["text"]


def test_test_split_is_streamed_not_stored(built):
    data = TaskDataset(built["memorize"])
    assert not (built["memorize"] / "test").exists()
    assert [entry["segments"] for entry in data.test_lengths] == [1, 2, 16, 4096]
    labels, chunks = data.stream(4096, [0, 1, 2])
    total = 0
    for chunk in chunks:
        assert chunk.shape[0] == 3 and chunk.shape[1] <= 1 << 16
        total += chunk.shape[1]
    assert total == 4096 * 64
    assert labels.tolist() == [data.generator.label("test", i, 4096 * 64) for i in range(3)]


def test_rebuilding_gives_the_same_bytes_and_a_new_seed_other_bytes(built, tmp_path):
    again = build_dataset(DataConfig(task="memorize", **SMALL), tmp_path / "again", progress=False)
    assert files_of(again) == files_of(built["memorize"])
    reseeded = build_dataset(DataConfig(task="memorize", seed=1, **SMALL), tmp_path / "reseeded", progress=False)
    original, changed = files_of(built["memorize"]), files_of(reseeded)
    assert original["train/segments-2/tokens.npy"] != changed["train/segments-2/tokens.npy"]
    assert original["noise.txt"] == changed["noise.txt"]


def test_train_and_valid_share_no_example(built):
    data = TaskDataset(built["memorize"])
    train = {row.tobytes() for row in np.asarray(data.arrays("train", 1)[0])}
    valid = {row.tobytes() for row in np.asarray(data.arrays("valid", 1)[0])}
    assert train.isdisjoint(valid)


def test_training_forms_replace_a_share_of_the_training_examples_only(built, tmp_path):
    """data.train_forms: the same examples as without it but for the share drawn from the
    form, at every length; validation untouched; the card counts the forms."""
    mixed = build_dataset(DataConfig(task="reasoning", **{**SMALL, "train_forms": {"middle_lookup": 0.5}}),
                          tmp_path / "mixed", progress=False)
    plain, data = TaskDataset(built["reasoning"]), TaskDataset(mixed)
    forms = [data.config.train_form(i) for i in range(40)]
    assert 10 < forms.count("middle_lookup") < 30 and set(forms) == {"middle_lookup", None}
    for segments in (1, 3):
        same = (np.asarray(data.arrays("train", segments)[0]) == np.asarray(plain.arrays("train", segments)[0])).all(1)
        assert [bool(s) for s in same] == [form is None for form in forms]  # the same rows switch at every length
        assert np.array_equal(data.arrays("valid", segments)[0], plain.arrays("valid", segments)[0])
    kinds = data.kinds("valid", 1, range(20))
    assert set(kinds) == {"end_room", "middle_room"}  # validation asks the task's own questions
    card = json.loads((mixed / "card.json").read_text())
    assert card["splits"]["train"]["1"]["examples_by_form"] == {"middle_lookup": forms.count("middle_lookup"),
                                                                 "reasoning": forms.count(None)}
    assert "train_forms" not in json.loads((built["reasoning"] / "config.json").read_text())  # files as before
    # Generated, not stored (long steps, `rmt data show`): the same example in the same form.
    index = forms.index("middle_lookup")
    layout, tokens = data.example("train", index, 3 * 64)
    assert np.array_equal(tokens, data.arrays("train", 3)[0][index])
    plain_layout = plain.example("train", index, 3 * 64)[0]
    assert (layout.first_sentence, layout.noise_offsets) == (plain_layout.first_sentence, plain_layout.noise_offsets)
    assert data.kinds("train", 1, [index]) == ["middle_room"]
    # An overlay clears a lower file's forms with null or a share of 0.
    assert DataConfig(task="reasoning", train_forms=None).train_forms == {}
    assert DataConfig(task="reasoning", train_forms={"middle_lookup": 0}).canonical_json() == \
        DataConfig(task="reasoning").canonical_json()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(task="memorize", train_forms={"middle_lookup": 0.5}), r"it has none: set forms per task \(tasks.reas"),
        (dict(task="reasoning", train_forms={"lookup": 0.5}), "choose from middle_lookup"),
        (dict(task="reasoning", train_forms={"middle_lookup": 1.0}), "less than 1"),
        (dict(task="reasoning", train_forms={"middle_lookup": 0.6, "middle_lookup ": 0.5}), "not forms"),
        (dict(task="qa99"), "unknown task"),
        (dict(task="memorize", curriculum_segments=[1, 1]), "distinct"),
        (dict(task="memorize", segment_length=0), "greater than or equal to 1"),
        (dict(task="memorize", colour="red"), "Extra inputs"),
    ],
)
def test_invalid_settings_are_named(settings, message):
    assert DataConfig(task="memorize", test_examples=8).test_examples_at(4096) == 8
    assert DataConfig(task="memorize", test_examples_by_segments={4096: 3}).test_examples_at(4096) == 3
    with pytest.raises(ValidationError, match=message):
        DataConfig(**settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(task="reasoning", segment_length=8), "raise segment_length"),
        (dict(task="reasoning", segment_length=16), "cannot hold"),
        (dict(task="memorize", noise="/no/such/folder"), "/no/such/folder"),
        (dict(task="memorize", noise="quality"), "pydoc"),
        (dict(task="memorize", tokenizer="no-such-org/no-such-tokenizer"), "Could not load the tokenizer"),
    ],
)
def test_bad_input_fails_before_any_file_and_keeps_what_was_there(tmp_path, settings, message):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "card.json").write_text("{}")  # an earlier dataset, which a successful build would replace
    (target / "keep.txt").write_text("earlier work")
    with pytest.raises(ValueError, match=message):
        build_dataset(DataConfig(**{**SMALL, **settings}), target, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no half-written sibling
    assert (target / "keep.txt").read_text() == "earlier work"


def test_cli_generates_and_shows(tmp_path):
    runner = CliRunner()
    output = tmp_path / "detect"
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  segment_length: 48\n  train_examples: 12\n  valid_examples: 6\n"
                      "  curriculum_segments: [1, 2]\n")
    result = runner.invoke(app, ["data", "generate", "detect_and_memorize", str(output), "--config", str(config),
                                 "--set", "data.test_segments=[1, 8]", "--set", "data.samples=1"])
    assert result.exit_code == 0, result.output
    data = TaskDataset(output)
    assert data.config.segment_length == 48 and data.arrays("valid", 2)[0].shape == (6, 96)
    shown = runner.invoke(app, ["data", "show", str(output), "--segments", "2", "--index", "1"])
    assert shown.exit_code == 0 and "answer:" in shown.output
    bad = runner.invoke(app, ["data", "generate", "memorize", str(tmp_path / "x"), "--set", "data.segment_length=-3"])
    assert bad.exit_code != 0 and "segment_length" in bad.output
    assert not (tmp_path / "x").exists()
    listed = runner.invoke(app, ["data", "tasks"])
    assert "reasoning: 2 fact(s)" in listed.output
