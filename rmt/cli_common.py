"""Options several `rmt` commands share, defined once (rmt/cli.py and rmt/profile/commands.py
use them), and the reading of the configuration they select.

A command that reads the pipeline configuration takes `--config` files and `--set`
overrides; a command that runs a model takes `--device`. Each is one Annotated type here, so
that every command spells, parses and documents it the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

CONFIG_HELP = "Pipeline configuration (params.yaml); several are laid over each other in order."
SET_HELP = ("One setting, laid over the --config files (the value read as YAML); repeatable. "
            "E.g. train.learning_rate=5e-4 or data.segment_length=32.")
DEVICE_HELP = ("Where the model runs: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N. Replaces the "
               "configuration's device where the command has one (train.device, profile.device). "
               "Default: that setting, else auto.")

ConfigFiles = Annotated[list[Path], typer.Option("--config", metavar="FILE", help=CONFIG_HELP)]
Overrides = Annotated[list[str], typer.Option("--set", metavar="SECTION.KEY=VALUE", help=SET_HELP)]
Device = Annotated[str | None, typer.Option("--device", metavar="DEVICE", help=DEVICE_HELP)]


def device_override(section: str, device: str | None) -> list[str]:
    """--device as the --set override of `section`.device it stands for (none when not given).
    The value is written as a JSON string, so YAML never reads `cuda:0` as anything else."""
    return [] if device is None else [f"{section}.device={json.dumps(device)}"]


def merged_settings(configs: list[Path], overrides: list[str]) -> dict:
    """The config files merged, then the --set overrides applied; not yet validated."""
    import yaml

    from rmt.config import read_config_files

    try:
        merged = read_config_files(*configs)
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None
    for item in overrides:
        key, separator, value = item.partition("=")
        path = key.strip().split(".")
        if not separator or len(path) < 2:
            raise typer.BadParameter(f"{item!r} is not SECTION.KEY=VALUE", param_hint="--set")
        target = merged
        for part in path[:-1]:
            target = target.setdefault(part, {})
        try:
            target[path[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise typer.BadParameter(f"{item!r}: the value is not valid YAML (quote strings, e.g. "
                                     f"{key}='\"text\"')", param_hint="--set") from None
    return merged


def pipeline_settings(configs: list[Path], overrides: list[str]):
    """The whole configuration (every task), for the commands that span tasks (report,
    profile memory): the files merged, the overrides applied, validated."""
    from rmt.config import PipelineConfig

    merged = merged_settings(configs, overrides)
    return _validated(lambda: PipelineConfig(**merged))


def task_settings(configs: list[Path], overrides: list[str], task: str):
    """The settings of one task: the config files merged, then --set overrides, validated."""
    from rmt.config import PipelineConfig

    merged = merged_settings(configs, overrides)
    # A command runs one task: the settings of the others are not its business.
    tasks = merged.get("tasks") or {}
    own = (tasks.get(task) or {}) if isinstance(tasks, dict) else {}
    return _validated(lambda: PipelineConfig(**{**merged, "tasks": {task: own}}).for_task(task))


def _validated(build):
    """`build()`, with invalid settings reported as one message listing every problem."""
    from pydantic import ValidationError

    from rmt.config import problem_lines

    try:
        return build()
    except ValidationError as error:
        raise typer.BadParameter("Invalid settings:\n" + "\n".join(f"  {line}" for line in problem_lines(error))) \
            from None
    except ValueError as error:
        raise typer.BadParameter("Invalid settings:\n  " + str(error).replace("\n", "\n  ")) from None
