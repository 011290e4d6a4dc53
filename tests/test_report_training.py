"""The report's view of training: validation accuracy through the curriculum and, for a
task with kinds of question (Reasoning), each kind's accuracy in the figure and tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rmt.layout import STAGE, StageFiles
from rmt.pipeline import plan
from rmt.config import load_config
from rmt.report import accuracy_table, markdown_table, read_histories, training_figure


def _write_history(root, *, task, seed, segments, steps, middle):
    history = StageFiles(root / STAGE.format(task=task, seed=seed, segments=segments)).history
    history.parent.mkdir(parents=True, exist_ok=True)
    records = [{"step": step, "valid_accuracy": (1.0 + middle) / 2, "valid_loss": 0.5,
                "valid_accuracy_by_kind": {"end_room": 1.0, "middle_room": middle}} for step in steps]
    history.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture
def histories(tmp_path):
    for seed in (0, 1):
        _write_history(tmp_path, task="reasoning", seed=seed, segments=1, steps=[25, 50], middle=0.5)
        _write_history(tmp_path, task="reasoning", seed=seed, segments=2, steps=[25, 50, 75], middle=0.9)
    return read_histories({tmp_path / STAGE.format(task="reasoning", seed=s, segments=n):
                           {"task": "reasoning", "seed": s, "segments": n} for s in (0, 1) for n in (1, 2)})


def test_each_stage_continues_the_curriculum_step_and_keeps_every_kind(histories):
    seed = histories[(histories["seed"] == 0) & (histories["kind"] == "middle_room")]
    assert seed["curriculum_step"].tolist() == [25, 50, 75, 100, 125]  # stage 2 starts after stage 1's 50 steps
    assert seed["accuracy"].tolist() == [0.5, 0.5, 0.9, 0.9, 0.9]
    assert set(histories["kind"]) == {"all", "end_room", "middle_room"}
    assert len(histories) == 2 * 5 * 3  # seeds x validations x kinds


def test_the_training_figure_draws_a_line_per_kind_and_marks_each_stage(histories, tmp_path):
    paths = training_figure(histories, tmp_path)
    assert [path.name for path in paths] == ["training.png", "training.svg"]
    svg = paths[1].read_text()
    for label in ("reasoning", "middle_room", "end_room", "validation accuracy (%)", "training step"):
        assert label in svg, label


def test_a_missing_history_is_named(tmp_path):
    stage = tmp_path / STAGE.format(task="memorize", seed=0, segments=1)
    with pytest.raises(FileNotFoundError, match="history.jsonl: train the curriculum first"):
        read_histories({stage: {"task": "memorize", "seed": 0, "segments": 1}})


def test_the_accuracy_tables_show_each_kind_where_a_task_has_kinds():
    rows = [{"task": task, "trained_segments": 7, "evaluated_segments": 4096, "tokens": 262144, "examples": 100,
             "accuracy": 0.75, "ci_low": 0.66, "ci_high": 0.82, "seed": seed,
             **({"accuracy_end_room": 1.0, "accuracy_middle_room": 0.4 + 0.2 * seed} if task == "reasoning" else {})}
            for task in ("memorize", "reasoning") for seed in (0, 1)]
    table = accuracy_table(pd.DataFrame(rows))
    reasoning = table[table["task"] == "reasoning"].iloc[0]
    assert reasoning["accuracy_middle_room"] == pytest.approx(0.5) and reasoning["accuracy_end_room"] == 1.0
    markdown = markdown_table(table)
    assert "| end room (%) | middle room (%) |" in markdown
    assert markdown.splitlines()[-1].endswith("| 100.0 | 50.0 |")  # reasoning's row
    assert markdown.splitlines()[-2].endswith("| 90.6 |  |  |")  # memorize has no kinds


def test_the_report_step_reads_every_stages_history():
    config = load_config(Path(__file__).parents[1] / "params.yaml")
    report = next(step for step in plan(config, ["params.yaml"]) if step.rule == "report")
    for task in config.tasks:
        for segments in config.for_task(task).curriculum:
            assert f"{STAGE.format(task=task, seed=0, segments=segments)}/history.jsonl" in report.deps
