"""The tiny pipeline end to end: run by `snakemake -j 2` as a user runs it locally, then by
`snakemake --profile slurm` through a real SLURM cluster (cluster/local-slurm, with
accounting): every job goes through sbatch and shows in sacct, the results equal the local
run's, and a failing job fails the workflow and its MLflow run. The paper's path,
`--workflow-profile profiles/gpu`, sends GPU jobs to the GPU partition with their GPU
requests (GRES on the test cluster, no GPU needed) and trains a stage with torchrun, one
process per GPU.

Every test that uses the session's two costly fixtures, the SLURM cluster and the finished
tiny pipeline, lives in this module (tests/conftest.py refuses one elsewhere): `make test`
shares the suite out between two pytest-xdist workers by module, so one worker builds them,
once, and the cluster's daemons never see two owners."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from workflow_project import BIN, ROOT, TINY, copy_project, dry_run_jobs, make_project, mlflow_runs

pytestmark = pytest.mark.slow

# Jobs of the tiny pipeline that SLURM runs: data, 2 stages, 2 grid evaluations, the
# evaluation, the FLOP study, the memory profile and the report (`all` is local).
CLUSTER_JOBS = 9
# Timing figures differ between runs; everything else must not.
TIMING_COLUMNS = {"seconds", "examples_per_second", "peak_memory_mb"}

# config/paper.yaml's shape (sections laid over params.yaml, a task's own settings, settings
# of one stage) at TINY's size: one task, a 1-layer model, a curriculum of 2 stages.
TINY_PAPER = {
    "data": {"segment_length": 16, "curriculum_segments": [1, 2], "train_examples": 64, "valid_examples": 16},
    "model": TINY["model"],
    # No micro_batch_size, as in config/paper.yaml: each of the 2 processes takes half a batch.
    "train": {"learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 4, "batch_size": 8,
              "clip_value": 5.0, "eval_every": 2, "eval_examples": 16, "patience": 15, "target_accuracy": None},
    "tasks": {"memorize": {"stage_train": {2: {"learning_rate": 5e-4}}}},
}
# What profiles/gpu asks of the rules run, cut to the test cluster's node (2 cores, 2 GPUs
# as GRES); everything else, partitions first, is the profile's. The test passes them all as
# --set-resources, which replaces the workflow profile's whole set-resources.
NODE_SIZES = {
    "data": {"cpus_per_task": 1, "mem_mb": 1000, "runtime": 5},
    "train": {"gpu": 2, "cpus_per_gpu": 1, "mem_mb": 3000, "runtime": 10},
    "evaluate": {"mem_mb": 2000, "runtime": 10},
}


# The cluster itself: jobs run and sacct reports them.

def _submit_wait(cluster, tmp_path, name: str, command: str):
    """sbatch --wait a one-line job; return (job id, completed process)."""
    result = cluster.run(
        [
            "sbatch", "--parsable", "--wait", "-p", cluster.partition, "-t", "1",
            "-J", name, "-D", str(tmp_path), "-o", str(tmp_path / f"{name}.out"),
            "--wrap", command,
        ],
        timeout=120,
    )
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    assert job_id.isdigit(), f"no job id from sbatch: {result.stdout!r} {result.stderr!r}"
    return job_id, result


def test_sbatch_job_completes_and_is_in_sacct(local_slurm, tmp_path):
    job_id, result = _submit_wait(local_slurm, tmp_path, "rmt-ok", "echo hello from $SLURM_JOB_ID")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rmt-ok.out").read_text().strip() == f"hello from {job_id}"
    record = local_slurm.wait_final(job_id)
    assert record["State"] == "COMPLETED", record
    assert record["ExitCode"] == "0:0"
    # Not JobName: for a job that ends within a second, slurmdbd may first record it under
    # the name "allocation" and correct the name a few seconds later.


def test_failing_job_is_failed_in_sacct(local_slurm, tmp_path):
    job_id, result = _submit_wait(local_slurm, tmp_path, "rmt-fail", "exit 3")
    assert result.returncode != 0  # sbatch --wait exits with the job's exit code
    record = local_slurm.wait_final(job_id)
    assert record["State"] == "FAILED", record
    assert record["ExitCode"] == "3:0"


def _overlapping(runs) -> list[tuple[str, str]]:
    """The pairs of runs whose times overlap."""
    spans = sorted((run.info.start_time, run.info.end_time, run.info.run_name) for run in runs)
    return [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]



def test_the_tiny_pipeline_end_to_end(tiny_pipeline, tmp_path):
    # The session's finished run of `snakemake -j 2` (shared with the SLURM test), copied:
    # this test changes the project.
    project = copy_project(tiny_pipeline, tmp_path / "project")
    metrics = json.loads((project.root / "results/memorize/seed-0/stage-2/metrics.json").read_text())
    assert metrics["steps"] == 4
    for path in ("reports/accuracy.png", "reports/generalization.svg", "reports/accuracy.md", "reports/flops.png",
                 "reports/memory.png", "reports/training-memory.svg", "results/profile/memory/summary.json",
                 "results/memorize/seed-0/evaluation.csv", "results/memorize/seed-0/grid/stage-1.csv",
                 "logs/train/memorize/seed-0/stage-2.log", "results/timings/train/memorize/seed-0/stage-2.tsv"):
        assert (project.root / path).is_file(), path
    runs = mlflow_runs(project)
    assert {run.data.tags["rmt.step"] for run in runs} == {"reproduction", "data", "train", "grid", "evaluate",
                                                          "flops", "memory"}
    assert len({run.data.tags["rmt.group"] for run in runs}) == 1  # one reproduction, one group
    # Threads never exceed the 2 cores (the workflow profile gives these steps 2 threads each),
    # and the memory profile, which measures, ran alone.
    steps = [run for run in runs if run.data.tags["rmt.step"] != "reproduction"]
    busy = [run for run in steps if run.data.tags["rmt.step"] in ("train", "grid", "evaluate", "memory")]
    assert not _overlapping(busy), _overlapping(busy)
    (memory,) = [run for run in steps if run.data.tags["rmt.step"] == "memory"]
    assert not [pair for pair in _overlapping(steps) if memory.info.run_name in pair], _overlapping(steps)
    # ... and one parent run, with the configuration and the headline results; every step nests under it.
    (parent,) = [run for run in runs if run.data.tags["rmt.step"] == "reproduction"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == parent.data.tags["rmt.group"]
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in runs if run is not parent)
    assert parent.data.params["seeds"] == "[0]" and parent.data.params["config_files"] == "['params.yaml']"
    assert {"memorize/accuracy_4", "memorize/last_stage_valid_accuracy"} <= set(parent.data.metrics)
    assert all(len(run.data.tags["mlflow.source.git.commit"]) >= 1 for run in runs)
    # Where the time went: one row per job from Snakemake's benchmark files, summed.
    timing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce_time.py"), "--project",
                             str(project.root), "--output", str(tmp_path / "time.md")], capture_output=True, text=True,
                            timeout=120)
    assert timing.returncode == 0, timing.stderr
    assert "| train/memorize/seed-0/stage-2 |" in timing.stdout and "| train | 2 |" in timing.stdout
    assert "Sum over 9 jobs:" in timing.stdout

    # Done: nothing to do. One changed value reruns exactly what reads it.
    assert "Nothing to be done" in project.snakemake("-n").stdout
    project.set_params(evaluate={"grid_examples": 4})
    planned = {job.rule for job in dry_run_jobs(project.snakemake("-n", "-p").stdout)}
    assert planned == {"grid", "report", "all"}

    # The report: self-contained HTML with every registered figure and table and its caption.
    project.snakemake()
    project.snakemake("--report", "reports/report.html")
    html = (project.root / "reports/report.html").read_text()
    for name in ("accuracy.png", "generalization.png", "accuracy.csv", "seeds.csv", "flops.png", "memory.png",
                 "training-memory.png"):
        assert name in html, name
    for caption in ("Accuracy against input length (log scale", "Generalization (the paper's Figure 5)",
                    "Forward FLOPs against input length", "Measured peak memory (left)",
                    "One training step (forward, backward, AdamW)", "for every configuration in the MLflow"):
        assert caption in html, caption

    # A change to the library reruns the jobs that run that code, and only them. (Snakemake
    # compares checksums of small inputs: a new modification time alone reruns nothing.)
    with (project.root / "rmt/evaluate.py").open("a") as source:
        source.write("# changed\n")
    planned = {job.rule for job in dry_run_jobs(project.snakemake("-n", "-p").stdout)}
    assert planned == {"evaluate", "grid", "report", "all"}


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


def test_the_pipeline_runs_through_slurm_like_locally(local_slurm, tiny_pipeline, tmp_path):
    before = len(sacct_states(local_slurm))
    cluster = make_project(tmp_path / "cluster")
    slurm_snakemake(cluster, tmp_path)
    states = sacct_states(local_slurm)[before:]
    assert states == ["COMPLETED"] * CLUSTER_JOBS, states

    local = tiny_pipeline  # the same configuration run locally (the session's run, only read here)
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


def gpu_profile_resources() -> dict[str, dict]:
    """profiles/gpu's resources of the rules in NODE_SIZES, with those sizes."""
    profile = yaml.safe_load((ROOT / "profiles" / "gpu" / "config.yaml").read_text())["set-resources"]
    return {rule: {**profile.get(rule, {}), **sizes} for rule, sizes in NODE_SIZES.items()}


