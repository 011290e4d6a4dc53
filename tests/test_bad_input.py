"""Bad input, tried as a new user would, across every command (issue 16). For each case:
the command fails (exit code != 0), its message names the bad value and the fix, it shows
no traceback, and every file that was there before is unchanged, with nothing added."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rmt.cli import app
from rmt.data.dataset import DataConfig, build_dataset
from rmt.settings import ModelSettings, TrainSettings
from rmt.layout import StageFiles
from rmt.train import train_stage

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
TINY_YAML = ("model: {pretrained: false, num_memory_tokens: 2, backbone_overrides: {num_hidden_layers: 1, "
             "hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}\n"
             "train: {max_steps: 2, eval_every: 2, batch_size: 4, eval_examples: 4}\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny memorize dataset, one trained stage, and the same task at another segment length."""
    root = tmp_path_factory.mktemp("built")
    small = dict(train_examples=8, valid_examples=4, curriculum_segments=[1], test_segments=[1, 2], samples=0)
    build_dataset(DataConfig(task="memorize", segment_length=24, **small), root / "data", progress=False)
    build_dataset(DataConfig(task="memorize", segment_length=40, **small), root / "data-40", progress=False)
    build_dataset(DataConfig(task="detect_and_memorize", segment_length=24, **small), root / "other-task",
                  progress=False)
    train_stage(data_dir=root / "data", segments=1, output=root / "stage-1",
                model=ModelSettings(pretrained=False, backbone_overrides=TINY_BERT, num_memory_tokens=2),
                train=TrainSettings(max_steps=2, eval_every=2, batch_size=4, eval_examples=4), progress=False)
    (root / "tiny.yaml").write_text(TINY_YAML)
    return root


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]  # {root}: the built fixtures, {work}: the case's own folder
    names: str  # what the message must mention: the bad value
    fix: str  # ... and words of the fix (a regular expression, case-insensitive)
    prepare: str | None = None  # a function below that damages or adds files first
    store: str | None = None  # MLFLOW_TRACKING_URI for the case ({work} is formatted)


def _damage_truncated_weights(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1" / "best", work / "best")
    weights = work / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])


