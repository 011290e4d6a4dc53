"""The pipeline configuration: params.yaml and config/*.yaml validate and build."""

import warnings
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import BertConfig, BertModel

from rmt.config import PipelineConfig, json_schema, load_config, read_config_files, schema_problems, validate_config
from rmt.model import RMTConfig, RecurrentMemoryEncoder
from rmt.settings import CURRICULUM_ONLY

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_default_validates():
    config = load_config(ROOT / "params.yaml")
    assert sorted(config.tasks) == ["detect_and_memorize", "memorize", "reasoning"]
    memorize = config.for_task("memorize")
    assert memorize.curriculum == [1, 2, 3, 4, 5, 6, 7]
    assert memorize.data.segment_length == 64 and memorize.model.backbone_overrides["num_hidden_layers"] == 2
    assert max(memorize.data.test_segments) == 4096
    assert max(config.for_task("detect_and_memorize").data.test_segments) == 32768


def test_the_paper_recipe_validates_and_builds():
    config = load_config(ROOT / "params.yaml", ROOT / "config" / "paper.yaml")
    reasoning = config.for_task("reasoning")
    assert reasoning.train.learning_rate == 5e-5 and reasoning.train.max_steps == 20000
    # The paper's Reasoning schedule: stage 1 at lr 1e-5 for 6000 steps, later stages as above.
    first, second = reasoning.train_for(1), reasoning.train_for(2)
    assert (first.learning_rate, first.max_steps, first.warmup_steps) == (1e-5, 6000, 300)
    assert (second.learning_rate, second.max_steps) == (5e-5, 20000)
    memorize = config.for_task("memorize")
    assert memorize.model.backbone == "bert-base-cased" and memorize.model.pretrained
    assert memorize.train.learning_rate == 1e-5 and memorize.train.clip_value == 5.0
    assert memorize.data.segment_length == 499 and memorize.curriculum == list(range(1, 8))
    # The paper's model and loss, not the CPU default's (20 memory tokens, smoothed targets).
    assert memorize.model.num_memory_tokens == 10 and memorize.train.label_smoothing_factor == 0
    # bert-base-cased's shape (its weights are not downloadable here), on the meta device.
    with torch.device("meta"):
        backbone = BertModel(BertConfig(vocab_size=28996))
        model = RecurrentMemoryEncoder(backbone=backbone, config=RMTConfig(
            architecture="encoder", num_memory_tokens=memorize.model.num_memory_tokens,
            segment_length=memorize.data.segment_length, num_labels=6, cls_token_id=101, sep_token_id=102,
            pad_token_id=0))
    assert model.config.segment_positions == 512


def test_the_long_reasoning_recipe_changes_reasonings_first_stage_and_model_only():
    base = load_config(ROOT / "params.yaml")
    config = load_config(ROOT / "params.yaml", ROOT / "config" / "reasoning-long.yaml")
    reasoning, first = config.for_task("reasoning"), config.for_task("reasoning").train_for(1)
    assert first.form_labels == ["middle_lookup", "middle_lookup_either_wording", "middle_room_questions"]
    assert (first.form_text_tokens, first.learning_rate, first.schedule, first.batch_size) == (24, 1e-3, "constant", 64)
    assert reasoning.train_for(2).form_curriculum == [] and reasoning.train_for(2).learning_rate == 5e-4
    shape = base.for_task("reasoning").model.backbone_overrides
    assert reasoning.model.backbone_overrides == {**shape, "hidden_dropout_prob": 0.0,
                                                  "attention_probs_dropout_prob": 0.0}  # the shape kept
    for task in ("memorize", "detect_and_memorize"):
        assert config.for_task(task) == base.for_task(task)


def test_the_seeds_overlay_keeps_every_task_and_adds_seeds():
    config = load_config(ROOT / "params.yaml", ROOT / "config" / "seeds.yaml")
    assert config.seeds == [0, 1, 2] and list(config.tasks) == list(load_config(ROOT / "params.yaml").tasks)
    assert max(config.for_task("detect_and_memorize").data.test_segments) == 32768


