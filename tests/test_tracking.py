"""rmt.tracking against real SQLite stores in tmp_path: what a run records, how it ends
(success, exception, KeyboardInterrupt, SIGTERM), and many processes sharing one new database."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rmt import tracking

ROOT = Path(__file__).resolve().parents[1]
TRACKING_FILE = ROOT / "rmt" / "tracking.py"

# Subprocesses load rmt/tracking.py by path: `import rmt.tracking` would import torch and
# transformers through rmt/__init__, seconds per process that this file cannot spare.
LOAD_TRACKING = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tracking", {str(TRACKING_FILE)!r})
tracking = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tracking)
import mlflow  # imported before any timing matters, as a long-running job would have it
"""


@pytest.fixture(scope="module")
def migrated_database(tmp_path_factory) -> Path:
    """An empty store, created once: migrating a new database takes seconds, and only the
    parallel test needs to see that happen."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    tracking._client(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_database) -> str:
    """An empty SQLite store in tmp_path, which is also the working directory."""
    shutil.copyfile(migrated_database, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return uri


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_script(tmp_path: Path, name: str, body: str, uri: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(LOAD_TRACKING + textwrap.dedent(body))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_default_uri_is_the_project_sqlite_database_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == tracking.DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri() == "http://tracking.example:5000"


def test_default_store_lives_in_the_working_directory(tmp_path, monkeypatch, migrated_database):
    shutil.copyfile(migrated_database, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.Run(experiment="default", name="r", system_metrics=False):
        pass
    assert (tmp_path / "mlflow.db").exists()
    assert [run["status"] for run in tracking.search_runs(experiment="default")] == ["FINISHED"]


def test_limits_are_mlflows():
    from mlflow.utils import validation

    assert tracking.MAX_PARAM_LENGTH == validation.MAX_PARAM_VAL_LENGTH
    assert tracking.MAX_TAG_LENGTH == validation.MAX_TAG_VAL_LENGTH
    assert tracking.MAX_PARAMS_TAGS_PER_BATCH == validation.MAX_PARAMS_TAGS_PER_BATCH
    assert tracking.MAX_METRICS_PER_BATCH <= validation.MAX_METRICS_PER_BATCH


def test_a_run_records_params_metrics_tags_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, "parent123")
    config = {
        "train": {"lr": 0.001, "steps": 10, "schedule": {"kind": "linear"}},
        "segments": [1, 2, 4],
        "note": "x" * 10_000,  # longer than MLflow allows
        "many": {f"p{i}": i for i in range(150)},  # more params than one batch holds
    }
    artifact = tmp_path / "curve.txt"
    artifact.write_text("0.5\n0.25\n")
    with tracking.Run(
        experiment="exp", name="train", params=config, tags={"task": "qa1"}, group="repro-1",
        system_metrics=False,
    ) as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1), "accuracy": step / 10}, step=step)
        run.set_tags({"stage": "done"})
        run.log_artifact(artifact, artifact_path="plots")
        run_id = run.run_id

    found = client(store).get_run(run_id)
    assert found.info.status == "FINISHED"
    assert found.info.run_name == "train"
    params = found.data.params
    assert params["train.lr"] == "0.001" and params["train.schedule.kind"] == "linear"
    assert params["segments"] == "[1, 2, 4]"
    assert len(params["note"]) == tracking.MAX_PARAM_LENGTH and params["note"].endswith("...")
    assert params["many.p149"] == "149" and len(params) == 155
    history = client(store).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    tags = found.data.tags
    assert tags["task"] == "qa1" and tags["stage"] == "done"
    assert tags[tracking.GROUP_TAG] == "repro-1"
    assert tags[tracking.PARENT_TAG] == "parent123"
    assert tags[tracking.HOSTNAME_TAG]
    commit = tags[tracking.GIT_COMMIT_TAG]  # tmp_path is not a git checkout
    assert commit == "unknown"
    # Artifacts go next to the database, not to ./mlruns.
    assert (tmp_path / "mlartifacts" / "exp" / run_id / "artifacts" / "plots" / "curve.txt").read_text() == "0.5\n0.25\n"
    assert not (tmp_path / "mlruns").exists()
    assert [a.path for a in client(store).list_artifacts(run_id, "plots")] == ["plots/curve.txt"]


def test_git_commit_is_recorded_inside_a_checkout(store, monkeypatch):
    monkeypatch.chdir(ROOT)  # the store stays in tmp_path: its URI is absolute
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the project is not a git checkout here")
    with tracking.Run(experiment="exp", name="r", system_metrics=False) as run:
        run_id = run.run_id
    assert client(store).get_run(run_id).data.tags[tracking.GIT_COMMIT_TAG] == head.stdout.strip()


def test_an_exception_fails_the_run_and_propagates(store):
    with pytest.raises(ValueError, match="boom"):
        with tracking.Run(experiment="exp", name="r", system_metrics=False) as run:
            run_id = run.run_id
            raise ValueError("boom")
    assert client(store).get_run(run_id).info.status == "FAILED"


def test_keyboard_interrupt_fails_the_run(store):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with tracking.Run(experiment="exp", name="r", system_metrics=False) as run:
            run_id = run.run_id
            assert signal.getsignal(signal.SIGTERM) != previous  # ours while the run is open
            raise KeyboardInterrupt
    assert client(store).get_run(run_id).info.status == "FAILED"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_system_metrics_are_sampled_when_asked(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with tracking.Run(experiment="exp", name="r") as run:
        time.sleep(0.5)
        run_id = run.run_id
    metrics = client(store).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    with tracking.Run(experiment="exp", name="quiet", system_metrics=False) as run:
        time.sleep(0.3)
        run_id = run.run_id
    assert not client(store).get_run(run_id).data.metrics


def test_sigterm_fails_the_run_of_a_subprocess(store, tmp_path):
    job = run_script(tmp_path, "job", """
        import time
        with tracking.Run(experiment="exp", name="killed", system_metrics=False) as run:
            print(run.run_id, flush=True)
            time.sleep(120)
    """, store)
    run_id = job.stdout.readline().strip()
    assert run_id, job.communicate(timeout=30)[1]
    assert client(store).get_run(run_id).info.status == "RUNNING"
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert client(store).get_run(run_id).info.status == "FAILED"


def test_parallel_writers_share_a_new_database(store, tmp_path):
    """Processes that start together on a database that does not exist yet: they race to
    create and migrate it, to create the experiment, and then to write."""
    (tmp_path / "mlflow.db").unlink()
    workers, steps = 4, 50
    go = tmp_path / "go"
    jobs = [
        run_script(tmp_path, f"worker{i}", f"""
            import time
            from pathlib import Path
            Path("ready{i}").touch()
            while not Path({str(go)!r}).exists():
                time.sleep(0.005)
            config = {{"worker": {i}, "train": {{"lr": 0.1, "steps": {steps}}}}}
            with tracking.Run(experiment="parallel", name="worker{i}", params=config, group="g",
                              tags={{"worker": "{i}"}}, system_metrics=False) as run:
                for step in range({steps}):
                    run.log_metrics({{"loss": 1.0 / (step + 1), "worker": {i}}}, step=step)
                    if step % 10 == 0:
                        run.set_tags({{"last_checkpoint": str(step)}})
        """, store)
        for i in range(workers)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(workers)):
        assert time.monotonic() < deadline and all(job.poll() is None for job in jobs), [
            job.communicate()[1] for job in jobs if job.poll() is not None
        ]
        time.sleep(0.01)
    assert not (tmp_path / "mlflow.db").exists()
    go.touch()
    for job in jobs:
        _, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr

    runs = tracking.search_runs(experiment="parallel")
    assert sorted(run["name"] for run in runs) == [f"worker{i}" for i in range(workers)]
    mlflow_client = client(store)
    for run in runs:
        i = int(run["name"].removeprefix("worker"))
        assert run["status"] == "FINISHED"
        assert run["params"] == {"worker": str(i), "train.lr": "0.1", "train.steps": str(steps)}
        assert run["metrics"] == {"loss": 1.0 / steps, "worker": float(i)}
        assert run["tags"]["worker"] == str(i) and run["tags"][tracking.GROUP_TAG] == "g"
        assert run["tags"]["last_checkpoint"] == "40"
        history = mlflow_client.get_metric_history(run["run_id"], "loss")
        assert sorted(m.step for m in history) == list(range(steps))
    assert len(tracking.search_runs(experiment="parallel", filter_string="params.worker = '2'")) == 1


def test_search_runs_reads_without_creating_anything(store, tmp_path, monkeypatch):
    missing = tmp_path / "missing" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert tracking.search_runs(experiment="exp") == []
    assert not missing.parent.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with tracking.Run(experiment="exp", name="r", params={"a": 1}, system_metrics=False) as run:
        run.log_metrics({"m": 2.0}, step=3)
        run_id = run.run_id
    assert tracking.search_runs(experiment="other") == []
    [found] = tracking.search_runs(experiment="exp")
    assert found["params"] == {"a": "1"} and found["metrics"] == {"m": 2.0}
    assert found["status"] == "FINISHED" and found["run_id"] == run_id


def test_retry_waits_out_a_locked_database_then_gives_up_clearly(monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_BASE_DELAY", 0.001)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "written"

    assert tracking._retry("sqlite:///x.db", "writing", locked_twice) == "written"
    assert len(calls) == 3

    def always_locked():
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(tracking.TrackingError, match=re.escape("sqlite:///x.db")):
        tracking._retry("sqlite:///x.db", "writing", always_locked)

    def broken():
        calls.append(1)
        raise ValueError("not transient")

    calls.clear()
    with pytest.raises(ValueError):
        tracking._retry("sqlite:///x.db", "writing", broken)
    assert len(calls) == 1


def test_a_ctrl_c_during_a_store_call_is_delivered_when_the_call_is_done(monkeypatch):
    """The write it interrupts goes on to its end (its transaction closed), then ctrl-c stops
    the job as ever; the job's own ctrl-c handling is back in place."""
    monkeypatch.setattr(tracking, "RETRY_BASE_DELAY", 0.001)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # an xdist worker may ignore it
    try:
        steps = []

        def write():
            signal.raise_signal(signal.SIGINT)
            steps.append("written")  # not cut off by the ctrl-c
            return "done"

        with pytest.raises(KeyboardInterrupt):
            tracking._retry("sqlite:///x.db", "writing", write)
        assert steps == ["written"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert tracking._retry("sqlite:///x.db", "writing", lambda: "quiet") == "quiet"  # nothing held over
    finally:
        signal.signal(signal.SIGINT, previous)


def test_only_the_tracking_module_imports_mlflow():
    pattern = re.compile(r"^\s*(import\s+mlflow|from\s+mlflow)\b", re.MULTILINE)
    importers = sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "rmt").rglob("*.py") if pattern.search(path.read_text())
    )
    # ... and the code of the MLflow model it logs, which only MLflow itself imports.
    assert importers == ["rmt/mlflow_model.py", "rmt/tracking.py"]


