"""`rmt profile ...`: cost studies. Registered in rmt/cli.py as `app.add_typer(profile_app, name="profile")`.

Heavy imports (pandas, the estimator) happen inside the commands so that `rmt --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rmt.cli_common import ConfigFiles, Device, Overrides, device_override, pipeline_settings

profile_app = typer.Typer(no_args_is_help=True, help="Cost studies: analytic FLOPs, measured memory and time, attention maps.")


@profile_app.callback()
def _group() -> None:
    # A Typer with a single command would otherwise collapse into it: keep `profile flops`
    # the same whether the sub-app is called alone or registered under `rmt`.
    pass


def _split(values: list[str]) -> list[str]:
    """Repeated options and comma-separated lists alike: --models a,b --models c."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _shape(name: str):
    """A published OPT shape by name, or a local Hugging Face config (config.json or its folder)."""
    from rmt.profile.flops import TransformerShape, opt_shape

    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return TransformerShape.from_config(json.loads(path.read_text()), name=path.parent.name or path.stem)
    return opt_shape(name)


@profile_app.command("flops")
def flops(
    output: Path = typer.Option(Path("results/profile/flops.csv"), help="Grid to write: .csv (rows) or .json "
                                "(accounting, layout and rows)."),
    models: list[str] = typer.Option([], "--models", help="opt-125m, opt-1.3b, opt-6.7b, opt-30b, opt-175b, or a "
                                     "local config.json / model folder; repeat or comma-separate (default: all OPT)."),
    tokens: list[str] = typer.Option([], "--tokens", help="Input lengths, repeat or comma-separate "
                                     "(default: the paper's 512 ... 2,048,000)."),
    segment_length: int = typer.Option(512, min=1, help="RMT text tokens per segment."),
    memory_tokens: int = typer.Option(0, min=0, help="Memory positions added to every segment (the paper's "
                                      "FLOP study adds none: a segment is one 512-position pass)."),
    memory_writes: bool = typer.Option(False, "--memory-writes", help="Decoder layout: memory read AND written, "
                                       "2 x memory_tokens positions."),
    special_tokens: int = typer.Option(0, min=0, help="Special positions per segment (3 for the encoder's "
                                       "[CLS] [MEM]* [SEP] ... [SEP])."),
    embeddings: bool = typer.Option(False, "--embeddings/--no-embeddings", help="Count the input embedding as a "
                                    "one-hot matmul (appendix F) instead of a lookup."),
    logits: bool = typer.Option(True, "--logits/--no-logits", help="Count the vocabulary projection."),
    softmax: bool = typer.Option(True, "--softmax/--no-softmax", help="Count softmax (3 x heads x P^2 per layer)."),
) -> None:
    """Forward FLOPs of full attention and RMT on OPT shapes (the paper's Figure 3).

    Normalized to one 512-token full-attention pass; prints full-attention / RMT FLOPs at the longest input.
    """
    from rmt.profile.flops import Accounting, SegmentLayout, figure3_grid, ratios, write_grid

    lengths, shapes = _flops_lengths(tokens), _flops_shapes(models)
    accounting = Accounting(embeddings=embeddings, logits=logits, softmax=softmax)
    layout = SegmentLayout(segment_length=segment_length, num_memory_tokens=memory_tokens,
                           memory_writes=memory_writes, num_special_tokens=special_tokens)
    from rmt.tracking import pipeline_run

    params = {"models": [shape.name for shape in shapes], "tokens": sorted(set(lengths)),
              "accounting": accounting.describe(), "layout": layout.describe()}
    with pipeline_run("flops", name="profile/flops", params=params) as run:
        grid = figure3_grid(shapes, sorted(set(lengths)), layout=layout, accounting=accounting)
        try:
            path = write_grid(grid, output)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--output") from None
        longest = max(lengths)
        run.log_metrics({f"flops_ratio/{model}": ratio for model, ratio in ratios(grid, longest).items()},
                        step=longest)
        run.log_artifact(path)
    typer.echo(f"Accounting: {accounting.describe()}")
    typer.echo(f"RMT: {layout.describe()}")
    _echo_ratios(ratios(grid, longest), longest)
    typer.echo(f"Wrote {len(grid)} rows to {path}")


