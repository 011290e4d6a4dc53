"""Every pipeline step is an MLflow run: data, training stage, evaluation, grouped."""

import uuid

import yaml
from typer.testing import CliRunner

from rmt.cli import app
from rmt.tracking import EXPERIMENT, search_runs

TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def metric_history(run_id, key):
    from mlflow.tracking import MlflowClient

    from rmt.tracking import tracking_uri

    return [(m.step, m.value) for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key)]


def test_data_train_and_evaluate_are_tracked_as_one_group(tmp_path, monkeypatch):
    group = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RMT_GROUP", group)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # MLflow's default: every 10 s
    runner = CliRunner()
    data, stage = tmp_path / "data", tmp_path / "stage-1"
    result = runner.invoke(app, ["data", "generate", "memorize", str(data), "--set", "data.segment_length=32",
                                 "--set", "data.train_examples=64", "--set", "data.valid_examples=16",
                                 "--set", "data.curriculum_segments=[1]", "--set", "data.test_segments=[1,3]",
                                 "--set", "data.test_examples=8", "--set", "data.samples=1"])
    assert result.exit_code == 0, result.output
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump({"model": {"pretrained": False, "backbone_overrides": TINY_BERT,
                                                "num_memory_tokens": 2},
                                      "train": {"max_steps": 4, "eval_every": 2, "batch_size": 8},
                                      "stage_train": {"last": {"learning_rate": 3e-4}}}))
    result = runner.invoke(app, ["train", "--data", str(data), "--segments", "1", "--output", str(stage),
                                 "--config", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(stage / "best"), "--data", str(data),
                                 "--output", str(tmp_path / "eval.csv"), "--config", str(config)])
    assert result.exit_code == 0, result.output

    runs = {run["tags"]["rmt.step"]: run for run in search_runs(experiment=EXPERIMENT,
                                                                  filter_string=f"tags.\"rmt.group\" = '{group}'")}
    assert sorted(runs) == ["data", "evaluate", "train"]
    assert all(run["status"] == "FINISHED" for run in runs.values())
    train = runs["train"]
    assert train["name"] == "memorize/seed-0/stage-1/train"
    assert train["tags"]["rmt.task"] == "memorize" and train["tags"]["rmt.stage"] == "1"
    assert train["tags"]["rmt.data_hash"] == runs["data"]["tags"]["rmt.data_hash"]
    assert len(train["tags"]["mlflow.source.git.commit"]) >= 7
    # One configuration: the seed summary groups the evaluation with the training that made it.
    assert train["tags"]["rmt.config"] == runs["evaluate"]["tags"]["rmt.config"]
    assert runs["evaluate"]["tags"]["rmt.config_files"] == str(config)
    assert train["params"]["train.max_steps"] == "4" and train["params"]["model.num_memory_tokens"] == "2"
    # The data's curriculum is [1]: its one stage is the `last` stage_train names, whatever
    # curriculum the configuration itself holds (its default, 1..7).
    assert float(train["params"]["train.learning_rate"]) == 3e-4
    assert [step for step, _ in metric_history(train["run_id"], "train_loss")] == [1, 2, 3, 4]
    assert [step for step, _ in metric_history(train["run_id"], "valid_accuracy")] == [2, 4]
    # Time and peak memory as columns: the peak is absolute (the process, weights and all).
    assert train["metrics"]["seconds"] > 0 and train["metrics"]["peak_memory_mb"] > 100
    assert runs["evaluate"]["metrics"]["peak_memory_mb"] > 100
    for run in runs.values():  # CPU and memory use sampled while each command ran
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run["metrics"])
    evaluate = metric_history(runs["evaluate"]["run_id"], "accuracy")
    assert [step for step, _ in evaluate] == [1, 3]  # step = number of segments
    # By name too, for the runs table; and with the settings that trained the checkpoint.
    assert {"accuracy_1", "accuracy_3"} <= set(runs["evaluate"]["metrics"])
    assert runs["evaluate"]["params"]["stage.model.num_memory_tokens"] == "2"
    assert runs["evaluate"]["params"]["stage.train.max_steps"] == "4"
    # The dataset is each run's MLflow input, the same one throughout, by context.
    from mlflow.tracking import MlflowClient

    from rmt.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    inputs = {step: client.get_run(run["run_id"]).inputs.dataset_inputs for step, run in runs.items()}
    contexts = {step: [tag.value for tag in found[0].tags] for step, found in inputs.items()}
    assert contexts == {"data": ["generated"], "train": ["training"], "evaluate": ["evaluation"]}
    assert len({found[0].dataset.digest for found in inputs.values()}) == 1
    assert inputs["train"][0].dataset.name == "memorize-32tok-seed0"
    # The curriculum's last stage (here its only one) is an MLflow model of its train run.
    outputs = client.get_run(train["run_id"]).outputs.model_outputs
    assert [output.step for output in outputs] == [4]  # the stage's last training step
    model = client.get_logged_model(outputs[0].model_id)
    assert model.name == "memorize-seed-0" and model.source_run_id == train["run_id"]
    assert model.params["train.max_steps"] == "4" and [m.key for m in model.metrics] == ["best_valid_accuracy"]


