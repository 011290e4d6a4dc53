"""`rmt profile memory`: measured memory and time of RMT against full attention, full
attention stopped at its budget and projected beyond, training memory against segments."""

from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
import pytest

from rmt.config import load_config
from rmt.profile.memory import (
    Budget, INFERENCE_FIELDS, Measurement, TRAINING_FIELDS, _quadratic_fit, crossover_tokens, flat_memory_ratio,
    profile_memory, run_measurement,
)
from rmt.settings import ModelSettings
from workflow_project import BIN, TINY

TINY_MODEL = ModelSettings(**TINY["model"])


def fake_point(spec: Measurement) -> dict:
    """Costs with the shapes of the real ones: RMT flat memory and linear time, full
    attention quadratic memory and time; training linear (BPTT) or flat (memory-efficient)."""
    if spec.kind == "stream":
        return {"peak_memory_mb": 20.0, "seconds": 1e-4 * spec.tokens}
    if spec.kind == "full_attention":
        return {"peak_memory_mb": 10.0 + 1e-6 * spec.tokens**2, "seconds": 1e-9 * spec.tokens**2}
    growth = 0.0 if spec.memory_efficient else 5.0 * spec.segments
    return {"peak_memory_mb": 50.0 + growth, "step_seconds": 0.1 * spec.segments}


def test_full_attention_stops_at_its_budget_and_the_rest_is_projected():
    calls = []

    def counting(spec):
        calls.append(spec)
        return fake_point(spec)

    tokens = [512, 1024, 2048, 4096, 8192, 16384, 32768]
    # 4096 tokens cost 26.8 MB; the next length's bound (4x) is 107 MB, over the budget.
    profile = profile_memory(model=TINY_MODEL, segment_length=16, tokens=tokens, full_attention=["eager"],
                             budget=Budget(memory_mb=100, seconds=1e9), train_segments=[1, 4], progress=False,
                             measure_point=counting)
    full = [row for row in profile.inference if row["method"] == "full-eager"]
    assert [row["tokens"] for row in full if row["measured"]] == [512, 1024, 2048, 4096]
    assert [row["tokens"] for row in full if not row["measured"]] == [8192, 16384, 32768]
    assert not [spec for spec in calls if spec.kind == "full_attention" and spec.tokens > 4096], "projected, never run"
    projected = {row["tokens"]: row["peak_memory_mb"] for row in full}
    assert projected[32768] == pytest.approx(10.0 + 1e-6 * 32768**2, rel=0.01)  # the quadratic, recovered
    rmt = [row for row in profile.inference if row["method"] == "rmt"]
    assert all(row["measured"] for row in rmt) and [row["segments"] for row in rmt][-1] == 32768 // 16
    summary = profile.summary
    assert summary["crossover"]["full-eager"] == {"memory_from_tokens": 4096, "time_from_tokens": None,
                                                  "longest_measured_tokens": 4096}
    assert summary["flat_memory_ratio"] == {"tokens": 32768, "reference_tokens": 8192, "ratio": 1.0}
    assert summary["training"] == {"bptt": {"segments": [1, 4], "peak_ratio": 1.2727},
                                   "memory-efficient": {"segments": [1, 4], "peak_ratio": 1.0}}


def test_the_time_budget_stops_full_attention_too():
    profile = profile_memory(model=TINY_MODEL, segment_length=16, tokens=[1000, 2000, 4000, 8000, 16000],
                             full_attention=["sdpa"], budget=Budget(memory_mb=1e9, seconds=0.05), train_segments=[1],
                             progress=False, measure_point=fake_point)
    # 4000 tokens take 0.016 s; 8000 would be bounded by 0.064 s, over 0.05 s.
    measured = [row["tokens"] for row in profile.inference if row["method"] == "full-sdpa" and row["measured"]]
    assert measured == [1000, 2000, 4000]


def test_with_too_few_points_to_fit_the_projection_is_the_bound():
    profile = profile_memory(model=TINY_MODEL, segment_length=16, tokens=[1000, 4000, 16000, 64000],
                             full_attention=["eager"], budget=Budget(memory_mb=20, seconds=1e9), train_segments=[1],
                             progress=False, measure_point=fake_point)
    full = {row["tokens"]: row for row in profile.inference if row["method"] == "full-eager"}
    assert [t for t, row in full.items() if row["measured"]] == [1000]  # 11 MB; 4000 tokens bounded by 176 MB
    assert full[4000]["peak_memory_mb"] == pytest.approx(11.0 * 16) and full[64000]["peak_memory_mb"] == pytest.approx(11.0 * 64**2)


