"""What a researcher sees in MLflow, checked against a real `mlflow server` on 127.0.0.1: a tiny
reproduction (a parent run opened as the workflow opens it, the planned data, curriculum and
evaluation steps as its children), read back through the REST API the UI itself calls, and
the runs page rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from workflow_project import BIN, ROOT, TINY

SERVER_START_TIMEOUT = 300.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rest(base: str, path: str, body: dict | None = None, **query) -> dict:
    """One call of MLflow's REST API (GET, or POST with a JSON body), its JSON answer."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite store and artifact folder of its own,
    artifacts proxied (the default), as a team would run it. Stopped with its workers."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (folder / "server.log").open("w")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # Without the job runner's seven worker processes (GenAI jobs, which the runs pages do not
    # use): on a busy 2-core machine the server starts in 30 s instead of 40 and stops in 4
    # instead of 30.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "mlartifacts")],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited {server.returncode}:\n{(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in {SERVER_START_TIMEOUT:.0f} s:\n"
                            f"{(folder / 'server.log').read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        # The server's own process group (the mlflow command, uvicorn and its worker): only
        # what this fixture started; killed when it does not stop within a minute.
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sent)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                continue
        server.wait()
        log.close()


@dataclass
class Reproduction:
    base: str  # the server's URL
    group: str
    parent_id: str
    root: Path  # the project folder of the tiny reproduction (data/, results/)
    data: Path


@pytest.fixture(scope="module")
def reproduction(mlflow_server, tmp_path_factory) -> Reproduction:
    """One tiny reproduction tracked on the server, as `snakemake` runs it: the parent run
    opened by the driver (rmt.tracking.reproduction_run, its id in RMT_PARENT_RUN_ID), the
    planned commands of the data, both curriculum stages, their grids and the evaluation, then the
    headline results on the parent. The commands run from the checkout (the commit tag is
    its HEAD) and write into a project folder of their own."""
    from rmt.cli import app
    from rmt.config import read_config_files, validate_config
    from rmt.pipeline import headline_results, plan
    from rmt.tracking import PARENT_RUN_ENV, reproduction_run

    root = tmp_path_factory.mktemp("reproduction")
    config = root / "params.yaml"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False))
    settings = read_config_files(config)
    steps = [step for step in plan(validate_config(settings, [str(config)]), [str(config)])
             if step.rule in ("data", "train", "grid", "evaluate")]
    group = f"reproduction-test-{os.getpid()}-{int(time.time())}"
    runner = CliRunner()

    def in_project(argument: str) -> str:  # the layout's relative paths, under this project
        return str(root / argument) if argument.startswith(("data/", "results/")) else argument

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("RMT_GROUP", group)
        patch.delenv(PARENT_RUN_ENV, raising=False)
        with reproduction_run(group=group, params={**settings, "config_files": [str(config)]}) as parent:
            patch.setenv(PARENT_RUN_ENV, parent.run_id)
            for step in steps:
                command = shlex.split(step.command)
                assert command[0] == "rmt", step.command
                result = runner.invoke(app, [in_project(argument) for argument in command[1:]])
                assert result.exit_code == 0, f"{step.command}:\n{result.output}"
            parent.log_metrics(headline_results(steps, root), step=0)
            parent_id = parent.run_id
    return Reproduction(base=mlflow_server, group=group, parent_id=parent_id, root=root, data=root / "data" / "memorize")


def _experiment(base: str) -> dict:
    return rest(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="rmt")["experiment"]


