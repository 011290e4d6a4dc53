"""`dvc repro` runs the same pipeline: it resumes a killed training stage (persisted
checkpoints), does nothing when nothing changed, reruns only what a changed value
touches, and moves results through the default local remote. After `snakemake --touch`,
Snakemake does not rerun what DVC restored (DVC does not keep modification times)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from workflow_project import BIN, ROOT, TINY, environment, interruptible, make_project

pytestmark = pytest.mark.slow

STAGE_1 = "results/memorize/seed-0/stage-1"


def assert_each_dvc_repro_is_one_reproduction(database, *, invocations: int) -> None:
    """In MLflow, as under Snakemake: one group and one parent run per `dvc repro` that ran
    stages, each step's run nested under its invocation's parent, and the last invocation's
    parent holding the headline results (the report stage logs them)."""
    from mlflow import MlflowClient

    from rmt.tracking import EXPERIMENT, GROUP_TAG, PARENT_TAG

    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], "", max_results=1000)
    parents = [run for run in runs if run.data.tags["rmt.step"] == "reproduction"]
    by_group = {run.data.tags[GROUP_TAG]: run for run in parents}
    assert len(parents) == len(by_group) == invocations, sorted(by_group)
    assert all(group.startswith("dvc-repro-") and run.info.status == "FINISHED" for group, run in by_group.items())
    steps: dict[str, set[str]] = {group: set() for group in by_group}
    for run in (run for run in runs if run.data.tags["rmt.step"] != "reproduction"):
        group = run.data.tags[GROUP_TAG]
        assert run.data.tags[PARENT_TAG] == by_group[group].info.run_id, run.info.run_name
        steps[group].add(run.data.tags["rmt.step"])
    last = max(parents, key=lambda run: run.info.start_time)
    # The interrupted training stage's run continues in the invocation that finished it.
    assert {"train", "grid", "evaluate", "flops", "memory"} <= steps[last.data.tags[GROUP_TAG]]
    assert {"memorize/accuracy_4", "memorize/last_stage_valid_accuracy"} <= set(last.data.metrics)
    assert last.data.params["config_files"] == "['params.yaml']"


def test_dvc_reproduces_resumes_and_moves_the_pipeline(tmp_path):
    config = json.loads(json.dumps(TINY))
    config["stage_train"] = {1: {"max_steps": 300, "eval_every": 2, "eval_examples": 4, "patience": 1000}}
    project = make_project(tmp_path / "project", config)
    shutil.copytree(ROOT / ".dvc", project.root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy2(ROOT / ".dvcignore", project.root / ".dvcignore")
    project.run(str(BIN / "rmt"), "pipeline", "dvc")
    dvc = str(BIN / "dvc")
    project.run(dvc, "config", "core.no_scm", "true")  # this copy is not a git repository

    # Killed during the first training stage, `dvc repro` again resumes it.
    output = (tmp_path / "dvc.out").open("w")  # a file, not a pipe nobody reads while it runs
    process = subprocess.Popen([dvc, "repro"], cwd=project.root, env=environment(project.root),
                               stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=interruptible)
    history = project.root / STAGE_1 / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and len(history.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "dvc.out").read_text()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    output.close()
    assert (project.root / STAGE_1 / "checkpoints/last/training_state.pt").is_file()
    assert not (project.root / STAGE_1 / "metrics.json").exists()  # killed mid-stage
    resumed = project.run(dvc, "repro", timeout=900).stdout
    assert "starting the stage afresh" not in resumed and "Resuming the stage at step" in resumed
    assert json.loads((project.root / STAGE_1 / "metrics.json").read_text())["steps"] == 300
    assert len(history.read_text().splitlines()) == 150  # none lost, none repeated
    assert (project.root / "reports/accuracy.png").is_file()

    # Nothing changed: nothing runs. One value changed: only the stages that read it.
    assert "Data and pipelines are up to date" in project.run(dvc, "repro").stdout
    assert_each_dvc_repro_is_one_reproduction(project.root / "mlflow.db", invocations=2)  # none for the no-op
    # Validation accuracy of every stage, test accuracy at every length.
    shown = json.loads(project.run(dvc, "metrics", "show", "--json").stdout)
    (metrics,) = (revision["data"] for revision in shown.values())  # the workspace's (named "" without git)
    assert "best_valid_accuracy" in metrics[f"{STAGE_1}/metrics.json"]["data"]
    evaluation = metrics["results/memorize/seed-0/evaluation.json"]["data"]
    assert list(evaluation["accuracy"]) == ["1", "2", "4"]
    project.run(dvc, "plots", "show", "-o", "plots")
    page = (project.root / "plots/index.html").read_text()
    assert "results/memorize/seed-0/evaluation.csv" in page
    assert '"field": "evaluated_segments"' in page and '"field": "accuracy"' in page, page
    original = (project.root / "params.yaml").read_text()
    project.set_params(evaluate={"grid_examples": 4})
    changed = project.run(dvc, "status").stdout
    stages = {line.rstrip(":").strip() for line in changed.splitlines() if line and not line.startswith("\t")
              and line.rstrip().endswith(":")}
    # The check that dvc.yaml still matches params.yaml reads all of it (and writes the same
    # stamp again, so nothing after it reruns for that).
    assert stages == {"check-dvc-yaml", "grid-memorize-seed0-stage1", "grid-memorize-seed0-stage2"}, changed
    (project.root / "params.yaml").write_text(original)

    # A seed added to params.yaml: dvc.yaml no longer describes it, and `dvc repro` says so first.
    (project.root / "params.yaml").write_text(original.replace("seeds:\n- 0\n", "seeds:\n- 0\n- 1\n"))
    assert (project.root / "params.yaml").read_text() != original
    stale = project.run(dvc, "repro", check=False)
    assert stale.returncode != 0 and "run `rmt pipeline dvc`" in stale.stdout, stale.stdout
    assert not (project.root / "results/memorize/seed-1").exists()
    (project.root / "params.yaml").write_text(original)

    # Through the default local remote: push, lose everything, pull.
    project.run(dvc, "push")
    for folder in ("data", "results", "reports", ".dvc/cache"):
        shutil.rmtree(project.root / folder)
    project.run(dvc, "pull")
    assert "Data and pipelines are up to date" in project.run(dvc, "status").stdout
    assert (project.root / "reports/accuracy.png").is_file()

    # Restored files have new modification times in no particular order; `snakemake
    # --touch` (README) sets them in the DAG's order, and Snakemake has nothing to do.
    project.snakemake("--touch")
    dry = project.snakemake("-n").stdout
    assert "Nothing to be done" in dry, dry
