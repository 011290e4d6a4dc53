"""The `rmt` command: one subcommand per pipeline step, each a thin call into the library."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

try:
    import click
    import typer
    from typer.core import TyperGroup
except ImportError as error:  # `pip install rmt` is the model library alone
    raise SystemExit(f"The rmt command needs the pipeline's dependencies ({error.name} is missing): "
                     "pip install 'rmt[pipeline]', or `make install` in a checkout") from None

from rmt import __version__
from rmt.cli_common import ConfigFiles, Device, Overrides, device_override, pipeline_settings, task_settings
from rmt.utils import UserError

# Bad values (ValueError) and files, folders, disks and permissions (OSError) are the user's
# or the machine's to fix: a message naming the problem, never a traceback. Anything else is
# a bug in rmt and keeps its traceback.
USER_ERRORS = (ValueError, OSError, UserError)
_OS_ADVICE = {
    errno.ENOSPC: "free disk space there, or write the output elsewhere",
    errno.EDQUOT: "free space within your quota, or write the output elsewhere",
    errno.EACCES: "choose a location you may write to, or fix its permissions",
    errno.EPERM: "choose a location you may write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: write the output elsewhere",
    errno.ENOENT: "check the path",
}


def describe_error(error: BaseException) -> str:
    """One line (or a few) for the user: what failed, on which path, and what to do."""
    if isinstance(error, OSError) and error.errno in _OS_ADVICE:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}: {_OS_ADVICE[error.errno]}"
    return str(error)


class _UserErrors(TyperGroup):
    """Every command's user and environment errors become `Error: ...` and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            typer.echo(f"Error: {describe_error(error)}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_UserErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Recurrent Memory Transformer: a reproducibility pipeline (Bulatov et al. 2023).",
)
data_app = typer.Typer(no_args_is_help=True, help="Synthetic long-context datasets.")
app.add_typer(data_app, name="data")


def _tracked(step: str, *, task: str, seed: int, params: dict, tags: dict | None = None,
             resume_run_id: str | None = None):
    """The MLflow run of one pipeline step; none in the other processes of a torchrun job.
    RMT_GROUP names the reproduction it belongs to (the workflow sets it)."""

    from rmt.tracking import pipeline_run

    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(None)
    name = "/".join([task, f"seed-{seed}", *([f"stage-{tags['rmt.stage']}"] if tags and "rmt.stage" in tags else []), step])
    return pipeline_run(step, name=name, params=params, tags={"rmt.task": task, "rmt.seed": seed, **(tags or {})},
                        resume_run_id=resume_run_id)


def _log_dataset(run, dataset, context: str) -> None:
    """The dataset as the run's MLflow input: named by task, segment length and seed,
    identified by its config hash (which covers the noise and the vocabulary)."""
    if run is None:  # a torchrun process other than the first
        return
    card = dataset.card
    run.log_dataset(name=f"{card['task']}-{card['segment_length']}tok-seed{card['seed']}", digest=card["config_hash"],
                    source=dataset.directory, context=context,
                    profile={"task": card["task"], "classes": card["classes"], "noise": card["noise"]["source"],
                             "segment_length": card["segment_length"], "seed": card["seed"]})