def _runs_of_group(base: str, experiment_id: str, group: str) -> dict[str, dict]:
    """The group's runs by name, each with its tags and params as dicts."""
    found = rest(base, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": f"tags.`rmt.group` = '{group}'", "max_results": 100})
    runs = {}
    for run in found.get("runs", []):
        data = run["data"]
        runs[run["info"]["run_name"]] = {
            "info": run["info"], "inputs": run.get("inputs", {}), "outputs": run.get("outputs", {}),
            "tags": {tag["key"]: tag["value"] for tag in data.get("tags", [])},
            "params": {param["key"]: param["value"] for param in data.get("params", [])},
            "metrics": {metric["key"]: metric["value"] for metric in data.get("metrics", [])},
        }
    return runs


STAGE_1, STAGE_2 = "memorize/seed-0/stage-1/train", "memorize/seed-0/stage-2/train"
DATA, EVALUATE = "memorize/seed-0/data", "memorize/seed-0/stage-2/evaluate"
GRID_1, GRID_2 = "memorize/seed-0/stage-1/grid", "memorize/seed-0/stage-2/grid"


def _is_commit_of_this_checkout(commit: str) -> bool:
    """A commit of the checkout's history (others may commit while the tests run)."""
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT,
                          capture_output=True).returncode == 0


def test_the_rest_api_shows_one_reproduction_as_a_parent_run_with_its_steps(reproduction):
    base, group = reproduction.base, reproduction.group
    experiment = _experiment(base)
    tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    # A model-training experiment (the UI opens its runs, not the GenAI views) with a description.
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("Recurrent Memory Transformer reproductions")

    runs = _runs_of_group(base, experiment["experiment_id"], group)
    assert sorted(runs) == sorted([group, DATA, STAGE_1, STAGE_2, GRID_1, GRID_2, EVALUATE])
    assert {run["info"]["status"] for run in runs.values()} == {"FINISHED"}
    parent = runs.pop(group)
    assert parent["info"]["run_id"] == reproduction.parent_id and "mlflow.parentRunId" not in parent["tags"]
    assert parent["tags"]["rmt.step"] == "reproduction" and parent["tags"]["rmt.group"] == group
    # The parent holds the configuration and the headline results.
    assert parent["params"]["train.max_steps"] == "4" and parent["params"]["data.curriculum_segments"] == "[1, 2]"
    assert {"memorize/accuracy_1", "memorize/accuracy_4", "memorize/last_stage_valid_accuracy"} <= set(parent["metrics"])
    for name, run in runs.items():  # the steps nest under it
        assert run["tags"]["mlflow.parentRunId"] == reproduction.parent_id, name
        assert run["tags"]["rmt.group"] == group, name
    in_checkout = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    for name, run in {group: parent, **runs}.items():  # MLflow's own source tags (the Source column)
        commit = run["tags"]["mlflow.source.git.commit"]
        assert _is_commit_of_this_checkout(commit) if in_checkout else commit == "unknown", (name, commit)
        assert run["tags"]["mlflow.source.name"] == "rmt"

    # The dataset is every step's logged input, one digest throughout, by context.
    contexts, digests = {}, set()
    for name, run in runs.items():
        (logged,) = run["inputs"]["dataset_inputs"]
        assert logged["dataset"]["name"] == "memorize-16tok-seed0", name
        assert json.loads(logged["dataset"]["source"]) == {"uri": str(reproduction.data)}
        contexts[name] = {tag["key"]: tag["value"] for tag in logged["tags"]}["mlflow.data.context"]
        digests.add(logged["dataset"]["digest"])
    assert contexts == {DATA: "generated", STAGE_1: "training", STAGE_2: "training", GRID_1: "evaluation",
                        GRID_2: "evaluation", EVALUATE: "evaluation"}
    assert len(digests) == 1

    # Metrics the runs table and compare view use as columns; the curve stays as steps.
    for stage, segments in ((STAGE_1, "1"), (STAGE_2, "2")):
        assert {"best_valid_accuracy", "seconds", "peak_memory_mb"} <= set(runs[stage]["metrics"]), stage
        assert runs[stage]["params"]["segments"] == runs[stage]["tags"]["rmt.stage"] == segments
    evaluate = runs[EVALUATE]
    assert {"accuracy_1", "accuracy_2", "accuracy_4", "accuracy", "peak_memory_mb"} <= set(evaluate["metrics"])
    assert evaluate["params"]["stage.model.num_memory_tokens"] == "2"  # the evaluated stage's settings
    assert evaluate["params"]["stage.train.max_steps"] == "4"
    history = rest(base, "/api/2.0/mlflow/metrics/get-history", run_id=evaluate["info"]["run_id"], metric_key="accuracy")
    assert sorted(point["step"] for point in history["metrics"]) == [1, 2, 4]  # step = number of segments

    # The curriculum's last stage is a logged model of its train run (the Models column).
    assert not runs[STAGE_1]["outputs"].get("model_outputs")
    (output,) = runs[STAGE_2]["outputs"]["model_outputs"]
    assert int(output["step"]) == 4  # the stage's last training step (TINY: max_steps 4)
    models = rest(base, "/api/2.0/mlflow/logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})
    ours = [model["info"] for model in models["models"]
            if model["info"].get("source_run_id") in {run["info"]["run_id"] for run in runs.values()}]
    assert [model["model_id"] for model in ours] == [output["model_id"]]
    assert ours[0]["name"] == "memorize-seed-0" and ours[0]["status"] == "LOGGED_MODEL_READY"
    assert ours[0]["source_run_id"] == runs[STAGE_2]["info"]["run_id"]
    # Its files went through the server's artifact proxy: the MLmodel and the checkpoint.
    listing = rest(base, f"/api/2.0/mlflow/logged-models/{output['model_id']}/artifacts/directories",
                   artifact_directory_path="artifacts/best")
    assert {"artifacts/best/config.json", "artifacts/best/model.safetensors"} <= {f["path"] for f in listing["files"]}
    with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/logged-models/{output['model_id']}/artifacts/files?"
                                "artifact_file_path=MLmodel", timeout=60) as response:
        mlmodel = yaml.safe_load(response.read())
    assert mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"] == "artifacts/best"


