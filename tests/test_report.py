"""rmt report: figures and tables from the result files; attention maps of a trained model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from rmt.cli import app
from rmt.data.dataset import DataConfig, build_dataset
from rmt.evaluate import ROW_FIELDS
from rmt.layout import ATTENTION, EVALUATION, FLOPS, GRID, MEMORY, report_files
from rmt.profile.attention import attention_maps
from rmt.profile.memory import Budget, profile_memory, write_profile
from rmt.report import accuracy_table, build_report, markdown_table
from rmt.settings import ModelSettings, TrainSettings
from rmt.tracking import EXPERIMENT
from rmt.train import train_stage
from test_memory_profile import fake_point
from test_report_training import _write_history

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def _rows(task, trained, lengths, accuracy):
    return [{"task": task, "trained_segments": trained, "evaluated_segments": n, "tokens": 64 * n, "examples": 100,
             "accuracy": accuracy, "ci_low": accuracy - 0.03, "ci_high": min(1.0, accuracy + 0.03), "seconds": 1.0,
             "examples_per_second": 100.0, "peak_memory_mb": 10.0} for n in lengths]


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = DataConfig(task="reasoning", segment_length=32, train_examples=64, valid_examples=16,
                        curriculum_segments=[2], test_segments=[4], test_examples=40, samples=0)
    data = build_dataset(config, root / "data", progress=False)
    train_stage(data_dir=data, segments=2, output=root / "stage-2",
                model=ModelSettings(pretrained=False, backbone_overrides=TINY_BERT, num_memory_tokens=3),
                train=TrainSettings(max_steps=2, eval_every=2, batch_size=8, learning_rate=1e-3), progress=False)
    return data, root / "stage-2" / "best"


def test_attention_maps_cover_every_segment_and_mark_the_facts(trained):
    data, checkpoint = trained
    result = attention_maps(checkpoint=checkpoint, data_dir=data, segments=4)
    assert len(result["maps"]) == 4
    for cells in result["maps"]:
        assert len(cells) == 1 + 3 and all(len(row) == 3 + 32 for row in cells)  # [CLS] + memory; memory + tokens
        assert all(0.0 <= sum(row) <= 1.0 + 1e-5 for row in cells)  # a share of each row's attention
    marked = [segment for segment, columns in enumerate(result["fact_columns"]) if columns]
    assert len(marked) == 2 and max(marked) < 3  # two facts, in different segments, none in the last
    assert all(3 <= column < 35 for columns in result["fact_columns"] for column in columns)


def _last_run(step: str):
    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)
    return MlflowClient().search_runs([experiment.experiment_id], f"tags.`rmt.step` = '{step}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)[0]


def test_the_attention_command_refuses_what_is_not_a_checkpoint(tmp_path, trained):
    data, _ = trained
    result = CliRunner().invoke(app, ["profile", "attention", "--checkpoint", str(tmp_path), "--data", str(data),
                                      "--output", str(tmp_path / "attention.json")])
    message = " ".join(result.output.replace("│", " ").split())  # typer draws the error in a box
    assert result.exit_code == 2 and "is not an RMT checkpoint (its config.json is missing" in message, result.output
    assert not (tmp_path / "attention.json").exists()


def test_the_report_draws_every_figure_and_table_from_the_files(tmp_path, trained):
    data, checkpoint = trained
    for seed, accuracy in ((0, 0.9), (1, 1.0)):
        _write_csv(tmp_path / EVALUATION.format(task="reasoning", seed=seed),
                   _rows("reasoning", 2, [1, 2, 4096], accuracy))
        for stage in (1, 2):
            _write_csv(tmp_path / GRID.format(task="reasoning", seed=seed, segments=stage),
                       _rows("reasoning", stage, [1, 2, 3], accuracy))
            _write_history(tmp_path, task="reasoning", seed=seed, segments=stage, steps=[25, 50], middle=accuracy)
    flops = tmp_path / FLOPS
    result = CliRunner().invoke(app, ["profile", "flops", "--output", str(flops), "--models", "opt-125m",
                                      "--tokens", "512,4096"])
    assert result.exit_code == 0, result.output
    attention = tmp_path / ATTENTION.format(task="reasoning")
    result = CliRunner().invoke(app, ["profile", "attention", "--checkpoint", str(checkpoint), "--data", str(data),
                                      "--output", str(attention)])
    assert result.exit_code == 0, result.output
    maps = json.loads(attention.read_text())
    assert maps["task"] == "reasoning" and len(maps["maps"]) == 4 and f"answer {maps['answer']}" in result.output
    run = _last_run("attention")
    assert run.info.status == "FINISHED" and run.data.params["segments"] == "4"
    assert [artifact.path for artifact in MlflowClient().list_artifacts(run.info.run_id)] == [attention.name]
    costs = profile_memory(model=ModelSettings(pretrained=False), segment_length=64, tokens=[512, 2048, 8192, 32768],
                           budget=Budget(memory_mb=1000, seconds=10.0), train_segments=[1, 2, 4], progress=False,
                           measure_point=fake_point)
    write_profile(costs, tmp_path / MEMORY)

    written = build_report(tasks=["reasoning"], seeds=[0, 1], curricula={"reasoning": [1, 2]},
                           output=tmp_path / "reports", root=tmp_path)
    names = sorted(path.name for path in written)
    assert names == sorted(["accuracy.png", "accuracy.svg", "generalization.png", "generalization.svg",
                            "training.png", "training.svg", "flops.png",
                            "flops.svg", "attention-reasoning.png", "attention-reasoning.svg", "memory.png", "memory.svg",
                            "training-memory.png", "training-memory.svg", "accuracy.csv", "accuracy.md",
                            "seeds.csv", "seeds.md"])
    assert names == sorted(report_files(["reasoning"]))  # the workflow's outputs
    assert all(path.stat().st_size > 0 for path in written)
    # What each figure shows, read from its SVG (text is kept as text).
    svg = {path.stem: path.read_text() for path in written if path.suffix == ".svg"}
    for name, labels in {
        "accuracy": ("input length (segments)", "input length (tokens)", "accuracy (%)", "ours", "paper",
                     "trained on 2"),
        "generalization": ("trained on (segments)", "evaluated on (segments)"),
        "training": ("validation accuracy (%)", "middle_room", "end_room"),
        "flops": ("forward FLOPs / one 512-token pass", "opt-125m", "rmt", "full"),
        "attention-reasoning": ("segment 1", "memory (3) | tokens", "[CLS]"),
        "memory": ("peak memory (MB)", "time per token (µs)", "rmt", "(projected)"),
        "training-memory": ("segments per example", "memory-efficient", "optimizer step (s)"),
    }.items():
        for label in labels:
            assert label in svg[name], (name, label)
    # The same results give the same files.
    again = build_report(tasks=["reasoning"], seeds=[0, 1], curricula={"reasoning": [1, 2]},
                         output=tmp_path / "again", root=tmp_path)
    for first, second in zip(written, again):
        assert first.read_bytes() == second.read_bytes(), first.name
    table = {row["evaluated_segments"]: row for row in csv.DictReader((tmp_path / "reports/accuracy.csv").open())}
    assert float(table["4096"]["accuracy"]) == pytest.approx(0.95)  # mean of the two seeds
    assert float(table["4096"]["accuracy_std"]) > 0 and table["4096"]["seeds"] == "2"
    assert float(table["4096"]["paper_accuracy"]) == pytest.approx(0.819)
    assert table["1"]["paper_accuracy"] == ""  # the paper reports no 1-segment figure
    markdown = (tmp_path / "reports/accuracy.md").read_text()
    assert "| reasoning | 4096 | 262,144 | 200 | 2 | 95.0 ± 7.1 |" in markdown and "| 81.9 |" in markdown
    assert markdown.startswith("Mean ± standard deviation over 2 seeds")


def test_missing_results_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation.csv"):
        build_report(tasks=["memorize"], seeds=[0], curricula={"memorize": [1]}, output=tmp_path / "r", root=tmp_path)


def test_accuracy_table_and_markdown_for_one_seed():
    import pandas as pd

    table = accuracy_table(pd.DataFrame(_rows("memorize", 7, [4096], 0.97)).assign(seed=0))
    assert table["accuracy_std"].tolist() == [0.0] and table["paper_accuracy"].tolist() == [pytest.approx(0.906)]
    markdown = markdown_table(table)
    assert "| 97.0 |" in markdown and "97.0 ±" not in markdown
    assert markdown.startswith("One seed: each figure is one run") and "config/seeds.yaml" in markdown
    assert (Path(__file__).parents[1] / "config/seeds.yaml").is_file()  # the file the sentence names


def _log_evaluation(*, task, config, seed, accuracies, files="params.yaml", status_ok=True):
    from rmt.tracking import pipeline_run

    tags = {"rmt.task": task, "rmt.seed": seed, "rmt.stage": 7, "rmt.config": config, "rmt.config_files": files}
    try:
        with pipeline_run("evaluate", name=f"{task}/seed-{seed}/evaluate", params={}, tags=tags) as run:
            for segments, accuracy in accuracies.items():
                run.log_metrics({"accuracy": accuracy}, step=segments)
            if not status_ok:
                raise RuntimeError("crashed")
    except RuntimeError:
        pass


def test_the_seed_summary_compares_configurations_across_seeds_from_mlflow(tmp_path, monkeypatch):
    from rmt.report import seed_summary, seed_summary_markdown
    from rmt.tracking import EXPERIMENT, search_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _log_evaluation(task="memorize", config="aaa", seed=0, accuracies={4: 0.5, 4096: 0.2})  # superseded below
    _log_evaluation(task="memorize", config="aaa", seed=0, accuracies={4: 1.0, 4096: 0.9})
    _log_evaluation(task="memorize", config="aaa", seed=1, accuracies={4: 1.0, 4096: 0.8})
    _log_evaluation(task="memorize", config="bbb", seed=0, accuracies={4: 0.6, 4096: 0.3}, files="params.yaml + x.yaml")
    _log_evaluation(task="memorize", config="bbb", seed=1, accuracies={4: 0.1}, status_ok=False)  # FAILED: left out
    runs = search_runs(experiment=EXPERIMENT, history=("accuracy",))
    table = seed_summary(runs).set_index(["config", "evaluated_segments"])
    assert table.loc[("aaa", 4096), "seeds"] == 2
    assert table.loc[("aaa", 4096), "accuracy_mean"] == pytest.approx(0.85)
    assert table.loc[("aaa", 4096), "accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    assert (table.loc[("aaa", 4096), "accuracy_min"], table.loc[("aaa", 4096), "accuracy_max"]) == (0.8, 0.9)
    assert table.loc[("bbb", 4), "seeds"] == 1 and table.loc[("bbb", 4), "accuracy_mean"] == pytest.approx(0.6)
    markdown = seed_summary_markdown(seed_summary(runs))
    assert "params.yaml [aaa], trained on 7, 2 seed(s)" in markdown and "params.yaml + x.yaml [bbb]" in markdown
    assert "| 4096 | 85.0 ± 7.1 | 30.0 |" in markdown


def test_an_empty_store_gives_an_empty_summary_that_says_so():
    from rmt.report import SEED_SUMMARY_FIELDS, seed_summary, seed_summary_markdown

    table = seed_summary([])
    assert list(table.columns) == list(SEED_SUMMARY_FIELDS) and table.empty
    assert "No finished evaluation runs" in seed_summary_markdown(table)


def test_the_report_never_writes_into_a_folder_of_other_files(tmp_path):
    from rmt.utils import OutputConflict

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputConflict, match="not a report folder written by rmt"):
        build_report(tasks=["memorize"], seeds=[0], curricula={"memorize": [1]}, output=mine, root=tmp_path)
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
