"""The `rmt` command."""

import json

import torch
from typer.testing import CliRunner

from rmt.cli import app
from rmt.peak_memory import PeakMemory

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(name in result.output for name in ("train", "evaluate", "report"))
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("rmt ")


def test_peak_memory_sees_a_short_lived_allocation():
    with PeakMemory() as meter:
        block = torch.ones(50_000_000)  # 200 MB, freed before the block ends
        del block
    assert meter.growth_mb >= 180
    assert meter.absolute_mb > meter.growth_mb + 50  # the peak itself: also the interpreter and torch


def test_benchmark_script_runs(tmp_path):
    """The benchmark's own measuring step (streaming against a plain loop), at a tiny size,
    so the script cannot silently rot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "model_bench.py"
    completed = subprocess.run(
        [sys.executable, str(script), "child-stream-overhead", "--segments", "2", "--batch", "1", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["segments"] == 2 and result["tokens_per_example"] == 2 * 499
    assert result["plain_wall_seconds"] > 0 and result["wall_ratio"] > 0


def test_progress_in_a_log_file_is_a_line_per_update(capsys):
    from rmt.utils import progress_bar

    for _ in progress_bar(range(3), desc="work", mininterval=0):
        pass
    log = capsys.readouterr().err
    assert "\r" not in log and log.count("\n") >= 2 and "3/3" in log.splitlines()[-1]


def test_nested_progress_in_a_log_file_has_no_terminal_controls(monkeypatch):
    """A bar inside a bar (lengths, then the batches of one length): on a terminal tqdm moves
    the cursor between them; in a log file each keeps to lines of its own, and the inner bar's
    last line stays although it is left=False (a log cannot erase it)."""
    import io
    import sys

    from rmt.utils import progress_bar

    log = io.StringIO()  # not a terminal: isatty() is False
    monkeypatch.setattr(sys, "stderr", log)
    for length in progress_bar([1, 2], desc="lengths", mininterval=0):
        with progress_bar(total=4, desc=f"segments={length}", leave=False, mininterval=0) as inner:
            for _ in range(2):
                inner.update(2)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(line.strip() == line and line for line in lines)
    for length in (1, 2):
        counts = [line.split("|")[2].split()[0] for line in lines if line.startswith(f"segments={length}:")]
        # Every update, then the closing line (the same count again: the bar is not erased).
        assert list(dict.fromkeys(counts)) == ["0/4", "2/4", "4/4"] and counts[-1] == "4/4"
    assert "2/2" in [line for line in lines if line.startswith("lengths")][-1]


def test_help_keeps_bracketed_words():
    result = CliRunner().invoke(app, ["profile", "attention", "--help"])
    assert "[memory, tokens]" in result.output and "[CLS]" in result.output


def _commands(group, prefix=()):
    """(path, click command) of every command under `group`, e.g. (("data", "show"), ...)."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _click_app():
    import typer

    return typer.main.get_command(app)


def test_every_option_and_argument_has_help():
    missing = [f"rmt {' '.join(path)} {param.name}" for path, command in _commands(_click_app())
               for param in command.params if not (getattr(param, "help", None) or "").strip()]
    assert missing == []


# Which commands read the pipeline configuration, and which run a model: each takes the one
# shared definition of --config/--set, or of --device.
READ_SETTINGS = {("train",), ("evaluate",), ("report",), ("data", "generate"), ("profile", "memory")}
RUN_A_MODEL = {("train",), ("evaluate",), ("profile", "attention"), ("profile", "memory")}


def test_settings_and_device_options_are_the_shared_ones_wherever_they_make_sense():
    from rmt.cli_common import CONFIG_HELP, DEVICE_HELP, SET_HELP

    commands = dict(_commands(_click_app()))
    options = {path: {param.opts[0]: param for param in command.params} for path, command in commands.items()}
    for path in READ_SETTINGS:
        assert options[path]["--config"].help == CONFIG_HELP and options[path]["--config"].multiple, path
        assert options[path]["--set"].help == SET_HELP and options[path]["--set"].multiple, path
    for path in RUN_A_MODEL:
        assert options[path]["--device"].help == DEVICE_HELP and options[path]["--device"].default is None, path
    # The others have no settings to override and no model to place.
    for path in set(commands) - READ_SETTINGS:
        assert "--set" not in options[path], path
    for path in set(commands) - RUN_A_MODEL:
        assert "--device" not in options[path], path
    for path in READ_SETTINGS | RUN_A_MODEL:
        shown = runner.invoke(app, [*path, "--help"], terminal_width=200).output
        assert ("--set" in shown) == (path in READ_SETTINGS) and ("--device" in shown) == (path in RUN_A_MODEL)


def test_device_option_is_the_configurations_device_setting():
    from rmt.cli_common import device_override, task_settings

    assert device_override("train", None) == []
    settings = task_settings([], device_override("train", "cuda:0"), "memorize")
    assert settings.train.device == "cuda:0"  # a string, though `cuda:0` could read as YAML otherwise
    later = task_settings([], ["train.device=cpu", *device_override("train", "auto")], "memorize")
    assert later.train.device == "auto"  # --device wins over --set, as --seed does
