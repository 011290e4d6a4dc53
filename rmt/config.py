"""The one configuration of the pipeline: params.yaml, with config/*.yaml laid over it.

    tasks:      which tasks, each with optional overrides of any section below
    seeds:      one full reproduction per seed
    data:       rmt.data.dataset.DataConfig without `task`
    model:      rmt.settings.ModelSettings (what the first curriculum stage starts from)
    train:      rmt.settings.TrainSettings (every curriculum stage)
    stage_train: changes to `train` for single stages, by number of segments, e.g. the
                paper's Reasoning runs stage 1 at lr 1e-5 for 6000 steps: {1: {...}};
                `last` names the curriculum's last stage whatever its length, and null
                clears an entry of a file below
    evaluate:   extrapolation lengths and batch size
    profile:    the measured cost study, `rmt profile memory` (lengths, budgets)

The curriculum is data.curriculum_segments: stage N trains on N segments starting from
stage N-1's best checkpoint. Validated as a whole before any job runs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmt.data.dataset import DataConfig
from rmt.data.tasks import TASKS
from rmt.paper import FIGURE3_TOKENS
from rmt.settings import (LONG_VALIDATION, ModelSettings, TrainSettings, form_curriculum_problem, form_length_problem,
                          label_smoothing_problem)


class EvaluateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Lengths for the last stage's checkpoint (default: the dataset's test lengths).
    segments: list[int] | None = None
    # Lengths of the generalization grid (every stage's checkpoint), the paper's Figure 5.
    grid_segments: list[int] = Field(default_factory=lambda: list(range(1, 16)))
    grid_examples: int = Field(default=200, ge=1)
    batch_size: int = Field(default=16, ge=1)


class ProfileSettings(BaseModel):
    """`rmt profile memory` (rmt/profile/memory.py): RMT's streaming inference against full
    attention over the same backbone, and training memory against segments. The model is the
    first task's (its model settings and segment length)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[int] = Field(default_factory=lambda: list(FIGURE3_TOKENS), min_length=1,
                              description="Input lengths (tokens per example); the paper's Figure 3 grid")
    full_attention: list[Literal["sdpa", "eager"]] = Field(
        default_factory=lambda: ["sdpa", "eager"],
        description="Attention implementations of the full-attention baseline (sdpa: fused kernel; eager: the "
                    "score matrix materialised)")
    memory_budget_mb: float | None = Field(default=None, gt=0, description="Full attention is measured while "
                                           "its projected peak stays within this (null: a quarter of the memory "
                                           "available when the profile starts); longer inputs are projected")
    max_seconds: float = Field(default=60.0, gt=0, description="The same for the time of one full-attention pass")
    batch_size: int = Field(default=1, ge=1, description="Examples per inference call")
    train_segments: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    train_batch_size: int = Field(default=8, ge=1)
    train_steps: int = Field(default=3, ge=1, description="Timed optimizer steps per training point")
    device: str = "auto"

    @model_validator(mode="after")
    def _enough_lengths_to_project(self) -> "ProfileSettings":
        if min(self.tokens) < 1 or min(self.train_segments) < 1:
            raise ValueError("profile.tokens and profile.train_segments must be positive")
        if self.full_attention and len(set(self.tokens)) < 3:
            raise ValueError(f"profile.tokens {self.tokens}: give at least 3 lengths, the fewest from which full "
                             "attention's cost beyond its budget is projected")
        return self


# A stage_train entry's key: a stage's number of segments, or the curriculum's last stage.
LAST_STAGE = "last"
StageKey = int | Literal[LAST_STAGE]


def _stage_number(key) -> int | str:
    """A stage_train key as given: YAML's 7, --set's "7", or `last`."""
    if key == LAST_STAGE or isinstance(key, int):
        return key
    if isinstance(key, str) and re.fullmatch(r"[0-9]+", key):
        return int(key)
    raise ValueError(f"unknown stage {key!r}: name a stage by its number of segments (from "
                     f"data.curriculum_segments) or `{LAST_STAGE}`")


def _known_stage_keys(stage_train):
    """One entry per stage: --set writes "7" beside a file's 7, and its keys go over the file's."""
    if not isinstance(stage_train, dict):
        return stage_train  # pydantic names the type
    entries: dict = {}
    for key, values in stage_train.items():
        stage = _stage_number(key)
        both = isinstance(entries.get(stage), dict) and isinstance(values, dict)
        entries[stage] = {**entries[stage], **values} if both else values
    return entries