def _memorize_data(runner, data):
    result = runner.invoke(app, ["data", "generate", "memorize", str(data), "--set", "data.train_examples=16",
                                 "--set", "data.valid_examples=8", "--set", "data.curriculum_segments=[1]",
                                 "--set", "data.test_segments=[1]", "--set", "data.samples=0",
                                 "--set", "data.segment_length=24"])
    assert result.exit_code == 0, result.output


def test_a_failing_step_is_marked_failed_and_bad_input_opens_no_run(tmp_path, monkeypatch):
    group = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RMT_GROUP", group)
    runner = CliRunner()
    data = tmp_path / "data"
    _memorize_data(runner, data)
    result = runner.invoke(app, ["train", "--data", str(data), "--segments", "1", "--output", str(tmp_path / "s"),
                                 "--init", str(tmp_path)])
    assert result.exit_code == 2 and "not an RMT checkpoint" in result.output
    assert not (tmp_path / "s").exists()  # refused before anything was written
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"pretrained": False, "backbone_overrides": TINY_BERT},
                                      "train": {"max_steps": 8, "eval_every": 4, "batch_size": 4,
                                                "learning_rate": 1e30, "warmup_steps": 0, "clip_value": None}}))
    result = runner.invoke(app, ["train", "--data", str(data), "--segments", "1", "--output", str(tmp_path / "d"),
                                 "--config", str(config)])
    assert result.exit_code == 2 and "The loss became" in result.output, result.output
    runs = search_runs(experiment=EXPERIMENT, filter_string=f"tags.\"rmt.group\" = '{group}'")
    statuses = {run["tags"]["rmt.step"]: run["status"] for run in runs}
    assert statuses == {"data": "FINISHED", "train": "FAILED"}


def test_a_resumed_stage_continues_its_run_and_logs_no_step_twice(tmp_path, monkeypatch):
    import torch

    group = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RMT_GROUP", group)
    runner = CliRunner()
    data, stage = tmp_path / "data", tmp_path / "stage-1"
    _memorize_data(runner, data)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"pretrained": False, "backbone_overrides": TINY_BERT},
                                      "train": {"max_steps": 9, "eval_every": 3, "batch_size": 4,
                                                "warmup_steps": 0}}))
    command = ["train", "--data", str(data), "--segments", "1", "--output", str(stage), "--config", str(config)]
    original, calls = torch.nn.utils.clip_grad_value_, {"count": 0}

    def crash_at_step_5(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 5:  # after the checkpoint of step 3, with step 4 done but not saved
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", crash_at_step_5)
    assert runner.invoke(app, command).exit_code != 0
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", original)
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    runs = search_runs(experiment=EXPERIMENT, filter_string=f"tags.\"rmt.group\" = '{group}' and "
                                                           "tags.\"rmt.step\" = 'train'")
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert [step for step, _ in metric_history(runs[0]["run_id"], "train_loss")] == list(range(1, 10))
    assert [step for step, _ in metric_history(runs[0]["run_id"], "valid_accuracy")] == [3, 6, 9]


def test_runs_of_dead_processes_are_ended_when_a_step_starts(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from mlflow import MlflowClient

    from rmt.tracking import HOSTNAME_TAG, PID_TAG, Run, tracking_uri

    group = f"test-{uuid.uuid4().hex[:8]}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    client = MlflowClient(tracking_uri())
    with Run(experiment=EXPERIMENT, name="alive", group=group, system_metrics=False):
        pass  # makes sure the experiment exists
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    orphan = client.create_run(experiment, run_name="killed -9", tags={
        HOSTNAME_TAG: socket.gethostname(), PID_TAG: dead.stdout.strip(), "rmt.group": group})
    elsewhere = client.create_run(experiment, run_name="other host", tags={
        HOSTNAME_TAG: "another-node", PID_TAG: dead.stdout.strip(), "rmt.group": group})
    with Run(experiment=EXPERIMENT, name="next step", group=group, system_metrics=False):
        assert client.get_run(orphan.info.run_id).info.status == "KILLED"
        assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot be checked from here
    client.set_terminated(elsewhere.info.run_id)