def _damage_garbage_weights(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1" / "best", work / "best")
    (work / "best" / "model.safetensors").write_bytes(b"\x00garbage" * 10)


def _damage_rmt_config(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1" / "best", work / "best")
    _edit_config(work / "best", "rmt_config", num_labels="six")


def _damage_backbone_config(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1" / "best", work / "best")
    _edit_config(work / "best", "backbone_config", hidden_size="wide")


def _edit_config(checkpoint: Path, part: str, **values) -> None:
    """Change values of the RMT's or the backbone's part of a checkpoint's config.json."""
    config = json.loads((checkpoint / "config.json").read_text())
    config[part].update(values)
    (checkpoint / "config.json").write_text(json.dumps(config))


def _damage_card(work: Path, root: Path) -> None:
    shutil.copytree(root / "data", work / "data")
    card = work / "data" / "card.json"
    card.write_text(card.read_text()[:50])


def _damage_tokens(work: Path, root: Path) -> None:
    shutil.copytree(root / "data", work / "data")
    tokens = work / "data" / "train" / "segments-1" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:200])


def _damage_manifest(work: Path, root: Path) -> None:
    shutil.copytree(root / "data", work / "data")
    (work / "data" / "test.json").write_text("[")


def _user_files(work: Path, root: Path) -> None:
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("precious")
    (work / "notes.txt").write_text("precious")
    (work / "table.csv").write_text("my,own\n1,2\n")
    (work / "metrics.json").write_text('{"mine": 1}')


def _crafted_state(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1", work / "stage-1")
    state = StageFiles(work / "stage-1").last / StageFiles.TRAINING_STATE
    torch.save({"optimizer": _RunsCode(str(work / "code-ran"))}, state)


def _corrupt_state(work: Path, root: Path) -> None:
    shutil.copytree(root / "stage-1", work / "stage-1")
    (work / "stage-1" / "checkpoints" / "last" / StageFiles.TRAINING_STATE).write_bytes(b"PK\x03\x04 truncated")


def _locked_stage(work: Path, root: Path) -> None:
    (work / "stage-1").mkdir()
    # A live holder: this very test process (its PID is alive, so the lock is not stale).
    from filelock import SoftFileLock

    _LOCKS.append(SoftFileLock(work / "stage-1" / StageFiles.LOCK))
    _LOCKS[-1].acquire()


def _garbage_store(work: Path, root: Path) -> None:
    (work / "mlflow.db").write_text("not an MLflow database\n")


def _bad_yaml(work: Path, root: Path) -> None:
    (work / "bad.yaml").write_text("train: {learning_rate: 1e-4\n")
    (work / "list.yaml").write_text("- just\n- a list\n")
    (work / "unknown.yaml").write_text("trian: {learning_rate: 0.1}\n")


_LOCKS: list = []


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


DATA, STAGE, CKPT, TINY = "{root}/data", "{root}/stage-1", "{root}/stage-1/best", "{root}/tiny.yaml"
TRAIN = ["train", "--data", DATA, "--segments", "1", "--config", TINY]
EVALUATE = ["evaluate", "--checkpoint", CKPT, "--data", DATA]

CASES = [
    # rmt data generate
    Case("generate: unknown task", ["data", "generate", "qa99", "{work}/d"], "qa99", "choose one of"),
    Case("generate: a user's folder", ["data", "generate", "memorize", "{work}/mine"], "mine", "choose another output",
         "_user_files"),
    Case("generate: a user's file", ["data", "generate", "memorize", "{work}/notes.txt"], "notes.txt",
         "choose another output", "_user_files"),
    Case("generate: --set without =", ["data", "generate", "memorize", "{work}/d", "--set", "data.seed"], "data.seed",
         "SECTION.KEY=VALUE"),
    Case("generate: --set without a section", ["data", "generate", "memorize", "{work}/d", "--set", "seed=1"],
         "seed=1", "SECTION.KEY=VALUE"),
    Case("generate: unknown setting", ["data", "generate", "memorize", "{work}/d", "--set", "data.colour=red"],
         "data.colour", "not permitted|extra"),
    Case("generate: segment length 0", ["data", "generate", "memorize", "{work}/d", "--set", "data.segment_length=0"],
         "data.segment_length", "greater than or equal to 1"),
    Case("generate: segment length text", ["data", "generate", "memorize", "{work}/d", "--set",
                                           "data.segment_length=wide"], "data.segment_length", "integer"),
    Case("generate: repeated curriculum length", ["data", "generate", "memorize", "{work}/d", "--set",
                                                  "data.curriculum_segments=[1,1]"], "curriculum_segments",
         "distinct"),
    Case("generate: no such noise file", ["data", "generate", "memorize", "{work}/d", "--set",
                                          "data.noise=/no/such/noise.txt"], "/no/such/noise.txt", "pydoc"),
    Case("generate: empty noise source", ["data", "generate", "memorize", "{work}/d", "--set", "data.noise=''"],
         "noise source", "pydoc"),
    Case("generate: unknown tokenizer", ["data", "generate", "memorize", "{work}/d", "--set",
                                         "data.tokenizer=no-org/no-tokenizer"], "no-org/no-tokenizer", "local|offline"),
    Case("generate: segments too short for reasoning", ["data", "generate", "reasoning", "{work}/d", "--set",
                                                        "data.segment_length=8"], "segment_length", "raise"),
    Case("generate: curriculum larger than the disk", ["data", "generate", "memorize", "{work}/d", "--set",
                                                       "data.curriculum_segments=[100000000]"], "GiB",
         "fewer or shorter"),
    Case("generate: missing config file", ["data", "generate", "memorize", "{work}/d", "--config", "{work}/no.yaml"],
         "no.yaml", "does not exist"),
    Case("generate: YAML syntax error", ["data", "generate", "memorize", "{work}/d", "--config", "{work}/bad.yaml"],
         "bad.yaml", "line 2", "_bad_yaml"),
    Case("generate: config not a mapping", ["data", "generate", "memorize", "{work}/d", "--config",
                                            "{work}/list.yaml"], "list.yaml", "mapping", "_bad_yaml"),
    Case("generate: misspelt section", ["data", "generate", "memorize", "{work}/d", "--config", "{work}/unknown.yaml"],
         "trian", "not permitted|extra", "_bad_yaml"),
    Case("generate: --set value not YAML", ["data", "generate", "memorize", "{work}/d", "--set", "data.noise=["],
         "data.noise", "quote"),
    Case("generate: stage_train outside the curriculum", ["data", "generate", "memorize", "{work}/d", "--set",
                                                          "stage_train.9={{max_steps: 5}}"], "[9]",
         "curriculum_segments"),
    # rmt train
    Case("train: no such data", ["train", "--data", "{work}/nodata", "--segments", "1", "--output", "{work}/s"],
         "nodata", "rmt data generate"),
    Case("train: data folder is not a dataset", ["train", "--data", "{work}/mine", "--segments", "1", "--output",
                                                 "{work}/s"], "mine", "rmt data generate", "_user_files"),
    Case("train: damaged data card", ["train", "--data", "{work}/data", "--segments", "1", "--output", "{work}/s",
                                      "--config", TINY], "data", "generate it again", "_damage_card"),
    Case("train: truncated token array", ["train", "--data", "{work}/data", "--segments", "1", "--output", "{work}/s",
                                          "--config", TINY], "segments-1", "generate the dataset", "_damage_tokens"),
    Case("train: damaged test manifest", ["train", "--data", "{work}/data", "--segments", "1", "--output", "{work}/s",
                                          "--config", TINY], "data", "generate it again", "_damage_manifest"),
    Case("train: a length the data lacks", [*TRAIN[:4], "3", *TRAIN[5:], "--output", "{work}/s"], "3 segments",
         "it has \\[1\\]"),
    Case("train: segments 0", [*TRAIN[:4], "0", *TRAIN[5:], "--output", "{work}/s"], "segments", "greater than or equal to 1"),
    Case("train: --init is not a checkpoint", [*TRAIN, "--output", "{work}/s", "--init", "{work}/mine"], "mine",
         "best/ folder", "_user_files"),
    Case("train: --init with truncated weights", [*TRAIN, "--output", "{work}/s", "--init", "{work}/best"], "best",
         "train its stage again", "_damage_truncated_weights"),
    Case("train: --init with garbage weights", [*TRAIN, "--output", "{work}/s", "--init", "{work}/best"], "best",
         "train its stage again", "_damage_garbage_weights"),
    Case("train: --init with a mistyped RMT config", [*TRAIN, "--output", "{work}/s", "--init", "{work}/best"], "best",
         "train its stage again", "_damage_rmt_config"),
    Case("train: --init with a mistyped backbone config", [*TRAIN, "--output", "{work}/s", "--init", "{work}/best"],
         "best", "train its stage again", "_damage_backbone_config"),
    Case("train: output is a user's folder", [*TRAIN, "--output", "{work}/mine"], "mine", "choose another output",
         "_user_files"),
    Case("train: output is a file", [*TRAIN, "--output", "{work}/notes.txt"], "notes.txt", "choose another output",
         "_user_files"),
    Case("train: negative learning rate", [*TRAIN, "--output", "{work}/s", "--set", "train.learning_rate=-1"],
         "train.learning_rate", "greater than 0"),
    Case("train: micro-batch does not divide the batch", [*TRAIN, "--output", "{work}/s", "--set",
                                                          "train.micro_batch_size=3"], "micro_batch_size",
         "must divide"),
    Case("train: min_steps beyond max_steps", [*TRAIN, "--output", "{work}/s", "--set", "train.min_steps=10"],
         "min_steps", "lower it or raise max_steps"),
    Case("train: a CUDA device this machine lacks", [*TRAIN, "--output", "{work}/s", "--set", "train.device=cuda:7"],
         "cuda:7", "use device 'auto'"),
    Case("train: --device this machine lacks", [*TRAIN, "--output", "{work}/s", "--device", "cuda:7"], "cuda:7",
         "use device 'auto'"),
    Case("train: a crafted resume state", [*TRAIN, "--output", "{work}/stage-1"], "training_state.pt",
         "delete", "_crafted_state"),
    Case("train: a corrupted resume state", [*TRAIN, "--output", "{work}/stage-1"], "training_state.pt",
         "delete", "_corrupt_state"),
    Case("train: a stage another trainer holds", [*TRAIN, "--output", "{work}/stage-1"], "PID", "wait for it",
         "_locked_stage"),
    Case("train: unknown backbone", [*TRAIN, "--output", "{work}/s", "--set", "model.backbone=no-org/no-model"],
         "no-org/no-model", "local"),
    # rmt evaluate
    Case("evaluate: no such checkpoint", ["evaluate", "--checkpoint", "{work}/nothing", "--data", DATA, "--output",
                                          "{work}/e.csv"], "nothing", "best/ folder"),
    Case("evaluate: truncated weights", ["evaluate", "--checkpoint", "{work}/best", "--data", DATA, "--output",
                                         "{work}/e.csv"], "best", "train its stage again", "_damage_truncated_weights"),
    Case("evaluate: no such data", [*EVALUATE[:3], "--data", "{work}/nodata", "--output", "{work}/e.csv"], "nodata",
         "rmt data generate"),
    Case("evaluate: other segment length", [*EVALUATE[:3], "--data", "{root}/data-40", "--output", "{work}/e.csv"],
         "40", "data.segment_length=24"),
    Case("evaluate: other task", [*EVALUATE[:3], "--data", "{root}/other-task", "--output", "{work}/e.csv"],
         "detect_and_memorize", "give a checkpoint of this task"),
    Case("evaluate: output is a folder", [*EVALUATE, "--output", "{work}/mine"], "mine", "choose another output",
         "_user_files"),
    Case("evaluate: output is a user's table", [*EVALUATE, "--output", "{work}/table.csv"], "table.csv",
         "choose another output", "_user_files"),
    Case("evaluate: metrics is a user's file", [*EVALUATE, "--output", "{work}/e.csv", "--metrics",
                                                "{work}/metrics.json"], "metrics.json", "choose another output",
         "_user_files"),
    Case("evaluate: negative segments", [*EVALUATE, "--output", "{work}/e.csv", "--segments", "-5"], "-5",
         "LOW-HIGH"),
    Case("evaluate: open range", [*EVALUATE, "--output", "{work}/e.csv", "--segments", "1-"], "1-", "LOW-HIGH"),
    Case("evaluate: zero segments", [*EVALUATE, "--output", "{work}/e.csv", "--segments", "0"], "'0'", "LOW-HIGH"),
    Case("evaluate: reversed range", [*EVALUATE, "--output", "{work}/e.csv", "--segments", "9-3"], "9-3", "LOW-HIGH"),
    Case("evaluate: batch size 0", [*EVALUATE, "--output", "{work}/e.csv", "--batch-size", "0"], "batch-size",
         "greater than or equal to 1"),
    Case("evaluate: --device this machine lacks", [*EVALUATE, "--output", "{work}/e.csv", "--device", "cuda:7"],
         "cuda:7", "use device 'auto'"),
    # rmt data show
    Case("show: not a dataset", ["data", "show", "{work}/mine"], "mine", "rmt data generate", "_user_files"),
    Case("show: unknown split", ["data", "show", DATA, "--split", "dev"], "dev", "train, valid, test"),
    Case("show: negative index", ["data", "show", DATA, "--index", "-1"], "index", "greater than or equal to 0"),
    Case("show: zero segments", ["data", "show", DATA, "--segments", "0"], "segments", "greater than or equal to 1"),
    # rmt profile
    Case("flops: token count text", ["profile", "flops", "--output", "{work}/f.csv", "--tokens", "lots"], "lots",
         "whole token counts"),
    Case("flops: unknown model", ["profile", "flops", "--output", "{work}/f.csv", "--models", "opt-9b"], "opt-9b",
         "opt-125m"),
    Case("flops: output is a folder", ["profile", "flops", "--output", "{work}/mine"], "mine",
         "choose another output|\\.csv", "_user_files"),
    Case("attention: no such checkpoint", ["profile", "attention", "--checkpoint", "{work}/nothing", "--data", DATA,
                                           "--output", "{work}/a.json"], "nothing", "best/ folder"),
    Case("attention: other segment length", ["profile", "attention", "--checkpoint", CKPT, "--data", "{root}/data-40",
                                             "--output", "{work}/a.json"], "40", "data.segment_length=24"),
    Case("attention: --device this machine lacks", ["profile", "attention", "--checkpoint", CKPT, "--data", DATA,
                                                     "--output", "{work}/a.json", "--device", "cuda:7"], "cuda:7",
         "use device 'auto'"),
    Case("memory: --device this machine lacks", ["profile", "memory", "--output", "{work}/m", "--config",
                                                  "params.yaml", "--device", "cuda:7"], "cuda:7", "use device 'auto'"),
    Case("memory: --set of an unknown setting", ["profile", "memory", "--output", "{work}/m", "--config",
                                                  "params.yaml", "--set", "profile.colour=red"], "profile.colour",
         "not permitted|extra"),
    Case("memory: missing config", ["profile", "memory", "--output", "{work}/m", "--config", "{work}/no.yaml"],
         "no.yaml", "does not exist"),
    Case("memory: a task the configuration lacks", ["profile", "memory", "--output", "{work}/m", "--config",
                                                     "params.yaml", "--task", "qa99"], "qa99", "task of the"),
    # rmt report
    Case("report: missing config", ["report", "--output", "{work}/r", "--config", "{work}/no.yaml"], "no.yaml",
         "does not exist"),
    Case("report: --set of a bad value", ["report", "--output", "{work}/r", "--config", "params.yaml", "--set",
                                          "train.learning_rate=-1"], "train.learning_rate", "greater than 0"),
    Case("report: output is a user's folder", ["report", "--output", "{work}/mine", "--config", "params.yaml"], "mine",
         "choose another output", "_user_files"),
    # the tracking store
    Case("generate: the tracking store is not a database", ["data", "generate", "memorize", "{work}/d"], "mlflow.db",
         "move it away", "_garbage_store", store="sqlite:///{work}/mlflow.db"),
    Case("train: the tracking store is not a database", [*TRAIN, "--output", "{work}/s"], "mlflow.db", "move it away",
         "_garbage_store", store="sqlite:///{work}/mlflow.db"),
    # rmt pipeline
    Case("pipeline dvc: missing params", ["pipeline", "dvc", "--params", "{work}/no.yaml", "--output",
                                          "{work}/dvc.yaml"], "no.yaml", "does not exist"),
]


def _snapshot(folder: Path) -> dict[str, str]:
    # The tracking store's lock file stays beside the store, as every run leaves it (an OS
    # lock: removing it while another process waits on it would break the lock).
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*")) if path.name != "mlflow.db.lock"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_clear_message_and_changes_nothing(case, built, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # where params.yaml is, as users run it
    work = tmp_path / "work"
    work.mkdir()
    if case.prepare:
        globals()[case.prepare](work, built)
    before, built_before = _snapshot(work), _snapshot(built)
    args = [arg.format(root=built, work=work) for arg in case.args]
    if case.store:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", case.store.format(work=work))
    try:
        _check(case, CliRunner().invoke(app, args), work=work, built=built, before=before, built_before=built_before)
    finally:
        for lock in _LOCKS:
            lock.release()
        _LOCKS.clear()


def _check(case: Case, result, *, work: Path, built: Path, before: dict, built_before: dict) -> None:
    output = result.output
    assert result.exit_code not in (0, 1), f"exit {result.exit_code} (1 is an unhandled exception):\n{output}"
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), \
        output
    flat = " ".join(output.replace("│", " ").split())  # Rich boxes wrap long messages
    assert case.names.format(root=built, work=work).replace(" ", "") in flat.replace(" ", ""), flat
    assert re.search(case.fix, flat, re.IGNORECASE), flat
    assert _snapshot(work) == before, "files changed or were added"
    assert _snapshot(built) == built_before
    assert not (work / "code-ran").exists()
