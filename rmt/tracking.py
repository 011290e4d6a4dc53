"""Experiment tracking with MLflow. This is the only module of the package that imports
mlflow (lazily: importing it costs seconds, and most commands never track anything).

    with Run(experiment="babilong-qa1", name="train-rmt", params=config, group=pipeline_id) as run:
        run.log_metrics({"loss": loss}, step=step)
        run.log_artifact("results/curve.png")

Where runs go: `MLFLOW_TRACKING_URI` when set (a user's server), else `sqlite:///mlflow.db`
in the current directory (the project root when the pipeline runs). MLflow 3 refuses the
old ./mlruns file store, and SQLite needs no server. Artifacts of a SQLite store go to
`mlartifacts/<experiment>/` next to the database file, set per experiment when it is
created, because MLflow would otherwise put them in ./mlruns of whatever directory the
first process happened to start in.

Many pipeline jobs write to the same SQLite file at once, which SQLite only half supports:
  * MLflow waits up to 20 s for a locked database (it sets `PRAGMA busy_timeout` on every
    session); every read and write here is retried on top of that, with jittered
    exponential backoff, when the database stays locked (`_retry`).
  * The first use of a new database creates its tables and runs the schema migrations, and
    two processes migrating at once corrupt each other ("duplicate column name"). MLflow
    holds a lock for that, but in the temporary directory, which SLURM makes private to
    each job; a lock file next to the database (`mlflow.db.lock`) serialises it for every
    job that can see the database. The same lock covers finding or creating the
    experiment, and a creation that still loses a race is resolved by reading it back.

A run never stays RUNNING after a crash: leaving the block by an exception (including
KeyboardInterrupt) ends it FAILED, and while a run is open in the main thread SIGTERM (what
SLURM and snakemake send to stop a job) raises `Terminated`, so it does too.

Grouping: the tag `rmt.group` names the pipeline run (one reproduction) that a run belongs
to; it works across experiments, and `search_runs(filter_string="tags.\"rmt.group\" = 'x'")`
or the UI's tag filter show one reproduction together. When the driver of the pipeline
opens a Run of its own and exports its id as RMT_PARENT_RUN_ID, the runs of its jobs also
get the `mlflow.parentRunId` tag, which the UI uses to nest them under it (MLflow only
nests runs of the same experiment, hence the group tag as well). `dvc repro` has no driver
of ours and names no invocation: a step it runs (env DVC_STAGE) takes its group from the
`dvc` process it runs under (`dvc-repro-<start time>-<pid>`, `dvc_group`), and the first
such step creates the group's parent run, which the others find (`dvc_reproduction`); the
report, the last stage, logs the headline results into it. RMT_GROUP, when set, wins.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

from rmt.utils import UserError

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_RUN_ENV = "RMT_PARENT_RUN_ID"
GROUP_ENV = "RMT_GROUP"
ARTIFACTS_DIRECTORY = "mlartifacts"

GROUP_TAG = "rmt.group"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own: the UI shows it as the run's source version
SOURCE_NAME_TAG = "mlflow.source.name"
HOSTNAME_TAG = "rmt.hostname"
PID_TAG = "rmt.pid"  # with the hostname: whether the process of a RUNNING run is still alive
PROCESS_START_TAG = "rmt.process_start"  # that process's start time: a reused PID is another process
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under this one
# The UI opens an experiment in its model-training view (not the GenAI one) with this kind.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"

# MLflow 3.x limits (mlflow.utils.validation): longer values are rejected, not truncated.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it (tests set it low).
SYSTEM_METRICS_INTERVAL = 10.0

# Each attempt already waits up to MLflow's 20 s busy timeout; these add up to ~40 s more.
RETRY_ATTEMPTS = 8
RETRY_BASE_DELAY = 0.2
RETRY_MAX_DELAY = 10.0
STORE_LOCK_TIMEOUT = 600.0


class TrackingError(UserError):
    """The tracking store could not be used; the message says why and what to do."""


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while a run is open. A SystemExit, so that
    `except Exception` in training code does not swallow it, with the exit status a shell
    reports for a process killed by SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else the project's SQLite database."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"}: MLflow params are flat strings.
    Pydantic models are dumped first; values too long for MLflow are cut, ending in '...'."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = _truncate(str(value), MAX_PARAM_LENGTH)
    return flat


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _resolve(uri: str) -> str:
    """Make a relative SQLite path absolute, so that a later chdir cannot point the open
    store at another file."""
    path = _sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")


def _is_transient(error: BaseException) -> bool:
    """A locked or briefly unavailable database: sqlite3/SQLAlchemy OperationalError, which
    MLflow re-raises as an MlflowException with code TEMPORARILY_UNAVAILABLE."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "OperationalError" or "database is locked" in str(error):
            return True
        if getattr(error, "error_code", None) == "TEMPORARILY_UNAVAILABLE":
            return True
        error = error.__cause__ or error.__context__
    return False


