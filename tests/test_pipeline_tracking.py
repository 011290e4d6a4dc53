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
                                      "train": {"max_steps": 4, "eval_every": 2, "batch_size": 8}}))
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
    assert len(train["tags"]["rmt.git_commit"]) >= 7
    # One configuration: the seed summary groups the evaluation with the training that made it.
    assert train["tags"]["rmt.config"] == runs["evaluate"]["tags"]["rmt.config"]
    assert runs["evaluate"]["tags"]["rmt.config_files"] == str(config)
    assert train["params"]["train.max_steps"] == "4" and train["params"]["model.num_memory_tokens"] == "2"
    assert [step for step, _ in metric_history(train["run_id"], "train_loss")] == [1, 2, 3, 4]
    assert [step for step, _ in metric_history(train["run_id"], "valid_accuracy")] == [2, 4]
    for run in runs.values():  # CPU and memory use sampled while each command ran
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run["metrics"])
    evaluate = metric_history(runs["evaluate"]["run_id"], "accuracy")
    assert [step for step, _ in evaluate] == [1, 3]  # step = number of segments


def test_a_failing_step_is_marked_failed(tmp_path, monkeypatch):
    group = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RMT_GROUP", group)
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(app, ["data", "generate", "memorize", str(data), "--set", "data.train_examples=16",
                                 "--set", "data.valid_examples=8", "--set", "data.curriculum_segments=[1]",
                                 "--set", "data.test_segments=[1]", "--set", "data.samples=0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--data", str(data), "--segments", "1", "--output", str(tmp_path / "s"),
                                 "--init", str(tmp_path)])
    assert result.exit_code == 2 and "not an RMT checkpoint" in result.output
    runs = search_runs(experiment=EXPERIMENT, filter_string=f"tags.\"rmt.group\" = '{group}'")
    statuses = {run["tags"]["rmt.step"]: run["status"] for run in runs}
    assert statuses == {"data": "FINISHED", "train": "FAILED"}
