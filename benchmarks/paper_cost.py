"""What the paper's recipe costs on GPUs, estimated from the analytic FLOP model, so that a
cluster user can set `gpu` and `runtime` in profiles/gpu/config.yaml.

    .venv/bin/python benchmarks/paper_cost.py                  # params.yaml + config/paper.yaml
    .venv/bin/python benchmarks/paper_cost.py --mfu 0.3 --output results/benchmarks/paper-cost.md
    .venv/bin/python benchmarks/paper_cost.py --summary        # the README's table only

Every number of the recipe is read from the configuration (rmt.config: steps, batch,
validation, curriculum, test lengths and examples) and every FLOP from rmt/profile/flops.py
(`rmt_flops` with the model's segment layout). Per task: each curriculum stage (max_steps
training steps of 3 x the forward FLOPs of its segments x batch, plus its validation passes),
the last stage's evaluation at every test length, and the generalization grid of every stage.
FLOPs become hours at a stated fraction (MFU) of the GPUs' datasheet peak; the closing table
checks the workflow profile's `runtime` against the longest job of each rule.

These are estimates, not measurements: they are as good as the FLOP model and the MFU.
The table goes to stdout; --output writes it as Markdown (.md) or its numbers as JSON (.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
import yaml

from rmt.config import TaskSettings, load_config
from rmt.data.tasks import get_task
from rmt.hub import resolve
from rmt.model.config import RMTConfig
from rmt.profile.flops import PAPER_ACCOUNTING, Accounting, SegmentLayout, TransformerShape, rmt_flops
from rmt.settings import ModelSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (ROOT / "params.yaml", ROOT / "config" / "paper.yaml")
GPU_PROFILE = ROOT / "profiles" / "gpu" / "config.yaml"

# A training step is the forward pass, then the backward pass at about twice its FLOPs
# (gradients with respect to activations and to weights), through every segment: the
# recipe back-propagates through time across all of them.
FORWARD_PASSES_PER_TRAINING_STEP = 3
# Memory-efficient back-propagation recomputes each segment's forward pass in the backward.
RECOMPUTED_FORWARD_PASSES = 1

# bert-base-cased's config.json is transformers' BertConfig defaults (bert-base) with the
# cased vocabulary, as tests/test_config.py builds it: used when the hub cannot provide it
# (offline). The vocabulary does not enter the classifier's FLOPs.
OFFLINE_CONFIGS = {"bert-base-cased": {"model_type": "bert", "vocab_size": 28996}}


# ---------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: dict[str, float]  # dense (no sparsity) peak by precision, from the vendor's datasheet
    source: str


GTX_1080_TI = Gpu("GTX 1080 Ti", {"fp32": 11.3}, "NVIDIA GeForce GTX 1080 Ti specifications (boost clock)")
A100_40GB = Gpu("A100 40GB", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}, "NVIDIA A100 datasheet, dense")
# rmt computes in fp32 (no autocast, and torch leaves TF32 matmuls off): the paper's "full precision".
RMT_PRECISION = "fp32"


@dataclass(frozen=True)
class Hardware:
    gpu: Gpu
    count: int
    precision: str
    mfu: float  # the achieved fraction of the peak (model FLOP utilisation)

    @property
    def label(self) -> str:
        return f"{self.count} x {self.gpu.name}"

    def hours(self, flops: float) -> float:
        sustained = self.count * self.gpu.peak_tflops[self.precision] * 1e12 * self.mfu
        return flops / sustained / 3600


# Only `rmt train` runs data-parallel (torchrun, one process per GPU); `rmt evaluate` runs in
# one process on one GPU, whatever the profile gives it.
DATA_PARALLEL_RULES = ("train",)


def profile_resources(path: Path) -> dict[str, dict]:
    """The workflow profile's set-resources, by rule."""
    return yaml.safe_load(path.read_text())["set-resources"]


def gpus_used(rule: str, resources: dict[str, dict]) -> int:
    return resources[rule].get("gpu", 1) if rule in DATA_PARALLEL_RULES else 1


def paper_hardware(rule: str, resources: dict[str, dict], mfu: float) -> Hardware:
    """A job of `rule` on the profile's GPUs, taken to be the paper's training GPUs: the
    slowest the shipped profile plans for (the GPU rules share one partition)."""
    return Hardware(GTX_1080_TI, gpus_used(rule, resources), RMT_PRECISION, mfu)