class TaskOverrides(BaseModel):
    """Per-task changes to the shared sections (e.g. a longer schedule for reasoning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: dict = Field(default_factory=dict)
    model: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    stage_train: dict[StageKey, dict | None] = Field(default_factory=dict)
    evaluate: dict = Field(default_factory=dict)

    _stage_keys = field_validator("stage_train", mode="before")(_known_stage_keys)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: dict[str, TaskOverrides] = Field(default_factory=lambda: {name: TaskOverrides() for name in TASKS})
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    data: dict = Field(default_factory=dict)
    model: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    stage_train: dict[StageKey, dict | None] = Field(default_factory=dict)
    evaluate: dict = Field(default_factory=dict)
    profile: ProfileSettings = Field(default_factory=ProfileSettings)

    _stage_keys = field_validator("stage_train", mode="before")(_known_stage_keys)

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
        data = _section(f"{task}: data", DataConfig, {**self.data, **overrides.data, "task": task})
        train = {**self.train, **overrides.train}
        named = {key for key in (*self.stage_train, *overrides.stage_train) if key != LAST_STAGE}
        unknown = sorted(named - set(data.curriculum_segments))
        if unknown:
            raise ValueError(f"{task}: stage_train names stages {unknown} that are not in the curriculum "
                             f"{data.curriculum_segments}: use numbers of segments from data.curriculum_segments "
                             f"or `{LAST_STAGE}`")
        own = _stage_entries(data.curriculum_segments, self.stage_train, overrides.stage_train)
        return TaskSettings(
            task=task,
            data=data,
            model=_section(f"{task}: model", ModelSettings, {**self.model, **overrides.model}),
            train=_section(f"{task}: train", TrainSettings, train),
            stage_train={n: _section(f"{task}: stage_train.{key}", TrainSettings,
                                     _stage_values(train, values, where=f"{task}: stage_train.{key}"))
                         for n, (key, values) in sorted(own.items())},
            evaluate=_section(f"{task}: evaluate", EvaluateSettings, {**self.evaluate, **overrides.evaluate}),
        )


def last_stage(curriculum: list[int]) -> int:
    """The stage `stage_train.last` names, whose model is the curriculum's result."""
    return curriculum[-1]


def _stage_entries(curriculum: list[int], *layers: dict) -> dict[int, tuple[str, dict]]:
    """Each stage's own changes to `train`, with the key they were written under, from the
    layers of stage_train (shared, then the task's): within a layer a stage's number is laid
    over `last`; a null entry clears what the layers before gave that stage
    (`tasks: {reasoning: {stage_train: {last: null}}}`)."""
    entries: dict[int, tuple[str, dict]] = {}
    for layer in layers:
        for key in sorted(layer, key=lambda key: key != LAST_STAGE):  # `last` first
            stage = last_stage(curriculum) if key == LAST_STAGE else key
            values = {} if layer[key] is None else {**entries.get(stage, ("", {}))[1], **layer[key]}
            entries[stage] = (str(key), values)
    return {stage: entry for stage, entry in entries.items() if entry[1]}


def _stage_values(train: dict, own: dict, *, where: str) -> dict:
    """A stage's training values: `train`'s, with the stage's own laid over them. What a stage
    names itself applies as given, also where `train`'s long validation would leave it out
    (valid_length_from_segments) or set its examples (valid_length_examples). A stage's own
    min_steps never holds it past a max_steps it takes from `train` (a quick run's
    `--set train.max_steps=20`): it yields, with a warning."""
    values = {**train, **own}
    max_steps = values.get("max_steps", TrainSettings.model_fields["max_steps"].default)
    if "max_steps" not in own and own.get("min_steps", 0) > max_steps:
        warnings.warn(f"{where}: min_steps {own['min_steps']} yields to train.max_steps {max_steps}: the stage "
                      f"stops at step {max_steps}", stacklevel=2)
        values["min_steps"] = max_steps
    if own.keys() & set(LONG_VALIDATION):
        values["valid_length_from_segments"] = own.get("valid_length_from_segments", 1)
    if "eval_examples" in own:
        values["valid_length_examples"] = own.get("valid_length_examples")
    return values


class TaskSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    task: str
    data: DataConfig
    model: ModelSettings
    train: TrainSettings
    stage_train: dict[int, TrainSettings] = Field(default_factory=dict)
    evaluate: EvaluateSettings

    @model_validator(mode="after")
    def _training_fits_the_task(self) -> "TaskSettings":
        for segments, train in {"train": self.train, **self.stage_train}.items():
            problem = label_smoothing_problem(self.model, train) or form_curriculum_problem(self.task, train)
            if problem:
                where = "train" if segments == "train" else f"stage_train.{segments}"
                raise ValueError(f"{self.task}: {where}: {problem}")
        for segments in self.curriculum:
            try:
                problem = form_length_problem(self.train_for(segments), segments * self.data.segment_length)
            except ValidationError as error:
                problem = error.errors()[0]["msg"].removeprefix("Value error, ")
            if problem:
                raise ValueError(f"{self.task}: the stage on {segments} segments: {problem}") from None
        return self

    @property
    def curriculum(self) -> list[int]:
        return self.data.curriculum_segments

    def train_for(self, segments: int) -> TrainSettings:
        """The training settings of the stage on `segments` segments."""
        return self.stage_train.get(segments, self.train).for_stage(segments)

    def config_hash(self) -> str:
        """What makes runs comparable: every setting but the training seed and the device,
        hashed, so that the seeds of one configuration group together (MLflow tag
        `rmt.config`, the report's seed summary)."""
        import hashlib
        import json

        # Values at their defaults are left out, so that a setting rmt gains later (whose
        # default is the old behaviour) does not split the seeds of one configuration.
        settings = self.model_dump(mode="json", exclude_defaults=True)
        for train in (settings.get("train", {}), *settings.get("stage_train", {}).values()):
            train.pop("seed", None), train.pop("device", None)
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _section(name: str, model: type[BaseModel], values: dict):
    """One section's settings, its problems named by full key ("memorize: train.learning_rate")."""
    try:
        return model(**values)
    except ValidationError as error:
        raise ValueError("\n".join(problem_lines(error, prefix=name.split(": ")[-1], task=name.split(": ")[0])))


def problem_lines(error: ValidationError, *, prefix: str = "", task: str = "") -> list[str]:
    """pydantic's errors as one line each: the full key, the value given and what is wrong."""
    lines = []
    for problem in error.errors():
        if not problem["loc"] and problem["type"] == "value_error":  # a check across the section's keys
            where = f"{task + ': ' if task else ''}{prefix}: " if prefix else ""  # else already named by for_task
            lines += [where + line for line in str(problem["ctx"]["error"]).splitlines()]
            continue
        key = ".".join(str(part) for part in (prefix, *problem["loc"]) if part != "")
        if problem["type"] == "value_error":  # a validator's own message, which names the value
            message, given = str(problem["ctx"]["error"]), ""
        else:
            message = problem["msg"]
            given = f" (given {problem['input']!r})" if problem["type"] != "missing" and "input" in problem else ""
        lines.append(f"{task + ': ' if task else ''}{key or 'config'}: {message}{given}")
    return lines


class _YAMLLoader(yaml.SafeLoader):
    """YAML as users write numbers: `1e-4` is a float (YAML 1.1, which PyYAML and Snakemake
    follow, reads it as a string because it lacks a dot)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def merge(base, overlay, *, key: str = "", notes: list[str] | None = None):
    """Lay `overlay` over `base`: mappings key by key at every depth; null replaces (so
    `backbone_overrides: null` clears the overrides of the file below); a list of task names
    under `tasks` selects those tasks and keeps their settings from below. Any other value
    replaces the base's whole, which for a mapping is noted in `notes` (settings lost)."""
    if key == "tasks" and isinstance(base, dict) and isinstance(overlay, list):
        return {name: base.get(name) or {} for name in overlay}
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        if isinstance(base, dict) and base and overlay is not None and notes is not None:
            notes.append(f"{key} replaces the whole mapping below it (dropping {', '.join(map(str, base))}): "
                         "give a mapping to change single keys, or null to clear it")
        return overlay
    return {**base, **{name: merge(base.get(name), value, key=f"{key}.{name}".lstrip("."), notes=notes)
                       for name, value in overlay.items()}}


def _read_yaml(path: Path, loader=_YAMLLoader) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=loader) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{at}: {problem}. Fix the file's syntax") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return values


def read_config_files(*paths: str | Path) -> dict:
    """The files' settings laid over each other (`merge`), not yet validated. As Snakemake
    does with --configfile: the later files are merged together first, then laid over the
    first. A file that drops settings by replacing a whole mapping is warned about."""
    notes: list[str] = []
    overlay: dict = {}
    for path in paths[1:]:
        overlay = merge(overlay, _read_yaml(Path(path)), notes=notes)
    merged = merge(_read_yaml(Path(paths[0])), overlay, notes=notes) if paths else {}
    for note in notes:
        warnings.warn(f"{', '.join(map(str, paths[1:]))}: {note}", stacklevel=2)
    return merged


