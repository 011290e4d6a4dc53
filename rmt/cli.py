"""The `rmt` command: one subcommand per pipeline step, each a thin call into the library."""

from __future__ import annotations

from pathlib import Path

import typer

from rmt import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Recurrent Memory Transformer: a reproducibility pipeline (Bulatov et al. 2023).",
)


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
def demo(
    segment_length: int = typer.Option(32, min=1, help="Text tokens per segment."),
    max_segments: int = typer.Option(7, min=1, help="Last curriculum stage (segments)."),
    steps_per_stage: int = typer.Option(300, min=1, help="Step cap of each curriculum stage."),
    stream_tokens: int = typer.Option(200_000, min=1, help="Length of the streamed input."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    output: Path = typer.Option(Path("results/demo/summary.json"), help="Where the summary JSON goes."),
) -> None:
    """Train a small RMT with a 1 -> N segment curriculum, then stream a long input."""
    from rmt.demo import DemoSettings, run_demo

    settings = DemoSettings(
        segment_length=segment_length, max_segments=max_segments, steps_per_stage=steps_per_stage,
        stream_tokens=stream_tokens, seed=seed, device=device,
    )
    summary = run_demo(settings, output)
    typer.echo("\nCurriculum (validation accuracy on 256 fresh examples):")
    for stage in summary["curriculum"]:
        typer.echo(f"  {stage['segments']} segment(s): {stage['accuracy']:.1%} after {stage['steps']} steps, {stage['seconds']} s")
    typer.echo("Longer inputs than any seen in training:")
    for point in summary["extrapolation"]:
        typer.echo(f"  {point['segments']} segments: {point['accuracy']:.1%}")
    stream = summary["stream"]
    typer.echo(
        f"Streamed {stream['tokens']:,} tokens ({stream['segments']:,} segments) in {stream['seconds']} s, "
        f"{stream['tokens_per_second']:,} tokens/s, peak memory {stream['peak_memory_growth_mb']} MB above its start; "
        f"predicted class {stream['predicted']} (answer {stream['answer']})."
    )
    typer.echo(f"Summary: {output}")