# ---------------------------------------------------------------- the FLOP model of one task
def backbone_shape(model: ModelSettings) -> tuple[TransformerShape, str]:
    """The backbone's shape (with the configured overrides) and where it was read from."""
    from transformers import AutoConfig, CONFIG_MAPPING

    try:
        config = AutoConfig.from_pretrained(resolve(model.backbone), **model.backbone_overrides)
        source = "its Hugging Face config"
    except OSError:  # offline, and not in the cache
        if model.backbone not in OFFLINE_CONFIGS:
            raise
        values = dict(OFFLINE_CONFIGS[model.backbone])
        config_class = CONFIG_MAPPING[values.pop("model_type")]
        config = config_class(**values, **model.backbone_overrides)
        source = f"{config_class.__name__} defaults with {values} (offline: the hub did not provide its config)"
    return TransformerShape.from_config(config, name=model.backbone), source


def segment_layout(settings: TaskSettings) -> SegmentLayout:
    """What one segment puts through the backbone, as rmt.model builds it."""
    # The special tokens' ids do not change the layout: placeholders satisfy RMTConfig's check.
    config = RMTConfig(architecture=settings.model.architecture, num_memory_tokens=settings.model.num_memory_tokens,
                       segment_length=settings.data.segment_length, num_labels=len(get_task(settings.task).classes),
                       cls_token_id=0, sep_token_id=0, pad_token_id=0)
    return SegmentLayout.for_rmt_config(config)


@dataclass(frozen=True)
class ForwardModel:
    """Forward FLOPs of one example of n segments, by rmt/profile/flops.py."""

    shape: TransformerShape
    shape_source: str
    layout: SegmentLayout
    head: str  # "classifier" on [CLS] (encoder) or "lm" over the text positions (decoder)
    num_labels: int
    accounting: Accounting = PAPER_ACCOUNTING

    def flops(self, segments: int) -> int:
        return rmt_flops(self.shape, segments * self.layout.segment_length, layout=self.layout,
                         accounting=self.accounting, head=self.head, num_labels=self.num_labels).total


def forward_model(settings: TaskSettings) -> ForwardModel:
    shape, source = backbone_shape(settings.model)
    head = "classifier" if settings.model.architecture == "encoder" else "lm"
    return ForwardModel(shape, source, segment_layout(settings), head, len(get_task(settings.task).classes))


# ---------------------------------------------------------------- costs
@dataclass(frozen=True)
class StageCost:
    segments: int
    steps: int  # max_steps: an upper bound, early stopping can end the stage sooner
    batch_size: int
    forward_passes: int  # forward-pass equivalents of one training step
    step_flops: int
    validations: int
    validation_examples: int  # per validation
    validation_segments: int
    validation_flops: int  # all the stage's validations

    @property
    def training_flops(self) -> int:
        return self.steps * self.step_flops

    @property
    def flops(self) -> int:
        return self.training_flops + self.validation_flops


@dataclass(frozen=True)
class LengthCost:
    segments: int
    tokens: int
    examples: int
    flops: int


def unmodelled_settings(model: ModelSettings, train: TrainSettings) -> list[str]:
    """Settings under which a step does not cost 3 forward passes of the stage's own length."""
    return [name for name, on in (("model.bptt_depth (truncated BPTT)", model.bptt_depth != -1),
                                  ("train.mixed_lengths", train.mixed_lengths),
                                  ("train.long_step_every", train.long_step_every is not None)) if on]


def forward_passes_per_step(model: ModelSettings) -> int:
    return FORWARD_PASSES_PER_TRAINING_STEP + (RECOMPUTED_FORWARD_PASSES if model.memory_efficient_backprop else 0)


def validation_examples(settings: TaskSettings, train: TrainSettings, segments: int) -> int:
    """What rmt.train validates on: eval_examples (all: null) of the stored validation split
    at a curriculum length, or as many generated at another (valid_length_factor > 1)."""
    wanted = train.eval_examples or settings.data.valid_examples
    stored = segments in settings.data.curriculum_segments
    return min(wanted, settings.data.valid_examples) if stored else wanted