def _config_tags(settings, configs: list[Path]) -> dict:
    """Which configuration a run belongs to: its hash (seeds of one configuration share it)
    and the files it came from, for people reading the table."""
    return {"rmt.config": settings.config_hash(), "rmt.config_files": " + ".join(map(str, configs)) or "defaults"}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rmt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Recurrent Memory Transformer: a reproducibility pipeline (Bulatov et al. 2023)."""


@app.command()
def train(
    data: Path = typer.Option(..., help="Dataset directory (rmt data generate)."),
    segments: int = typer.Option(..., min=1, help="Segments per example in this curriculum stage."),
    output: Path = typer.Option(..., help="The stage's folder: checkpoints, metrics, history."),
    init: Path | None = typer.Option(None, help="Previous stage's best/ checkpoint; none for the first stage."),
    seed: int | None = typer.Option(None, help="Training seed (default: train.seed); one of the config's seeds."),
    device: Device = None,
    configs: ConfigFiles = [],
    overrides: Overrides = [],
) -> None:
    """Train one curriculum stage (resumes from its last checkpoint when run again). The
    task's model and train settings come from the configuration."""
    if seed is not None:
        overrides = [*overrides, f"train.seed={seed}"]
    overrides = [*overrides, *device_override("train", device)]
    from rmt.config import last_stage
    from rmt.data.dataset import TaskDataset
    from rmt.tracking import check_store
    from rmt.layout import StageFiles
    from rmt.train import train_stage

    try:
        dataset = TaskDataset(data)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="--data") from None
    task, curriculum = dataset.config.task, dataset.config.curriculum_segments
    settings = task_settings(configs, overrides, task)  # the configuration, as its runs are grouped
    # The stage is one of this dataset's curriculum: that is whose last stage `stage_train.last`
    # and the logged model mean, whatever curriculum the configuration would generate.
    stage = settings if settings.curriculum == curriculum else \
        task_settings(configs, [*overrides, f"data.curriculum_segments={curriculum}"], task)
    model_settings, train_settings = stage.model, stage.train_for(segments)
    params = {"data": dataset.config.model_dump(), "model": model_settings.model_dump(),
              "train": train_settings.model_dump(), "segments": segments, "init": str(init) if init else None}
    tags = {"rmt.stage": segments, "rmt.data_hash": dataset.card["config_hash"], **_config_tags(settings, configs)}

    if int(os.environ.get("RANK", "0")) == 0:
        check_store()  # a broken store fails the stage before its folder is written

    @contextlib.contextmanager
    def tracking(previous_run_id: str | None):
        with _tracked("train", task=dataset.config.task, seed=train_settings.seed, params=params, tags=tags,
                      resume_run_id=previous_run_id) as run:
            if previous_run_id is None:  # a resumed run has its input already
                _log_dataset(run, dataset, "training")
            yield run
            if run is not None and segments == last_stage(curriculum):
                # The curriculum's result: the model the runs table and the Models tab compare.
                outcome = json.loads(StageFiles(output).metrics.read_text())
                run.log_model(StageFiles(output).best, name=f"{task}-seed-{train_settings.seed}",
                              classes=dataset.card["classes"], step=outcome["steps"],
                              metrics={"best_valid_accuracy": outcome["best_valid_accuracy"]})

    metrics = train_stage(data_dir=data, segments=segments, output=output, model=model_settings,
                          train=train_settings, init=init, tracking=tracking)
    typer.echo(f"Stage {segments}: best validation accuracy {metrics['best_valid_accuracy']:.4f} at step "
               f"{metrics['best_step']} ({metrics['stop_reason']}, {metrics['steps']} steps, {metrics['seconds']} s)")


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="A stage's best/ checkpoint."),
    data: Path = typer.Option(..., help="Dataset directory (its test split is streamed)."),
    output: Path = typer.Option(..., help="CSV to write, one row per length."),
    metrics: Path | None = typer.Option(None, help="Also a JSON of the accuracy at every length, for "
                                         "`dvc metrics show`."),
    grid: bool = typer.Option(False, "--grid", help="The generalization grid: evaluate.grid_segments and "
                              "evaluate.grid_examples instead of the extrapolation lengths."),
    segments: str | None = typer.Option(None, help="Lengths, e.g. '1-15' or '16,32,4096' (default: evaluate.segments, "
                                        "else the dataset's test lengths)."),
    max_examples: int | None = typer.Option(None, min=1, help="At most this many examples per length."),
    batch_size: int | None = typer.Option(None, min=1, help="Default: evaluate.batch_size."),
    device: Device = None,
    configs: ConfigFiles = [],
    overrides: Overrides = [],
) -> None:
    """Accuracy of a checkpoint at many input lengths (streamed, flat memory)."""
    from rmt.data.dataset import TaskDataset
    from rmt.checkpoint import stage_settings
    from rmt.evaluate import evaluate_checkpoint, parse_segments

    try:
        lengths = parse_segments(segments) if segments else None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--segments") from None
    try:
        dataset = TaskDataset(data)
    except FileNotFoundError as error:
        raise typer.BadParameter(str(error), param_hint="--data") from None
    settings_of_task = task_settings(configs, overrides, dataset.config.task)
    settings = settings_of_task.evaluate
    if grid:
        lengths, max_examples = lengths or settings.grid_segments, max_examples or settings.grid_examples
    lengths = lengths or settings.segments
    batch_size = batch_size or settings.batch_size
    stage = stage_settings(checkpoint)
    # With the settings of the stage that trained the checkpoint, so that the compare view
    # tells two configurations' evaluations apart.
    params = {"checkpoint": str(checkpoint), "data": str(data), "grid": grid, "segments": lengths,
              "max_examples": max_examples, "batch_size": batch_size,
              **({"stage": {key: stage[key] for key in ("model", "train", "init")}} if stage else {})}
    tags = {"rmt.data_hash": dataset.card["config_hash"], **({"rmt.stage": stage["segments"]} if stage else {}),
            **_config_tags(settings_of_task, configs)}
    seed = stage["train"]["seed"] if stage else dataset.config.seed
    with _tracked("grid" if grid else "evaluate", task=dataset.config.task, seed=seed, params=params,
                  tags=tags) as run:
        _log_dataset(run, dataset, "evaluation")
        rows = evaluate_checkpoint(checkpoint=checkpoint, data_dir=data, output=output, metrics=metrics,
                                   segments=lengths, max_examples=max_examples, batch_size=batch_size,
                                   device=device or "auto", run=run)
    for row in rows:
        typer.echo(f"{row['evaluated_segments']:>6} segments ({row['tokens']:,} tokens): {row['accuracy']:.1%} "
                   f"[{row['ci_low']:.1%}, {row['ci_high']:.1%}] on {row['examples']} examples, {row['seconds']} s")


