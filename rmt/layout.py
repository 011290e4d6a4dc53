"""Where everything the pipeline writes lives: the folders of its steps, and the names of
the files inside a dataset, a stage and the report. The on-disk contracts, in one place;
plain Python, so that any layer can read them.

    data/<task>/                                   a dataset (DATASET_CARD marks it)
    results/<task>/seed-<s>/stage-<n>/             a curriculum stage (StageFiles)
    results/<task>/seed-<s>/evaluation.csv|json    the last stage at long inputs
    results/<task>/seed-<s>/grid/stage-<n>.csv     every stage on 1..15 segments
    results/profile/                               FLOPs, attention maps, memory profile
    results/timings/<rule>/...tsv                  each job's time and memory (Snakemake)
    reports/                                       figures and tables (report_files)

A checkpoint folder (stage-<n>/best/) is a Hugging Face model folder: config.json (the
RMT's, with the backbone's nested: rmt/model/auto.py), the weights and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Paths of the pipeline's outputs, with Snakemake-style wildcards.
DATA = "data/{task}"
STAGE = "results/{task}/seed-{seed}/stage-{segments}"
EVALUATION = "results/{task}/seed-{seed}/evaluation.csv"
EVALUATION_METRICS = "results/{task}/seed-{seed}/evaluation.json"
GRID = "results/{task}/seed-{seed}/grid/stage-{segments}.csv"
FLOPS = "results/profile/flops.csv"
ATTENTION = "results/profile/attention-{task}.json"
ATTENTION_TASKS = ("reasoning", "detect_and_memorize")  # tasks whose facts the maps show (Figure 6)
MEMORY = "results/profile/memory"
MEMORY_FILES = tuple(f"{MEMORY}/{name}" for name in ("inference.csv", "training.csv", "summary.json"))
REPORT = "reports"
DVC_CHECKED = "results/dvc-yaml-checked.txt"  # written by `dvc repro`'s first stage when dvc.yaml is current
LOGS = "logs"
TIMINGS = "results/timings"  # Snakemake's benchmark file of every job: {rule}/...tsv
# The evaluation table's column of one kind of question (Reasoning: end_room, middle_room).
KIND_ACCURACY = "accuracy_{kind}"

# What the report shows, in the order of Snakemake's HTML report: figures (one file per
# format) and tables, each with its caption there (workflow/report/<caption>.rst) and category.
FIGURES = {"accuracy": "Accuracy", "generalization": "Generalization", "training": "Training", "flops": "Cost",
           "memory": "Cost", "training-memory": "Cost"}
TABLES = {"accuracy": ("table", "Accuracy"), "seeds": ("seeds", "Accuracy")}


def report_files(tasks) -> dict[str, tuple[str, str] | None]:
    """Every file `rmt report` writes for these tasks, by name: its caption and category
    in Snakemake's HTML report, or None for a file not shown there (an SVG beside its PNG,
    a Markdown copy of a CSV table)."""
    figures = {**FIGURES, **{f"attention-{task}": "Attention" for task in tasks if task in ATTENTION_TASKS}}
    files = {}
    for name, category in figures.items():
        caption = "attention" if name.startswith("attention-") else name
        files[f"{name}.png"], files[f"{name}.svg"] = (caption, category), None
    for name, (caption, category) in TABLES.items():
        files[f"{name}.csv"], files[f"{name}.md"] = (caption, category), None
    return files


# Inside a dataset folder: what marks it as one (rmt data generate writes it last).
DATASET_CARD = "card.json"


@dataclass(frozen=True)
class StageFiles:
    """The files of one curriculum stage folder (rmt/train.py writes them).

    config.json         the stage's resolved settings: a rerun with others starts afresh
    history.jsonl       one line per validation
    checkpoints/last/   the latest checkpoint, with TRAINING_STATE to resume from
    checkpoints/best/   the best checkpoint so far
    best/, metrics.json published when the stage ends
    .lock               held while a process trains the stage
    """

    folder: Path

    SETTINGS = "config.json"
    HISTORY = "history.jsonl"
    TRAINING_STATE = "training_state.pt"
    LOCK = ".lock"

    @property
    def settings(self) -> Path:
        return self.folder / self.SETTINGS

    @property
    def history(self) -> Path:
        return self.folder / self.HISTORY

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def best(self) -> Path:
        return self.folder / "best"

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last"

    @property
    def best_so_far(self) -> Path:
        return self.checkpoints / "best"

    @property
    def lock(self) -> Path:
        return self.folder / self.LOCK

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "StageFiles":
        """The stage a published checkpoint (stage/best) belongs to."""
        return cls(Path(checkpoint).parent)
