"""The research benchmarks run end to end at a tiny size, so that they cannot silently rot."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rmt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from robustness import QUOTE_BEGIN, QUOTE_END  # noqa: E402

TINY = ("model: {backbone_overrides: {num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, "
        "intermediate_size: 64}}\n")


def run(script: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # Typer draws an error in a box as wide as the terminal, breaking a long path (a pytest
    # temporary folder under xdist) inside a word; wide enough, no message the tests read wraps.
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                               text=True, timeout=600, cwd=cwd, env={**os.environ, "COLUMNS": "1000"})
    assert completed.returncode == 0 or not check, completed.stderr[-3000:]
    return completed


def flat(text: str) -> str:
    """A message as one line of words: typer draws an error in a box, wrapping its lines."""
    return " ".join(text.replace("│", " ").split())


def test_the_reasoning_search_reports_each_kind_of_question(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY + "data: {train_examples: 64}\n")
    completed = run("reasoning_search.py", "--steps", "4", "--eval-every", "2", "--examples", "20", "--recipes",
                    "escape", "--config", str(tmp_path / "tiny.yaml"), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert "| escape | 0 | 4 |" in completed.stdout
    assert "| escape | 0 | 4 |" in (tmp_path / "reasoning-search.md").read_text()  # next to --workdir
    # A mixed recipe trains on the lookup and the task, and validates on the task alone.
    mixed = run("reasoning_search.py", "--steps", "2", "--eval-every", "2", "--examples", "20", "--recipes",
                "escape-mix-lookup", "--config", str(tmp_path / "tiny.yaml"), "--workdir", str(tmp_path / "w"),
                cwd=tmp_path)
    assert "| escape-mix-lookup | 0 | 2 |" in mixed.stdout
    card = json.loads((tmp_path / "w" / "escape-mix-lookup" / "seed-0" / "data" / "card.json").read_text())
    assert set(card["splits"]["train"]["1"]["examples_by_form"]) == {"middle_lookup", "reasoning"}
    assert "examples_by_form" not in card["splits"]["valid"]["1"]
    result = json.loads((tmp_path / "w" / "escape" / "seed-0" / "run.json").read_text())
    assert {"accuracy", "end_room", "middle_room", "escape_step", "curve"} <= set(result)
    stage = json.loads((tmp_path / "w" / "escape" / "seed-0" / "stage-1" / "config.json").read_text())
    assert stage["train"]["schedule"] == "constant" and stage["train"]["max_steps"] == 4  # the budget wins
    assert stage["train"]["learning_rate"] == 1e-3  # the recipe's, not params.yaml's last-stage rate
    # The research tool that splits a checkpoint's errors on a form by what its examples hold.
    run_folder = tmp_path / "w" / "escape" / "seed-0"
    errors = subprocess.run([sys.executable, str(ROOT / "docs" / "research" / "form_errors.py"), str(run_folder / "data"),
                             str(run_folder / "stage-1" / "best"), "--examples", "40"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert errors.returncode == 0, errors.stderr[-3000:]
    assert "| all |  | any |" in errors.stdout and "| phrasing | <dir> of the X | any |" in errors.stdout
    assert "| answering fact first | True | the X <dir> of |" in errors.stdout
    # A finished run is reused only under the settings it was trained with.
    (tmp_path / "tiny.yaml").write_text(TINY + "data: {train_examples: 65}\n")
    changed = run("reasoning_search.py", "--steps", "4", "--eval-every", "2", "--examples", "20", "--recipes",
                  "escape", "--config", str(tmp_path / "tiny.yaml"), "--workdir", str(tmp_path / "w"), cwd=tmp_path,
                  check=False)
    assert changed.returncode != 0 and "was trained with other settings" in flat(changed.stderr)


def test_the_robustness_benchmark_trains_scores_and_reuses_stages(tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        TINY + "data: {curriculum_segments: [1, 2], train_examples: 32, valid_examples: 16}\n"
        "train: {max_steps: 4, min_steps: 0, eval_every: 2, eval_examples: 16}\n")
    (tmp_path / "last.yaml").write_text("stage_train: {2: {valid_length_factor: 3}}\n")
    common = ["--tasks", "detect_and_memorize", "--settings", "segment-48", "--seeds", "1", "--segments", "4",
              "--segments", "8", "--examples", "10", "--skip-below", "0", "--workers", "1",
              "--workdir", str(tmp_path / "w"), "--config", str(tmp_path / "tiny.yaml")]
    run("robustness.py", "--label", "before", *common, cwd=tmp_path)
    before = json.loads((tmp_path / "w" / "before" / "detect_and_memorize" / "segment-48" / "seed-1" / "run.json")
                        .read_text())
    assert set(before["accuracy"]) == {"4", "8"} and len(before["stages"]) == 2
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\nThe table:\n{QUOTE_BEGIN}\nan old table\n{QUOTE_END}\nAfter it.\n")
    completed = run("robustness.py", "--label", "after", *common, "--config", str(tmp_path / "last.yaml"),
                    "--reuse-from", "before", "--quote-in", str(readme), cwd=tmp_path)
    quoted = readme.read_text()  # the table over seeds replaces the old one, the rest is kept
    assert quoted.startswith("# Results\n\nThe table:\n") and quoted.endswith(f"{QUOTE_END}\nAfter it.\n")
    assert "an old table" not in quoted and "`after` (params.yaml + tiny.yaml + last.yaml), 1 of 1 runs" in quoted
    assert "| detect_and_memorize | segment-48 | 1 |" in quoted and "runs >= paper at 4096" in quoted
    assert "starting the stage afresh" in completed.stderr  # stage 2 only: stage 1 was reused
    assert completed.stderr.count("starting the stage afresh") == 1
    history = (tmp_path / "w" / "after" / "detect_and_memorize" / "segment-48" / "seed-1" / "stage-2" /
               "history.jsonl").read_text()
    assert '"valid_segments": 6' in history
    # The table names the recipe its runs were trained with, given no --config; the label's
    # finished runs are not mistaken for another recipe's.
    table = run("robustness.py", "--label", "after", "--tasks", "detect_and_memorize", "--settings", "segment-48",
                "--seeds", "1", "--workdir", str(tmp_path / "w"), "--table-only", cwd=tmp_path)
    assert "Recipe: params.yaml + tiny.yaml + last.yaml;" in table.stdout
    assert "| task | setting | seed | 4 | 8 | steps |" in table.stdout  # the lengths the run was scored at
    assert (tmp_path / "robustness-after.md").read_text() in table.stdout  # next to --workdir, not in results/
    other = run("robustness.py", "--label", "after", *common, cwd=tmp_path, check=False)
    message = flat(other.stderr)
    assert other.returncode == 2 and "was trained with params.yaml + tiny.yaml + last.yaml, not params.yaml + " \
        "tiny.yaml: give this recipe a --label of its own" in message, message
    (tmp_path / "last.yaml").write_text("stage_train: {2: {valid_length_factor: 2}}\n")  # the same name, edited
    edited = run("robustness.py", "--label", "after", *common, "--config", str(tmp_path / "last.yaml"), cwd=tmp_path,
                 check=False)
    message = flat(edited.stderr)
    assert edited.returncode == 2 and "was trained with other settings than params.yaml + tiny.yaml + last.yaml " \
        "holds now" in message, message
    (tmp_path / "last.yaml").write_text("stage_train: {2: {valid_length_factor: 3}}\n")
    longer = run("robustness.py", "--label", "after", *common, "--config", str(tmp_path / "last.yaml"), "--segments",
                 "16", cwd=tmp_path, check=False)  # a finished run is not silently left unscored at 16
    message = flat(longer.stderr)
    assert longer.returncode == 2 and "is finished and was not scored at [16] segments" in message, message
    # What a recipe trains now, whichever label measured it: one file holding tiny.yaml and
    # last.yaml (as params.yaml holds a lever once measured from a recipe file) finds `after`'s
    # run, tiny.yaml alone `before`'s.
    adopted = tmp_path / "adopted.yaml"
    adopted.write_text((tmp_path / "tiny.yaml").read_text() + (tmp_path / "last.yaml").read_text())
    found = run("robustness.py", "--label", "now", "--table-only", "--any-label", *common[:-1], str(adopted),
                cwd=tmp_path)
    assert "Recipe: params.yaml + adopted.yaml, as trained in after (1);" in found.stdout, found.stdout
    assert found.stdout.count("| after |") == 1  # the row names the label that measured it
    found = run("robustness.py", "--label", "now", "--table-only", "--any-label", *common, cwd=tmp_path)
    assert "as trained in before (1);" in found.stdout, found.stdout
    # Of two labels with the same run, the first by name, unless the asked label has it.
    shutil.copytree(tmp_path / "w" / "before", tmp_path / "w" / "again")
    found = run("robustness.py", "--label", "now", "--table-only", "--any-label", *common, cwd=tmp_path)
    assert "as trained in again (1);" in found.stdout, found.stdout
    found = run("robustness.py", "--label", "before", "--table-only", "--any-label", *common, cwd=tmp_path)
    assert "as trained in before (1);" in found.stdout, found.stdout
    refused = run("robustness.py", "--label", "now", "--any-label", *common, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "give --table-only too" in flat(refused.stderr)
    # Which examples the run gets wrong: one row per example, and the summary by distance.
    folder = tmp_path / "w" / "after" / "detect_and_memorize" / "segment-48" / "seed-1"
    completed = run("robustness_errors.py", str(folder), "--segments", "4", "--examples", "10", cwd=tmp_path)
    rows = [json.loads(line) for line in (folder / "errors-4.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(10))
    assert all(0 <= row["segments_after_fact"] <= 3 and row["correct"] == (row["label"] == row["prediction"])
               for row in rows)
    right = sum(row["correct"] for row in rows)
    assert f"accuracy {right}/10" in completed.stdout and "errors by label:" in completed.stdout
    # the same examples and model as the benchmark's own score at that length
    assert right / 10 == json.loads((folder / "run.json").read_text())["accuracy"]["4"]["accuracy"]
    # Noise before the fact and after it, apart: one cell per pair, the same facts in each.
    completed = run("fact_after_noise.py", str(folder), "--before", "0", "--before", "3", "--after", "0",
                    "--after", "2", "--examples", "10", cwd=tmp_path)
    cells = json.loads((folder / "fact-after-noise.json").read_text())["accuracy"]
    assert [(cell["before"], cell["after"]) for cell in cells] == [(0, 0), (0, 2), (3, 0), (3, 2)]
    assert all(0 <= cell["accuracy"] <= 100 for cell in cells)
    assert "| noise segments before the fact \\ after it | 0 | 2 |" in completed.stdout


def test_a_table_of_no_runs_is_refused_and_overwrites_nothing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{QUOTE_BEGIN}\nthe last table\n{QUOTE_END}\n")
    completed = run("robustness.py", "--label", "nothing", "--table-only", "--quote-in", str(readme), "--workdir",
                    str(tmp_path / "w"), cwd=tmp_path, check=False)
    message = flat(completed.stderr)
    assert completed.returncode == 2 and "holds no finished run of these tasks, settings and seeds" in message, message
    assert "the last table" in readme.read_text()


def test_the_error_analysis_names_what_a_run_folder_needs(tmp_path):
    completed = run("robustness_errors.py", str(tmp_path), cwd=tmp_path, check=False)
    message = flat(completed.stderr)
    assert completed.returncode == 2 and "holds no trained stage (stage-<n>/best)" in message, message


def test_the_robustness_table_is_quoted_only_where_a_document_marks_its_place(tmp_path):
    unmarked = tmp_path / "README.md"
    unmarked.write_text("# A user's README\n")
    completed = run("robustness.py", "--label", "x", "--quote-in", str(unmarked), "--workdir", str(tmp_path / "w"),
                    cwd=tmp_path, check=False)
    message = flat(completed.stderr)
    assert completed.returncode == 2 and "has no place for the table: put the lines" in message, message
    assert unmarked.read_text() == "# A user's README\n" and not (tmp_path / "w" / "x").exists()  # before any work


@pytest.mark.parametrize("problem", ["misspelt setting", "missing recipe", "nothing to reuse"])
def test_the_robustness_benchmark_refuses_a_bad_recipe_or_reuse_before_any_work(tmp_path, problem):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stage_train:\n  7: {learning_rat: 1.0e-4}\n")
    arguments, expected = {
        "misspelt setting": (["--config", str(recipe)], "stage_train.7.learning_rat: Extra inputs are not permitted"),
        "missing recipe": (["--config", str(tmp_path / "none.yaml")], "none.yaml does not exist"),
        "nothing to reuse": (["--reuse-from", "earlier"], "holds no finished curriculum to reuse: run that label"),
    }[problem]
    completed = run("robustness.py", "--label", "x", "--tasks", "memorize", "--settings", "segment-48", "--seeds", "1",
                    "--workdir", str(tmp_path / "w"), *arguments, cwd=tmp_path, check=False)
    message = flat(completed.stderr)
    assert completed.returncode == 2 and expected in message, message
    assert not (tmp_path / "w" / "x").exists()


def test_the_paper_cost_estimate_adds_up_from_the_recipe(tmp_path):
    completed = run("paper_cost.py", "--output", str(tmp_path / "cost.json"), cwd=tmp_path)
    assert "not measurements" in completed.stdout and "| reasoning |" in completed.stdout
    cost = json.loads((tmp_path / "cost.json").read_text())
    recipe = load_config(ROOT / "params.yaml", ROOT / "config" / "paper.yaml")
    assert list(cost["tasks"]) == list(recipe.tasks)
    for task, numbers in cost["tasks"].items():
        settings, stages = recipe.for_task(task), numbers["stages"]
        first = stages[0]
        assert first["segments"] == 1
        assert first["step_flops"] == 3 * settings.train.batch_size * numbers["segment_forward_flops"]
        for stage in stages:  # FLOPs linear in segments; steps and validations as configured
            train = settings.train_for(stage["segments"])
            assert stage["step_flops"] == stage["segments"] * first["step_flops"]
            assert stage["steps"] == train.max_steps
            assert stage["validations"] * train.eval_every >= train.max_steps
            assert stage["flops"] == stage["steps"] * stage["step_flops"] + stage["validation_flops"]
        per_example = {length["segments"]: length["flops"] // length["examples"] for length in numbers["evaluation"]}
        assert per_example[4096] == 4096 // 16 * per_example[16]
        assert {length["segments"]: length["examples"] for length in numbers["evaluation"]} == {
            n: settings.data.test_examples_at(n) for n in settings.data.test_segments}
        assert numbers["training_flops"] == sum(stage["flops"] for stage in stages)
        assert numbers["evaluation_flops"] == sum(length["flops"] for length in numbers["evaluation"])
        assert numbers["grid_flops"] == len(stages) * sum(length["flops"] for length in numbers["grid_per_stage"])
        assert numbers["flops"] == numbers["training_flops"] + numbers["evaluation_flops"] + numbers["grid_flops"]
    # The shipped GPU profile's runtimes cover the longest job of each rule.
    assert [(rule["rule"], rule["covers"]) for rule in cost["profile"]] == [
        ("train", True), ("evaluate", True), ("grid", True)]


def test_the_peer_benchmark_measures_every_row_against_the_peer(tmp_path):
    # The peer is in the dev extra, so this runs wherever the tests do; without it the
    # benchmark exits saying which extra to install, and this test fails with that message.
    completed = run("peer_bench.py", "--quick", "--output", str(tmp_path / "peer.json"), cwd=tmp_path)
    result = json.loads((tmp_path / "peer.json").read_text())
    assert result["peer"] == {"package": "recurrent-memory-transformer-pytorch", "version": "0.7.0"}
    assert result["shape"]["hidden"] == 128 and result["shape"]["segment_length"] == 64
    measures = [row["measure"] for row in result["rows"]]
    for kind in ("train step, plain BPTT", "train step, memory-efficient / memory replay", "inference",
                 "peak training memory, plain BPTT", "peak training memory, memory-efficient / memory replay"):
        assert any(measure.startswith(kind) for measure in measures), (kind, measures)
    for row in result["rows"]:
        assert row["rmt"] > 0 and row["peer"] > 0 and row["ratio"] > 0, row
        assert row["measure"] in completed.stdout  # the printed table has every row


def test_the_dev_extra_installs_the_peer_extra():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["peer"]) <= set(extras["dev"])


@pytest.mark.parametrize("architecture", ["encoder", "decoder"])
def test_the_model_benchmark_times_memory_efficient_backprop_against_plain(tmp_path, architecture):
    completed = run("model_bench.py", "child-backprop-time", "--architecture", architecture, "--segments", "2",
                    "--batch", "2", "--repeats", "2", cwd=tmp_path)
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert (result["architecture"], result["segments"], result["threads"]) == (architecture, 2, 1)
    assert result["memory_efficient_backprop"] == {"plain": False, "efficient": True}  # the two sides differ
    for clock in ("wall", "cpu"):
        assert result[f"plain_{clock}_seconds"] > 0 and result[f"efficient_{clock}_seconds"] > 0
    assert len(result["load_average"]) == 3  # the load it ran under is part of the figure


def test_the_model_benchmark_streams_the_cpu_default_against_a_raw_backbone_loop(tmp_path):
    from common import cpu_default_task

    completed = run("model_bench.py", "child-stream-overhead", "--size", "cpu-default", "--segments", "3",
                    "--batch", "1", "--repeats", "2", cwd=tmp_path)
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["tokens_per_example"] == 3 * cpu_default_task().data.segment_length
    assert result["backbone_calls"] == {"plain": 3, "rmt": 3}  # the same backbone work on both sides
    assert result["plain_cpu_seconds"] > 0 and result["rmt_cpu_seconds"] > 0 and result["threads"] == 1


def test_the_error_summary_of_a_task_that_states_its_fact_first_has_no_distance_quarters():
    from robustness_errors import summary

    rows = [{"segments_after_fact": 15, "label": label, "prediction": prediction, "correct": label == prediction}
            for label, prediction in ((0, 0), (2, 3), (2, 3), (1, 1))]
    text = summary(rows, ("bathroom", "hallway", "garden", "office"))
    assert text.splitlines() == ["accuracy 2/4", "every fact 15 segments before the question",
                                 "errors by label: garden 2", "errors by prediction: office 2"]
