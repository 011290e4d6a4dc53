"""The Snakemake workflow and dvc.yaml: one step list, a checked configuration, and tiny runs
that resume a killed stage and fail with a failing job (the whole tiny pipeline, locally
and through SLURM: tests/test_end_to_end.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from rmt.config import json_schema, load_config
from rmt.pipeline import plan, source_files
from rmt.tracking import RETRY_ATTEMPTS, RETRY_MAX_DELAY
from workflow_project import BIN, ROOT, TINY, dry_run_jobs, environment, interruptible, make_project, mlflow_runs


def snakemake(*arguments, cwd=ROOT, timeout=120):
    """Snakemake in `cwd`; its messages (Snakemake writes them to stderr) in stdout."""
    return subprocess.run([str(BIN / "snakemake"), *arguments], cwd=cwd, env=environment(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


# The one lint the workflow keeps on purpose: its rules name no conda environment, because
# `--sdm conda` builds one from a copy of environment.yml in .snakemake/conda/, where its
# `-e .` is not the project; jobs run in the environment Snakemake was started from (README,
# "On a cluster").
NO_CONDA_LINT = "Specify a conda environment or container for each rule."


def test_lint_is_clean():
    result = snakemake("--lint")
    findings = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("* ")]
    assert findings and all(finding == f"* {NO_CONDA_LINT}:" for finding in findings), result.stdout


def test_committed_files_are_generated_from_the_current_sources(tmp_path):
    from rmt.pipeline import write_dvc_yaml

    write_dvc_yaml(ROOT / "params.yaml", tmp_path / "dvc.yaml")
    expected = (tmp_path / "dvc.yaml").read_text().replace(str(ROOT / "params.yaml"), "params.yaml")
    assert (ROOT / "dvc.yaml").read_text() == expected, "dvc.yaml is stale: run `rmt pipeline dvc`"
    schema = json.loads((ROOT / "workflow" / "schemas" / "config.schema.json").read_text())
    assert schema == json_schema(), "the config schema is stale: run `rmt pipeline schema`"


def _agreement(project_root, config_files):
    """Snakemake's dry run and the plan (dvc.yaml's source) list the same jobs."""
    arguments = ["-n", "-p", "--forceall", *(a for f in config_files[1:] for a in ("--configfile", f))]
    result = snakemake(*arguments, cwd=project_root)
    assert result.returncode == 0, result.stdout
    jobs = [job for job in dry_run_jobs(result.stdout) if job.rule != "all"]
    steps = plan(load_config(*(project_root / f for f in config_files)), list(config_files))
    assert len(jobs) == len(steps)
    by_output = {job.outputs: job for job in jobs}
    for step in steps:
        outputs = {*step.outs, *step.metrics, *step.plots}
        if step.rule == "report":  # DVC keeps reports/ whole; Snakemake lists its files
            job = next(job for job in jobs if job.rule == "report")
            assert all(path.startswith(f"{step.outs[0]}/") for path in job.outputs)
        else:
            job = by_output[frozenset(outputs)]
        # DVC hashes the code folders; Snakemake takes the files in them as inputs.
        assert set(job.inputs) == {*step.deps, *source_files(step.rule, project_root)}, step.name
        command = job.command.split(" > logs/")[0]  # Snakemake adds the log redirection
        assert (job.rule, command) == (step.rule, step.command)


def test_snakemake_and_dvc_run_the_same_steps():
    _agreement(ROOT, ["params.yaml"])
    _agreement(ROOT, ["params.yaml", "config/paper.yaml"])


def test_the_whole_default_dag_has_every_job():
    result = snakemake("-n", "--forceall", "--quiet", "rules")
    assert result.returncode == 0, result.stdout
    # 3 tasks x (data, 7 stages, 7 grid evaluations, 1 evaluation), FLOPs, 2 attention maps, the memory
    # profile, the report, `all`.
    assert "total" in result.stdout and " 54" in result.stdout.split("total")[1].splitlines()[0]


def test_a_job_outside_the_configuration_is_refused_by_name():
    # Wildcards match any seed; the plan holds only the configured ones.
    result = snakemake("-n", "results/memorize/seed-5/evaluation.csv")
    assert result.returncode != 0, result.stdout
    assert "evaluate {'task': 'memorize', 'seed': '5'} is not a job of the configured pipeline" in result.stdout
    assert "seeds [0]" in result.stdout


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"train": {"learning_rate": -1}}, "learning_rate"),
        ({"tasks": {"memorise": {}}}, "memorise"),
        ({"train": {"min_steps": 10, "max_steps": 5}}, "min_steps 10 exceeds max_steps 5"),
        ({"trian": {"learning_rate": 0.1}}, "'trian' was unexpected"),
        ({"train": {"max_steps": "zero"}}, "train.max_steps: 'zero' is not of type 'integer'"),
        ({"tasks": {"memorize": {"data": {"segment_length": 0}}}}, "tasks.memorize.data.segment_length: 0 is less than the minimum of 1"),
    ],
)
def test_a_bad_configuration_fails_before_any_job(tmp_path, overlay, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    result = snakemake("-n", "--configfile", str(bad))
    assert result.returncode != 0 and message in result.stdout, result.stdout
    assert "Job stats" not in result.stdout


def test_values_outside_the_config_files_are_refused():
    result = snakemake("-n", "--config", "seeds=[1]")
    assert result.returncode != 0 and "--configfile" in result.stdout


def test_a_command_line_without_the_machine_share_is_refused_with_the_fix():
    result = snakemake("-n", "--cores", "2", "--resources", "gpu=1")
    assert result.returncode != 0 and "add machine_share with the profile's total" in result.stdout, result.stdout


def test_every_workflow_profile_declares_the_same_machine_share():
    totals = {profile.parent.name: yaml.safe_load(profile.read_text())["resources"]["machine_share"]
              for profile in (ROOT / "profiles").glob("*/config.yaml") if profile.parent.name != "slurm"}
    assert set(totals) == {"default", "gpu"} and len(set(totals.values())) == 1, totals


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_killed_workflow_resumes_its_training_stage(tmp_path, kill):
    config = json.loads(json.dumps(TINY))
    config["data"]["curriculum_segments"] = [1]
    config["train"].update(max_steps=400, eval_every=2, eval_examples=4, patience=1000)
    project = make_project(tmp_path / "project", config)
    # The stage as the target: on one core Snakemake may otherwise start with jobs that do not
    # lead to it (the memory profile), and the test would time their run, not the stage's.
    stage = "results/memorize/seed-0/stage-1"
    target = f"{stage}/metrics.json"
    output = (tmp_path / "snakemake.out").open("w")  # a file, not a pipe nobody reads while it runs
    process = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", target], cwd=project.root,
                               env=environment(project.root), stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True,
                               preexec_fn=interruptible)
    state = project.root / stage / "checkpoints/last/training_state.pt"
    history = project.root / stage / "history.jsonl"
    deadline = time.monotonic() + 300
    while not (history.is_file() and len(history.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "snakemake.out").read_text()
        time.sleep(0.1)
    # Ctrl-C: the terminal signals Snakemake and its jobs. kill -9: all die where they stand.
    os.killpg(process.pid, kill)
    # Snakemake exits once its job has ended its MLflow run FAILED. On a busy machine that
    # write can wait out SQLite's 20 s busy timeout on every retry (CI once took over 120 s).
    process.wait(timeout=RETRY_ATTEMPTS * (20 + RETRY_MAX_DELAY) + 60)
    output.close()
    assert state.is_file()
    assert not (project.root / target).exists()
    killed_at = len(history.read_text().splitlines())
    if kill == signal.SIGKILL:  # Snakemake had no chance to remove its lock (README)
        project.snakemake("--unlock")

    project.snakemake("--cores", "1", target)
    log = (project.root / "logs/train/memorize/seed-0/stage-1.log").read_text()
    metrics = json.loads((project.root / target).read_text())
    assert metrics["steps"] == 400
    assert len(history.read_text().splitlines()) == 200  # none lost, none repeated
    assert "starting the stage afresh" not in log and "Resuming the stage at step" in log
    assert 3 <= killed_at < 200


@pytest.mark.slow
def test_a_failing_job_fails_the_workflow_and_its_run(tmp_path):
    config = json.loads(json.dumps(TINY))
    # Training that diverges fails inside its run (bad input, such as a missing CUDA device,
    # is refused before any run opens).
    config["train"].update(learning_rate=1e30, clip_value=None, warmup_steps=0)
    project = make_project(tmp_path / "project", config)
    result = project.snakemake(check=False)
    assert result.returncode != 0
    output = result.stdout
    assert "logs/train/memorize/seed-0/stage-1.log" in output
    failed = [run for run in mlflow_runs(project) if run.data.tags["rmt.step"] == "train"]
    assert [run.info.status for run in failed] == ["FAILED"]


def test_a_training_job_with_several_gpus_runs_under_torchrun():
    # The GPU workflow profile gives every training stage 4 GPUs (the paper's recipe).
    several = snakemake("results/memorize/seed-0/stage-2/metrics.json", "-n", "-p", "--forceall",
                        "--configfile", "config/paper.yaml", "--workflow-profile", "profiles/gpu")
    assert several.returncode == 0, several.stdout
    commands = [job.command for job in dry_run_jobs(several.stdout) if job.rule == "train"]
    assert commands and all(c.startswith("torchrun --standalone --nproc-per-node 4 -m rmt train ") for c in commands)
    one = snakemake("-n", "-p", "--forceall", "results/memorize/seed-0/stage-2/metrics.json")
    assert all(job.command.startswith("rmt train ") for job in dry_run_jobs(one.stdout) if job.rule == "train")


def test_code_dependencies_follow_the_import_graph(tmp_path):
    from rmt.pipeline import ENTRY_MODULES, code_dependencies

    package = tmp_path / "rmt"
    (package / "sub").mkdir(parents=True)
    files = {
        # A lazy re-export runs only for a module that takes the name from the package.
        "__init__.py": "def __getattr__(name):\n    import rmt.heavy\n",
        "entry.py": "from typing import TYPE_CHECKING\nfrom rmt.sub import helper\nif TYPE_CHECKING:\n"
                    "    from rmt import typed_only\n\ndef later():\n    from rmt.lazy import thing\n",
        "sub/__init__.py": "", "sub/helper.py": "import rmt.deep\nfrom .sibling import x\nfrom .. import up\n",
        "sub/sibling.py": "", "up.py": "", "deep.py": "", "lazy.py": "", "heavy.py": "", "typed_only.py": "",
        "unrelated.py": "", "user.py": "from rmt import Heavy\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    assert code_dependencies("rmt.entry", tmp_path) == [
        "rmt/__init__.py", "rmt/deep.py", "rmt/entry.py", "rmt/lazy.py", "rmt/sub/__init__.py", "rmt/sub/helper.py",
        "rmt/sub/sibling.py", "rmt/up.py"]
    assert code_dependencies("rmt.user", tmp_path) == ["rmt/__init__.py", "rmt/heavy.py", "rmt/user.py"]
    # The project's own map: evaluation runs the model and the generator (the test split is
    # generated at evaluation); no step's results depend on the tracking module.
    evaluate = code_dependencies(ENTRY_MODULES["evaluate"])
    assert {"rmt/model/encoder.py", "rmt/data/generator.py", "rmt/checkpoint.py"} <= set(evaluate)
    assert "rmt/paper.py" in code_dependencies(ENTRY_MODULES["report"])
    assert all("rmt/tracking.py" not in code_dependencies(module) for module in ENTRY_MODULES.values())
    assert "rmt/train.py" not in code_dependencies(ENTRY_MODULES["data"])


def test_a_local_noise_file_is_an_input_of_the_data_step(tmp_path):
    from rmt.pipeline import noise_files

    noise = tmp_path / "noise"
    (noise / "more").mkdir(parents=True)
    (noise / "a.txt").write_text("x")
    (noise / "more" / "b.txt").write_text("y")
    (noise / "notes.md").write_text("z")
    data = load_config(ROOT / "params.yaml").for_task("memorize").data
    assert noise_files(data) == ()  # pydoc ships with Python
    assert noise_files(data.model_copy(update={"noise": str(noise)})) == (str(noise / "a.txt"),
                                                                        str(noise / "more" / "b.txt"))
    assert noise_files(data.model_copy(update={"noise": str(noise / "a.txt")})) == (str(noise / "a.txt"),)


def test_a_stale_dvc_yaml_is_refused_with_the_fix(tmp_path, monkeypatch):
    from rmt.pipeline import check_dvc_yaml, write_dvc_yaml
    from rmt.utils import UserError

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    write_dvc_yaml(params, tmp_path / "dvc.yaml")
    assert check_dvc_yaml(params, tmp_path / "dvc.yaml").read_text().endswith("matches " + str(params) + "\n")
    params.write_text(params.read_text().replace("seeds: [0]", "seeds: [0, 1]"))  # DVC alone cannot see this
    with pytest.raises(UserError, match="run `rmt pipeline dvc`"):
        check_dvc_yaml(params, tmp_path / "dvc.yaml")


def test_a_dvc_stage_depends_on_its_own_stage_train_entries_only():
    """Lowering the last stage's rate (params.yaml's `stage_train.last`) retrains the last
    stage under `dvc repro`, not the stages before it."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    curriculum = load_config(ROOT / "params.yaml").for_task("memorize").curriculum
    first, last = (stages[f"train-memorize-seed0-stage{n}"]["params"] for n in (curriculum[0], curriculum[-1]))
    assert "stage_train.last" in last and "stage_train.last" not in first and "stage_train" not in first