def _readme_filters() -> list[str]:
    """The run filters the README's comparisons tell users to paste into the search box."""
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^\s*(tags\.`rmt\.task` = .*)$", readme, flags=re.MULTILINE)


def test_the_readmes_comparison_filters_find_the_runs_they_promise(reproduction, monkeypatch):
    base, group = reproduction.base, reproduction.group
    experiment_id = _experiment(base)["experiment_id"]
    runs = _runs_of_group(base, experiment_id, group)
    ours = {run["info"]["run_id"]: name for name, run in runs.items()}

    def found(filter_string: str) -> set[str]:  # the names of this reproduction's runs it finds
        runs = rest(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000})["runs"]
        return {ours[run["info"]["run_id"]] for run in runs if run["info"]["run_id"] in ours}

    stages, configurations = _readme_filters()
    assert found(stages) == {GRID_1, GRID_2}  # stage against stage: one grid per stage
    assert found(stages.replace("'grid'", "'train'")) == {STAGE_1, STAGE_2}
    # Configuration against configuration: the evaluations, grouped by their configuration tags.
    assert found(configurations.replace("detect_and_memorize", "memorize")) == {EVALUATE}
    assert runs[EVALUATE]["tags"]["rmt.config_files"] and runs[EVALUATE]["tags"]["rmt.config"]
    # The README's Python version: search_runs' columns by those names, one row per configuration.
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    client = mlflow.MlflowClient()
    frame = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=configurations.replace(
        "detect_and_memorize", "memorize") + f" AND tags.`rmt.group` = '{group}'")
    assert client.get_run(frame["run_id"].item()).info.run_name == EVALUATE
    summary = frame.groupby("tags.rmt.config_files")["metrics.accuracy_4"].agg(["mean", "std", "count"])
    assert summary["count"].tolist() == [1]
    for name in (GRID_1, GRID_2):  # the stage chart: accuracy against segments (step), per stage
        history = rest(base, "/api/2.0/mlflow/metrics/get-history", run_id=runs[name]["info"]["run_id"],
                       metric_key="accuracy")
        assert sorted(point["step"] for point in history["metrics"]) == [1, 2, 3], name


SWATCH = re.compile(r"#[0-9a-f]{6}")  # the label of a run's colour picker, beside its name


