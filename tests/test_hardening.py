"""The edges (issue 16): nothing a command did not write is replaced, no file is unpickled
beyond tensors, one trainer per stage, damaged files are named, not tracebacks."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rmt.data.dataset import DataConfig, build_dataset
from rmt.model.base import read_checkpoint_config
from rmt.settings import ModelSettings, TrainSettings
from rmt.layout import StageFiles
from rmt.train import StageBusy, train_stage
from rmt.utils import OutputConflict, atomic_directory, write_atomic

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
MODEL = ModelSettings(pretrained=False, backbone_overrides=TINY_BERT, num_memory_tokens=2)
TRAIN = TrainSettings(learning_rate=1e-3, warmup_steps=0, max_steps=4, batch_size=4, eval_every=2, eval_examples=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = DataConfig(task="memorize", segment_length=24, train_examples=16, valid_examples=8,
                        curriculum_segments=[1], test_segments=[1], samples=0)
    return build_dataset(config, tmp_path_factory.mktemp("data") / "memorize", progress=False)


@pytest.fixture(scope="module")
def stage(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage") / "stage-1"
    train_stage(data_dir=data, segments=1, output=folder, model=MODEL, train=TRAIN, progress=False)
    return folder


def test_a_dataset_never_replaces_a_users_file_or_folder(tmp_path):
    config = DataConfig(task="memorize", segment_length=24, train_examples=4, valid_examples=4,
                        curriculum_segments=[1], test_segments=[1], samples=0)
    folder, file = tmp_path / "mine", tmp_path / "notes.txt"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    file.write_text("precious")
    for target in (folder, file):
        with pytest.raises(OutputConflict, match=f"{target}.*not a dataset written by rmt.*choose another output"):
            build_dataset(config, target, progress=False)
    assert (folder / "keep.txt").read_text() == "precious" and file.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]  # no staging folder left
    # Its own earlier output is replaced.
    build_dataset(config, tmp_path / "data", progress=False)
    build_dataset(config.model_copy(update={"seed": 1}), tmp_path / "data", progress=False)
    assert '"seed": 1' in (tmp_path / "data" / "config.json").read_text()


def test_atomic_writes_refuse_what_they_do_not_recognise(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputConflict, match="existing folder"):
        write_atomic(tmp_path / "folder", "text")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "theirs.txt").write_text("theirs")
    with pytest.raises(OutputConflict):
        with atomic_directory(tmp_path / "other", marker="mine.json") as staging:
            (staging / "mine.json").write_text("{}")
    # A folder that appeared while the new one was being written is not replaced either.
    with pytest.raises(OutputConflict):
        with atomic_directory(tmp_path / "late", marker="mine.json") as staging:
            (staging / "mine.json").write_text("{}")
            (tmp_path / "late").mkdir()
            (tmp_path / "late" / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "late", "other"]
    # An empty folder holds nothing to lose: Snakemake makes its jobs' output folders first.
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty", marker="mine.json") as staging:
        (staging / "mine.json").write_text("{}")
    assert (tmp_path / "empty" / "mine.json").is_file()


def test_a_stage_never_trains_into_a_users_folder(data, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 8}')  # a Hugging Face model, say
    (tmp_path / "model" / "best").mkdir()
    with pytest.raises(OutputConflict, match="not a curriculum stage written by rmt"):
        train_stage(data_dir=data, segments=1, output=tmp_path / "model", model=MODEL, train=TRAIN, progress=False)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["best", "config.json"]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_training_state_is_refused_and_runs_nothing(data, stage, tmp_path):
    copy = tmp_path / "stage-1"
    subprocess.run(["cp", "-r", str(stage), str(copy)], check=True)
    state = copy / "checkpoints" / "last" / StageFiles.TRAINING_STATE
    genuine = torch.load(state, weights_only=True)  # what rmt writes loads without unpickling objects
    assert genuine["counters"]["step"] == TRAIN.max_steps
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": RunsCode(marker)}, state)
    with pytest.raises(ValueError, match=f"{state} is not a training state rmt can resume from"):
        train_stage(data_dir=data, segments=1, output=copy, model=MODEL, train=TRAIN, progress=False)
    assert not marker.exists()
    state.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(ValueError, match="not a training state"):
        train_stage(data_dir=data, segments=1, output=copy, model=MODEL, train=TRAIN, progress=False)


def test_a_second_trainer_on_the_same_stage_is_refused_with_the_holders_pid(data, tmp_path):
    from filelock import SoftFileLock

    output = tmp_path / "stage-1"
    output.mkdir()
    holder = SoftFileLock(output / StageFiles.LOCK)
    with holder:
        with pytest.raises(StageBusy, match=f"being trained by another process \\(PID {os.getpid()}"):
            train_stage(data_dir=data, segments=1, output=output, model=MODEL, train=TRAIN, progress=False)
    assert sorted(p.name for p in output.iterdir()) == []  # the refused trainer wrote nothing


def test_the_lock_of_a_killed_trainer_is_taken_over(data, tmp_path):
    output = tmp_path / "stage-1"
    output.mkdir()
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from filelock import SoftFileLock; "
        "lock = SoftFileLock(sys.argv[1]); lock.acquire(); os.kill(os.getpid(), signal.SIGKILL)"), str(output / StageFiles.LOCK)])
    assert killed.returncode == -signal.SIGKILL and (output / StageFiles.LOCK).exists()
    metrics = train_stage(data_dir=data, segments=1, output=output, model=MODEL, train=TRAIN, progress=False)
    assert metrics["steps"] == TRAIN.max_steps and not (output / StageFiles.LOCK).exists()


@pytest.mark.parametrize("damage", ["truncated weights", "garbage weights", "rmt config types", "backbone config"])
def test_a_damaged_checkpoint_is_named_not_a_traceback(stage, tmp_path, damage):
    checkpoint = tmp_path / "best"
    subprocess.run(["cp", "-r", str(stage / "best"), str(checkpoint)], check=True)
    if damage == "truncated weights":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage weights":
        (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file at all")
    elif damage == "rmt config types":
        config = json.loads((checkpoint / "config.json").read_text())
        config["rmt_config"]["num_labels"] = "six"
        (checkpoint / "config.json").write_text(json.dumps(config))
    else:
        (checkpoint / "config.json").write_text('{"model_type": "bert", "hidden_size":')
    with pytest.raises(ValueError, match=f"The checkpoint {checkpoint} is damaged or incomplete.*train its stage again"):
        read_checkpoint_config(checkpoint)


def test_a_full_disk_is_named_with_the_fix_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import numpy as np
    from typer.testing import CliRunner

    from rmt.cli import app

    def full_disk(handle, array, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data"))

    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    result = CliRunner().invoke(app, ["data", "generate", "memorize", str(tmp_path / "data"), "--set",
                                      "data.train_examples=4", "--set", "data.valid_examples=4", "--set",
                                      "data.curriculum_segments=[1]", "--set", "data.samples=0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "No space left on device" in result.output and "free disk space" in result.output
    assert list(tmp_path.iterdir()) == []  # the half-written dataset is gone, no staging folder left


def test_a_read_only_location_is_named_with_the_fix():
    import errno

    from rmt.cli import describe_error

    message = describe_error(OSError(errno.EROFS, "Read-only file system", "/mnt/results/x.csv"))
    assert "/mnt/results/x.csv" in message and "write the output elsewhere" in message
    message = describe_error(PermissionError(errno.EACCES, "Permission denied", "/data/memorize"))
    assert "/data/memorize" in message and "fix its permissions" in message


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def full_disk(self, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(Path, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "evaluation.csv", "task,accuracy\n")
    assert list(tmp_path.iterdir()) == []


def test_a_command_is_validated_against_its_own_task_only():
    """params.yaml's Reasoning trains stage 1 for longer (stage_train: {1: ...}); a Memorize
    command with another curriculum must not be refused for it."""
    from pathlib import Path

    from rmt.cli_common import task_settings

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    settings = task_settings([params], ["data.curriculum_segments=[2,3]"], "memorize")
    assert settings.curriculum == [2, 3]