def _flops_lengths(tokens: list[str]) -> list[int]:
    from rmt.profile.flops import FIGURE3_TOKENS

    try:
        lengths = [int(value.replace("_", "")) for value in _split(tokens)] or list(FIGURE3_TOKENS)
    except ValueError as error:
        raise typer.BadParameter(f"{error}: give whole token counts, e.g. 512,2048000", param_hint="--tokens") from None
    if any(length < 1 for length in lengths):
        raise typer.BadParameter("token counts must be at least 1", param_hint="--tokens")
    return lengths


def _flops_shapes(models: list[str]) -> list:
    from rmt.profile.flops import OPT_MODELS

    try:
        return [_shape(name) for name in _split(models) or OPT_MODELS]
    except (ValueError, KeyError) as error:
        raise typer.BadParameter(str(error), param_hint="--models") from None


def _echo_ratios(by_model: dict[str, float], longest: int) -> None:
    """Full attention / RMT at the longest input, beside the paper's where it gives one."""
    from rmt.profile.flops import PAPER_HEADLINE_RATIOS

    typer.echo(f"Full attention / RMT forward FLOPs at {longest:,} tokens:")
    for model, ratio in by_model.items():
        paper = PAPER_HEADLINE_RATIOS.get(model) if longest == 2_048_000 else None
        note = f"   (paper ~{paper:g}x, {ratio / paper - 1:+.1%})" if paper else ""
        typer.echo(f"  {model:>10}: {ratio:8.1f}x{note}")


@profile_app.command("attention")
def attention(
    checkpoint: Path = typer.Option(..., help="A trained stage's best/ checkpoint."),
    data: Path = typer.Option(..., help="Its dataset directory (a test example is drawn from it)."),
    output: Path = typer.Option(..., help="JSON to write (rmt report draws it)."),
    segments: int = typer.Option(4, min=2, help="Segments of the example."),
    index: int | None = typer.Option(None, min=0, help="Test example (default: one with its facts in different "
                                     "segments, none in the last)."),
    device: Device = None,
) -> None:
    """Attention of \\[CLS] and memory over \\[memory, tokens] per segment (the paper's Figure 6)."""
    from rmt.checkpoint import check_fits
    from rmt.data.dataset import TaskDataset
    from rmt.profile.attention import write_attention_maps
    from rmt.tracking import pipeline_run
    from rmt.utils import resolve_device

    check_fits(checkpoint, TaskDataset(data), option="--checkpoint", same_segment_length=True)
    torch_device = resolve_device(device or "auto")  # a device the machine lacks fails before the run opens
    params = {"checkpoint": str(checkpoint), "data": str(data), "segments": segments, "index": index}
    with pipeline_run("attention", name="profile/attention", params=params) as run:
        path = write_attention_maps(output, checkpoint=checkpoint, data_dir=data, segments=segments, index=index,
                                    device=torch_device)
        run.log_artifact(path)
    result = json.loads(path.read_text())
    typer.echo(f"{result['task']} example {result['example']}: facts {result['facts']}, question "
               f"{result['question']!r}, answer {result['answer']}, predicted {result['predicted']}")
    typer.echo(f"Wrote {path}")


