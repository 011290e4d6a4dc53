"""A throwaway copy of the project with a tiny configuration, for end-to-end workflow tests
(Snakemake locally and under SLURM, DVC)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Two curriculum stages of a 1-layer BERT on 16-token segments: every job takes seconds.
TINY = {
    "tasks": {"memorize": {}},
    "seeds": [0],
    "data": {"tokenizer": "sentence-transformers/all-MiniLM-L6-v2", "noise": "pydoc", "segment_length": 16,
             "curriculum_segments": [1, 2], "train_examples": 64, "valid_examples": 16, "test_examples": 8,
             "test_segments": [1, 2, 4], "long_test_from_segments": 512, "samples": 1},
    "model": {"backbone": "sentence-transformers/all-MiniLM-L6-v2", "pretrained": False,
              "backbone_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                     "intermediate_size": 64},
              "num_memory_tokens": 2},
    "train": {"learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 4, "eval_every": 2, "batch_size": 8,
              "eval_examples": 16},
    "evaluate": {"segments": None, "grid_segments": [1, 2, 3], "grid_examples": 8, "batch_size": 8},
    "profile": {"tokens": [16, 32, 64], "full_attention": ["sdpa"], "train_segments": [1, 2], "train_batch_size": 2,
                "train_steps": 1},
}


def interruptible() -> None:
    """In a child process: let SIGINT interrupt it, as Ctrl-C does in a terminal. A shell
    that starts a job in the background (as CI runners may) leaves SIGINT ignored, and the
    children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Snakemake loads its SLURM plugin at every start, and the plugin runs `scontrol show config`
# for a help text. Where a SLURM client is installed and no controller runs (a machine the
# SLURM tests have left), that waits out the client's retries, about 9 s per Snakemake call;
# a stand-in answers as scontrol then does, at once. With a controller up (the SLURM tests'
# cluster), the real scontrol is used.
NO_CONTROLLER_BIN = Path(__file__).resolve().parent / "no_slurm_controller"
SLURMCTLD_PORT = 6817  # SLURM's default SlurmctldPort, which cluster/local-slurm keeps


def slurm_controller_listens() -> bool:
    try:
        socket.create_connection(("localhost", SLURMCTLD_PORT), timeout=0.5).close()
        return True
    except OSError:
        return False


def environment(project: Path, **extra: str) -> dict[str, str]:
    path = [str(BIN), *([] if slurm_controller_listens() else [str(NO_CONTROLLER_BIN)]), os.environ["PATH"]]
    return {**os.environ, "PATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **extra}


@dataclass
class Project:
    root: Path

    def run(self, *command: str, timeout: float = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """A command in the project, bounded in time; stdout and stderr together in stdout."""
        result = subprocess.run(command, cwd=self.root, env=environment(self.root, **env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}"
        return result

    def snakemake(self, *arguments: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "snakemake"), "--cores", "2", *arguments, timeout=timeout, check=check)

    def set_params(self, **sections: dict) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        for section, values in sections.items():
            params[section] = {**params.get(section, {}), **values}
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(folder: Path, config: dict = TINY) -> Project:
    """The workflow files, the package source (DVC hashes it as code) and a tiny params.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "environment.yml", "pyproject.toml"):
        shutil.copy2(ROOT / name, folder / name)
    for name in ("workflow", "rmt", "profiles"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return Project(folder)


def mlflow_runs(project: Project):
    """Every run of the project's MLflow store (experiment `rmt`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rmt")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def copy_project(source: Project, folder: Path) -> Project:
    """A copy of a project for a test to change: every file with its modification time
    (Snakemake compares them), and the copy's MLflow store pointing at the copy's own
    artifact folder (the store records absolute paths), so that nothing run in the copy
    writes into the original."""
    shutil.copytree(source.root, folder, symlinks=True)
    database = folder / "mlflow.db"
    if database.is_file():
        old, new = str(source.root), str(folder)
        with closing(sqlite3.connect(database)) as store, store:
            tables = [name for (name,) in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in store.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if column[2].upper().startswith(("VARCHAR", "TEXT")):
                        store.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?) '
                                      f'WHERE instr("{column[1]}", ?) > 0', (old, new, old))
    return Project(folder)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Project:
    """The tiny pipeline (TINY) run to its end once, as `snakemake -j 2` runs it, for every
    test that needs its results: read them in place, or change a copy (copy_project), never
    this project itself. Imported into tests/conftest.py: one run for the whole session."""
    project = make_project(tmp_path_factory.mktemp("tiny-pipeline") / "project")
    # -j N locally: Snakemake itself would no longer count threads. The time limit is the two
    # tests' that waited for it before, together.
    project.snakemake("-j", "2", timeout=1800)
    return project


# ---------------------------------------------------------------------------------------
# Snakemake's dry run (-n -p), read back as jobs: rule, inputs, outputs, shell command.

_JOB = re.compile(r"^(?:local)?rule (\w+):$")


@dataclass(frozen=True)
class DryRunJob:
    rule: str
    inputs: frozenset[str]
    outputs: frozenset[str]
    command: str | None


def dry_run_jobs(text: str) -> list[DryRunJob]:
    jobs, current = [], None
    for line in text.splitlines():
        if match := _JOB.match(line):
            current = {"rule": match.group(1), "input": "", "output": "", "command": None}
        elif current is not None and line.startswith("    ") and ": " in line:
            key, _, value = line.strip().partition(": ")
            if key in ("input", "output"):
                current[key] = value
        elif current is not None and line.startswith("Shell command: "):
            command = line.removeprefix("Shell command: ")
            current["command"] = None if command == "None" else command
            jobs.append(DryRunJob(rule=current["rule"], command=current["command"],
                                  inputs=frozenset(filter(None, current["input"].split(", "))),
                                  outputs=frozenset(filter(None, current["output"].split(", ")))))
            current = None
    return jobs
