"""A trained checkpoint (a stage's best/ folder) and the data it may be used with.

    stage-N/config.json   the stage's settings (rmt.train): the task's data, segments, ...
    stage-N/best/         the checkpoint: config.json (the RMT's, the backbone's nested:
                          rmt/model/auto.py), model.safetensors, the tokenizer's files

Evaluation, attention maps and a stage's --init all check here, before any work, that the
checkpoint is whole and fits the dataset it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

from rmt.data.dataset import TaskDataset
from rmt.hub import load_tokenizer
from rmt.layout import StageFiles
from rmt.model.base import read_checkpoint_config
from rmt.objective import Objective, objective_for

def stage_settings(checkpoint: str | Path) -> dict | None:
    """The resolved settings of the stage a checkpoint (stage/best) comes from, if any."""
    path = StageFiles.of_checkpoint(checkpoint).settings
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and "segments" in settings else None


def trained_segments(checkpoint: str | Path) -> int | None:
    """A stage's checkpoint (stage/best) knows how many segments it was trained on."""
    stage = stage_settings(checkpoint)
    return stage["segments"] if stage else None


def check_fits(checkpoint: str | Path, data: TaskDataset, *, option: str, same_segment_length: bool) -> Objective:
    """Refuse a checkpoint that cannot be used on `data`: damaged, another vocabulary,
    another number of classes (or, for a decoder, answers its vocabulary cannot write in
    one token), another task (when its stage says which), and, where the length of a
    segment matters (evaluation), another segment length. Returns the checkpoint's
    objective on this data."""
    checkpoint = Path(checkpoint)
    config = read_checkpoint_config(checkpoint)
    tokenizer = load_tokenizer(str(checkpoint))
    data.check_vocabulary(tokenizer, f"{option} {checkpoint}")
    objective = objective_for(config.architecture, classes=data.card["classes"], tokenizer=tokenizer)
    classes = len(data.card["classes"])
    if config.architecture == "encoder" and config.num_labels != classes:
        raise ValueError(f"{option} {checkpoint} classifies {config.num_labels} classes, the data in "
                         f"{data.directory} has {classes}: give a checkpoint trained on this task")
    if same_segment_length and config.segment_length != data.config.segment_length:
        raise ValueError(f"{option} {checkpoint} was trained on segments of {config.segment_length} tokens, the data "
                         f"in {data.directory} has {data.config.segment_length}: generate the data with "
                         f"data.segment_length={config.segment_length}, or give a checkpoint trained on this data")
    stage = stage_settings(checkpoint)
    trained_task = _task_of(stage["data"]) if stage else None
    if trained_task is not None and trained_task != data.config.task:
        raise ValueError(f"{option} {checkpoint} was trained on {trained_task}, the data in {data.directory} is "
                         f"{data.config.task}: give a checkpoint of this task, or data of that one")
    return objective


def _task_of(data_dir: str) -> str | None:
    try:
        return TaskDataset(data_dir).config.task
    except (OSError, ValueError):
        return None  # the training data is gone or moved: nothing to compare with