@profile_app.command("memory")
def memory(
    output: Path = typer.Option(Path("results/profile/memory"), help="Folder to write: inference.csv, "
                                "training.csv, summary.json."),
    task: str | None = typer.Option(None, help="Profile this task's model (default: the configuration's first)."),
    device: Device = None,
    configs: ConfigFiles = [],
    overrides: Overrides = [],
) -> None:
    """Measured peak memory and time: RMT streaming against full attention over the same
    backbone (512 to 2,048,000 tokens; full attention within a budget, projected beyond),
    and one training step against segments, plain BPTT against memory-efficient backprop.
    The configuration gives the task's model and the `profile:` section."""
    from rmt.profile.memory import PROFILE_MARKER, Budget, profile_memory, write_profile
    from rmt.tracking import pipeline_run
    from rmt.utils import claim_output, has_marker, resolve_device

    config = pipeline_settings(configs, [*overrides, *device_override("profile", device)])
    task = task or next(iter(config.tasks))
    if task not in config.tasks:
        raise typer.BadParameter(f"{task!r} is not a task of the configuration ({', '.join(config.tasks)})",
                                 param_hint="--task")
    settings, profile = config.for_task(task), config.profile
    claim_output(output, kind="a memory profile", ours=has_marker(PROFILE_MARKER))  # before minutes of work
    resolve_device(profile.device)  # likewise a device the machine lacks (each measurement resolves it again)
    budget = Budget(memory_mb=profile.memory_budget_mb or Budget.default_memory_mb(), seconds=profile.max_seconds)
    params = {"task": task, "model": settings.model.model_dump(), "segment_length": settings.data.segment_length,
              "profile": profile.model_dump(), "budget": {"memory_mb": budget.memory_mb, "seconds": budget.seconds}}
    with pipeline_run("memory", name="profile/memory", params=params, tags={"rmt.task": task}) as run:
        result = profile_memory(
            model=settings.model, segment_length=settings.data.segment_length, tokens=profile.tokens,
            full_attention=profile.full_attention, budget=budget, batch_size=profile.batch_size,
            train_segments=profile.train_segments, train_batch_size=profile.train_batch_size,
            train_steps=profile.train_steps, device=profile.device)
        paths = write_profile(result, output)
        for row in result.inference:
            if row["measured"]:
                run.log_metrics({f"peak_memory_mb/{row['method']}": row["peak_memory_mb"],
                                 f"us_per_token/{row['method']}": row["us_per_token"]}, step=row["tokens"])
        for row in result.training:
            run.log_metrics({f"train_peak_memory_mb/{row['backprop']}": row["peak_memory_mb"],
                             f"train_step_seconds/{row['backprop']}": row["step_seconds"]}, step=row["segments"])
        if result.summary["flat_memory_ratio"]:
            run.log_metrics({"flat_memory_ratio": result.summary["flat_memory_ratio"]["ratio"]},
                            step=result.summary["flat_memory_ratio"]["tokens"])
        run.log_artifact(output)
    _print_memory_summary(result)
    typer.echo(f"Wrote {', '.join(map(str, paths))}")


def _print_memory_summary(result) -> None:
    typer.echo(f"{'method':>11} {'tokens':>10} {'peak MB':>9} {'seconds':>9} {'us/token':>9}")
    for row in result.inference:
        note = "" if row["measured"] else "  (projected)"
        typer.echo(f"{row['method']:>11} {row['tokens']:>10,} {row['peak_memory_mb']:>9.1f} {row['seconds']:>9.3f} "
                   f"{row['us_per_token']:>9.2f}{note}")
    for method, crossover in result.summary["crossover"].items():
        typer.echo(f"RMT cheaper than {method} from {crossover['memory_from_tokens']} tokens in memory, from "
                   f"{crossover['time_from_tokens']} tokens in time (measured to {crossover['longest_measured_tokens']:,})")
    flat = result.summary["flat_memory_ratio"]
    if flat:
        typer.echo(f"RMT peak memory at {flat['tokens']:,} tokens / at {flat['reference_tokens']:,}: {flat['ratio']:.3f}")
    typer.echo(f"{'segments':>8} {'backprop':>16} {'peak MB':>9} {'step s':>8}")
    for row in result.training:
        typer.echo(f"{row['segments']:>8} {row['backprop']:>16} {row['peak_memory_mb']:>9.1f} {row['step_seconds']:>8.3f}")
