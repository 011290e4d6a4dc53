"""Extrapolation evaluation: streamed accuracy equals in-memory accuracy; CSV; errors."""

import csv
import json

import numpy as np
import pytest
import torch

from rmt.data.dataset import DataConfig, TaskDataset, build_dataset
from rmt.evaluate import ROW_FIELDS, evaluate_checkpoint, parse_segments, wilson_interval
from rmt.model import RecurrentMemoryEncoder
from rmt.settings import ModelSettings, TrainSettings
from rmt.train import train_stage

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    config = DataConfig(task="detect_and_memorize", segment_length=32, train_examples=64, valid_examples=16,
                        curriculum_segments=[2], test_segments=[1, 2, 5, 300], test_examples=12,
                        long_test_from_segments=300, long_test_examples=5, samples=0)
    data = build_dataset(config, root / "data", progress=False)
    train_stage(data_dir=data, segments=2, output=root / "stage-2",
                model=ModelSettings(pretrained=False, backbone_overrides=TINY_BERT, num_memory_tokens=4),
                train=TrainSettings(max_steps=4, eval_every=4, batch_size=8, learning_rate=1e-3), progress=False)
    return data, root / "stage-2" / "best"


def test_wilson_interval_and_segment_lists():
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and 0.96 < low < 0.97
    low, high = wilson_interval(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    assert parse_segments("1-3,8, 4096") == [1, 2, 3, 8, 4096]
    with pytest.raises(ValueError, match="1-15"):
        parse_segments("0-3")


def test_streamed_accuracy_equals_the_in_memory_forward_pass(trained, tmp_path):
    data_dir, checkpoint = trained
    rows = evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=tmp_path / "eval.csv",
                               batch_size=5, device="cpu", progress=False)
    assert [r["evaluated_segments"] for r in rows] == [1, 2, 5, 300]
    assert [r["examples"] for r in rows] == [12, 12, 12, 5]
    assert all(r["trained_segments"] == 2 and r["task"] == "detect_and_memorize" for r in rows)
    data = TaskDataset(data_dir)
    model = RecurrentMemoryEncoder.from_pretrained(checkpoint, segment_length=32)
    for row in rows[:3]:
        num_tokens = row["evaluated_segments"] * 32
        tokens = torch.as_tensor(np.stack([data.generator.example("test", i, num_tokens)[1] for i in range(12)]),
                                 dtype=torch.long)
        labels = torch.tensor([data.generator.label("test", i, num_tokens) for i in range(12)])
        with torch.no_grad():
            expected = (model(tokens).logits.argmax(-1) == labels).float().mean().item()
        assert row["accuracy"] == pytest.approx(expected)
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    with open(tmp_path / "eval.csv") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == ROW_FIELDS and len(table) == 4 and table[3]["tokens"] == str(300 * 32)


def test_chosen_lengths_and_example_cap(trained, tmp_path):
    data_dir, checkpoint = trained
    rows = evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=tmp_path / "grid.csv",
                               metrics=tmp_path / "grid.json", segments=[3, 4], max_examples=4, device="cpu",
                               progress=False)
    assert [(r["evaluated_segments"], r["examples"]) for r in rows] == [(3, 4), (4, 4)]
    # The metrics file says the same as the CSV, keyed by length for `dvc metrics show`.
    metrics = json.loads((tmp_path / "grid.json").read_text())
    assert metrics == {"task": "detect_and_memorize", "trained_segments": 2, "examples": {"3": 4, "4": 4},
                       "accuracy": {"3": rows[0]["accuracy"], "4": rows[1]["accuracy"]}}


def test_progress_within_a_length_is_shown_batch_by_batch(trained, tmp_path, monkeypatch):
    """A long length takes hours: its examples have a bar of their own, below the lengths'."""
    import io
    import sys

    import rmt.utils

    data_dir, checkpoint = trained
    log = io.StringIO()  # a log file, as under Snakemake or SLURM
    monkeypatch.setattr(sys, "stderr", log)
    real_progress_bar = rmt.utils.progress_bar
    monkeypatch.setattr("rmt.evaluate.progress_bar", lambda *a, **k: real_progress_bar(*a, **{**k, "mininterval": 0}))
    evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=tmp_path / "eval.csv", segments=[1, 5],
                        max_examples=5, batch_size=2, device="cpu", progress=True)
    for length in (1, 5):
        counts = [line.split("|")[2].split()[0] for line in log.getvalue().splitlines()
                  if line.startswith(f"segments={length}:")]
        assert list(dict.fromkeys(counts)) == ["0/5", "2/5", "4/5", "5/5"]  # one update per batch of 2
    assert "\r" not in log.getvalue()


