"""The one configuration of the pipeline: params.yaml, with config/*.yaml laid over it.

    tasks:      which tasks, each with optional overrides of any section below
    seeds:      one full reproduction per seed
    data:       rmt.data.dataset.DataConfig without `task`
    model:      rmt.train.ModelSettings (what the first curriculum stage starts from)
    train:      rmt.train.TrainSettings (every curriculum stage)
    stage_train: changes to `train` for single stages, by number of segments, e.g. the
                paper's Reasoning runs stage 1 at lr 1e-5 for 6000 steps: {1: {...}}
    evaluate:   extrapolation lengths and batch size

The curriculum is data.curriculum_segments: stage N trains on N segments starting from
stage N-1's best checkpoint. Validated as a whole before any job runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rmt.data.dataset import DataConfig
from rmt.data.tasks import TASKS
from rmt.train import ModelSettings, TrainSettings


class EvaluateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lengths for the last stage's checkpoint (default: the dataset's test lengths).
    segments: list[int] | None = None
    # Lengths of the generalization grid (every stage's checkpoint), the paper's Figure 5.
    grid_segments: list[int] = Field(default_factory=lambda: list(range(1, 16)))
    grid_examples: int = Field(default=200, ge=1)
    batch_size: int = Field(default=16, ge=1)


class TaskOverrides(BaseModel):
    """Per-task changes to the shared sections (e.g. a longer schedule for reasoning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: dict = Field(default_factory=dict)
    model: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    stage_train: dict[int, dict] = Field(default_factory=dict)
    evaluate: dict = Field(default_factory=dict)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: dict[str, TaskOverrides] = Field(default_factory=lambda: {name: TaskOverrides() for name in TASKS})
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: dict = Field(default_factory=dict)
    model: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    stage_train: dict[int, dict] = Field(default_factory=dict)
    evaluate: dict = Field(default_factory=dict)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_as_mapping(cls, tasks):
        if isinstance(tasks, list):  # `tasks: [memorize, reasoning]` with no overrides
            return {name: {} for name in tasks}
        return tasks

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict) -> dict:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}: choose from {', '.join(sorted(TASKS))}")
        if not tasks:
            raise ValueError("no tasks: list at least one of " + ", ".join(sorted(TASKS)))
        return tasks

    def model_post_init(self, _context) -> None:
        # Build every task's sections now, so that any invalid value fails before any job.
        for task in self.tasks:
            self.for_task(task)

    def for_task(self, task: str) -> "TaskSettings":
        overrides = self.tasks[task]
        data = DataConfig(**{**self.data, **overrides.data, "task": task})
        train = {**self.train, **overrides.train}
        stages = sorted(set(self.stage_train) | set(overrides.stage_train))
        unknown = [n for n in stages if n not in data.curriculum_segments]
        if unknown:
            raise ValueError(f"{task}: stage_train names stages {unknown} that are not in the curriculum "
                             f"{data.curriculum_segments}: use numbers of segments from data.curriculum_segments")
        return TaskSettings(
            task=task,
            data=data,
            model=ModelSettings(**{**self.model, **overrides.model}),
            train=TrainSettings(**train),
            stage_train={n: TrainSettings(**{**train, **self.stage_train.get(n, {}), **overrides.stage_train.get(n, {})})
                         for n in stages},
            evaluate=EvaluateSettings(**{**self.evaluate, **overrides.evaluate}),
        )


class TaskSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    data: DataConfig
    model: ModelSettings
    train: TrainSettings
    stage_train: dict[int, TrainSettings] = Field(default_factory=dict)
    evaluate: EvaluateSettings

    @property
    def curriculum(self) -> list[int]:
        return self.data.curriculum_segments

    def train_for(self, segments: int) -> TrainSettings:
        """The training settings of the stage on `segments` segments."""
        return self.stage_train.get(segments, self.train)


def _merge(base, overlay, levels: int):
    """Merge `levels` levels of mappings; below that, the overlay's value replaces the base's
    whole (so `backbone_overrides: {}` clears it, and a list replaces a list)."""
    if levels == 0 or not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    return {**base, **{key: _merge(base.get(key), value, levels - 1) for key, value in overlay.items()}}


# tasks -> task name -> section -> field; every other section -> field.
MERGE_LEVELS = {"tasks": 3}


def load_config(*paths: str | Path) -> PipelineConfig:
    """params.yaml, then each further file laid over it, section by section and field by field."""
    merged: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        if isinstance(values.get("tasks"), list):
            values["tasks"] = {name: {} for name in values["tasks"]}
        merged = {**merged, **{key: _merge(merged.get(key), value, MERGE_LEVELS.get(key, 1))
                               for key, value in values.items()}}
    return PipelineConfig(**merged)