@app.command()
def report(
    output: Path = typer.Option(Path("reports"), help="Folder for the figures and tables."),
    results: Path = typer.Option(Path("."), help="Project root holding results/ (the pipeline's layout)."),
    configs: ConfigFiles = [],
    overrides: Overrides = [],
) -> None:
    """Figures and tables of the reproduction, from its result files; the seed summary of
    every configuration from the tracking store (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    from rmt.report import build_report, claim_report_folder
    from rmt.tracking import EXPERIMENT, search_runs

    config = pipeline_settings(configs, overrides)
    claim_report_folder(output)  # before the tracking store is read
    curricula = {task: config.for_task(task).curriculum for task in config.tasks}
    runs = search_runs(experiment=EXPERIMENT, filter_string="tags.\"rmt.step\" = 'evaluate'", history=("accuracy",))
    written = build_report(tasks=list(config.tasks), seeds=config.seeds, curricula=curricula, output=output,
                           root=results, runs=runs)
    for path in written:
        typer.echo(f"Wrote {path}")
    _log_dvc_headline_results(config, configs, results)


def _log_dvc_headline_results(config, configs: list[Path], results: Path) -> None:
    """Under `dvc repro`, whose last stage the report is: the headline results into the
    invocation's parent run, as Snakemake's driver logs them into its own when it ends."""
    from rmt.pipeline import headline_results, plan
    from rmt.tracking import dvc_reproduction_run

    parent = dvc_reproduction_run()
    if parent is None:  # by hand, or under Snakemake
        return
    with parent:
        parent.log_metrics(headline_results(plan(config, [str(path) for path in configs]), root=results), step=0)


from rmt.profile.commands import profile_app  # noqa: E402  (torch loads inside its commands)

app.add_typer(profile_app, name="profile")

pipeline_app = typer.Typer(help="The pipeline's step list (one source for Snakemake and DVC).", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("dvc")
def pipeline_dvc(
    params: Path = typer.Option(Path("params.yaml"), help="The configuration DVC tracks."),
    output: Path = typer.Option(Path("dvc.yaml"), help="The DVC pipeline file to write (or, with --check, to check)."),
    check: bool = typer.Option(False, "--check", help="Only check that dvc.yaml matches params (dvc repro's "
                               "first stage does): fail with the fix when it does not."),
) -> None:
    """Write dvc.yaml: the workflow's steps as DVC stages."""
    from rmt.pipeline import check_dvc_yaml, write_dvc_yaml

    if check:
        check_dvc_yaml(params, output)
        typer.echo(f"{output} matches {params}")
    else:
        typer.echo(f"Wrote {write_dvc_yaml(params, output)}")