def test_bad_input_is_refused_before_evaluating(trained, tmp_path):
    data_dir, checkpoint = trained
    with pytest.raises(FileNotFoundError, match="not an RMT checkpoint"):
        evaluate_checkpoint(checkpoint=tmp_path, data_dir=data_dir, output=tmp_path / "x.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        evaluate_checkpoint(checkpoint=checkpoint, data_dir=tmp_path, output=tmp_path / "x.csv", progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_a_checkpoint_that_does_not_fit_the_data_is_refused(trained, tmp_path):
    data_dir, checkpoint = trained
    other_length = build_dataset(DataConfig(task="detect_and_memorize", segment_length=48, train_examples=4,
                                            valid_examples=4, curriculum_segments=[1], test_segments=[1], samples=0),
                                 tmp_path / "d48", progress=False)
    with pytest.raises(ValueError, match="trained on segments of 32 tokens.*has 48.*data.segment_length=32"):
        evaluate_checkpoint(checkpoint=checkpoint, data_dir=other_length, output=tmp_path / "x.csv", progress=False)
    other_task = build_dataset(DataConfig(task="memorize", segment_length=32, train_examples=4, valid_examples=4,
                                          curriculum_segments=[1], test_segments=[1], samples=0),
                               tmp_path / "memorize", progress=False)
    with pytest.raises(ValueError, match="was trained on detect_and_memorize.*is memorize"):
        evaluate_checkpoint(checkpoint=checkpoint, data_dir=other_task, output=tmp_path / "x.csv", progress=False)
    (tmp_path / "notes.csv").write_text("my,own\n1,2\n")
    with pytest.raises(FileExistsError, match="not an evaluation table written by rmt"):
        evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=tmp_path / "notes.csv", progress=False)
    assert (tmp_path / "notes.csv").read_text() == "my,own\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d48", "memorize", "notes.csv"]


def test_an_interrupted_evaluation_continues_from_the_first_missing_length(trained, tmp_path, monkeypatch, capsys):
    import rmt.evaluate as evaluate_module

    data_dir, checkpoint = trained
    output = tmp_path / "eval.csv"
    whole = evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=tmp_path / "whole.csv",
                                segments=[1, 2, 5], progress=False)
    original, done = evaluate_module._evaluate_length, []

    def interrupted_at_the_third_length(model, data, checkpoint, length, *args, **options):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(length)
        return original(model, data, checkpoint, length, *args, **options)

    monkeypatch.setattr(evaluate_module, "_evaluate_length", interrupted_at_the_third_length)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=output, segments=[1, 2, 5],
                            progress=False)
    assert not output.exists() and (tmp_path / "eval.csv.partial").is_file()
    done.clear()
    monkeypatch.setattr(evaluate_module, "_evaluate_length", lambda *a, **k: (done.append(a[3]), original(*a, **k))[1])
    rows = evaluate_checkpoint(checkpoint=checkpoint, data_dir=data_dir, output=output, segments=[1, 2, 5],
                               progress=False)
    assert done == [5] and "2 length(s) done" in capsys.readouterr().err
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_second",
                                                                     "peak_memory_mb")} for r in rows]
    assert strip(rows) == strip(whole)
    assert not (tmp_path / "eval.csv.partial").exists()
    with open(output) as handle:
        assert [row["segment_length"] for row in csv.DictReader(handle)] == ["32", "32", "32"]


def test_the_dvc_metrics_sort_by_length():
    from rmt.evaluate import accuracy_metrics

    rows = [{"task": "memorize", "trained_segments": 7, "evaluated_segments": n, "accuracy": 1.0, "examples": 100}
            for n in (1, 2, 16, 4096)]
    keys = list(accuracy_metrics(rows)["accuracy"])
    assert keys == ["0001", "0002", "0016", "4096"] and sorted(keys) == keys  # DVC sorts them as text