def _read_like_snakemake(*paths: str | Path) -> dict:
    """The files merged as Snakemake merges --configfile files (YAML 1.1, lists replace,
    the later files merged together before they are laid over the first)."""
    overlay: dict = {}
    for path in paths[1:]:
        overlay = _replace_merge(overlay, _read_yaml(Path(path), loader=yaml.SafeLoader))
    return _replace_merge(_read_yaml(Path(paths[0]), loader=yaml.SafeLoader), overlay) if paths else {}


def _replace_merge(base, overlay):
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    return {**base, **{key: _replace_merge(base.get(key), value) for key, value in overlay.items()}}


def load_config(*paths: str | Path) -> PipelineConfig:
    """params.yaml, then each further file laid over it (`merge`), validated."""
    return PipelineConfig(**read_config_files(*paths))


def json_schema() -> dict:
    """JSON schema of a configuration file (params.yaml or an overlay: every key optional),
    from the settings models; workflow/schemas/config.schema.json is this, written by
    `rmt pipeline schema`. Types and ranges only: PipelineConfig checks the rest."""
    definitions: dict = {}

    def section(model, *, drop: tuple[str, ...] = ()) -> dict:
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(schema.pop("$defs", {}))
        for key in drop:
            schema["properties"].pop(key)
        schema.pop("required", None)  # an overlay may set any subset
        return schema

    sections = {"data": section(DataConfig, drop=("task",)), "model": section(ModelSettings),
                "train": section(TrainSettings), "evaluate": section(EvaluateSettings)}
    profile = section(ProfileSettings)
    stage_train = {"type": "object", "propertyNames": {"pattern": f"^([0-9]+|{LAST_STAGE})$"},
                   "additionalProperties": {"anyOf": [sections["train"], {"type": "null"}]},
                   "description": f"Changes to train for single curriculum stages, by number of segments or "
                                  f"`{LAST_STAGE}` (the curriculum's last stage); null clears an entry"}
    task = {"type": ["object", "null"], "additionalProperties": False,
            "properties": {**sections, "stage_train": stage_train}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rmt pipeline configuration (params.yaml, config/*.yaml)",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tasks": {"description": "Tasks to run, each with optional overrides of the sections",
                      "oneOf": [{"type": "array", "items": {"enum": sorted(TASKS)}},
                                {"type": "object", "propertyNames": {"enum": sorted(TASKS)},
                                 "additionalProperties": task}]},
            "seeds": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
            **sections,
            "stage_train": stage_train,
            "profile": profile,
        },
        "$defs": definitions,
    }


def check_config_files(config: dict, config_files: list[str]) -> None:
    """The configuration a workflow manager loaded is what its config files say: the rmt
    commands read those files, so values given any other way (`snakemake --config k=v`)
    would not reach them."""
    from_files = _read_like_snakemake(*config_files)
    differing = sorted(key for key in {*config, *from_files} if config.get(key) != from_files.get(key))
    if differing:
        raise ValueError(
            f"The configuration's {', '.join(differing)} differ from its files ({', '.join(config_files)}): values "
            "passed with `snakemake --config` do not reach the rmt commands. Put them in a YAML file and pass it "
            "with `--configfile FILE` instead."
        )


def schema_problems(config: dict, schema: dict) -> list[str]:
    """The configuration against its JSON schema (what Snakemake workflows validate up
    front), one line per problem with its full key, not jsonschema's dump of the schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    problems = []
    for error in Draft202012Validator(schema).iter_errors(config):
        error = best_match([error])  # oneOf/anyOf: the alternative that says what is wrong
        key = ".".join(map(str, error.absolute_path)) or "config"
        problems.append(f"{key}: {error.message}")
    return sorted(problems)


def validate_config(config: dict, config_files: list[str]) -> PipelineConfig:
    """The whole configuration validated, every problem named with its key."""
    try:
        return PipelineConfig(**config)
    except (ValidationError, ValueError) as error:
        lines = problem_lines(error) if isinstance(error, ValidationError) else str(error).splitlines()
        problems = "\n".join(f"  {line}" for line in lines)
        raise ValueError(f"The configuration ({', '.join(config_files)}) is invalid:\n{problems}\n"
                         "Fix these values; every setting is described in rmt/config.py.") from None