def stage_cost(settings: TaskSettings, segments: int, forward: ForwardModel) -> StageCost:
    train = settings.train_for(segments)
    unmodelled = unmodelled_settings(settings.model, train)
    if unmodelled:
        raise ValueError(f"{settings.task}, stage {segments}: {', '.join(unmodelled)} not modelled; this estimate "
                         "assumes full back-propagation through the stage's own length, as the paper trains")
    validation_segments = segments * train.valid_length_factor
    examples = validation_examples(settings, train, validation_segments)
    validations = math.ceil(train.max_steps / train.eval_every)  # every eval_every steps, and at max_steps
    passes = forward_passes_per_step(settings.model)
    return StageCost(
        segments=segments, steps=train.max_steps, batch_size=train.batch_size, forward_passes=passes,
        step_flops=passes * train.batch_size * forward.flops(segments),
        validations=validations, validation_examples=examples, validation_segments=validation_segments,
        validation_flops=validations * examples * forward.flops(validation_segments),
    )


def length_cost(segments: int, examples: int, forward: ForwardModel) -> LengthCost:
    return LengthCost(segments, segments * forward.layout.segment_length, examples, examples * forward.flops(segments))


def evaluation_costs(settings: TaskSettings, forward: ForwardModel) -> list[LengthCost]:
    """`rmt evaluate` of the last stage: every test length, with the dataset's example counts."""
    lengths = settings.evaluate.segments or settings.data.test_segments
    return [length_cost(n, settings.data.test_examples_at(n), forward) for n in sorted(lengths)]


def grid_costs(settings: TaskSettings, forward: ForwardModel) -> list[LengthCost]:
    """`rmt evaluate --grid` of ONE stage's checkpoint (every stage gets one)."""
    grid = settings.evaluate
    return [length_cost(n, min(settings.data.test_examples_at(n), grid.grid_examples), forward)
            for n in grid.grid_segments]


@dataclass(frozen=True)
class TaskCost:
    task: str
    forward: ForwardModel
    stages: list[StageCost]
    evaluation: list[LengthCost]
    grid_per_stage: list[LengthCost]

    @property
    def training_flops(self) -> int:
        return sum(stage.flops for stage in self.stages)

    @property
    def evaluation_flops(self) -> int:
        return sum(length.flops for length in self.evaluation)

    @property
    def grid_flops_per_stage(self) -> int:
        return sum(length.flops for length in self.grid_per_stage)

    @property
    def grid_flops(self) -> int:
        return len(self.stages) * self.grid_flops_per_stage

    @property
    def flops(self) -> int:
        return self.training_flops + self.evaluation_flops + self.grid_flops


def task_cost(settings: TaskSettings) -> TaskCost:
    forward = forward_model(settings)
    return TaskCost(settings.task, forward, [stage_cost(settings, n, forward) for n in settings.curriculum],
                    evaluation_costs(settings, forward), grid_costs(settings, forward))


# ---------------------------------------------------------------- the profile check
def longest_jobs(costs: list[TaskCost]) -> dict[str, int]:
    """The FLOPs of the longest job of each GPU rule (one train job per stage, one evaluate
    job per task and seed, one grid job per stage)."""
    return {"train": max(stage.flops for cost in costs for stage in cost.stages),
            "evaluate": max(cost.evaluation_flops for cost in costs),
            "grid": max(cost.grid_flops_per_stage for cost in costs)}


def profile_check(costs: list[TaskCost], resources: dict[str, dict], mfu: float) -> list[dict]:
    """Each GPU rule's runtime (minutes) against its longest job on `paper_hardware`."""
    rows = []
    for rule, flops in longest_jobs(costs).items():
        hardware = paper_hardware(rule, resources, mfu)
        minutes = hardware.hours(flops) * 60
        runtime = resources[rule]["runtime"]
        rows.append({"rule": rule, "gpus": hardware.count, "runtime_minutes": runtime,
                     "estimate_minutes": round(minutes, 1), "covers": runtime >= minutes})
    return rows


# ---------------------------------------------------------------- Markdown
def flops_text(flops: float) -> str:
    return f"{flops:.3g}"


def hours_text(hours: float) -> str:
    return f"{hours:,.1f}" if hours >= 0.1 else f"{hours:.2f}"