class RunsTable(HTMLParser):
    """The runs table as the browser drew it: {run id: {column id: text}}. The grid draws
    each row in several containers (pinned columns, scrolling ones), each tagged with the
    run id (row-id) and its place (row-index), and each cell with its column (col-id)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, page: str):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.place: dict[str, int] = {}  # run id -> row shown at this place from the top
        self._open: list[tuple[str | None, str | None]] = []  # (row, column) of each open element
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        row, column = self._open[-1] if self._open else (None, None)
        attrs = dict(attrs)
        if "row-id" in attrs and "row-index" in attrs:
            self.place[attrs["row-id"]] = int(attrs["row-index"])
        self._open.append((attrs.get("row-id", row), attrs.get("col-id", column)))

    def handle_startendtag(self, tag, attrs):
        pass  # opens nothing

    def handle_endtag(self, tag):
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data):
        row, column = self._open[-1] if self._open else (None, None)
        if row and column and data.strip() and not SWATCH.fullmatch(data.strip()):
            cells = self.rows.setdefault(row, {})
            cells[column] = f"{cells.get(column, '')} {data.strip()}".strip()

    def column(self, row: str, title: str) -> str:
        """A cell by its column's title (the column id is `attributes.\\`<title>\\``)."""
        return self.rows[row].get(f"attributes.`{title}`", "")


def render(url: str, profile: Path, *, until=lambda page: True, attempts: int = 3) -> str:
    """The page's DOM after headless Chromium ran its scripts; rendered again with more
    virtual time when `until` does not hold yet (a slow server on a busy machine)."""
    budget = 30_000
    for _ in range(attempts):
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--window-size=1600,1200", f"--virtual-time-budget={budget}",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        if until(result.stdout):
            break
        budget *= 2
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run "
                    "installs it)")
def test_the_runs_page_renders_the_reproduction_in_headless_chromium(reproduction, tmp_path):
    base, group = reproduction.base, reproduction.group
    experiment_id = _experiment(base)["experiment_id"]
    runs = {run["info"]["run_id"]: name for name, run in _runs_of_group(base, experiment_id, group).items()}
    page = f"{base}/#/experiments/{experiment_id}/runs"

    # The experiment's runs page as it opens: the training runs view with the description,
    # and the reproduction as one row named after its group, its steps folded under it.
    shown = render(page, tmp_path / "profile-default", until=lambda dom: reproduction.parent_id in dom)
    table = RunsTable(shown)
    assert "Training runs" in shown and "Recurrent Memory Transformer reproductions" in shown
    assert set(table.rows) == {reproduction.parent_id}, table.rows
    assert table.column(reproduction.parent_id, "Run Name") == group

    # Filtered by the group and sorted by name (the UI nests runs only in its date order):
    # every step's row with its name, dataset, source and model.
    query = urllib.parse.urlencode({"searchFilter": f"tags.`rmt.group` = '{group}'",
                                    "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
    shown = render(f"{page}?{query}", tmp_path / "profile-group", until=lambda dom: all(run in dom for run in runs))
    table = RunsTable(shown)
    assert set(table.rows) == set(runs), table.rows
    assert {table.column(run, "Run Name") for run in runs} == set(runs.values())
    by_name = {name: run for run, name in runs.items()}
    assert sorted(table.rows, key=table.place.get) == [by_name[name] for name in sorted(runs.values())]
    for name, context in ((DATA, "generated"), (STAGE_1, "training"), (STAGE_2, "training"), (EVALUATE, "evaluation")):
        dataset = table.column(by_name[name], "Dataset")
        assert dataset.startswith("memorize-16tok-seed0 (") and context in dataset, (name, dataset)
        assert table.column(by_name[name], "Source") == "rmt"
    assert table.column(by_name[STAGE_2], "Models") == "memorize-seed-0"
    assert {table.column(by_name[name], "Models") for name in (DATA, STAGE_1, EVALUATE, group)} == {"-"}
