"""The `rmt` command and the demo that `make reproduce` runs."""

import json

import pytest
import torch
from typer.testing import CliRunner

from rmt.cli import app
from rmt.memory import PeakMemory

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("rmt ")


def test_demo_trains_a_short_curriculum_and_streams(tmp_path):
    output = tmp_path / "summary.json"
    result = runner.invoke(
        app,
        ["demo", "--max-segments", "2", "--steps-per-stage", "150", "--stream-tokens", "3000",
         "--device", "cpu", "--output", str(output)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(output.read_text())
    assert [stage["segments"] for stage in summary["curriculum"]] == [1, 2]
    assert all(stage["accuracy"] >= 0.99 for stage in summary["curriculum"])
    assert summary["stream"]["segments"] == 3000 // 32 + 1
    assert summary["device"] == "cpu"
    assert "Streamed 3,000 tokens" in result.output


def test_demo_rejects_bad_settings_before_any_work(tmp_path):
    output = tmp_path / "summary.json"
    result = runner.invoke(app, ["demo", "--max-segments", "0", "--output", str(output)])
    assert result.exit_code != 0
    assert "max-segments" in result.output
    assert not output.exists()


@pytest.mark.slow
def test_demo_defaults_learn_the_whole_curriculum(tmp_path):
    output = tmp_path / "summary.json"
    result = runner.invoke(app, ["demo", "--stream-tokens", "20000", "--output", str(output)])
    assert result.exit_code == 0, result.output
    summary = json.loads(output.read_text())
    assert [stage["segments"] for stage in summary["curriculum"]] == list(range(1, 8))
    assert all(stage["accuracy"] >= 0.99 for stage in summary["curriculum"]), summary["curriculum"]


def test_peak_memory_sees_a_short_lived_allocation():
    with PeakMemory() as meter:
        block = torch.ones(50_000_000)  # 200 MB, freed before the block ends
        del block
    assert meter.growth_mb >= 180


def test_benchmark_script_runs(tmp_path):
    """The benchmark's measuring step, at a tiny size, so the script cannot silently rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "model_bench.py"
    completed = subprocess.run(
        [sys.executable, str(script), "child-stream-memory", "--segments", "4", "--batch", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["segments"] == 4 and result["tokens_per_example"] == 256
    assert result["peak_mb"] > 0
