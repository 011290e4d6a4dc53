# Helpers shared by the rules: the validated configuration, paths and curriculum links.

import json
import os
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rmt.config import check_config_files, read_config_files, schema_problems, validate_config
from rmt.pipeline import (
    ATTENTION,
    ATTENTION_TASKS,
    DATA,
    EVALUATION,
    EVALUATION_METRICS,
    FLOPS,
    GRID,
    LOGS,
    MEMORY,
    MEMORY_FILES,
    REPORT,
    STAGE,
    config_arguments,
    noise_files,
    source_files,
)


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
CONFIG_ARGS = config_arguments(CONFIG_FILES)

# One reproduction is one group in MLflow; jobs (also under SLURM) inherit the variable.
os.environ.setdefault("RMT_GROUP", f"reproduction-{time.strftime('%Y%m%d-%H%M%S')}")

TIMINGS = "results/timings"
ENVIRONMENT = "../../environment.yml"  # for --software-deployment-method conda


def curriculum(task):
    return PIPELINE.for_task(task).curriculum


def previous_stage(wildcards):
    """The stage a curriculum stage starts from: none for the first."""
    stages = curriculum(wildcards.task)
    index = stages.index(int(wildcards.segments))
    return STAGE.format(task=wildcards.task, seed=wildcards.seed, segments=stages[index - 1]) if index else None


def best_checkpoint(stage):
    return os.path.join(stage, "best")


def previous_best(wildcards):
    previous = previous_stage(wildcards)
    return [best_checkpoint(previous)] if previous else []


def last_stage_best(wildcards):
    return best_checkpoint(STAGE.format(task=wildcards.task, seed=wildcards.seed,
                                        segments=curriculum(wildcards.task)[-1]))


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


def evaluations():
    return [EVALUATION.format(task=task, seed=seed) for task in PIPELINE.tasks for seed in PIPELINE.seeds]


def grids():
    return [GRID.format(task=task, seed=seed, segments=segments)
            for task in PIPELINE.tasks for seed in PIPELINE.seeds for segments in curriculum(task)]


def attention_maps():
    """The maps of the tasks whose facts they show (the first seed's last stage)."""
    return [ATTENTION.format(task=task) for task in PIPELINE.tasks if task in ATTENTION_TASKS]


def last_stage_of_first_seed(wildcards):
    return best_checkpoint(STAGE.format(task=wildcards.task, seed=PIPELINE.seeds[0],
                                        segments=curriculum(wildcards.task)[-1]))


def memory_profile_settings(wildcards):
    """What `rmt profile memory` reads: its section, and the first task's model and segments."""
    settings = PIPELINE.for_task(next(iter(PIPELINE.tasks)))
    return {"profile": PIPELINE.profile.model_dump(mode="json"), "model": settings.model.model_dump(mode="json"),
            "segment_length": settings.data.segment_length}


def report_inputs(wildcards):
    return [*evaluations(), *grids(), FLOPS, *attention_maps(), *MEMORY_FILES]


def all_outputs():
    return [*evaluations(), *grids(), *REPORT_FILES]
