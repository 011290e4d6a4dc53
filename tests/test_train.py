"""One curriculum stage: exact resume, stopping rules, divergence, bad input."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rmt.train as train_module
from rmt.data.dataset import DataConfig, build_dataset
from rmt.model import RecurrentMemoryEncoder
from rmt.drifted_memory import DriftedMemory
from rmt.objective import new_model
from rmt.settings import FormStep, ModelSettings, TrainSettings
from rmt.train import TrainingDiverged, train_stage

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
MODEL = ModelSettings(pretrained=False, backbone_overrides=TINY_BERT, num_memory_tokens=4)
TRAIN = TrainSettings(learning_rate=1e-3, warmup_steps=4, max_steps=24, batch_size=8, micro_batch_size=4,
                      eval_every=6, patience=100)


def validated(train: TrainSettings, **changes) -> TrainSettings:
    """`train` with `changes`, validated as params.yaml would be (model_copy does not validate)."""
    return TrainSettings.model_validate({**train.model_dump(), **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = DataConfig(task="memorize", segment_length=32, train_examples=200, valid_examples=24,
                        curriculum_segments=[1, 2], test_segments=[1], samples=0)
    return build_dataset(config, tmp_path_factory.mktemp("data") / "memorize", progress=False)


@pytest.fixture(scope="module")
def stage_1(data, tmp_path_factory):
    """One stage of TRAIN on 1 segment, trained once for the tests that only read it, resume
    from it or start from it: (its folder, train_stage's metrics). A test that changes the
    folder changes a copy (`copy_stage`)."""
    folder = tmp_path_factory.mktemp("stage") / "stage-1"
    return folder, train_stage(data_dir=data, segments=1, output=folder, model=MODEL, train=TRAIN, progress=False)


def copy_stage(stage, folder):
    """A copy of a finished stage for a test to change: every file, without the lock."""
    shutil.copytree(stage, folder, ignore=shutil.ignore_patterns("*.lock"))
    return folder


def outcome(folder):
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.pop("seconds")
    history = (folder / "history.jsonl").read_text()
    weights = {name: load_file(folder / name / "model.safetensors") for name in ("best", "checkpoints/last")}
    return metrics, history, weights


def crash_in_step(step: int, monkeypatch) -> Callable:
    """Make training raise KeyboardInterrupt in step `step` (after backward, before the
    optimizer's step); returns the function to patch back for the run that resumes."""
    original, calls = torch.nn.utils.clip_grad_value_, {"count": 0}

    def crash(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", crash)
    return original


def assert_crash_resumes_to(whole_folder, data_dir, *, segments, train, crash_at, monkeypatch):
    """A stage killed in step `crash_at`, then run again, ends as the uninterrupted one in
    `whole_folder` did: metrics, history and both checkpoints' weights."""
    folder = whole_folder.parent / "resumed"
    original = crash_in_step(crash_at, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_stage(data_dir=data_dir, segments=segments, output=folder, model=MODEL, train=train, progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", original)
    train_stage(data_dir=data_dir, segments=segments, output=folder, model=MODEL, train=train, progress=False)
    whole, resumed = outcome(whole_folder), outcome(folder)
    assert resumed[:2] == whole[:2]
    for name in ("best", "checkpoints/last"):
        for key, tensor in whole[2][name].items():
            assert torch.equal(resumed[2][name][key], tensor), (name, key)


def test_a_stage_killed_midway_resumes_to_the_same_result(data, tmp_path, monkeypatch, capsys):
    train_stage(data_dir=data, segments=2, output=tmp_path / "whole", model=MODEL, train=TRAIN, progress=False)

    # Crash in the middle of step 15: after backward, before the optimizer step, between
    # the checkpoints of steps 12 and 18.
    original = crash_in_step(15, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_stage(data_dir=data, segments=2, output=tmp_path / "resumed", model=MODEL, train=TRAIN, progress=False)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert saved["counters"]["step"] == 12
    # Worse, kill -9 had struck the next save between its two renames: the complete last
    # checkpoint is set aside and a half-written one lies beside it.
    checkpoints = tmp_path / "resumed" / "checkpoints"
    (checkpoints / ".last.old-x").mkdir()
    (checkpoints / "last").rename(checkpoints / ".last.old-x" / "last")
    (checkpoints / ".last.tmp-y").mkdir()
    (checkpoints / ".last.tmp-y" / "model.safetensors").write_bytes(b"half")
    # The resumed run redoes steps 13..24 and must not repeat or lose a history line.
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", original)
    capsys.readouterr()
    train_stage(data_dir=data, segments=2, output=tmp_path / "resumed", model=MODEL, train=TRAIN, progress=False)
    assert "Resuming the stage at step 12" in capsys.readouterr().err
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best", "last"]

    whole, resumed = outcome(tmp_path / "whole"), outcome(tmp_path / "resumed")
    assert resumed[0] == whole[0]
    assert resumed[1] == whole[1]
    for name in ("best", "checkpoints/last"):
        for key, tensor in whole[2][name].items():
            assert torch.equal(resumed[2][name][key], tensor), (name, key)
    # Running the finished stage again does nothing.
    again = train_stage(data_dir=data, segments=2, output=tmp_path / "resumed", model=MODEL, train=TRAIN, progress=False)
    assert again["steps"] == 24


def test_curriculum_stage_starts_from_the_previous_checkpoint(data, stage_1, tmp_path):
    previous, first = stage_1  # only read: the next stage starts from its best checkpoint
    assert first["stop_reason"] == "max_steps"
    second = train_stage(data_dir=data, segments=2, output=tmp_path / "stage-2", model=MODEL,
                         train=TRAIN.model_copy(update={"max_steps": 6}), init=previous / "best",
                         progress=False)
    assert second["steps"] == 6
    config = json.loads((tmp_path / "stage-2" / "config.json").read_text())
    assert config["init"].endswith("stage-1/best")


def test_stopping_rules(data, tmp_path):
    stalled = train_stage(data_dir=data, segments=1, output=tmp_path / "stalled", model=MODEL,
                          train=TRAIN.model_copy(update={"learning_rate": 1e-12, "patience": 2, "max_steps": 60}),
                          progress=False)
    assert stalled["stop_reason"] == "early_stopping" and stalled["steps"] == 18
    reached = train_stage(data_dir=data, segments=1, output=tmp_path / "reached", model=MODEL,
                          train=TRAIN.model_copy(update={"target_accuracy": 0.01}), progress=False)
    assert reached["stop_reason"] == "target_accuracy" and reached["steps"] == 6
    held = train_stage(data_dir=data, segments=1, output=tmp_path / "held", model=MODEL,
                       train=TRAIN.model_copy(update={"target_accuracy": 0.01, "min_steps": 12}), progress=False)
    assert held["stop_reason"] == "target_accuracy" and held["steps"] == 12


def test_accuracy_ties_keep_the_checkpoint_with_the_lower_validation_loss(data, tmp_path, monkeypatch):
    scores = iter([(1.0, 0.5), (1.0, 0.2), (1.0, 0.3), (0.9, 0.1)])  # steps 6, 12, 18, 24
    monkeypatch.setattr(train_module, "evaluate_arrays", lambda *args, **kwargs: next(scores))
    metrics = train_stage(data_dir=data, segments=1, output=tmp_path / "ties", model=MODEL, train=TRAIN,
                          progress=False)
    assert (metrics["best_step"], metrics["best_valid_accuracy"], metrics["best_valid_loss"]) == (12, 1.0, 0.2)
    history = [json.loads(line) for line in (tmp_path / "ties" / "history.jsonl").read_text().splitlines()]
    assert [record["valid_loss"] for record in history] == [0.5, 0.2, 0.3, 0.1]


def test_a_longer_validation_length_chooses_and_stops_the_stage(data, tmp_path, monkeypatch):
    seen = []

    def record(model, objective, tokens, labels, *args, **kwargs):
        seen.append((tokens.shape, len(labels)))
        return 0.5, 1.0

    monkeypatch.setattr(train_module, "evaluate_arrays", record)
    metrics = train_stage(data_dir=data, segments=2, output=tmp_path / "long", model=MODEL, progress=False,
                          train=TRAIN.model_copy(update={"valid_length_factor": 3, "eval_examples": 10,
                                                         "max_steps": 6}))
    # 3 x 2 segments of 32 tokens, generated from the validation split (only 1 and 2 are stored).
    assert seen == [((10, 6 * 32), 10)]
    history = [json.loads(line) for line in (tmp_path / "long" / "history.jsonl").read_text().splitlines()]
    assert history[0]["valid_segments"] == 6 and metrics["best_valid_accuracy"] == 0.5


def test_the_generated_validation_set_is_the_validation_split(data):
    dataset = train_module.TaskDataset(data)
    tokens, labels = train_module.validation_set(dataset, 2, None)
    stored_tokens, stored_labels = dataset.arrays("valid", 2)
    assert (tokens == stored_tokens).all() and (labels == stored_labels).all()
    longer, longer_labels = train_module.validation_set(dataset, 5, 7)
    assert longer.shape == (7, 5 * 32) and len(longer_labels) == 7
    # Lengths that are not stored come from the generator's validation split.
    expected = [dataset.generator.example("valid", i, 5 * 32)[1] for i in range(7)]
    assert (longer == expected).all()


def test_other_settings_start_the_stage_afresh(data, stage_1, tmp_path, capsys):
    copy_stage(stage_1[0], tmp_path / "d")  # a finished stage of TRAIN's 24 steps
    longer = train_stage(data_dir=data, segments=1, output=tmp_path / "d", model=MODEL,
                         train=TRAIN.model_copy(update={"max_steps": 12}), progress=False)
    assert "starting the stage afresh" in capsys.readouterr().err
    assert longer["steps"] == 12
    assert len((tmp_path / "d" / "history.jsonl").read_text().splitlines()) == 2


def test_a_stage_from_before_a_setting_existed_is_the_same_run(data, stage_1, tmp_path, capsys):
    # rmt gains a setting whose default is the old behaviour: a stage recorded without it
    # (an older rmt's config.json) is the same run, and resumes or publishes instead of
    # discarding hours of training.
    folder, first = copy_stage(stage_1[0], tmp_path / "stage"), stage_1[1]
    recorded = json.loads((folder / "config.json").read_text())
    for setting in ("schedule", "valid_length_factor", "adam_beta2", "label_smoothing_factor"):
        del recorded["train"][setting]
    (folder / "config.json").write_text(json.dumps(recorded))
    again = train_stage(data_dir=data, segments=1, output=folder, model=MODEL, train=TRAIN, progress=False)
    assert "afresh" not in capsys.readouterr().err and again == first
    # A setting it no longer knows is another run.
    recorded["train"]["retired_setting"] = 1
    (folder / "config.json").write_text(json.dumps(recorded))
    train_stage(data_dir=data, segments=1, output=folder, model=MODEL, train=TRAIN, progress=False)
    assert "starting the stage afresh" in capsys.readouterr().err


def test_adam_beta2_reaches_the_optimizer_and_is_validated(data, tmp_path, monkeypatch):
    betas, adamw = [], torch.optim.AdamW

    def recording_adamw(parameters, **options):
        betas.append(options["betas"])
        return adamw(parameters, **options)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    train_stage(data_dir=data, segments=1, output=tmp_path / "s", model=MODEL,
                train=TRAIN.model_copy(update={"adam_beta2": 0.95, "max_steps": 2}), progress=False)
    assert betas == [(0.9, 0.95)]
    with pytest.raises(ValueError, match="adam_beta2"):
        TrainSettings(adam_beta2=1.0)


@pytest.fixture
def segments_seen(monkeypatch) -> list[int]:
    """The number of segments (of 32 tokens) of every batch the model is given, in order."""
    seen = []
    original = train_module._token_tensor

    def record(tokens, device):
        seen.append(tokens.shape[1] // 32)
        return original(tokens, device)

    monkeypatch.setattr(train_module, "_token_tensor", record)
    return seen


def test_mixed_lengths_train_on_every_curriculum_length_up_to_the_stage(data, tmp_path, segments_seen):
    seen = segments_seen
    mixed = TRAIN.model_copy(update={"mixed_lengths": True, "max_steps": 12, "micro_batch_size": None})
    metrics = train_stage(data_dir=data, segments=2, output=tmp_path / "mixed", model=MODEL, train=mixed,
                          progress=False)
    assert metrics["steps"] == 12 and set(seen) == {1, 2}  # both lengths drawn, one per step
    # Without it, only the stage's own length; and the draws of earlier rmt are unchanged.
    seen.clear()
    train_stage(data_dir=data, segments=2, output=tmp_path / "one", model=MODEL, progress=False,
                train=TRAIN.model_copy(update={"max_steps": 12, "micro_batch_size": None}))
    assert set(seen) == {2}


def test_long_steps_train_every_kth_step_on_generated_examples_at_the_validation_length(data, tmp_path,
                                                                                        segments_seen):
    seen = segments_seen
    long = TRAIN.model_copy(update={"valid_length_factor": 3, "long_step_every": 4, "max_steps": 8,
                                    "eval_every": 8, "eval_examples": 4, "micro_batch_size": None})
    train_stage(data_dir=data, segments=2, output=tmp_path / "long", model=MODEL, train=long, progress=False)
    assert seen[:8] == [2, 2, 2, 6, 2, 2, 2, 6]  # steps 4 and 8 at 3 x 2 segments (then validation)
    # The long batch: training examples drawn by (seed, step), generated from the training split.
    trainer_batch = train_module._Trainer._long_batch
    rng = np.random.default_rng([long.seed, 3])
    dataset = train_module.TaskDataset(data)
    drawn = np.random.default_rng([long.seed, 3]).choice(dataset.config.train_examples, size=long.batch_size)
    second_of_two = SimpleNamespace(rank=1, world_size=2)  # generates only its own rows: the odd ones
    trainer = SimpleNamespace(inputs=SimpleNamespace(data=dataset), segments=2, train=long, parallel=second_of_two)
    tokens, labels, rows = trainer_batch(trainer, rng)
    assert tokens.shape == (long.batch_size // 2, 6 * 32) and (rows == np.arange(long.batch_size // 2)).all()
    assert (tokens[0] == dataset.generator.example("train", int(drawn[1]), 6 * 32)[1]).all()
    assert labels[-1] == dataset.generator.label("train", int(drawn[-1]), 6 * 32)


def test_long_steps_back_propagate_through_their_last_segments_only_when_asked(data, tmp_path, monkeypatch):
    from rmt.objective import Objective

    seen, original = [], Objective.loss

    def record(self, network, tokens, labels, **options):  # (segments, the truncation the model applies)
        seen.append((tokens.shape[1] // 32, network.config.bptt_depth))
        return original(self, network, tokens, labels, **options)

    monkeypatch.setattr(Objective, "loss", record)
    long = TRAIN.model_copy(update={"valid_length_factor": 3, "long_step_every": 2, "long_step_bptt_depth": 2,
                                    "max_steps": 4, "eval_every": 4, "eval_examples": 4, "micro_batch_size": None})
    train_stage(data_dir=data, segments=2, output=tmp_path / "long", model=MODEL, train=long, progress=False)
    assert seen == [(2, -1), (6, 2), (2, -1), (6, 2)]  # truncated on the long steps only, full BPTT again after
    saved = json.loads((tmp_path / "long" / "best" / "config.json").read_text())
    assert saved.get("bptt_depth", -1) == -1  # the checkpoint keeps the model's own setting (a default is not written)
    with pytest.raises(ValueError, match="long_step_every is null: set long_step_every"):
        TrainSettings.model_validate({**TRAIN.model_dump(), "long_step_bptt_depth": 2})


def test_long_steps_draw_their_length_from_the_given_factors(data, tmp_path, segments_seen):
    long = TRAIN.model_copy(update={"valid_length_factor": 2, "long_step_every": 1, "long_step_factors": [2, 4],
                                    "max_steps": 12, "eval_every": 12, "eval_examples": 4, "micro_batch_size": None})
    train_stage(data_dir=data, segments=1, output=tmp_path / "long", model=MODEL, train=long, progress=False)
    trained = segments_seen[:12]
    assert set(trained) == {2, 4}, trained  # every step long, at 2 x 1 or 4 x 1 segments
    # drawn by (seed, step): the same lengths again from the same settings
    segments_seen.clear()
    train_stage(data_dir=data, segments=1, output=tmp_path / "again", model=MODEL, train=long, progress=False)
    assert segments_seen[:12] == trained
    assert segments_seen[12:] and set(segments_seen[12:]) == {2}  # validation at valid_length_factor
    for bad, problem in (({"long_step_every": None}, "long_step_every is null"),
                         ({"long_step_factors": [1, 4]}, "use factors of 2 or more")):
        with pytest.raises(ValueError, match=problem):
            TrainSettings.model_validate({**long.model_dump(), **bad})


def test_long_steps_need_a_longer_validation_length():
    with pytest.raises(ValueError, match="valid_length_factor is 1: set it above 1"):
        TrainSettings.model_validate({**TRAIN.model_dump(), "long_step_every": 4})


DRIFT = TRAIN.model_copy(update={"drifted_memory_every": 2, "drifted_memory_segments": 6})


def test_drift_steps_read_their_examples_from_carried_noise_memories_and_resume_exactly(data, tmp_path, monkeypatch):
    given, carried, loss, advance = [], {}, train_module.Objective.loss, DriftedMemory.advance

    def record(self, network, tokens, labels, **options):
        given.append(options["memory"])
        return loss(self, network, tokens, labels, **options)

    def record_states(self, model, *, step):
        carried[step] = advance(self, model, step=step).clone()
        return carried[step]

    monkeypatch.setattr(train_module.Objective, "loss", record)
    monkeypatch.setattr(DriftedMemory, "advance", record_states)
    train_stage(data_dir=data, segments=2, output=tmp_path / "whole", model=MODEL, train=DRIFT, progress=False)
    # Every 2nd step, both micro-batches of 4 start from drifted memories (4 memory tokens, 32 wide).
    assert [None if memory is None else tuple(memory.shape) for memory in given[:8]] == \
        [None, None, (4, 4, 32), (4, 4, 32)] * 2
    # Each example from the memory of its own place in the batch (a micro-batch's rows are sorted).
    labels = train_module.TaskDataset(data).arrays("train", 2)[1]
    for step in (1, 3):
        indices = np.random.default_rng([DRIFT.seed, step]).choice(len(labels), size=DRIFT.batch_size)
        for start in (0, 4):
            order = np.argsort(indices[start : start + 4], kind="stable")
            assert torch.equal(given[2 * step + start // 4], carried[step][start + order])
    state = torch.load(tmp_path / "whole" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    (saved,) = state["drifted_memory"]  # one process's
    assert saved["states"].shape == (8, 4, 32) and set(saved["segments_read"].tolist()) <= {2, 4, 6}

    assert_crash_resumes_to(tmp_path / "whole", data, segments=2, train=DRIFT, crash_at=15, monkeypatch=monkeypatch)


def test_drifted_memories_span_every_amount_of_noise_and_start_again_past_the_most(data, monkeypatch):
    dataset = train_module.TaskDataset(data)
    model = new_model(MODEL, segment_length=32, classes=dataset.card["classes"]).train()
    drifted = DriftedMemory(noise=dataset.generator.noise["train"], segment_length=32, batch_size=8, block_segments=2,
                            max_segments=6, seed=0)
    blocks, draw = [], DriftedMemory._noise_block
    monkeypatch.setattr(DriftedMemory, "_noise_block", lambda self, rng: blocks.append(draw(self, rng)) or blocks[-1])
    states = drifted.advance(model, step=1).clone()
    assert model.training  # noise is read in eval mode, and the model given back as it was
    read = drifted.segments_read.copy()
    assert set(read) <= {0, 2, 4, 6} and len(set(read)) > 1
    model.eval()
    with torch.no_grad():
        for row, segments in enumerate(read):  # each row's state: its own noise blocks, read from the start
            expected = model.initial_memory(1) if not segments else model.read_memory(
                torch.cat([block[row] for block in blocks[: segments // 2]])[None])
            torch.testing.assert_close(states[row], expected[0])
    for step in (3, 5, 7):
        before = drifted.segments_read.copy()
        drifted.advance(model, step=step)
        assert (drifted.segments_read == np.where(before + 2 > 6, 2, before + 2)).all()


def test_a_window_of_noise_sentences_is_read_over_and_over_as_a_long_input_cycles_small_noise(data):
    noise = train_module.TaskDataset(data).generator.noise["train"]
    window = noise.tokens[noise.starts[5] : noise.starts[8]]  # sentences 5, 6 and 7
    drifted = DriftedMemory(noise=noise, segment_length=32, batch_size=2, block_segments=2, max_segments=64,
                            seed=0, window_sentences=3)
    cycled = np.tile(window, 4)
    assert (drifted._window_noise(5, 0, 3 * len(window)) == cycled[: 3 * len(window)]).all()
    assert (drifted._window_noise(5, 10, 2 * len(window)) == cycled[10 : 10 + 2 * len(window)]).all()
    drifted.first_sentence[:], drifted.segments_read[:] = [5, 5], [0, 2]  # the second row 2 segments on
    block = drifted._noise_block(np.random.default_rng(0)).numpy()
    assert (block[0] == cycled[:64]).all() and (block[1] == cycled[64:128]).all()


def test_drift_steps_are_refused_where_they_cannot_apply(data, tmp_path):
    with pytest.raises(ValueError, match="both choose what a step reads: set one of them to null"):
        TrainSettings.model_validate({**DRIFT.model_dump(), "valid_length_factor": 2, "long_step_every": 4})
    with pytest.raises(ValueError, match="drifted_memory_segments 6 is less than the 8 segments"):
        train_stage(data_dir=data, segments=8, output=tmp_path / "a", model=MODEL, train=DRIFT, progress=False)
    with pytest.raises(ValueError, match="drifted_memory_noise_sentences 100000 exceeds the .* sentences of the "
                                         "training split's noise"):
        train_stage(data_dir=data, segments=2, output=tmp_path / "a", model=MODEL, progress=False,
                    train=DRIFT.model_copy(update={"drifted_memory_noise_sentences": 100_000}))
    with pytest.raises(ValueError, match="drifted_memory_every is null: set drifted_memory_every, or "
                                         "drifted_memory_noise_sentences to null"):
        TrainSettings(drifted_memory_noise_sentences=100)
    with pytest.raises(ValueError, match="the model has no memory tokens: set drifted_memory_every to null"):
        train_stage(data_dir=data, segments=2, output=tmp_path / "a", train=DRIFT, progress=False,
                    model=MODEL.model_copy(update={"num_memory_tokens": 0}))
    assert not (tmp_path / "a").exists()


def test_drift_steps_train_a_decoder_with_memory_efficient_backprop_too(data, tmp_path):
    model = DECODER.model_copy(update={"memory_efficient_backprop": True})
    drift = DRIFT.model_copy(update={"max_steps": 4, "eval_every": 4, "eval_examples": 4})
    metrics = train_stage(data_dir=data, segments=2, output=tmp_path / "decoder", model=model, train=drift,
                          progress=False)
    state = torch.load(tmp_path / "decoder" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert metrics["steps"] == 4 and state["drifted_memory"][0]["states"].shape[:2] == (8, 4)


def test_a_finished_stage_publishes_deleted_outputs_again(data, stage_1, tmp_path):
    # Snakemake deletes a job's declared outputs before it reruns the job; the stage's
    # checkpoints/ are not among them, so the rerun publishes instead of training again.
    folder, first = copy_stage(stage_1[0], tmp_path / "stage"), stage_1[1]
    published = outcome(folder)
    shutil.rmtree(folder / "best")
    (folder / "metrics.json").unlink()
    (folder / "history.jsonl").unlink()
    again = train_stage(data_dir=data, segments=1, output=folder, model=MODEL, train=TRAIN, progress=False)
    assert again == first
    republished = outcome(folder)
    assert republished[:2] == published[:2]
    for key, tensor in published[2]["best"].items():
        assert torch.equal(republished[2]["best"][key], tensor), key


def test_a_pretrained_backbone_can_keep_its_first_layers():
    from transformers import AutoModel

    from rmt.hub import resolve
    from rmt.objective import new_model

    truncated = new_model(ModelSettings(pretrained=True, backbone_overrides={"num_hidden_layers": 2}),
                          segment_length=32, classes=[str(n) for n in range(6)])
    full = AutoModel.from_pretrained(resolve(MODEL.backbone))
    assert len(truncated.backbone.encoder.layer) == 2
    for name, tensor in truncated.backbone.encoder.layer[1].state_dict().items():
        assert torch.equal(tensor, full.encoder.layer[1].state_dict()[name]), name


def test_a_nan_loss_stops_with_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    original, calls = RecurrentMemoryEncoder.forward, {"count": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("labels") is not None:
            calls["count"] += 1
            if calls["count"] > 2 * 8:  # two micro-batches a step: NaN from step 9 on
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RecurrentMemoryEncoder, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="step 9"):
        train_stage(data_dir=data, segments=1, output=tmp_path / "nan", model=MODEL, train=TRAIN, progress=False)
    saved = torch.load(tmp_path / "nan" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert saved["counters"]["step"] == 6
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_bad_input_is_refused_before_training(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has \[1, 2\]"):
        train_stage(data_dir=data, segments=3, output=tmp_path / "a", model=MODEL, train=TRAIN, progress=False)
    with pytest.raises(FileNotFoundError, match="not an RMT checkpoint"):
        train_stage(data_dir=data, segments=1, output=tmp_path / "b", model=MODEL, train=TRAIN,
                    init=tmp_path, progress=False)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(data, other)
    card = json.loads((other / "card.json").read_text())
    card["tokenizer"]["vocabulary_sha256"] = "0" * 64
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="vocabulary differs.*generate the data with the same tokenizer"):
        train_stage(data_dir=other, segments=1, output=tmp_path / "c", model=MODEL, train=TRAIN, progress=False)
    with pytest.raises(ValueError, match="pretrained: false"):
        ModelSettings(backbone_overrides=TINY_BERT)
    with pytest.raises(ValueError, match="must divide"):
        TrainSettings(batch_size=8, micro_batch_size=3)
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder / "checkpoints").exists()


def train_under_torchrun(data, output, *, model: ModelSettings, train: TrainSettings, segments: int):
    import subprocess
    import sys

    import yaml

    config = output.parent / f"{output.name}.yaml"
    config.write_text(yaml.safe_dump({"model": model.model_dump(), "train": train.model_dump()}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "rmt", "train", "--data", str(data), "--segments", str(segments), "--output", str(output),
               "--config", str(config)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


NO_DROPOUT = ModelSettings(pretrained=False, num_memory_tokens=4, classifier_dropout=0.0, backbone_overrides={
    **TINY_BERT, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})


@pytest.mark.slow
@pytest.mark.parametrize("dataset_fixture, segments, settings", [
    # Every 2nd step starts from drifted memories: each process carries those of its own rows.
    ("data", 2, DRIFT.model_copy(update={"max_steps": 6, "eval_every": 3})),
    # Generated batches (the forms at 24 tokens beside the task's 32): each process generates
    # its own rows only, padded to its own longest.
    ("reasoning", 1, validated(
        TRAIN, form_curriculum=["middle_lookup", "middle_room_questions"], form_text_tokens=24, form_ramp_steps=3,
        form_advance_accuracy=0.01, max_steps=12, eval_every=3, target_accuracy=None)),
])
def test_two_processes_under_torchrun_train_like_one(dataset_fixture, segments, settings, request, tmp_path):
    """DDP on the CPU (gloo): each process takes half of every batch; gradients averaged
    across them equal one process's over the whole batch (dropout off to compare). Without a
    micro_batch_size (the paper's config), each process's share is one forward pass."""
    data = request.getfixturevalue(dataset_fixture)
    train_stage(data_dir=data, segments=segments, output=tmp_path / "single", model=NO_DROPOUT,
                train=settings.model_copy(update={"micro_batch_size": 2}), progress=False)
    train_under_torchrun(data, tmp_path / "ddp", model=NO_DROPOUT, train=settings.model_copy(
        update={"micro_batch_size": None}), segments=segments)
    single, parallel = outcome(tmp_path / "single"), outcome(tmp_path / "ddp")
    # The validation loss is summed over two processes: equal up to float rounding.
    assert parallel[0].pop("best_valid_loss") == pytest.approx(single[0].pop("best_valid_loss"), rel=1e-6)
    assert parallel[0] == single[0]
    history = [json.loads(line) for line in parallel[1].splitlines()]
    assert [record["step"] for record in history] == list(range(3, settings.max_steps + 1, 3))
    for key, tensor in single[2]["checkpoints/last"].items():
        torch.testing.assert_close(parallel[2]["checkpoints/last"][key], tensor, atol=1e-5, rtol=1e-4, msg=key)
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both processes' RNG states, for an exact resume
    if settings.drifted_memory_every:
        assert [len(saved["segments_read"]) for saved in state["drifted_memory"]] == [4, 4]  # and drifted memories
    if settings.form_curriculum:  # both forms were learned (the bar is 1%), and the task came in
        assert [r.get("form") for r in history] == ["middle_lookup", "middle_room_questions", None, None]


@pytest.fixture(scope="module")
def reasoning(tmp_path_factory):
    config = DataConfig(task="reasoning", segment_length=32, train_examples=64, valid_examples=40,
                        curriculum_segments=[1], test_segments=[1, 2], test_examples=20, samples=0)
    return build_dataset(config, tmp_path_factory.mktemp("reasoning") / "reasoning", progress=False)


def test_validation_is_split_by_question_kind_and_the_weakest_kind_decides_the_stop(reasoning, tmp_path, monkeypatch):
    metrics = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "kinds", model=MODEL,
                          train=TRAIN.model_copy(update={"max_steps": 6}), progress=False)
    history = [json.loads(line) for line in (tmp_path / "kinds" / "history.jsonl").read_text().splitlines()]
    assert set(history[0]["valid_accuracy_by_kind"]) == {"end_room", "middle_room"}
    by_kind = history[0]["valid_accuracy_by_kind"]
    assert min(by_kind.values()) - 1e-9 <= history[0]["valid_accuracy"] <= max(by_kind.values()) + 1e-9
    assert metrics["steps"] == 6
    # The shortcut: every end-room question right, middle-room ones at chance. The overall
    # score passes a 0.7 target; the stage goes on, since its weakest kind does not.
    monkeypatch.setattr(train_module, "evaluate_arrays",
                        lambda *args, **kwargs: (0.75, 0.5, {"end_room": 1.0, "middle_room": 0.5}))
    shortcut = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "shortcut", model=MODEL,
                           train=TRAIN.model_copy(update={"target_accuracy": 0.7}), progress=False)
    assert shortcut["stop_reason"] == "max_steps"


def test_evaluation_reports_accuracy_by_question_kind(reasoning, tmp_path):
    from rmt.evaluate import evaluate_checkpoint

    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "stage-1", model=MODEL,
                train=TRAIN.model_copy(update={"max_steps": 2, "eval_every": 2}), progress=False)
    rows = evaluate_checkpoint(checkpoint=tmp_path / "stage-1" / "best", data_dir=reasoning,
                               output=tmp_path / "eval.csv", segments=[1, 2], progress=False)
    for row in rows:
        assert {"accuracy_end_room", "accuracy_middle_room"} <= set(row)
        kinds = (row["accuracy_end_room"], row["accuracy_middle_room"])
        assert min(kinds) - 1e-9 <= row["accuracy"] <= max(kinds) + 1e-9  # a weighted mean of the two
    header = (tmp_path / "eval.csv").read_text().splitlines()[0]
    assert header.endswith("accuracy_end_room,accuracy_middle_room")


DECODER = MODEL.model_copy(update={"architecture": "decoder", "backbone_overrides": {**TINY_BERT, "is_decoder": True}})


def test_a_decoder_curriculum_trains_and_evaluates_through_the_same_loop(data, tmp_path):
    """The objective seam: a causal-LM RMT (here BERT as a decoder, built from its config)
    learns to write the answer's word, stage after stage, and is scored streamed like the
    encoder, with no change to the loop, validation or evaluation."""
    from rmt.evaluate import evaluate_checkpoint
    from rmt.model import RecurrentMemoryDecoder
    from rmt.data.tasks.base import PLACES
    from rmt.hub import load_tokenizer
    from rmt.objective import objective_for

    train = TRAIN.model_copy(update={"learning_rate": 1e-2, "max_steps": 12})
    first = train_stage(data_dir=data, segments=1, output=tmp_path / "stage-1", model=DECODER, train=train,
                        progress=False)
    second = train_stage(data_dir=data, segments=2, output=tmp_path / "stage-2", model=DECODER, train=train,
                         init=tmp_path / "stage-1" / "best", progress=False)
    losses = [json.loads(line)["train_loss"] for stage in ("stage-1", "stage-2")
              for line in (tmp_path / stage / "history.jsonl").read_text().splitlines()]
    # The answer's next-token loss starts near ln(vocabulary size) = 10.3 and falls as the
    # model learns to write one of the six answers' words; stage 2 goes on from there.
    assert losses[0] > 9.5 and losses[-1] < losses[0] - 2, losses
    assert first["steps"] == second["steps"] == train.max_steps
    best = tmp_path / "stage-2" / "best"
    model = RecurrentMemoryDecoder.from_pretrained(best)
    objective = objective_for("decoder", classes=PLACES, tokenizer=load_tokenizer(str(best)))
    rows = evaluate_checkpoint(checkpoint=best, data_dir=data, output=tmp_path / "evaluation.csv", segments=[1, 3],
                               max_examples=16, progress=False)
    assert [row["evaluated_segments"] for row in rows] == [1, 3]
    # Streamed scores are the in-memory forward's logits of the answers after the text.
    tokens = torch.randint(1000, 2000, (2, 3 * 32))
    with torch.no_grad():
        full = model(tokens).logits[:, -1, objective.answer_ids]
    assert torch.allclose(objective.class_logits(model, tokens), full, atol=1e-5)


def test_a_decoder_needs_answers_of_one_token():
    from rmt.hub import load_tokenizer
    from rmt.objective import objective_for

    with pytest.raises(ValueError, match="splits the answers"):
        objective_for("decoder", classes=["bathroom", "walk-in wardrobe"], tokenizer=load_tokenizer(MODEL.backbone))


def test_label_smoothing_smooths_the_cross_entropy_of_each_examples_last_segment():
    from conftest import make_encoder, random_text

    from rmt.objective import Objective

    model, objective = make_encoder(), Objective(classes=["a", "b", "c", "d", "e", "f"], tokenizer=None)
    with torch.no_grad():
        model.classifier.weight.mul_(1000)  # confident answers, where smoothing makes a difference
    tokens = torch.stack([random_text(40, seed=seed) for seed in range(3)])  # (3, 40): 3 segments of 16
    labels = torch.tensor([0, 4, 5])
    # The logits returned are those the model's own loss scores: each example's last segment's.
    log_p = model(tokens).logits.log_softmax(-1)  # (3, 6)
    plain = -log_p[torch.arange(3), labels].mean()
    assert torch.allclose(plain, model(tokens, labels=labels).loss)
    # Smoothed: (1 - e) x cross-entropy + e x the mean over classes of -log p (Hugging Face's LabelSmoother).
    smoothed = objective.loss(model, tokens, labels, label_smoothing=0.1)
    assert torch.allclose(smoothed, 0.9 * plain + 0.1 * -log_p.mean(-1).mean())
    assert not torch.allclose(smoothed, plain)


def test_label_smoothing_is_refused_where_it_does_not_apply(data, tmp_path):
    from rmt.config import PipelineConfig, read_config_files

    params = read_config_files(ROOT / "params.yaml")
    decoder = {"model": {**params["model"], "architecture": "decoder"}}
    # params.yaml smooths the encoder's targets: a decoder laid over it is told to turn that off.
    with pytest.raises(ValueError, match="memorize: train: label_smoothing_factor 0.1 .* a decoder: set it to 0"):
        PipelineConfig(**{**params, **decoder})
    params = {**params, "train": {**params["train"], "label_smoothing_factor": 0}}
    PipelineConfig(**{**params, **decoder})
    smoothing = {"stage_train": {2: {"label_smoothing_factor": 0.1}}}
    with pytest.raises(ValueError, match="stage_train.2: label_smoothing_factor 0.1 applies to the encoder's"):
        PipelineConfig(**{**params, **decoder, **smoothing})
    with pytest.raises(ValueError, match="loss_on_all_segments is on: set label_smoothing_factor to 0 or"):
        PipelineConfig(**{**params, "model": {**params["model"], "loss_on_all_segments": True}, **smoothing})
    with pytest.raises(ValueError, match="loss_on_all_segments is on"):  # a stage trained on its own
        train_stage(data_dir=data, segments=1, output=tmp_path / "s", progress=False,
                    model=MODEL.model_copy(update={"loss_on_all_segments": True}),
                    train=TRAIN.model_copy(update={"label_smoothing_factor": 0.1}))
    with pytest.raises(ValueError, match="this model is a decoder: set it to 0"):
        train_stage(data_dir=data, segments=1, output=tmp_path / "s", progress=False, model=DECODER,
                    train=TRAIN.model_copy(update={"label_smoothing_factor": 0.1}))
    assert not (tmp_path / "s").exists()


FORMS = validated(TRAIN, form_curriculum=["middle_lookup", "middle_room_questions"], form_ramp_steps=6,
                  form_start_share=0.5, form_advance_accuracy=0.01, max_steps=36, target_accuracy=None,
                  clip_value=None, clip_norm=1.0)


@pytest.fixture
def forms_seen(monkeypatch):
    """(form, sample) of every training example a form curriculum generates, in order."""
    seen = []
    original = train_module._Trainer._form_example

    def spy(self, form_step, split, index):
        layout, tokens = original(self, form_step, split, index)
        if split == "train":
            seen.append((form_step and form_step.label, layout.sample))
        return layout, tokens

    monkeypatch.setattr(train_module._Trainer, "_form_example", spy)
    return seen


def test_a_form_curriculum_ramps_each_form_in_after_the_one_before_and_then_trains_on_the_task(
        reasoning, tmp_path, forms_seen):
    metrics = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "forms", model=MODEL,
                          train=FORMS.model_copy(update={"max_steps": 24}), progress=False)
    batches = [[form for form, _ in forms_seen[i : i + 8]] for i in range(0, len(forms_seen), 8)]
    # Steps 1-6: the first form alone; it is learned at the step-6 validation, so the next
    # comes in at half of each batch and takes all of it by step 12; then the task.
    assert batches[:6] == [["middle_lookup"] * 8] * 6
    assert batches[6] == ["middle_room_questions"] * 4 + ["middle_lookup"] * 4
    assert batches[10] == ["middle_room_questions"] * 7 + ["middle_lookup"]  # ceil(8 * (0.5 + 0.5 * 4/6))
    assert batches[11] == ["middle_room_questions"] * 8
    assert batches[12] == [None] * 4 + ["middle_room_questions"] * 4  # the task, as its dataset holds it
    assert len(batches) == 18 and metrics["steps"] == 24  # steps 19-24: the stored task data
    history = [json.loads(line) for line in (tmp_path / "forms" / "history.jsonl").read_text().splitlines()]
    # Each form is scored at the first validation after its ramp; from step 18 on, the task alone.
    assert [(r["form"], r["form_share"]) for r in history[:2]] == [("middle_lookup", 1.0), ("middle_room_questions", 1.0)]
    assert all(0 <= r["form_accuracy"] <= 1 for r in history[:2])
    assert not any("form" in r for r in history[2:]) and "unfinished_form" not in metrics


def test_the_examples_of_each_form_are_the_forms(reasoning, tmp_path, forms_seen):
    from rmt.data.tasks.qa4 import _FACT, _WHAT_IS_X_DIR_OF

    reasoning_task = train_module.get_task("reasoning")
    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "forms", model=MODEL,
                train=FORMS.model_copy(update={"max_steps": 18}), progress=False)
    by_form = {}
    for form, sample in forms_seen:
        by_form.setdefault(form, []).append(sample)
    assert set(by_form) == {"middle_lookup", "middle_room_questions", None}
    for sample in by_form["middle_lookup"]:  # one phrasing, facts worded from the middle room
        middle = _WHAT_IS_X_DIR_OF.match(sample.question).group(1)
        assert all(_FACT.match(fact).group(1) == middle for fact in sample.facts)
    for form, samples in by_form.items():
        kinds = {reasoning_task.kind(sample) for sample in samples}
        assert kinds == ({"end_room", "middle_room"} if form is None else {"middle_room"}), form


def test_patience_counts_from_when_the_form_curriculum_has_brought_the_task_in(reasoning, tmp_path, monkeypatch):
    def flat(*args, kinds=None, **kwargs):  # the same score at every validation: no gain ever
        return (0.5, 1.0) if kinds is None else (0.5, 1.0, {"end_room": 0.5, "middle_room": 0.5})

    monkeypatch.setattr(train_module, "evaluate_arrays", flat)
    metrics = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "patience", model=MODEL,
                          train=FORMS.model_copy(update={"patience": 2, "form_advance_accuracy": 0.5}),
                          progress=False)
    # The task is in whole at step 18; the validations there and at 24 are the two without gain.
    assert (metrics["stop_reason"], metrics["steps"]) == ("early_stopping", 24)
    # A target reached while the forms run does not stop the stage either.
    target = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "target", model=MODEL,
                         train=FORMS.model_copy(update={"target_accuracy": 0.5, "form_advance_accuracy": 0.5}),
                         progress=False)
    assert (target["stop_reason"], target["steps"]) == ("target_accuracy", 18)


def test_a_stage_too_short_for_its_form_curriculum_is_warned_about_and_says_where_it_ended(reasoning, tmp_path):
    with pytest.warns(UserWarning, match=r"max_steps 12 stops the stage before its form_curriculum .*at least 18"):
        metrics = train_stage(data_dir=reasoning, segments=1, output=tmp_path / "short", model=MODEL,
                              train=FORMS.model_copy(update={"max_steps": 12, "form_advance_accuracy": 1.0}),
                              progress=False)
    assert (metrics["stop_reason"], metrics["unfinished_form"]) == ("max_steps", "middle_lookup")


def test_form_curriculum_ramps_and_boundaries():
    from rmt.form_curriculum import FormCurriculum

    a, b = FormStep(form="a"), FormStep(form="b", text_tokens=30)
    forms = FormCurriculum(forms=(a, b, None), ramp_steps=333, start_share=0.1, advance_accuracy=0.9)
    assert forms.rows(0, 5, 4) == [a] * 4
    assert forms.rows(1, 0, 4) == [b, a, a, a]  # at least one row of the newest form
    assert forms.share(1, 332) < 1 and forms.share(1, 333) == 1.0 and forms.ramped_in(1, 333)
    assert forms.may_advance(1, 333) and not forms.may_advance(2, 333) and forms.done(2, 333)
    assert not forms.done(2, 332) and not forms.done(1, 333)
    assert forms.fewest_steps(100) == 100 + 400 + 333  # first check, b's ramp to a validation, the task's ramp
    assert TrainSettings(form_curriculum=None).form_curriculum == []  # null clears it, as elsewhere


def test_a_stage_killed_during_its_form_curriculum_resumes_to_the_same_result(reasoning, tmp_path, monkeypatch):
    train = FORMS.model_copy(update={"max_steps": 24, "clip_value": 5.0, "clip_norm": None})
    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "whole", model=MODEL, train=train, progress=False)
    # Crash in the second form's ramp.
    assert_crash_resumes_to(tmp_path / "whole", reasoning, segments=1, train=train, crash_at=9, monkeypatch=monkeypatch)


@pytest.mark.parametrize("change, problem", [
    ({"form_curriculum": ["lookup"]}, r"not forms of the task reasoning: choose from middle_lookup, "),
    ({"form_curriculum": ["middle_lookup", "middle_lookup"]}, "names a form twice"),
    ({"form_curriculum": [{"form": "whole_task", "text_tokens": 28}, {"form": "whole_task", "text_tokens": 28}]},
     r"\['whole_task@28', 'whole_task@28'\] names a form twice at one length"),
    ({"form_curriculum": [{"form": "lookup", "text_tokens": 28}]}, r"names \['lookup'\], which are not forms"),
    # A name is the form at form_text_tokens: the same step spelled twice.
    ({"form_curriculum": ["middle_lookup", {"form": "middle_lookup", "text_tokens": 24}], "form_text_tokens": 24},
     r"names a form twice at one length \(a name is the form at form_text_tokens, 24\)"),
])
def test_a_form_curriculum_that_does_not_fit_the_task_is_refused_before_training(reasoning, data, tmp_path, change,
                                                                               problem):
    with pytest.raises(ValueError, match=problem):
        train_stage(data_dir=reasoning, segments=1, output=tmp_path / "refused", model=MODEL,
                    train=validated(TRAIN, **change), progress=False)
    with pytest.raises(ValueError, match="not forms of the task memorize: this task has none"):
        train_stage(data_dir=data, segments=1, output=tmp_path / "memorize", model=MODEL,
                    train=validated(TRAIN, form_curriculum=["middle_lookup"]), progress=False)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "memorize").exists()
    with pytest.raises(ValueError, match="form_curriculum .* and mixed_lengths both choose what a step reads"):
        TrainSettings(form_curriculum=["middle_lookup"], mixed_lengths=True)


def test_forms_can_be_shorter_than_the_stage_with_less_noise(reasoning, tmp_path, monkeypatch):
    """form_text_tokens: a form's examples hold fewer tokens (less noise), padded with [PAD]
    beside the task's own, which keep the stage's length; the encoder reads them unpadded."""
    batches = []
    original = train_module._Trainer._form_batch

    def keep(self, rng, step):
        batches.append(original(self, rng, step))
        return batches[-1]

    monkeypatch.setattr(train_module._Trainer, "_form_batch", keep)
    train = FORMS.model_copy(update={"form_text_tokens": 24, "max_steps": 18})
    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "short", model=MODEL, train=train, progress=False)
    from rmt.hub import load_tokenizer

    pad = load_tokenizer(MODEL.backbone).pad_token_id
    real_lengths = [set((tokens != pad).sum(axis=1).tolist()) for tokens, _, _ in batches]
    assert real_lengths[0] == {24} and batches[0][0].shape == (8, 24)  # forms alone: no padding at all
    assert real_lengths[12] == {24, 32} and batches[12][0].shape == (8, 32)  # the task comes in at its length
    model = RecurrentMemoryEncoder.from_pretrained(tmp_path / "short" / "best").eval()
    tokens = torch.as_tensor(batches[12][0])
    with torch.no_grad():
        padded = model(tokens).logits
        unpadded = model([row[row != pad] for row in tokens]).logits
    torch.testing.assert_close(padded, unpadded)


def test_forms_can_vary_in_length_each_example_keeping_its_own(reasoning, tmp_path, monkeypatch):
    """form_text_tokens_max: each form example's length is drawn between form_text_tokens and
    it, so its facts move among noise; an example drawn again has the length it had."""
    lengths = {}
    original = train_module._Trainer._form_example

    def spy(self, form_step, split, index):
        layout, tokens = original(self, form_step, split, index)
        if form_step is not None:
            assert lengths.setdefault((split, index), len(tokens)) == len(tokens)
        return layout, tokens

    monkeypatch.setattr(train_module._Trainer, "_form_example", spy)
    train = FORMS.model_copy(update={"form_text_tokens": 24, "form_text_tokens_max": 32, "max_steps": 12})
    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "varied", model=MODEL, train=train, progress=False)
    for split in ("train", "valid"):
        seen = [length for (where, _), length in lengths.items() if where == split]
        assert min(seen) >= 24 and max(seen) <= 32 and len(set(seen)) > 4, (split, sorted(set(seen)))
        # The length is a function of (seed, split, index): another trainer draws the same.
        other = SimpleNamespace(train=train)
        assert all(train_module._Trainer._form_length(other, where, index) == length
                   for (where, index), length in lengths.items())


def test_a_form_batch_under_several_processes_generates_only_the_processs_own_rows(reasoning, monkeypatch):
    from rmt.form_curriculum import FormCurriculum
    from rmt.hub import load_tokenizer

    generated, original = [], train_module._Trainer._form_example

    def spy(self, form_step, split, index):
        generated.append((form_step.label, index))
        return original(self, form_step, split, index)

    monkeypatch.setattr(train_module._Trainer, "_form_example", spy)
    train, dataset = validated(FORMS, form_text_tokens=24), train_module.TaskDataset(reasoning)
    trainer = object.__new__(train_module._Trainer)  # only what a form batch reads
    trainer.inputs, trainer.segments, trainer.train = SimpleNamespace(data=dataset), 1, train
    trainer.forms, trainer.tokenizer = FormCurriculum.of(train), load_tokenizer(MODEL.backbone)
    trainer.progress = SimpleNamespace(form_phase=1, form_phase_step=0)
    trainer.parallel = SimpleNamespace(rank=1, world_size=2)
    forms = train_module.TRAINING_FORMS["reasoning"]
    trainer.form_generators = {step.form: dataset.generator.for_form(forms[step.form]) for step in train.form_curriculum}
    tokens, labels, rows = trainer._form_batch(np.random.default_rng(7), step=3)
    # Step 3 of the second form's ramp: 6 of the 8 rows are its (ceil(8 x 0.75)); the second of
    # two processes generates rows 1, 3, 5 and 7 alone.
    drawn = np.random.default_rng(7).choice(dataset.config.train_examples, size=8)
    assert generated == [("middle_room_questions", drawn[1]), ("middle_room_questions", drawn[3]),
                         ("middle_room_questions", drawn[5]), ("middle_lookup", drawn[7])]
    assert tokens.shape == (4, 24) and len(labels) == 4 and (rows == np.arange(4)).all()


def test_a_form_curriculum_step_can_carry_a_form_to_a_length_of_its_own(reasoning, tmp_path, monkeypatch):
    """{form, text_tokens}: a form learned at form_text_tokens, then the same form ramped in
    at a longer length; each step's examples, training and validation, at its own length."""
    lengths = {}
    original = train_module._Trainer._form_example

    def spy(self, form_step, split, index):
        layout, tokens = original(self, form_step, split, index)
        lengths.setdefault((form_step and form_step.label, split), set()).add(len(tokens))
        return layout, tokens

    monkeypatch.setattr(train_module._Trainer, "_form_example", spy)
    train = validated(FORMS, form_text_tokens=24, max_steps=18,
                      form_curriculum=["middle_lookup", {"form": "middle_lookup", "text_tokens": 28}])
    train_stage(data_dir=reasoning, segments=1, output=tmp_path / "longer", model=MODEL, train=train, progress=False)
    assert lengths == {("middle_lookup", "train"): {24}, ("middle_lookup", "valid"): {24},
                       ("middle_lookup@28", "train"): {28}, ("middle_lookup@28", "valid"): {28},
                       (None, "train"): {32}}  # the task, at the stage's length
    history = [json.loads(line) for line in (tmp_path / "longer" / "history.jsonl").read_text().splitlines()]
    assert [r.get("form") for r in history] == ["middle_lookup", "middle_lookup@28", None]


@pytest.mark.parametrize("text_tokens, model, problem", [
    (20, MODEL, r"form_curriculum's step middle_lookup@20 cannot hold the reasoning facts and question"),
    (40, MODEL, r"step middle_lookup@40 is longer than the stage's examples \(32 tokens\): lower its text_tokens"),
    (24, DECODER, "a decoder would read the padding: set its text_tokens to 32"),
])
def test_a_form_curriculum_step_of_a_length_that_cannot_be_is_refused(reasoning, tmp_path, text_tokens, model,
                                                                      problem):
    train = validated(FORMS, form_curriculum=["middle_lookup", {"form": "middle_lookup", "text_tokens": text_tokens}])
    with pytest.raises(ValueError, match=problem):
        train_stage(data_dir=reasoning, segments=1, output=tmp_path / "refused", model=model, train=train,
                    progress=False)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("tokens, model, problem", [
    (20, MODEL, "cannot hold the reasoning facts and question .* raise it to"),
    (40, MODEL, "longer than the stage's examples"),
    ((24, 40), MODEL, "form_text_tokens_max 40 is longer than the stage's examples"),
    (24, DECODER, "a decoder would read the padding"),
])
def test_forms_too_short_too_long_or_on_a_decoder_are_refused(reasoning, tmp_path, tokens, model, problem):
    shortest, longest = tokens if isinstance(tokens, tuple) else (tokens, None)
    with pytest.raises(ValueError, match=problem):
        train_stage(data_dir=reasoning, segments=1, output=tmp_path / "refused", model=model, progress=False,
                    train=FORMS.model_copy(update={"form_text_tokens": shortest, "form_text_tokens_max": longest}))
    assert not (tmp_path / "refused").exists()