@pipeline_app.command("schema")
def pipeline_schema(
    output: Path = typer.Option(Path("workflow/schemas/config.schema.json"), help="The JSON schema file to write."),
) -> None:
    """Write the JSON schema of the configuration files (Snakemake validates against it)."""
    from rmt.config import json_schema
    from rmt.utils import json_with, write_atomic

    write_atomic(output, json.dumps(json_schema(), indent=2) + "\n", kind="a generated config schema",
                 ours=json_with("$schema", "title", "properties"))
    typer.echo(f"Wrote {output}")


@data_app.command("generate")
def data_generate(
    task: str = typer.Argument(..., help="memorize, detect_and_memorize or reasoning (see `rmt data tasks`)."),
    output: Path = typer.Argument(..., help="Dataset directory to write; an earlier dataset there is replaced whole "
                                "on success, anything else is refused."),
    configs: ConfigFiles = [],
    overrides: Overrides = [],
) -> None:
    """Generate a task's dataset: curriculum lengths on disk, the test split as a manifest."""
    from rmt.data.dataset import TaskDataset, build_dataset
    from rmt.layout import DATASET_CARD
    from rmt.utils import claim_output, has_marker
    from rmt.data.tasks import TASKS

    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}: choose one of {', '.join(sorted(TASKS))}", param_hint="TASK")
    settings = task_settings(configs, overrides, task).data
    claim_output(output, kind="a dataset", ours=has_marker(DATASET_CARD))  # before the run opens
    with _tracked("data", task=task, seed=settings.seed, params=settings.model_dump()) as run:
        build_dataset(settings, output)
        _log_dataset(run, TaskDataset(output), "generated")
        card = json.loads((output / DATASET_CARD).read_text())
        run.set_tags({"rmt.data_hash": card["config_hash"]})
        run.log_artifact(output / DATASET_CARD)
        run.log_artifact(output / "samples.jsonl")
    typer.echo(f"Wrote {output}")


@data_app.command("tasks")
def data_tasks() -> None:
    """List the registered tasks."""
    from rmt.data.tasks import TASKS

    for name, task in sorted(TASKS.items()):
        typer.echo(f"{name}: {task.num_facts} fact(s), placed {task.fact_position}; classes {', '.join(task.classes)}")


@data_app.command("show")
def data_show(
    dataset: Path = typer.Argument(..., help="A dataset directory."),
    split: str = typer.Option("train", help="train, valid or test."),
    segments: int = typer.Option(1, min=1, help="Length of the example in segments (any length: "
                                 "examples are generated, not read from the stored arrays)."),
    index: int = typer.Option(0, min=0, help="Which example of the split."),
) -> None:
    """Print one example as text, with its facts and answer."""
    from rmt.data.dataset import TaskDataset
    from rmt.data.generator import SPLITS

    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r}: choose one of {', '.join(SPLITS)}", param_hint="--split")
    data = TaskDataset(dataset)
    layout, tokens = data.example(split, index, segments * data.config.segment_length)
    typer.echo(f"facts: {list(layout.sample.facts)} at tokens {list(layout.fact_positions)}")
    typer.echo(f"question: {layout.sample.question}  answer: {layout.sample.answer} (label {layout.sample.label})")
    typer.echo(data.generator.tokenizer.decode(tokens))
