"""`snakemake --profile slurm` runs the tiny pipeline through a real SLURM cluster
(cluster/local-slurm, with accounting): every job goes through sbatch and shows in sacct,
the results equal a local run's, and a failing job fails the workflow and its MLflow run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from workflow_project import BIN, ROOT, TINY, make_project

pytestmark = pytest.mark.slow

# Jobs of the tiny pipeline that SLURM runs: data, 2 stages, 2 grid evaluations, the
# evaluation, the FLOP study, the memory profile and the report (`all` is local).
CLUSTER_JOBS = 9
# Timing figures differ between runs; everything else must not.
TIMING_COLUMNS = {"seconds", "examples_per_second", "peak_memory_mb"}


def slurm_snakemake(project, tmp_path, *arguments, check=True):
    """`snakemake --profile slurm` with the example profile installed where Snakemake looks
    for it (the user's config folder), bounded in time so a broken cluster fails the test."""
    profiles = tmp_path / "xdg" / "snakemake"
    if not (profiles / "slurm").exists():
        shutil.copytree(ROOT / "profiles" / "slurm", profiles / "slurm")
    return project.run("timeout", "-k", "10", "900", str(BIN / "snakemake"), "--profile", "slurm",
                       "--slurm-init-seconds-before-status-checks", "2", *arguments, timeout=960, check=check,
                       XDG_CONFIG_HOME=str(tmp_path / "xdg"))


def comparable(path):
    if path.suffix == ".csv":
        with path.open() as file:
            return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(file)]
    metrics = json.loads(path.read_text())
    metrics.pop("seconds")
    return metrics


def sacct_states(cluster):
    result = cluster.run(["sacct", "-X", "-n", "-P", "-a", "-o", "JobID,State"], timeout=60)
    return [line.split("|")[1] for line in result.stdout.splitlines() if line.strip()]


def test_the_pipeline_runs_through_slurm_like_locally(local_slurm, tmp_path):
    before = len(sacct_states(local_slurm))
    cluster = make_project(tmp_path / "cluster")
    slurm_snakemake(cluster, tmp_path)
    states = sacct_states(local_slurm)[before:]
    assert states == ["COMPLETED"] * CLUSTER_JOBS, states

    local = make_project(tmp_path / "local")
    local.snakemake()
    results = ["results/memorize/seed-0/stage-1/metrics.json", "results/memorize/seed-0/stage-2/metrics.json",
               "results/memorize/seed-0/evaluation.csv", "results/memorize/seed-0/grid/stage-1.csv",
               "results/memorize/seed-0/grid/stage-2.csv"]
    for path in results:
        assert comparable(cluster.root / path) == comparable(local.root / path), path
    assert "Nothing to be done" in slurm_snakemake(cluster, tmp_path, "-n").stdout


def test_a_failing_slurm_job_fails_the_workflow_and_its_run(local_slurm, tmp_path):
    from mlflow.tracking import MlflowClient

    config = json.loads(json.dumps(TINY))
    # Training that diverges fails inside its run (bad input, such as a missing CUDA device,
    # is refused before any run opens).
    config["train"].update(learning_rate=1e30, clip_value=None, warmup_steps=0)
    project = make_project(tmp_path / "project", config)
    before = len(sacct_states(local_slurm))
    result = slurm_snakemake(project, tmp_path, check=False)
    assert result.returncode != 0
    assert "logs/train/memorize/seed-0/stage-1.log" in result.stdout
    assert "FAILED" in sacct_states(local_slurm)[before:]
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rmt").experiment_id])
    statuses = {run.data.tags["rmt.step"]: run.info.status for run in runs}
    assert statuses["data"] == "FINISHED" and statuses["train"] == "FAILED", statuses