def test_the_pipeline_experiment_is_a_model_training_experiment(store):
    with tracking.pipeline_run("data", name="memorize/data", params={}):
        pass
    experiment = client(store).get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not the GenAI view
    assert "parent run" in experiment.tags[tracking.DESCRIPTION_TAG]


def test_an_older_experiment_gets_its_kind_and_keeps_its_description(store):
    experiment_id = client(store).create_experiment(tracking.EXPERIMENT, tags={tracking.DESCRIPTION_TAG: "mine"})
    with tracking.pipeline_run("data", name="memorize/data", params={}):
        pass
    tags = client(store).get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development" and tags[tracking.DESCRIPTION_TAG] == "mine"


def test_a_reproduction_is_a_parent_run_and_leaves_sigterm_to_its_driver(store, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    parent = tracking.reproduction_run(group="reproduction-1", params={"seeds": [0, 1]}).__enter__()
    assert signal.getsignal(signal.SIGTERM) is before  # Snakemake keeps its own handler
    parent_id = parent.run_id
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent_id)
    with tracking.pipeline_run("train", name="memorize/seed-0/stage-1", params={}) as child:
        child_id = child.run_id
    parent.log_metrics({"memorize/accuracy_4096": 1.0}, step=0)
    parent.__exit__(None, None, None)
    recorded = client(store).get_run(parent_id)
    assert recorded.info.status == "FINISHED" and recorded.info.run_name == "reproduction-1"
    assert recorded.data.params["seeds"] == "[0, 1]" and recorded.data.metrics["memorize/accuracy_4096"] == 1.0
    assert client(store).get_run(child_id).data.tags[tracking.PARENT_TAG] == parent_id