def test_the_projection_never_falls_with_length():
    # Noisy points whose unconstrained quadratic would bend down.
    fit = _quadratic_fit([(1000, 10.0), (2000, 30.0), (4000, 35.0)])
    assert fit(8000) >= fit(4000) >= fit(2000) >= 0


def test_crossover_and_flat_ratio_read_the_grid():
    rmt = [{"tokens": t, "peak_memory_mb": 5.0, "seconds": 1.0} for t in (1, 2, 3, 4)]
    full = [{"tokens": 1, "peak_memory_mb": 1.0, "seconds": 2.0}, {"tokens": 2, "peak_memory_mb": 9.0, "seconds": 0.5},
            {"tokens": 3, "peak_memory_mb": 9.0, "seconds": 2.0}, {"tokens": 4, "peak_memory_mb": 9.0, "seconds": 3.0}]
    assert crossover_tokens(rmt, full, "peak_memory_mb") == 2
    assert crossover_tokens(rmt, full, "seconds") == 3  # cheaper at 1 too, but not at 2
    assert crossover_tokens(full, rmt, "peak_memory_mb") is None
    assert flat_memory_ratio(rmt) is None  # nothing from 8192 tokens on


def test_a_real_measurement_counts_the_weights_and_not_the_runtime():
    spec = Measurement(kind="stream", model=TINY_MODEL.model_dump(mode="json"), segment_length=16, tokens=256)
    result = run_measurement(spec)  # a fresh process, as the command measures
    # The tiny model: 30522 x 32 embeddings and one small layer, about 4 MB of float32.
    assert 3.5 < result["peak_memory_mb"] < 60, result
    assert result["seconds"] > 0 and result["device"] == "cpu"


@pytest.fixture
def profile_config(tmp_path):
    overlay = tmp_path / "profile.yaml"
    overlay.write_text(json.dumps({"profile": {"tokens": [32, 64, 128], "full_attention": ["eager"],
                                               "train_segments": [1, 2], "train_batch_size": 2, "train_steps": 1}}))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({key: value for key, value in TINY.items() if key != "profile"}))
    return [params, overlay]


@pytest.mark.slow  # a dozen fresh processes, each measuring one point: about a minute
def test_the_command_measures_writes_and_tracks(profile_config, tmp_path):
    from mlflow import MlflowClient

    output = tmp_path / "results" / "profile" / "memory"
    arguments = [a for path in profile_config for a in ("--config", str(path))]
    result = subprocess.run([str(BIN / "rmt"), "profile", "memory", "--output", str(output), *arguments],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr
    inference, training = pd.read_csv(output / "inference.csv"), pd.read_csv(output / "training.csv")
    assert tuple(inference.columns) == INFERENCE_FIELDS and tuple(training.columns) == TRAINING_FIELDS
    assert sorted(set(inference["method"])) == ["full-eager", "rmt"]
    assert inference["measured"].all() and (inference["peak_memory_mb"] > 0).all()
    assert sorted(zip(training["segments"], training["backprop"])) == [
        (1, "bptt"), (1, "memory-efficient"), (2, "bptt"), (2, "memory-efficient")]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["segment_length"] == TINY["data"]["segment_length"] and "full-eager" in summary["crossover"]
    assert "RMT cheaper than full-eager" in result.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("rmt").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.tags["rmt.step"] == "memory"
    history = client.get_metric_history(run.info.run_id, "peak_memory_mb/rmt")
    assert sorted(point.step for point in history) == [32, 64, 128]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"inference.csv", "training.csv", "summary.json"}


def test_bad_profile_settings_fail_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="at least 3 lengths"):
        load_config_with(tmp_path, {"profile": {"tokens": [512, 1024]}})
    with pytest.raises(ValueError, match="full_attention"):
        load_config_with(tmp_path, {"profile": {"full_attention": ["flash"]}})


def load_config_with(tmp_path, values):
    path = tmp_path / "overlay.yaml"
    path.write_text(json.dumps(values))
    return load_config(path)