def _retry(uri: str, what: str, call: Callable[..., T], *args, **kwargs) -> T:
    """Every call into MLflow goes through here: a transient failure is retried with full
    jitter (so that the processes that collided do not collide again), anything else raised."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            with _ctrl_c_held():
                return call(*args, **kwargs)
        except Exception as error:
            if not _is_transient(error):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise TrackingError(
                    f"{what} failed {RETRY_ATTEMPTS} times: the tracking store {uri} stayed "
                    f"locked or unavailable ({error}). Run fewer jobs against one SQLite file at "
                    "once, or start an MLflow server and point MLFLOW_TRACKING_URI at it."
                ) from error
            time.sleep(random.uniform(0, min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2**attempt)))
    raise AssertionError("unreachable")


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold a ctrl-c (SIGINT) that arrives during one call into the store, and deliver it as
    soon as the call is done. Raised at any point inside MLflow's SQLAlchemy code, where
    KeyboardInterrupt (no Exception) passes by the handlers that roll back, it left a killed
    job's SQLite store locked past every retry of recording the run FAILED (a `dvc repro`
    stopped with ctrl-c under load). Not across the retries' sleeps: ctrl-c ends those at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Held while a process opens a SQLite store (creating and migrating a new database) and
    finds or creates its experiment. Other stores (servers) need no lock."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=STORE_LOCK_TIMEOUT)
    except Timeout as error:
        raise TrackingError(
            f"waited {STORE_LOCK_TIMEOUT:.0f} s for {lock.lock_file}: another process is opening "
            f"the tracking store {uri}. If no such process is alive, delete the lock file."
        ) from error
    try:
        yield
    finally:
        lock.release()


def _client(uri: str):
    """An MlflowClient; constructing it opens the store, which creates a new database."""
    from mlflow import MlflowClient

    _check_writable(uri)
    with _store_lock(uri):
        try:
            return _retry(uri, "opening the tracking store", MlflowClient, tracking_uri=uri)
        except TrackingError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever the store's layers raise, the user's fix is the same
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrackingError(
                f"The tracking store {uri} could not be opened ({first}). If that file is not an MLflow database, "
                "move it away; or point MLFLOW_TRACKING_URI at another store"
            ) from None


def check_store() -> None:
    """Open the tracking store now, so that a broken one fails a step before its work."""
    _client(_resolve(tracking_uri()))


def _check_writable(uri: str) -> None:
    """A SQLite store in a folder or file this user cannot write fails at once, not after
    the retries meant for a database another job has locked."""
    path = _sqlite_path(uri)
    if path is None:
        return
    folder = next(parent for parent in (path.absolute().parent, *path.absolute().parents) if parent.exists())
    target = path if path.exists() else folder
    if not os.access(target, os.W_OK):
        raise TrackingError(f"The tracking store {path} cannot be written here (no write permission on {target}): "
                            "run from a folder you may write to, or point MLFLOW_TRACKING_URI at another store")


def _artifact_location(uri: str, experiment: str) -> str | None:
    path = _sqlite_path(uri)
    if path is None:
        return None  # a server decides where artifacts go
    directory = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)  # runs inside are told apart by id
    return (path.resolve().parent / ARTIFACTS_DIRECTORY / directory).as_uri()


def _experiment_id(client, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        experiment = _retry(uri, f"reading experiment {name!r}", client.get_experiment_by_name, name)
        if experiment is None:
            try:
                return _retry(
                    uri, f"creating experiment {name!r}", client.create_experiment,
                    name, artifact_location=_artifact_location(uri, name), tags=EXPERIMENT_TAGS.get(name, {}),
                )
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Another process created it between our read and our write.
                experiment = _retry(uri, f"reading experiment {name!r}", client.get_experiment_by_name, name)
        if name in EXPERIMENT_TAGS and EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older rmt
            for key, value in EXPERIMENT_TAGS[name].items():
                if key not in experiment.tags:  # never a user's own description
                    _retry(uri, f"tagging experiment {name!r}", client.set_experiment_tag, experiment.experiment_id,
                           key, value)
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} is deleted in {uri}: restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or use another name"
        )
    return experiment.experiment_id


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # not a git checkout, or no git
    return result.stdout.strip() or "unknown"


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Run:
    """One MLflow run, open for the duration of a `with` block: FINISHED when the block
    completes, FAILED when it raises (including KeyboardInterrupt, and SIGTERM, which raises
    `Terminated` while the run is open in the main thread).

    params: the full resolved config (dict or pydantic model), flattened to dotted keys.
    tags: added to the automatic ones (git commit, hostname, group, parent run), which they
        may override.
    group: the pipeline run this run belongs to, stored as the `rmt.group` tag.
    system_metrics: sample CPU, memory, disk, network (and GPU) use into `system/...` metrics
        every SYSTEM_METRICS_INTERVAL seconds, in a background thread.
    """

    def __init__(
        self,
        *,
        experiment: str,
        name: str,
        params: Mapping | Any | None = None,
        tags: Mapping[str, Any] | None = None,
        group: str | None = None,
        system_metrics: bool = True,
        resume_run_id: str | None = None,
        handle_sigterm: bool = True,
    ):
        self.experiment = experiment
        self.resume_run_id = resume_run_id
        self.name = name
        self.params = flatten_params(params) if params is not None else {}
        self.tags = dict(tags or {})
        self.group = group
        self.system_metrics = system_metrics
        self.handle_sigterm = handle_sigterm  # False: a host process (Snakemake) keeps its own handler
        self._run_id: str | None = None
        self._monitor = None
        self._previous_sigterm = None
        self._ending = False
        self._sigterm_while_ending = False

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise TrackingError(f"run {self.name!r} is not open: use it inside `with Run(...) as run:`")
        return self._run_id

    def _automatic_tags(self) -> dict[str, str]:
        tags = {GIT_COMMIT_TAG: _git_commit(), SOURCE_NAME_TAG: "rmt", HOSTNAME_TAG: socket.gethostname(), PID_TAG: os.getpid(),
                PROCESS_START_TAG: _process_start(os.getpid())}
        if self.group is not None:
            tags[GROUP_TAG] = self.group
        if os.environ.get(PARENT_RUN_ENV):
            tags[PARENT_TAG] = os.environ[PARENT_RUN_ENV]
        return tags

    def __enter__(self) -> "Run":
        if self._run_id is not None:
            raise TrackingError(f"run {self.name!r} is already open: make a new Run for another run")
        self.uri = _resolve(tracking_uri())
        self._client = _client(self.uri)
        experiment_id = _experiment_id(self._client, self.uri, self.experiment)
        end_orphaned_runs(self._client, self.uri, experiment_id)
        tags = {**self._automatic_tags(), **self.tags}
        tags = {key: _truncate(str(value), MAX_TAG_LENGTH) for key, value in tags.items()}
        resumed = self._reopen(experiment_id, tags)
        if not resumed:
            run = _retry(
                self.uri, f"creating run {self.name!r}", self._client.create_run,
                experiment_id, run_name=self.name, tags=tags,
            )
            self._run_id = run.info.run_id
        if self.handle_sigterm:
            self._install_sigterm_handler()
        try:
            if not resumed:  # a resumed run has its params already
                self._log_params(self.params)
            if self.system_metrics:
                self._start_system_metrics()
        except BaseException:
            self._end("FAILED")
            raise
        return self

    def _reopen(self, experiment_id: str, tags: dict[str, str]) -> bool:
        """Continue the run `resume_run_id` (an interrupted attempt of the same step) when
        this store has it in this experiment: the same run id, so one curve per stage."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        if self.resume_run_id is None:
            return False
        try:
            run = _retry(self.uri, f"reading run {self.resume_run_id}", self._client.get_run, self.resume_run_id)
        except MlflowException:
            return False  # another store, or the run was deleted: start a new one
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            return False
        self._run_id = run.info.run_id
        _retry(self.uri, f"reopening run {self.name!r}", self._client.update_run, self._run_id, status="RUNNING")
        entries = [RunTag(key, value) for key, value in tags.items()]  # this process's pid and commit
        _retry(self.uri, f"tagging run {self.name!r}", self._client.log_batch, self._run_id, tags=entries)
        return True

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._end("FINISHED" if exc_type is None else "FAILED")

    def _end(self, status: str) -> None:
        # A SIGTERM now would interrupt the very write that records the status: note it,
        # and pass it on to the previous handler once the run is closed.
        self._ending = True
        try:
            if self._monitor is not None:
                self._monitor.finish()
            _retry(self.uri, f"ending run {self.name!r}", self._client.set_terminated, self.run_id, status=status)
        finally:
            self._restore_sigterm_handler()
            self._run_id = None
            self._monitor = None
            self._ending = False
        if self._sigterm_while_ending:
            self._sigterm_while_ending = False
            signal.raise_signal(signal.SIGTERM)

    def _install_sigterm_handler(self) -> None:
        # Python only lets the main thread set signal handlers; runs elsewhere go without.
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _on_sigterm(self, signum, frame) -> None:
        if self._ending:
            self._sigterm_while_ending = True
            return
        raise Terminated()

    def _start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Best effort: the monitor logs from its own thread, and stops (with a warning)
        # rather than retrying if the database stays locked.
        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, tracking_uri=self.uri
        )
        self._monitor.start()

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in params.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            _retry(self.uri, f"logging params of run {self.name!r}", self._client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        self.log_metric_steps([(metrics, step)])

    def log_metric_steps(self, points: list[tuple[Mapping[str, float], int]]) -> None:
        """Metrics of many steps in as few writes as MLflow allows (a training stage logs the
        steps since its last checkpoint together)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = []
        for metrics, step in points:
            for key, value in metrics.items():
                try:
                    value = float(value)
                except (TypeError, ValueError) as error:
                    raise TypeError(f"metric {key!r} = {value!r} is not a number: log floats (tensor.item())") from error
                entries.append(Metric(key, value, timestamp, step))
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            _retry(self.uri, f"logging metrics of run {self.name!r}", self._client.log_batch, self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, _truncate(str(value), MAX_TAG_LENGTH)) for key, value in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            _retry(self.uri, f"tagging run {self.name!r}", self._client.log_batch, self.run_id, tags=chunk)

    def log_dataset(self, *, name: str, digest: str, source: str | os.PathLike, context: str,
                    profile: Mapping | None = None) -> None:
        """A dataset the run used, as MLflow's own input (the runs table's Dataset column):
        `context` says how (training, evaluation), `digest` identifies its content."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(name=name, digest=digest[:36], source_type="local",
                          source=json.dumps({"uri": str(Path(source).resolve())}),
                          profile=json.dumps(dict(profile)) if profile else None)
        _retry(self.uri, f"logging the dataset of run {self.name!r}", self._client.log_inputs, self.run_id,
               datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_model(self, checkpoint: str | os.PathLike, *, name: str, classes: list[str], step: int = 0,
                  metrics: Mapping[str, float] | None = None) -> str:
        """A checkpoint as an MLflow model this run produced (the runs table's Models column,
        the Models tab's comparison): rmt/mlflow_model.py as its code, the checkpoint folder
        as its artifact and the rmt package beside it, so `mlflow.pyfunc.load_model` neither
        unpickles anything nor needs rmt installed. The run's params and `metrics` (at
        `step`) are the model's too, the columns the Models tab compares. Returns the model
        id; a run that already has its model (a resumed step) keeps it."""
        import tempfile

        import mlflow.pyfunc
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        from rmt.mlflow_model import CHECKPOINT_ARTIFACT

        run = _retry(self.uri, f"reading run {self.name!r}", self._client.get_run, self.run_id)
        if run.outputs is not None and run.outputs.model_outputs:
            return run.outputs.model_outputs[0].model_id
        package = Path(__file__).resolve().parent
        with tempfile.TemporaryDirectory() as staging:
            local = Path(staging) / "model"
            mlflow.pyfunc.save_model(local, python_model=str(package / "mlflow_model.py"),
                                     artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                                     model_config={"classes": list(classes)}, code_paths=[str(package)],
                                     pip_requirements=_runtime_requirements())
            model = _retry(self.uri, f"creating the model of run {self.name!r}", self._client.create_logged_model,
                           run.info.experiment_id, name=name, source_run_id=self.run_id, model_type="rmt")
            _retry(self.uri, f"uploading the model of run {self.name!r}", self._client.log_model_artifacts,
                   model.model_id, str(local))
        self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        _retry(self.uri, f"linking the model of run {self.name!r}", self._client.log_outputs, self.run_id,
               [LoggedModelOutput(model.model_id, step)])
        if self.params:
            _retry(self.uri, f"logging the model's params of run {self.name!r}", self._client.log_model_params,
                   model.model_id, self.params)
        for key, value in (metrics or {}).items():  # also a point of the run's own, at the same step
            _retry(self.uri, f"logging the model's metrics of run {self.name!r}", self._client.log_metric,
                   self.run_id, key, value, step=step, model_id=model.model_id)
        return model.model_id

    def log_artifact(self, path: str | os.PathLike, *, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist: write it before logging it")
        log = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        _retry(self.uri, f"logging artifact {path} of run {self.name!r}", log, self.run_id, str(path), artifact_path)


def _runtime_requirements() -> list[str]:
    """rmt's own pinned requirements (pyproject.toml), without the optional extras."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [entry for entry in requires("rmt") or [] if "extra ==" not in entry]
    except PackageNotFoundError:  # run from a source tree that was never installed
        return []


def checkpoint_of(model_uri: str, destination: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of an MLflow model `Run.log_model` logged (e.g. "models:/<id>"),
    downloaded: `RecurrentMemoryEncoder.from_pretrained` loads it as it is."""
    import mlflow.artifacts
    from mlflow.models import Model

    from rmt.mlflow_model import CHECKPOINT_ARTIFACT

    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=destination,
                                                     tracking_uri=_resolve(tracking_uri())))
    artifacts = Model.load(model).flavors["python_function"].get("artifacts", {})
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise TrackingError(f"{model_uri} is not a model rmt logged (no {CHECKPOINT_ARTIFACT!r} artifact)")
    return model / artifacts[CHECKPOINT_ARTIFACT]["path"]