def row(*cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def header(*titles: str) -> list[str]:
    return [row(*titles), row(*("---" for _ in titles))]


def training_table(cost: TaskCost, train_on: Hardware, single: Hardware) -> list[str]:
    lines = header("stage", "segments", "steps (max)", "FLOPs/step", f"s/step, {train_on.label}", "validations",
                   "validation FLOPs", "stage FLOPs", f"h, {train_on.label}", f"h, {single.label}")
    for stage in cost.stages:
        lines.append(row(stage.segments, stage.segments, f"{stage.steps:,}", flops_text(stage.step_flops),
                         f"{train_on.hours(stage.step_flops) * 3600:.2f}",
                         f"{stage.validations} x {stage.validation_examples:,} at {stage.validation_segments}",
                         flops_text(stage.validation_flops), flops_text(stage.flops),
                         hours_text(train_on.hours(stage.flops)), hours_text(single.hours(stage.flops))))
    total = cost.training_flops
    lines.append(row("**all**", "", f"{sum(s.steps for s in cost.stages):,}", "", "", "", "", flops_text(total),
                     hours_text(train_on.hours(total)), hours_text(single.hours(total))))
    return lines


def evaluation_table(lengths: list[LengthCost], evaluate_on: Hardware, single: Hardware) -> list[str]:
    lines = header("segments", "tokens", "examples", "FLOPs", f"h, {evaluate_on.label}", f"h, {single.label}")
    for length in lengths:
        lines.append(row(length.segments, f"{length.tokens:,}", f"{length.examples:,}", flops_text(length.flops),
                         hours_text(evaluate_on.hours(length.flops)), hours_text(single.hours(length.flops))))
    total = sum(length.flops for length in lengths)
    lines.append(row("**all**", "", f"{sum(length.examples for length in lengths):,}", flops_text(total),
                     hours_text(evaluate_on.hours(total)), hours_text(single.hours(total))))
    return lines


def summary_table(costs: list[TaskCost], train_on: Hardware, evaluate_on: Hardware, single: Hardware) -> list[str]:
    lines = header("task", f"longest stage, {train_on.label}", f"all stages, {train_on.label}",
                   f"all stages, {single.label}", f"evaluation, {evaluate_on.label}", f"evaluation, {single.label}",
                   f"grids, {single.label}")

    def hours_row(name: str, longest_stage: int, training: int, evaluation: int, grids: int) -> str:
        return row(name, hours_text(train_on.hours(longest_stage)), hours_text(train_on.hours(training)),
                   hours_text(single.hours(training)), hours_text(evaluate_on.hours(evaluation)),
                   hours_text(single.hours(evaluation)), hours_text(single.hours(grids)))

    for cost in costs:
        lines.append(hours_row(cost.task, max(stage.flops for stage in cost.stages), cost.training_flops,
                               cost.evaluation_flops, cost.grid_flops))
    lines.append(hours_row("**all tasks**", longest_jobs(costs)["train"], sum(cost.training_flops for cost in costs),
                           sum(cost.evaluation_flops for cost in costs), sum(cost.grid_flops for cost in costs)))
    return lines


def summary_caption(train_on: Hardware, single: Hardware) -> str:
    return (f"Hours per seed at {train_on.mfu:.0%} MFU ({train_on.gpu.name} {train_on.precision}, "
            f"{single.gpu.name} {single.precision}), every stage at its max_steps (an upper bound).")


def assumptions(costs: list[TaskCost], configs: list[Path], seeds: list[int], hardware: list[Hardware]) -> list[str]:
    forward = costs[0].forward
    shape = forward.shape
    first = costs[0].stages[0]
    lines = [
        f"Configuration: {' + '.join(_shown(path) for path in configs)}; every figure is per seed "
        f"(seeds {seeds}: multiply by {len(seeds)}). Estimates from the analytic FLOP model and the stated "
        "utilisation, not measurements.",
        "",
        f"- Backbone {shape.name} ({shape.num_layers} layers, width {shape.hidden_size}, {shape.num_heads} heads, "
        f"feed-forward {shape.ffn_dim}), from {forward.shape_source}; {forward.head} head over "
        f"{forward.num_labels} classes.",
        f"- Segment: {forward.layout.describe()}. FLOPs (rmt/profile/flops.py): {forward.accounting.describe()}; "
        f"one segment's forward pass: {flops_text(forward.flops(1))} FLOPs.",
        f"- Training step: {first.forward_passes} x forward FLOPs (forward + backward through every segment) "
        f"x segments x batch {first.batch_size}. Validation, evaluation and grid: forward only.",
        "- Steps are max_steps: an upper bound; early stopping (patience, target accuracy) can end a stage "
        "sooner, which also skips its remaining validations.",
    ]
    for item in hardware:
        peak = item.gpu.peak_tflops[item.precision]
        lines.append(f"- {item.label}: {peak:g} TFLOP/s {item.precision} peak each ({item.gpu.source}) at "
                     f"{item.mfu:.0%} MFU.")
    lines.append("- Several GPUs: perfect data-parallel scaling assumed. Not counted: data loading, start-up, "
                 "checkpoints, the data and profile rules.")
    return lines


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(costs: list[TaskCost], configs: list[Path], seeds: list[int], check: list[dict], *, train_on: Hardware,
           evaluate_on: Hardware, single: Hardware, profile: Path) -> str:
    lines = ["# The paper's recipe on GPUs: estimated cost", "",
             *assumptions(costs, configs, seeds, [train_on, single]), "",
             "## Hours per task", "", *summary_table(costs, train_on, evaluate_on, single)]
    for cost in costs:
        grid = cost.grid_per_stage
        lines += ["", f"## {cost.task}", "", "Training, one job per stage:", "",
                  *training_table(cost, train_on, single), "",
                  "Evaluation of the last stage, one job:", "", *evaluation_table(cost.evaluation, evaluate_on, single),
                  "", f"Generalization grid, one job per stage: {grid[0].segments}..{grid[-1].segments} segments, "
                  f"{flops_text(cost.grid_flops_per_stage)} FLOPs per stage "
                  f"({hours_text(evaluate_on.hours(cost.grid_flops_per_stage))} h on {evaluate_on.label})."]
    lines += ["", f"## Workflow profile ({_shown(profile)})", "",
              f"Each rule's runtime against its longest job on {train_on.gpu.name}s (train on the profile's GPUs, "
              "the others on one):", "",
              *header("rule", "GPUs", "runtime (min)", "longest job (min)", "covers")]
    lines += [row(r["rule"], r["gpus"], r["runtime_minutes"], f"{r['estimate_minutes']:,.0f}",
                  "yes" if r["covers"] else "**no**") for r in check]
    return "\n".join(lines) + "\n"


def as_json(costs: list[TaskCost], check: list[dict], hardware: dict[str, Hardware]) -> dict:
    """The numbers behind the tables (FLOPs as exact integers)."""
    return {
        "hardware": {name: {**asdict(item), "label": item.label} for name, item in hardware.items()},
        "tasks": {cost.task: {
            "segment_forward_flops": cost.forward.flops(1),
            "stages": [{**asdict(stage), "training_flops": stage.training_flops, "flops": stage.flops}
                       for stage in cost.stages],
            "evaluation": [asdict(length) for length in cost.evaluation],
            "grid_per_stage": [asdict(length) for length in cost.grid_per_stage],
            "training_flops": cost.training_flops, "evaluation_flops": cost.evaluation_flops,
            "grid_flops": cost.grid_flops, "flops": cost.flops,
        } for cost in costs},
        "profile": check,
    }


def main(
    configs: list[Path] = typer.Option(list(CONFIGS), "--config", help="params.yaml, then overlays laid over it."),
    mfu: float = typer.Option(0.35, min=0.01, max=1.0, help="Model FLOP utilisation: the achieved fraction of "
                              "the datasheet peak."),
    a100_precision: str = typer.Option(RMT_PRECISION, help="The A100's precision: fp32 (what rmt trains in), tf32 or bf16."),
    profile: Path = typer.Option(GPU_PROFILE, help="The workflow profile: its GPUs per rule, and the runtimes to check."),
    summary: bool = typer.Option(False, "--summary", help="Print the hours per task only (the README's table)."),
    output: Path | None = typer.Option(None, help="Also write the report: .md (the tables) or .json (the numbers)."),
):
    if a100_precision not in A100_40GB.peak_tflops:
        raise typer.BadParameter(f"choose from {', '.join(A100_40GB.peak_tflops)}", param_hint="--a100-precision")
    config = load_config(*configs)
    try:
        costs = [task_cost(config.for_task(task)) for task in config.tasks]
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from None
    resources = profile_resources(profile)
    hardware = {"train": paper_hardware("train", resources, mfu), "evaluate": paper_hardware("evaluate", resources, mfu),
                "single": Hardware(A100_40GB, 1, a100_precision, mfu)}
    check = profile_check(costs, resources, mfu)
    text = report(costs, configs, config.seeds, check, train_on=hardware["train"], evaluate_on=hardware["evaluate"],
                  single=hardware["single"], profile=profile)
    if summary:
        print("\n".join(summary_table(costs, hardware["train"], hardware["evaluate"], hardware["single"])))
        print("\n" + summary_caption(hardware["train"], hardware["single"]))
    else:
        print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(as_json(costs, check, hardware), indent=2) + "\n" if output.suffix == ".json"
                          else text)
        typer.echo(f"written {output}", err=True)


if __name__ == "__main__":
    typer.run(main)