def test_the_minilm_config_validates():
    memorize = load_config(ROOT / "params.yaml", ROOT / "config" / "minilm.yaml").for_task("memorize")
    assert memorize.model.pretrained and memorize.model.backbone_overrides == {}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tasks": ["qa9"]}, "unknown tasks"),
        ({"train": {"learning_rate": -1}}, "learning_rate"),
        ({"tasks": {"reasoning": {"train": {"batch_size": 8, "micro_batch_size": 3}}}}, "must divide"),
        ({"data": {"segment_length": 0}}, "segment_length"),
        ({"model": {"pretrained": True, "backbone_overrides": {"hidden_size": 64}}}, "pretrained: false"),
        ({"colour": "red"}, "Extra inputs"),
        ({"stage_train": {9: {"max_steps": 5}}}, "not in the curriculum"),
        ({"stage_train": {2: {"max_steps": 5, "min_steps": 10}}}, "min_steps 10 exceeds"),
        # Forms are the task's: set for every task, Memorize has none.
        ({"stage_train": {1: {"form_curriculum": ["middle_lookup"]}}},
         r"memorize: stage_train.1: form_curriculum names \['middle_lookup'\], which are not forms"),
        ({"tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": ["middle"]}}}}},
         "reasoning: stage_train.1: .* choose from middle_lookup, middle_lookup_either_wording, "),
        # Forms and long steps both choose what a step reads: refused where both apply.
        ({"train": {"long_step_every": 4, "valid_length_factor": 4, "valid_length_from_segments": 1},
          "tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": ["middle_lookup"]}}}}},
         "form_curriculum .* and long_step_every 4 both choose"),
        ({"train": {"long_step_every": 4, "valid_length_factor": 4, "valid_length_from_segments": 4},
          "tasks": {"reasoning": {"train": {"form_curriculum": ["middle_lookup"]}}}},
         "reasoning: the stage on 4 segments: form_curriculum .* and long_step_every 4 both choose"),
        ({"train": {"form_text_tokens_max": 30}}, "form_text_tokens, which is null: set form_text_tokens, or"),
        # Form lengths are checked against each stage before any data is generated.
        ({"tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": ["middle_lookup"], "form_text_tokens": 24,
                                                       "form_text_tokens_max": 80}}}}},
         r"reasoning: the stage on 1 segments: form_text_tokens_max 80 is longer than the stage's examples \(64 "),
        ({"tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": [
            "middle_lookup", {"form": "whole_task", "text_tokens": 48}, {"form": "whole_task", "text_tokens": 80}]}}}}},
         r"reasoning: the stage on 1 segments: form_curriculum's step whole_task@80 is longer than the stage's "
         r"examples \(64 tokens\): lower its text_tokens to at most 64"),
        ({"tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": [{"form": "whole_task", "tokens": 48}]}}}}},
         r"stage_train.1.form_curriculum.0.tokens: Extra inputs are not permitted \(given 48\)"),
        ({"train": {"form_text_tokens": 31, "form_text_tokens_max": 30}},
         r"form_text_tokens_max 30 is the longest of the lengths from form_text_tokens \(31\): set form_text_tokens"),
        # The task itself is a form only where it is generated shorter than stored.
        ({"tasks": {"reasoning": {"stage_train": {1: {"form_curriculum": ["middle_lookup", "whole_task"]}}}}},
         r"names \['whole_task'\], the task itself, and form_text_tokens is null"),
        ({"tasks": {"reasoning": {"data": {"train_forms": {"whole_task": 0.5}}}}},
         r"train_forms \['whole_task'\] is the task itself: its share would change nothing"),
    ],
)
def test_a_bad_value_is_named(values, message):
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(**values)


def test_long_steps_from_a_later_stage_leave_a_first_stage_form_curriculum_alone():
    config = PipelineConfig(train={"long_step_every": 4, "valid_length_factor": 4, "valid_length_from_segments": 4},
                            tasks={"reasoning": {"stage_train": {1: {"form_curriculum": ["middle_lookup"]}}}})
    reasoning = config.for_task("reasoning")
    assert reasoning.train_for(1).form_labels == ["middle_lookup"] and reasoning.train_for(1).long_step_every is None
    assert reasoning.train_for(4).long_step_every == 4 and reasoning.train_for(4).form_curriculum == []