def _process_start(pid: int) -> str:
    """When a process started, as the OS counts it (seconds since the epoch), or ""."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def _process_is_gone(pid: int, started: str) -> bool:
    """No process with this id, or another one than the run's (the id was reused: it
    started at another time)."""
    import psutil

    if not psutil.pid_exists(pid):
        return True
    now = _process_start(pid)
    return bool(started and now) and abs(float(now) - float(started)) > 1.0


def end_orphaned_runs(client, uri: str, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (kill -9, a lost
    node, a killed snakemake): a run never stays RUNNING after its process. Runs of other
    hosts cannot be checked from here and are left as they are."""
    host = socket.gethostname().replace("'", "")
    running = _retry(uri, "searching running runs", client.search_runs, [experiment_id],
                     f"attributes.status = 'RUNNING' and tags.`{HOSTNAME_TAG}` = '{host}'", max_results=1000)
    ended = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and _process_is_gone(int(pid), run.data.tags.get(PROCESS_START_TAG, "")):
            _retry(uri, f"ending orphaned run {run.info.run_id}", client.set_terminated, run.info.run_id,
                   status="KILLED")
            ended.append(run.info.run_id)
    return ended


def search_runs(*, experiment: str, filter_string: str = "", history: tuple[str, ...] = ()) -> list[dict]:
    """The runs of an experiment as plain dicts (run_id, name, status, start_time, end_time,
    params, metrics at their latest step, tags), newest first; with `history`, also those
    metrics at every step: {"history": {key: {step: value}}} (the last value logged at a
    step). No experiment, or no database yet, means no runs: reading never creates anything."""
    uri = _resolve(tracking_uri())
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        return []
    client = _client(uri)
    found = _retry(uri, f"reading experiment {experiment!r}", client.get_experiment_by_name, experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = _retry(
            uri, f"searching runs of {experiment!r}", client.search_runs,
            [found.experiment_id], filter_string, max_results=1000, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    def steps(run_id: str, key: str) -> dict[int, float]:
        points = _retry(uri, f"reading {key} of run {run_id}", client.get_metric_history, run_id, key)
        return {point.step: point.value for point in sorted(points, key=lambda p: p.timestamp)}

    return [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": dict(run.data.tags),
            **({"history": {key: steps(run.info.run_id, key) for key in history if key in run.data.metrics}}
               if history else {}),
        }
        for run in runs
    ]


EXPERIMENT = "rmt"  # the pipeline's experiment
REPRODUCTION_STEP = "reproduction"  # the rmt.step tag of a reproduction's parent run
EXPERIMENT_TAGS = {EXPERIMENT: {
    EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
    DESCRIPTION_TAG: "Recurrent Memory Transformer reproductions (rmt). Each reproduction is a parent run named "
                     "after its group, with the configuration and headline results; its steps (data, every "
                     "training stage, evaluation, profiles) are its child runs. Compare seeds and configurations "
                     "with the tags rmt.task, rmt.seed, rmt.stage and rmt.config.",
}}


def pipeline_run(step: str, *, name: str, params: dict, tags: dict | None = None,
                 resume_run_id: str | None = None) -> Run:
    """The run of one pipeline step in the pipeline's experiment, in the reproduction that
    RMT_GROUP names (the Snakemake workflow sets it for all its jobs) or, under `dvc repro`,
    which sets none, in the reproduction of that invocation, nested under its parent run
    (`dvc_reproduction`); `resume_run_id` continues the run of an interrupted attempt of the
    same step."""
    group, parent = os.environ.get(GROUP_ENV) or None, None
    if (reproduction := dvc_reproduction()) is not None:  # None when RMT_GROUP is set
        group, parent = reproduction
    nesting = {PARENT_TAG: parent} if parent else {}  # else RMT_PARENT_RUN_ID's, when the driver set it
    return Run(experiment=EXPERIMENT, name=name, params=params, group=group,
               tags={"rmt.step": step, **nesting, **(tags or {})}, resume_run_id=resume_run_id)


def reproduction_run(*, group: str, params: dict, resume_run_id: str | None = None) -> Run:
    """The parent run of one reproduction, opened by the workflow's driver (Snakemake) before
    its first job: named after the group, it holds the whole configuration; the runs of the
    jobs nest under it once its id is in RMT_PARENT_RUN_ID. The driver keeps its own SIGTERM
    handling, and its system metrics would only measure the driver. `resume_run_id` reopens
    it to log more (a DVC reproduction's headline results)."""
    return Run(experiment=EXPERIMENT, name=group, params=params, group=group, tags={"rmt.step": REPRODUCTION_STEP},
               system_metrics=False, handle_sigterm=False, resume_run_id=resume_run_id)


# DVC sets DVC_STAGE (and DVC_ROOT) for every stage command it runs, but names no invocation
# of `dvc repro`: the `dvc` process that runs the stages does, by its start time and pid.
DVC_STAGE_ENV, DVC_ROOT_ENV = "DVC_STAGE", "DVC_ROOT"
DVC_GROUP_PREFIX = "dvc-repro"


def dvc_group() -> str | None:
    """The group of the `dvc repro` (or `dvc exp run`) running this process as a stage
    command: `dvc-repro-<its start time>-<its pid>`, one for all the stages of one
    invocation and another for the next; None outside DVC."""
    if not os.environ.get(DVC_STAGE_ENV):
        return None
    found = _dvc_process()
    if found is None:
        return None
    pid, started = found
    return f"{DVC_GROUP_PREFIX}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{pid}"


def _dvc_process() -> tuple[int, float] | None:
    """The pid and start time of the closest ancestor process that is `dvc` (between it and
    this process: the shell DVC runs the command in, perhaps torchrun), or None."""
    import psutil

    try:
        ancestors = psutil.Process().parents()
    except psutil.Error:
        return None
    for process in ancestors:
        try:
            if _is_dvc_command(process.cmdline()):
                return process.pid, process.create_time()
        except psutil.Error:  # gone, or another user's: not the dvc that started us
            continue
    return None


def _is_dvc_command(command: list[str]) -> bool:
    """`dvc ...` (a binary), `python .../bin/dvc ...` (the pip entry point) or `python -m dvc ...`."""
    names = [Path(part).name for part in command[:3]]
    return bool(names) and (names[0] in ("dvc", "dvc.exe") or names[1:2] == ["dvc"] or names[1:3] == ["-m", "dvc"])


def dvc_reproduction() -> tuple[str, str] | None:
    """Under `dvc repro` with no RMT_GROUP: the invocation's group and the id of its parent
    run, which the first of its steps to track creates (named after the group, with the
    configuration, FINISHED at once: the children nest under it by their tag, and no driver
    is there to end it) and the others find. None outside DVC, or when RMT_GROUP is set."""
    if os.environ.get(GROUP_ENV):
        return None
    group = dvc_group()
    if group is None:
        return None
    uri = _resolve(tracking_uri())
    client = _client(uri)
    experiment_id = _experiment_id(client, uri, EXPERIMENT)
    parent = _reproduction_run_id(client, uri, experiment_id, group)
    if parent is None:
        with reproduction_run(group=group, params=_dvc_configuration()) as created:
            ours = created.run_id
        # DVC runs one stage at a time; should two processes still have raced to create the
        # parent, both keep the first created, and the other is deleted by its creator.
        parent = _reproduction_run_id(client, uri, experiment_id, group)
        if parent != ours:
            _retry(uri, f"deleting a second parent run of {group!r}", client.delete_run, ours)
    return group, parent


def _reproduction_run_id(client, uri: str, experiment_id: str, group: str) -> str | None:
    """The parent run of a group, the first created should there be several."""
    found = _retry(uri, f"searching the parent run of {group!r}", client.search_runs, [experiment_id],
                   f"tags.`{GROUP_TAG}` = '{group}' and tags.`rmt.step` = '{REPRODUCTION_STEP}'",
                   order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def _dvc_configuration() -> dict:
    """What a DVC reproduction's parent run records as its params, as Snakemake's does: the
    configuration the stages read (DVC_PARAMS at the repository's root) and its file."""
    from rmt.config import read_config_files
    from rmt.pipeline import DVC_PARAMS

    path = Path(os.environ.get(DVC_ROOT_ENV, "."), DVC_PARAMS)
    return {**read_config_files(path), "config_files": [DVC_PARAMS]} if path.is_file() else {}


def dvc_reproduction_run() -> Run | None:
    """Under `dvc repro`: its parent run, reopened for a step to log the headline results
    into (the report, the last stage; Snakemake's driver logs them itself). None outside
    DVC, or when RMT_GROUP is set."""
    reproduction = dvc_reproduction()
    if reproduction is None:
        return None
    group, parent = reproduction
    return reproduction_run(group=group, params={}, resume_run_id=parent)
