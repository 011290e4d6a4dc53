# Helpers shared by the rules: the validated configuration, the planned steps, settings.

import json
import math
import os
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rmt.config import check_config_files, read_config_files, schema_problems, validate_config
from rmt.layout import (
    ATTENTION,
    DATA,
    EVALUATION,
    EVALUATION_METRICS,
    FLOPS,
    GRID,
    LOGS,
    MEMORY,
    REPORT,
    STAGE,
    TIMINGS,
    report_files,
)
from rmt.pipeline import STEP_NAMES, plan


# The rmt commands read the same files Snakemake merged: params.yaml, then each --configfile.
# Checked before any job: the merged files against the schema (types and ranges), then by
# rmt's settings models (everything else, with the fix named).
CONFIG_FILES = ["params.yaml", *(os.path.relpath(path) for path in workflow.overwrite_configfiles)]
try:
    check_config_files(config, CONFIG_FILES)
    # rmt's reading of the same files: numbers as users write them (1e-4), task lists that
    # keep the tasks' settings; this is what the commands will see.
    SETTINGS = read_config_files(*CONFIG_FILES)
    schema = Path(workflow.current_basedir, "../schemas/config.schema.json")
    problems = schema_problems(SETTINGS, json.loads(schema.read_text()))
    if problems:
        raise ValueError(f"The configuration ({', '.join(CONFIG_FILES)}) is invalid:\n  " + "\n  ".join(problems))
    PIPELINE = validate_config(SETTINGS, CONFIG_FILES)
except (ValueError, FileNotFoundError) as error:
    raise WorkflowError(str(error)) from None
# The pipeline's one definition (rmt/pipeline.py, which also writes dvc.yaml): every job
# with its command and the files it reads. A rule takes both from its job's step.
STEPS = {step.name: step for step in plan(PIPELINE, CONFIG_FILES)}

# One reproduction is one group in MLflow; jobs (also under SLURM) inherit the variable.
GROUP = os.environ.setdefault("RMT_GROUP", f"reproduction-{time.strftime('%Y%m%d-%H%M%S')}")

# ... and one parent run: opened when the workflow starts jobs (not for a dry run, nor when
# nothing is to be done), with the configuration; the jobs' runs nest under it through
# RMT_PARENT_RUN_ID (inherited, also under SLURM); closed with the headline results.
REPRODUCTION = {}


def open_reproduction_run():
    from rmt.tracking import PARENT_RUN_ENV, reproduction_run

    run = reproduction_run(group=GROUP, params={**SETTINGS, "config_files": CONFIG_FILES})
    REPRODUCTION["run"] = run.__enter__()
    os.environ[PARENT_RUN_ENV] = run.run_id


def close_reproduction_run(failed):
    from rmt.pipeline import headline_results

    run = REPRODUCTION.pop("run", None)
    if run is not None:
        run.log_metrics(headline_results(list(STEPS.values())), step=0)
        run.__exit__(RuntimeError if failed else None, None, None)



# Jobs run on this machine share its cores through the resource `machine_share`, whose total
# the workflow profile declares (profiles/default/config.yaml): a job holds the share of the
# machine its threads are, and a measurement job holds all of it, so it runs alone. Snakemake
# counts threads against --cores itself, but not under -j N run locally (it reads -j as a
# number of cluster nodes and lifts the core limit: two 2-thread jobs ran at once on 2
# cores); the shares keep -j N and --cores N alike. On a cluster every job has an allocation
# of its own, and holds no share.
MACHINE_SHARE = "machine_share"


def _runs_here():
    """Whether this Snakemake runs its jobs on this machine: neither a driver submitting them
    to a cluster, nor a cluster job's own Snakemake (whose allocation is its own)."""
    return workflow.local_exec and not workflow.remote_exec


def _machine_total():
    declared = {name: resource.value for name, resource in workflow.global_resources.items()}.get(MACHINE_SHARE)
    if declared is None:
        raise WorkflowError(
            f"Jobs on this machine share its cores through the resource {MACHINE_SHARE}, which the workflow "
            "profiles (profiles/default, profiles/gpu) declare; --resources on the command line replaces the "
            f"profile's: add {MACHINE_SHARE} with the profile's total to it (or run with a workflow profile)")
    return declared


def machine_share(wildcards, threads):
    """The share of this machine a local job holds: its threads' part of the cores, rounded
    up, so that the jobs running at once never have more threads than the machine has cores."""
    return math.ceil(_machine_total() * threads / workflow.cores) if _runs_here() else 0


def whole_machine(wildcards):
    """A measurement job's share: all of this machine, so that nothing runs beside it."""
    return _machine_total() if _runs_here() else 0


def planned_step(rule, wildcards):
    """The planned step of a job of `rule`, found by its wildcards."""
    name = STEP_NAMES[rule].format(**wildcards)
    if name not in STEPS:
        raise WorkflowError(f"{rule} {dict(wildcards)} is not a job of the configured pipeline (tasks "
                            f"{', '.join(PIPELINE.tasks)}; seeds {PIPELINE.seeds}; their curricula): "
                            f"add it to the configuration ({', '.join(CONFIG_FILES)}) to run it")
    return STEPS[name]


def step_inputs(rule):
    return lambda wildcards: planned_step(rule, wildcards).inputs


def step_command(rule):
    return lambda wildcards: planned_step(rule, wildcards).command


def task_settings(wildcards, section):
    """A task's resolved settings of one section, as a job parameter; changing them reruns
    exactly the jobs that read them (rerun trigger `params`)."""
    return PIPELINE.for_task(wildcards.task).model_dump(mode="json")[section]


def evaluation_settings(wildcards, *, grid):
    """The evaluate settings one evaluation reads (the grid's or the extrapolation's)."""
    evaluate = task_settings(wildcards, "evaluate")
    names = ("grid_segments", "grid_examples") if grid else ("segments",)
    return {name: evaluate[name] for name in (*names, "batch_size")}


def stage_settings(wildcards):
    settings = PIPELINE.for_task(wildcards.task)
    return {"model": settings.model.model_dump(mode="json"),
            "train": settings.train_for(int(wildcards.segments)).model_dump(mode="json")}


def launcher(wildcards, resources):
    """torchrun with one process per GPU the job got; nothing for one device."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    return f"torchrun --standalone --nproc-per-node {gpus} -m " if gpus > 1 else ""


def memory_profile_settings(wildcards):
    """What `rmt profile memory` reads: its section, and the first task's model and segments."""
    settings = PIPELINE.for_task(next(iter(PIPELINE.tasks)))
    return {"profile": PIPELINE.profile.model_dump(mode="json"), "model": settings.model.model_dump(mode="json"),
            "segment_length": settings.data.segment_length}


def report_outputs():
    """The report's files, those shown in Snakemake's HTML report with their captions."""
    return [report(f"{REPORT}/{name}", caption=f"../report/{shown[0]}.rst", category=shown[1]) if shown
            else f"{REPORT}/{name}" for name, shown in report_files(PIPELINE.tasks).items()]


def all_outputs():
    """Every evaluation and the report (which reads every other result)."""
    results = [path for step in STEPS.values() if step.rule in ("evaluate", "grid") for path in step.plots]
    return [*results, *(f"{REPORT}/{name}" for name in report_files(PIPELINE.tasks))]