DVC_STARTED = 1_700_000_000.0  # when the faked `dvc` process started


def under_dvc(monkeypatch, root: Path, *, pid: int = 4242) -> str:
    """This process as a stage command of a `dvc repro` whose process is `pid`: DVC's
    variables set, no RMT_GROUP, and that process's start time faked. Returns its group."""
    monkeypatch.delenv(tracking.GROUP_ENV, raising=False)
    monkeypatch.setenv(tracking.DVC_STAGE_ENV, "train-memorize-seed0-stage1")
    monkeypatch.setenv(tracking.DVC_ROOT_ENV, str(root))
    monkeypatch.setattr(tracking, "_dvc_process", lambda: (pid, DVC_STARTED))
    return f"dvc-repro-{time.strftime('%Y%m%d-%H%M%S', time.localtime(DVC_STARTED))}-{pid}"


def reproduction_runs(uri: str, group: str | None = None) -> list:
    experiment = client(uri).get_experiment_by_name(tracking.EXPERIMENT)
    mine = f" and tags.`{tracking.GROUP_TAG}` = '{group}'" if group else ""
    return client(uri).search_runs([experiment.experiment_id], f"tags.`rmt.step` = 'reproduction'{mine}")


def test_the_steps_of_one_dvc_repro_share_a_group_and_nest_under_one_parent_run(store, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("seeds: [0, 1]\n")  # the configuration the stages read
    group = under_dvc(monkeypatch, tmp_path)
    children = []
    for step in ("data", "train"):
        with tracking.pipeline_run(step, name=f"memorize/{step}", params={}) as run:
            children.append(run.run_id)
    (parent,) = reproduction_runs(store, group)
    assert parent.info.run_name == group and parent.info.status == "FINISHED"  # nothing left RUNNING
    assert parent.data.params["seeds"] == "[0, 1]" and parent.data.params["config_files"] == "['params.yaml']"
    for run_id in children:
        tags = client(store).get_run(run_id).data.tags
        assert tags[tracking.GROUP_TAG] == group and tags[tracking.PARENT_TAG] == parent.info.run_id

    # The report, the last stage, logs the headline results into it and leaves it FINISHED.
    with tracking.dvc_reproduction_run() as reopened:
        assert reopened.run_id == parent.info.run_id
        reopened.log_metrics({"memorize/accuracy_4": 0.75}, step=0)
    (parent,) = reproduction_runs(store, group)
    assert parent.info.status == "FINISHED" and parent.data.metrics == {"memorize/accuracy_4": 0.75}

    # The next `dvc repro` (another dvc process) is another reproduction.
    following = under_dvc(monkeypatch, tmp_path, pid=4343)
    with tracking.pipeline_run("data", name="memorize/data", params={}) as run:
        later = run.run_id
    (next_parent,) = reproduction_runs(store, following)
    assert client(store).get_run(later).data.tags[tracking.PARENT_TAG] == next_parent.info.run_id
    assert len(reproduction_runs(store)) == 2


def test_rmt_group_wins_under_dvc_and_a_command_run_by_hand_joins_no_reproduction(store, tmp_path, monkeypatch):
    under_dvc(monkeypatch, tmp_path)
    monkeypatch.setenv(tracking.GROUP_ENV, "mine")
    with tracking.pipeline_run("data", name="memorize/data", params={}) as run:
        tags = client(store).get_run(run.run_id).data.tags
    assert tags[tracking.GROUP_TAG] == "mine" and tracking.PARENT_TAG not in tags
    assert tracking.dvc_reproduction_run() is None

    monkeypatch.delenv(tracking.GROUP_ENV)
    monkeypatch.delenv(tracking.DVC_STAGE_ENV)
    with tracking.pipeline_run("data", name="memorize/data", params={}) as run:
        tags = client(store).get_run(run.run_id).data.tags
    assert tracking.GROUP_TAG not in tags and tracking.PARENT_TAG not in tags
    assert reproduction_runs(store) == []


def test_the_dvc_group_is_named_by_the_dvc_process_a_stage_runs_under(tmp_path):
    # A stand-in for pip's `dvc` entry point: it runs a stage command through a shell, as DVC does.
    stage = LOAD_TRACKING.replace("import mlflow", "pass") + "print(tracking.dvc_group())"
    dvc = tmp_path / "dvc"
    dvc.write_text(f"#!{sys.executable}\nimport os, subprocess, sys\nprint(os.getpid(), flush=True)\n"
                   f"subprocess.run(['/bin/sh', '-c', sys.executable + ' -c \"$STAGE\"'], check=True, "
                   f"env={{**os.environ, 'DVC_STAGE': 'report', 'STAGE': {stage!r}}})\n")
    dvc.chmod(0o755)
    pid, group = subprocess.run([str(dvc)], capture_output=True, text=True, check=True).stdout.split()
    assert re.fullmatch(rf"dvc-repro-\d{{8}}-\d{{6}}-{pid}", group), group
    assert not tracking._is_dvc_command(["timeout", "300", "dvc", "repro"])  # a wrapper, not dvc itself
    assert tracking._is_dvc_command(["python3", "-m", "dvc", "repro"]) and tracking._is_dvc_command(["/usr/bin/dvc"])


def test_a_logged_checkpoint_is_an_mlflow_model_that_loads_back_without_pickle(store, tmp_path, minilm_path):
    import torch
    from conftest import make_encoder, random_text
    from mlflow import MlflowClient
    from mlflow.pyfunc import load_model
    from transformers import AutoTokenizer

    from rmt.model import RecurrentMemoryEncoder

    checkpoint = tmp_path / "best"
    model = make_encoder(num_labels=6)
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(checkpoint)
    classes = ["bathroom", "hallway", "garden", "office", "bedroom", "kitchen"]
    with tracking.Run(experiment="rmt", name="memorize/seed-0/stage-2/train", system_metrics=False,
                      params={"train": {"max_steps": 4}}) as run:
        model_id = run.log_model(checkpoint, name="memorize-seed-0", classes=classes, step=2,
                                 metrics={"best_valid_accuracy": 0.75})
        assert run.log_model(checkpoint, name="memorize-seed-0", classes=classes) == model_id  # once per run
        run_id = run.run_id

    logged = MlflowClient(store).get_logged_model(model_id)
    assert logged.source_run_id == run_id and logged.status.to_proto() == 2  # READY
    # What the Models tab compares: the run's settings and headline figures.
    assert logged.params == {"train.max_steps": "4"}
    assert [(metric.key, metric.value, metric.step) for metric in logged.metrics] == [("best_valid_accuracy", 0.75, 2)]
    outputs = MlflowClient(store).get_run(run_id).outputs.model_outputs
    assert [(output.model_id, output.step) for output in outputs] == [(model_id, 2)]
    texts = [random_text(70, seed=seed).tolist() for seed in range(3)]
    expected = [classes[int(model(torch.tensor([text])).logits.argmax())] for text in texts]
    assert load_model(f"models:/{model_id}").predict(texts) == expected
    assert not list(Path(tracking.ARTIFACTS_DIRECTORY).rglob("*.pkl"))  # models from code: nothing pickled
    reloaded = RecurrentMemoryEncoder.from_pretrained(tracking.checkpoint_of(f"models:/{model_id}", tmp_path / "dl"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