def sacct_jobs(cluster, run_id: str, since: str) -> list[dict[str, str]]:
    """The jobs of one Snakemake run (its SLURM run ID is every job's name) as sacct has them;
    the plugin writes each job's rule and wildcards in its comment."""
    fields = ["Comment", "JobName", "Partition", "AllocTRES", "ReqCPUS", "ReqMem", "Timelimit", "State"]
    result = cluster.run(["sacct", "-X", "-n", "-P", "-S", since, "--name", run_id, "-o", ",".join(fields)],
                         timeout=60)
    assert result.returncode == 0, result.stderr
    return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line.strip()]


def test_the_paper_recipe_runs_on_gpu_nodes_through_slurm(local_slurm, tmp_path):
    """The cluster path a researcher takes with config/paper.yaml, at a tiny size: every GPU
    job in the GPU partition with its GPUs, CPUs, memory and time limit, as sacct reads them
    back, and a training stage with 2 GPUs trained by 2 processes (torchrun, gloo on the CPU)."""
    node = local_slurm.run(["scontrol", "show", "node", "localhost"], timeout=30).stdout
    gpus = int(re.search(r"\bGres=gpu:(\d+)", node).group(1))
    resources = gpu_profile_resources()
    partition = resources["train"]["slurm_partition"]
    assert resources["evaluate"]["slurm_partition"] == partition == "gpu", resources
    assert resources["evaluate"]["gpu"] == 1 and resources["train"]["gpu"] == gpus == 2
    # SLURM schedules against the GPU count: a job asking for more is refused.
    refused = local_slurm.run(["sbatch", "-p", partition, f"--gpus={gpus + 1}", "-t", "1", "--wrap", "true"])
    assert refused.returncode != 0 and "node configuration is not available" in refused.stderr, refused

    project = make_project(tmp_path / "project")
    (project.root / "tiny-paper.yaml").write_text(yaml.safe_dump(TINY_PAPER, sort_keys=False))
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    settings = [f"{rule}:{key}={value}" for rule, values in resources.items() for key, value in values.items()]
    result = slurm_snakemake(project, tmp_path, "results/memorize/seed-0/evaluation.csv",
                             "--workflow-profile", "profiles/gpu", "--configfile", "tiny-paper.yaml",
                             "--set-resources", *settings)

    run_id = re.search(r"SLURM run ID: (\S+)", result.stdout).group(1)
    jobs = {job["Comment"].removeprefix("rule_"): job for job in sacct_jobs(local_slurm, run_id, since)}
    print("\n".join("|".join(job.values()) for job in jobs.values()))  # shown with -s, and on failure
    cpus = {"data": 1, "train": gpus * resources["train"]["cpus_per_gpu"], "evaluate": 1}
    expected = {"data_wildcards_memorize": "data", "train_wildcards_memorize_0_1": "train",
                "train_wildcards_memorize_0_2": "train", "evaluate_wildcards_memorize_0": "evaluate"}
    assert sorted(jobs) == sorted(expected), jobs
    for name, rule in expected.items():
        job, wanted = jobs[name], resources[rule]
        tres = dict(item.split("=", 1) for item in job["AllocTRES"].split(","))
        assert job["State"] == "COMPLETED", job
        assert job["Partition"] == wanted.get("slurm_partition", local_slurm.partition), job
        assert tres.get("gres/gpu") == (str(wanted["gpu"]) if "gpu" in wanted else None), job
        assert tres["cpu"] == str(cpus[rule]), job
        assert job["ReqMem"] == tres["mem"] == f"{wanted['mem_mb']}M", job
        assert job["Timelimit"] == f"00:{wanted['runtime']:02d}:00", job

    # Each stage was trained by 2 processes: both saved their random state to resume from.
    import torch

    for stage in (1, 2):
        folder = project.root / f"results/memorize/seed-0/stage-{stage}"
        assert (folder / "metrics.json").is_file()
        state = torch.load(folder / "checkpoints" / "last" / "training_state.pt", weights_only=True)
        assert len(state["rng"]) == gpus, stage
    assert f"torchrun --standalone --nproc-per-node {gpus} -m rmt train" in result.stdout
    assert (project.root / "results/memorize/seed-0/evaluation.csv").is_file()