def test_overlays_merge_field_by_field(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train: {max_steps: 7, min_steps: 0}\ntasks: {reasoning: {train: {batch_size: 16}}}\n")
    config = load_config(ROOT / "params.yaml", overlay)
    reasoning = config.for_task("reasoning")
    assert config.for_task("memorize").train.max_steps == 7 and reasoning.train.batch_size == 16
    assert reasoning.train.max_steps == 150  # the task's own value wins over the shared one
    assert reasoning.train.learning_rate == 5e-4  # untouched fields stay
    assert max(config.for_task("detect_and_memorize").data.test_segments) == 32768  # untouched task stays


def test_a_task_list_selects_tasks_and_keeps_their_settings(tmp_path):
    overlay = tmp_path / "one-task.yaml"
    overlay.write_text("tasks: [detect_and_memorize]\ntrain: {learning_rate: 1e-4}\n")
    config = load_config(ROOT / "params.yaml", overlay)
    assert list(config.tasks) == ["detect_and_memorize"]
    settings = config.for_task("detect_and_memorize")
    assert max(settings.data.test_segments) == 32768  # its own settings in params.yaml survive
    assert settings.train.learning_rate == 1e-4  # a number as users write it, not the string YAML 1.1 reads


def test_an_overlay_that_drops_settings_is_warned_about(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model: {backbone_overrides: [2]}\n")
    with pytest.warns(UserWarning, match="model.backbone_overrides replaces the whole mapping.*num_hidden_layers"):
        read_config_files(ROOT / "params.yaml", overlay)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clearing with null, as the shipped configs do, is no surprise
        read_config_files(ROOT / "params.yaml", ROOT / "config" / "paper.yaml")


def test_commands_resolve_a_tasks_settings_from_the_configuration():
    import typer

    from rmt.cli_common import task_settings

    settings = task_settings([ROOT / "params.yaml"], ["data.train_examples=10", "train.learning_rate=1e-4"],
                             "detect_and_memorize")
    assert settings.data.train_examples == 10 and settings.train.learning_rate == 1e-4
    assert max(settings.data.test_segments) == 32768  # the task's own override survives
    paper = task_settings([ROOT / "params.yaml", ROOT / "config" / "paper.yaml"], [], "reasoning")
    assert paper.train.max_steps == 20000
    staged = task_settings([ROOT / "params.yaml"], ["stage_train.3.learning_rate=1e-6",
                                                    "tasks.memorize.stage_train.3.max_steps=109"], "memorize")
    assert staged.train_for(3).learning_rate == 1e-6 and staged.train_for(3).max_steps == 109
    assert staged.train_for(2) == staged.train.for_stage(2)  # a stage without an entry: train's, resolved for it
    with pytest.raises(typer.BadParameter, match="SECTION.KEY=VALUE"):
        task_settings([], ["learning_rate=1"], "memorize")
    with pytest.raises(typer.BadParameter, match="learning_rate"):
        task_settings([], ["train.learning_rate=-1"], "memorize")


def test_long_validation_applies_from_its_stage_on_with_its_own_examples():
    from rmt.cli_common import task_settings

    long = ["train.valid_length_factor=4", "train.valid_length_from_segments=4", "train.valid_length_examples=200",
            "train.eval_examples=500", "train.long_step_every=4", "train.long_step_factors=[4,8]",
            "train.long_step_bptt_depth=2"]
    settings = task_settings([ROOT / "params.yaml"], long, "memorize")
    short, fourth = settings.train_for(3), settings.train_for(4)
    assert (short.valid_length_factor, short.eval_examples, short.long_step_every, short.long_step_factors,
            short.long_step_bptt_depth) == (1, 500, None, None, None)
    assert (fourth.valid_length_factor, fourth.eval_examples, fourth.long_step_every, fourth.long_step_factors,
            fourth.long_step_bptt_depth) == (4, 200, 4, [4, 8], 2)
    # What a stage names itself applies as given: long validation below the threshold, and its
    # own validation examples.
    staged = task_settings([ROOT / "params.yaml"], [*long, "stage_train.2.valid_length_factor=3",
                                                    "stage_train.5.eval_examples=50"], "memorize")
    assert staged.train_for(2).valid_length_factor == 3 and staged.train_for(2).long_step_every == 4
    assert staged.train_for(5).eval_examples == 50 and staged.train_for(6).eval_examples == 200
    # A shorter curriculum needs nothing more; the workflow's schema takes the settings.
    assert task_settings([ROOT / "params.yaml"], [*long, "data.curriculum_segments=[1,2]"], "memorize").train_for(2) \
        .valid_length_factor == 1
    schema_keys = json_schema()["properties"]["train"]["properties"]
    assert set(CURRICULUM_ONLY) <= set(schema_keys)


def test_last_names_the_curriculums_last_stage_whatever_its_length():
    from rmt.cli_common import task_settings

    default = load_config(ROOT / "params.yaml").for_task("memorize")
    assert default.train_for(7).learning_rate < default.train_for(6).learning_rate == default.train.learning_rate
    short = task_settings([ROOT / "params.yaml"], ["data.curriculum_segments=[1,2,3]"], "memorize")
    assert short.train_for(3).learning_rate == default.train_for(7).learning_rate
    assert short.train_for(2).learning_rate == default.train.learning_rate
    # Within a layer a stage's number wins over `last`; the task's layer over the shared one,
    # and its null clears what the shared layer gave the stage.
    layered = task_settings([ROOT / "params.yaml"], ["stage_train.7.learning_rate=3e-4", "stage_train.last.max_steps=700"],
                           "memorize")
    assert (layered.train_for(7).learning_rate, layered.train_for(7).max_steps) == (3e-4, 700)
    reasoning = task_settings([ROOT / "params.yaml"], ["tasks.reasoning.stage_train.last=null"], "reasoning")
    assert reasoning.train_for(7).learning_rate == reasoning.train.learning_rate
    paper = load_config(ROOT / "params.yaml", ROOT / "config" / "paper.yaml").for_task("memorize")
    assert 7 not in paper.stage_train  # the paper trains every stage at one rate
    # Detect & Memorize's last stage reads drifted memories too; not Memorize's, not the paper's.
    params = load_config(ROOT / "params.yaml")
    assert params.for_task("detect_and_memorize").train_for(7).drifted_memory_every == 2
    assert params.for_task("memorize").train_for(7).drifted_memory_every is None
    paper_dm = load_config(ROOT / "params.yaml", ROOT / "config" / "paper.yaml").for_task("detect_and_memorize")
    assert 7 not in paper_dm.stage_train
    schema = json_schema()
    config = {"stage_train": {"last": {"learning_rate": 1e-4}, 3: None}, "tasks": {"memorize": {"stage_train": {"last": None}}}}
    assert schema_problems(config, schema) == []
    assert schema_problems({"stage_train": {"final": {}}}, schema) == ["stage_train: 'final' does not match '^([0-9]+|last)$'"]
    # A form curriculum's entry is a name or a step: a bad step is named as a step.
    steps = {"train": {"form_curriculum": ["middle_lookup", {"form": "whole_task", "tokens": 40}, {"text_tokens": 40}]}}
    assert schema_problems(steps, schema) == [
        "train.form_curriculum.1: Additional properties are not allowed ('tokens' was unexpected)",
        "train.form_curriculum.2: 'form' is a required property"]
    params = read_config_files(ROOT / "params.yaml")
    for stage_train, problem in [({"final": {}}, "unknown stage 'final'.*or `last`"), (5, "valid dictionary"),
                                 ({9: None}, r"stages \[9\] that are not in the curriculum"),
                                 ({"last": {"min_steps": 50, "max_steps": 20}}, r"stage_train.last: min_steps 50")]:
        with pytest.raises(ValueError, match=problem):
            validate_config({**params, "stage_train": stage_train}, ["params.yaml"])


def test_set_changes_single_keys_of_a_stage_the_file_names():
    """--set writes the stage as "1" beside the file's 1: its keys go over the file's, the
    others stay (params.yaml's Reasoning stage 1 keeps its 1500 steps)."""
    from rmt.cli_common import task_settings

    reasoning = task_settings([ROOT / "params.yaml"], ["tasks.reasoning.stage_train.1.learning_rate=1e-5"], "reasoning")
    assert (reasoning.train_for(1).learning_rate, reasoning.train_for(1).max_steps) == (1e-5, 1500)


def test_without_long_validation_every_stage_trains_as_it_names():
    config = load_config(ROOT / "params.yaml", ROOT / "config" / "paper.yaml")
    for task in config.tasks:
        settings = config.for_task(task)
        for segments in settings.curriculum:
            resolved = settings.train_for(segments)
            assert resolved.valid_length_factor == 1, (task, segments)
            assert resolved.model_dump(exclude=set(CURRICULUM_ONLY)) == \
                settings.stage_train.get(segments, settings.train).model_dump(exclude=set(CURRICULUM_ONLY))


def test_the_config_hash_ignores_the_seed_and_device_only():
    base = load_config(ROOT / "params.yaml").for_task("memorize")
    other_seed = base.model_copy(update={"train": base.train.model_copy(update={"seed": 3, "device": "cuda"})})
    other_lr = base.model_copy(update={"train": base.train.model_copy(update={"learning_rate": 1e-5})})
    assert base.config_hash() == other_seed.config_hash() != other_lr.config_hash()
    assert len(base.config_hash()) == 12
    # A setting spelled out at its default is the same configuration: so is one rmt gains later.
    spelled_out = base.model_copy(update={"train": base.train.model_copy(update={"adam_beta2": 0.999})})
    assert "adam_beta2" not in base.train.model_fields_set and spelled_out.config_hash() == base.config_hash()


def test_a_stages_own_min_steps_yields_to_a_quick_runs_max_steps():
    """params.yaml's Detect & Memorize last stage trains at least 300 steps; a quick run's
    train.max_steps stops it earlier, as it says, instead of failing to validate."""
    from rmt.cli_common import task_settings

    with pytest.warns(UserWarning, match="detect_and_memorize: stage_train.last: min_steps 300 yields to "
                      "train.max_steps 20: the stage stops at step 20"):
        quick = task_settings([ROOT / "params.yaml"], ["train.max_steps=20", "train.min_steps=0"],
                              "detect_and_memorize")
    assert (quick.train_for(7).min_steps, quick.train_for(7).max_steps) == (20, 20)
    assert quick.train_for(7).drifted_memory_every == 2  # the rest of the stage's entry stays
    full = load_config(ROOT / "params.yaml").for_task("detect_and_memorize")
    assert (full.train_for(7).min_steps, full.train_for(7).max_steps) == (300, 1000)
