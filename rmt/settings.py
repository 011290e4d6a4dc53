"""Settings of a curriculum stage: the model a first stage starts from, and the training
recipe. Plain pydantic models (no torch), so that configurations validate quickly."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_serializer, field_validator,
                      model_validator)

from rmt.hub import MINILM
from rmt.model.config import Architecture, RMTConfig

# The memory wrapper's own defaults (RMTConfig, the paper's), shared rather than repeated.
_WRAPPER_DEFAULTS = {field.name: field.default for field in dataclasses.fields(RMTConfig)}
# The wrapper settings a stage sets on the checkpoint it starts from; the memory size and
# the classifier are the checkpoint's own.
TRAINING_WRAPPER_SETTINGS = ("bptt_depth", "memory_efficient_backprop", "loss_on_all_segments")


class FormStep(BaseModel):
    """A step of a form curriculum at a length of its own: every example `text_tokens` long, its
    facts among noise (a plain form name in the curriculum is a step at form_text_tokens).
    Steps of one form at growing lengths carry what was learned on short,
    noiseless examples over to the stage's length (docs/research.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    form: str = Field(description="A form of the task (TRAINING_FORMS)")
    text_tokens: int | None = Field(default=None, ge=1, description="Text tokens of each of this step's examples, "
                                    "all of one length (form_text_tokens_max does not apply; null: the stage's "
                                    "form_text_tokens)")

    @property
    def label(self) -> str:
        """How history.jsonl and metrics.json name the step: `form`, or `form@text_tokens`."""
        return self.form if self.text_tokens is None else f"{self.form}@{self.text_tokens}"


def _name_is_a_step(entry):
    return {"form": entry} if isinstance(entry, str) else entry


# A form curriculum's entry as params.yaml writes it: a form's name, or a step {form, text_tokens}.
FormCurriculumEntry = Annotated[FormStep, BeforeValidator(_name_is_a_step),
                                WithJsonSchema({"anyOf": [{"type": "string"}, FormStep.model_json_schema()]})]


class ModelSettings(BaseModel):
    """The model a first stage starts from (later stages start from the previous checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = Field(default="encoder", description="encoder: the paper's classifier on the last "
                                       "[CLS]; decoder: a causal LM backbone that writes the answer (rmt.objective)")
    backbone: str = Field(default=MINILM, description="Hugging Face id or local directory of the backbone")
    pretrained: bool = Field(default=True, description="Load its weights, or build it from its config, randomly initialised")
    # Changes to the backbone's config, e.g. a small variant for the CPU (pretrained=False), or
    # the first layers of a pretrained backbone ({num_hidden_layers: 2}).
    backbone_overrides: dict | None = Field(default_factory=dict)

    @field_validator("backbone_overrides", mode="before")
    @classmethod
    def _none_is_no_overrides(cls, value):
        return {} if value is None else value
    num_memory_tokens: int = Field(default=_WRAPPER_DEFAULTS["num_memory_tokens"], ge=0)
    bptt_depth: int = Field(default=_WRAPPER_DEFAULTS["bptt_depth"], ge=-1)
    memory_efficient_backprop: bool = _WRAPPER_DEFAULTS["memory_efficient_backprop"]
    loss_on_all_segments: bool = _WRAPPER_DEFAULTS["loss_on_all_segments"]
    classifier_dropout: float = Field(default=_WRAPPER_DEFAULTS["classifier_dropout"], ge=0, lt=1)

    def wrapper_settings(self, names=(*TRAINING_WRAPPER_SETTINGS, "num_memory_tokens", "classifier_dropout")) -> dict:
        """These settings as RMTConfig fields (a new model's, or with `names`, those a stage
        sets on its starting checkpoint)."""
        return {name: getattr(self, name) for name in names}

    @model_validator(mode="after")
    def _pretrained_weights_keep_their_shapes(self) -> "ModelSettings":
        # A pretrained backbone takes overrides that keep its weights' shapes: fewer layers
        # (the first ones are loaded) or other dropout.
        changes_shapes = sorted(key for key in self.backbone_overrides if not _keeps_weight_shapes(key))
        if self.pretrained and changes_shapes:
            raise ValueError(
                f"backbone_overrides {changes_shapes} change the pretrained weights' shapes: set pretrained: false "
                "to build the backbone from its config, or override only num_hidden_layers and dropout"
            )
        return self


def _keeps_weight_shapes(key: str) -> bool:
    return key in ("num_hidden_layers", "is_decoder") or "dropout" in key


# Long validation and long steps: what a stage below valid_length_from_segments goes without.
LONG_VALIDATION = ("valid_length_factor", "long_step_every", "long_step_factors", "long_step_bptt_depth")
# Settings of the whole curriculum that `TrainSettings.for_stage` resolves into a stage's own.
CURRICULUM_ONLY = ("valid_length_from_segments", "valid_length_examples")


class TrainSettings(BaseModel):
    """The paper's recipe is the shape: AdamW, linear schedule with warm-up, total batch by
    gradient accumulation, clipping by value, early stopping on validation accuracy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(default=1e-5, gt=0)
    # The paper's linear decay to 0 at max_steps, or held constant after the warm-up (a
    # saddle such as Reasoning's middle-room questions is escaped at a steady rate, not a
    # vanishing one).
    schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(default=0.001, ge=0)
    # AdamW's second-moment decay (Hugging Face's name). After a stretch of near-zero gradients
    # an outlier batch moves every weight by up to (1 - beta1) / sqrt(1 - beta2) learning
    # rates: 3.2 at 0.999, 0.45 at 0.95, which large-model recipes use for stability.
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    # The failing robustness runs fit their lengths to a loss near zero and then lose the long
    # run, or spike (docs/robustness.md). Smoothed targets keep a floor under the loss and the
    # gradients alive (Hugging Face's name; the encoder's classifier only).
    label_smoothing_factor: float = Field(default=0.0, ge=0, lt=1)
    warmup_steps: int = Field(default=300, ge=0)
    max_steps: int = Field(default=3000, ge=1)
    batch_size: int = Field(default=32, ge=1, description="Examples per optimizer step")
    micro_batch_size: int | None = Field(default=None, ge=1, description="Examples per forward pass (accumulation)")
    clip_value: float | None = Field(default=5.0, gt=0)
    clip_norm: float | None = Field(default=None, gt=0)
    eval_every: int = Field(default=100, ge=1)
    eval_examples: int | None = Field(default=None, ge=1, description="Validation examples per evaluation (all: None)")
    patience: int = Field(default=15, ge=1, description="Evaluations without improvement before stopping")
    target_accuracy: float | None = Field(default=None, gt=0, le=1, description="Stop once validation reaches it")
    min_steps: int = Field(default=0, ge=0, description="Neither the target nor patience stops a stage before this step")
    # Validation at the trained length cannot tell a model that carries the fact forward from
    # one that solved that length only: with a factor k > 1 the best checkpoint is chosen, and
    # the stage stopped, on validation examples k times as long (generated, not stored).
    valid_length_factor: int = Field(default=1, ge=1, description="Validate (choose the best checkpoint and stop) "
                                     "on examples this many times as long as the stage's")
    # A model trained on one to three segments does not carry a fact four times as far (the
    # paper's generalization grid), so long validation would only keep the first stages running.
    valid_length_from_segments: int = Field(default=1, ge=1, description="valid_length_factor (and long steps) "
                                            "apply to stages of at least this many segments; shorter stages "
                                            "validate at their own length")
    valid_length_examples: int | None = Field(default=None, ge=1, description="Validation examples per evaluation "
                                              "where valid_length_factor (above 1) applies (null: eval_examples)")
    # One length per stage lets a stage fit its own length; drawing each step's length from
    # every stored curriculum length up to the stage's asks for one rule at all of them.
    mixed_lengths: bool = Field(default=False, description="Each step trains on a number of segments drawn from the "
                                "stored curriculum lengths up to the stage's (validation stays at the stage's)")
    # Steps at the stage's length leave what the memory does beyond it untrained: every k-th
    # step can train on examples as long as the validation's instead (generated from the
    # training split's noise, never stored), so that the long run is learned, not hoped for.
    long_step_every: int | None = Field(default=None, ge=1, description="Every this many steps, train on examples "
                                        "valid_length_factor times the stage's length (off: null)")
    # Full back-propagation through a long step's every segment is what did not take hold from
    # a short-trained model (docs/robustness.md); through its last k segments only, the long
    # run's memory still reaches the loss, while the gradient's path stays as short as a stage's.
    long_step_bptt_depth: int | None = Field(default=None, ge=1, description="Long steps back-propagate through "
                                             "their last this many segments only (null: the model's bptt_depth)")
    # From a 7-segment model, 16x long steps alone did not take hold where 8x did
    # (docs/robustness.md): drawing each long step's length from several factors lets the
    # shorter ones lead the way to the longer.
    long_step_factors: list[int] | None = Field(default=None, min_length=1, description="Each long step's length "
                                                "in multiples of the stage's, drawn per step from these (null: "
                                                "valid_length_factor)")
    # At 512 segments a fact read after hundreds of noise segments is lost where one read early
    # is kept (docs/robustness.md): the memory drifts into states no stage's length reaches.
    # Every k-th step can start its examples from such states: memories that have read only
    # noise, carried from step to step (no gradient through the noise), so that writing the
    # fact is trained from them too.
    drifted_memory_every: int | None = Field(default=None, ge=1, description="Every this many steps, start each "
                                             "example from a memory that has read only noise, carried from step to "
                                             "step (off: null)")
    drifted_memory_segments: int = Field(default=512, ge=1, description="The most noise segments a carried "
                                         "memory reads before it starts again from the initial memory (in "
                                         "whole blocks of the stage's segments)")
    # A long test input cycles its split's noise when the noise text is small (pydoc), and the
    # repeated noise drove a model that holds on fresh noise off its facts (docs/robustness.md).
    drifted_memory_noise_sentences: int | None = Field(default=None, ge=1, description="A carried memory reads "
                                                       "a window of this many training-noise sentences over and "
                                                       "over (null: each block from a random sentence)")
    # A middle-room Reasoning question is answered by a parity of four binary features, which
    # gradient descent does not find from the whole task (docs/research.md); learned one feature
    # at a time, each new form ramped in while the one before still answers most of the batch,
    # it is. A deviation from the paper's training data: validation and test stay the task's.
    form_curriculum: list[FormCurriculumEntry] = Field(default_factory=list, description="Simpler forms of the task "
                                                  "(TRAINING_FORMS), simplest first: the stage trains on the first, "
                                                  "then ramps in each next one (the task itself last) once the one "
                                                  "before scores form_advance_accuracy on its own validation "
                                                  "examples. A name is a form at form_text_tokens; {form, "
                                                  "text_tokens} is a form at a length of its own")
    # Noise drowns a form's slope: the lookup left chance by step ~1,100 on 24-token examples and
    # not within 2,500 on the stage's 64 with noise (docs/research.md).
    form_text_tokens: int | None = Field(default=None, ge=1, description="Text tokens of a form's examples, "
                                         "fewer than the stage's for less noise (encoder models; null: the "
                                         "stage's length). The task itself always has the stage's length")
    # At one fixed short length a form's layout never moves, and the model learns its positions:
    # lookup and wording learned at 24 tokens fell from 90% to 27% at 28 (docs/research.md).
    form_text_tokens_max: int | None = Field(default=None, ge=1, description="With form_text_tokens: each form "
                                             "example's length is drawn between the two (per example, the same "
                                             "on every visit), so that its facts move among a varying amount of "
                                             "noise (null: all at form_text_tokens)")
    form_ramp_steps: int = Field(default=1000, ge=1, description="Steps over which a newly ramped-in form's share "
                                 "of each batch rises from form_start_share to all of it")
    form_start_share: float = Field(default=0.1, gt=0, le=1, description="A newly ramped-in form's first share of "
                                    "each batch (the rest from the form before it)")
    form_advance_accuracy: float = Field(default=0.95, gt=0, le=1, description="Validation accuracy on a form's own "
                                         "examples at which the next one is ramped in")
    seed: int = 0
    device: str = "auto"

    @field_validator("form_curriculum", mode="before")
    @classmethod
    def _null_clears_forms(cls, forms):
        return [] if forms is None else forms

    @field_serializer("form_curriculum")
    def _steps_without_lengths_are_names(self, forms):
        """Written back as params.yaml writes it: a name where the step has no length of its own."""
        return [step.form if step.text_tokens is None else step.model_dump() for step in forms]

    @model_validator(mode="after")
    def _accumulation_divides(self) -> "TrainSettings":
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}")
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps {self.min_steps} exceeds max_steps {self.max_steps}: lower it or raise max_steps")
        if self.long_step_every is not None and self.valid_length_factor == 1:
            raise ValueError(f"long_step_every {self.long_step_every} trains on examples valid_length_factor times the "
                             "stage's length, and valid_length_factor is 1: set it above 1, or long_step_every to null")
        if self.long_step_factors is not None and self.long_step_every is None:
            raise ValueError(f"long_step_factors {self.long_step_factors} apply to long steps, and long_step_every is "
                             "null: set long_step_every, or long_step_factors to null")
        if self.long_step_factors is not None and min(self.long_step_factors) < 2:
            raise ValueError(f"long_step_factors {self.long_step_factors}: a long step is at least twice the "
                             "stage's length; use factors of 2 or more")
        if self.long_step_bptt_depth is not None and self.long_step_every is None:
            raise ValueError(f"long_step_bptt_depth {self.long_step_bptt_depth} applies to long steps, and "
                             "long_step_every is null: set long_step_every, or long_step_bptt_depth to null")
        if self.drifted_memory_noise_sentences is not None and self.drifted_memory_every is None:
            raise ValueError(f"drifted_memory_noise_sentences {self.drifted_memory_noise_sentences} applies to drift "
                             "steps, and drifted_memory_every is null: set drifted_memory_every, or "
                             "drifted_memory_noise_sentences to null")
        # Below valid_length_from_segments a stage has no long steps (for_stage), so the clash
        # is checked once the stage is known (TaskSettings) unless long steps apply everywhere.
        if self.form_curriculum and self.long_step_every is not None and self.valid_length_from_segments == 1:
            raise ValueError(f"form_curriculum {self.form_labels} and long_step_every {self.long_step_every} both "
                             "choose what a step reads: set one of them to null (a form curriculum belongs to stage 1: "
                             "stage_train: {1: {form_curriculum: [...]}})")
        if self.form_text_tokens_max is not None and self.form_text_tokens is None:
            raise ValueError(f"form_text_tokens_max {self.form_text_tokens_max} is the longest of the lengths from "
                             "form_text_tokens, which is null: set form_text_tokens, or form_text_tokens_max to null")
        if self.form_text_tokens_max is not None and self.form_text_tokens > self.form_text_tokens_max:
            raise ValueError(f"form_text_tokens_max {self.form_text_tokens_max} is the longest of the lengths from "
                             f"form_text_tokens ({self.form_text_tokens}): set form_text_tokens to at most it")
        if self.form_curriculum and self.mixed_lengths:
            raise ValueError(f"form_curriculum {self.form_labels} and mixed_lengths both choose what a step reads: "
                             "turn mixed_lengths off (a form curriculum belongs to stage 1: "
                             "stage_train: {1: {form_curriculum: [...]}})")
        if self.drifted_memory_every is not None and self.long_step_every is not None:
            raise ValueError(f"drifted_memory_every {self.drifted_memory_every} and long_step_every "
                             f"{self.long_step_every} both choose what a step reads: set one of them to null")
        return self

    @property
    def form_labels(self) -> list[str]:
        return [step.label for step in self.form_curriculum]

    def for_stage(self, segments: int) -> "TrainSettings":
        """The settings a stage on `segments` segments trains with: valid_length_from_segments
        and valid_length_examples resolved into its valid_length_factor and eval_examples (and
        its long steps, which need the long length, off where that does not apply)."""
        values = self.model_dump(exclude=set(CURRICULUM_ONLY))
        if segments < self.valid_length_from_segments:
            values.update({key: TrainSettings.model_fields[key].default for key in LONG_VALIDATION})
        elif self.valid_length_factor > 1 and self.valid_length_examples is not None:
            values.update(eval_examples=self.valid_length_examples)
        return TrainSettings(**values)


def form_curriculum_problem(task: str, train: TrainSettings) -> str | None:
    """Why `train.form_curriculum` does not fit the task, if it does not."""
    from rmt.data.tasks import TASKS, TRAINING_FORMS

    forms = TRAINING_FORMS.get(task, {})
    unknown = [step.form for step in train.form_curriculum if step.form not in forms]
    if unknown:
        choose = f"choose from {', '.join(forms)}" if forms else "this task has none: set it per task"
        return f"form_curriculum names {unknown}, which are not forms of the task {task}: {choose}"
    # A name is the form at form_text_tokens: {form, text_tokens} at that length is the same step.
    same_length = train.form_text_tokens if train.form_text_tokens_max is None else None
    steps = [(step.form, step.text_tokens or same_length) for step in train.form_curriculum]
    if len(set(steps)) < len(steps):
        return (f"form_curriculum {train.form_labels} names a form twice at one length (a name is the form at "
                f"form_text_tokens, {train.form_text_tokens}): list each once, simplest first")
    itself = [step.label for step in train.form_curriculum if forms[step.form] == TASKS[task]
              and step.text_tokens is None and train.form_text_tokens is None]
    if itself:
        return (f"form_curriculum names {itself}, the task itself, and form_text_tokens is null: at the stage's "
                "length it is the task as stored, which the curriculum brings in last anyway; set form_text_tokens "
                "(or the step's text_tokens) or leave it out")
    return None


def form_length_problem(train: TrainSettings, stage_tokens: int) -> str | None:
    """Why a form curriculum's lengths do not fit a stage of `stage_tokens` tokens, if they do not."""
    if not train.form_curriculum:
        return None
    for name, null_means in (("form_text_tokens", "the stage's length"),
                             ("form_text_tokens_max", "all at form_text_tokens")):
        if not (getattr(train, name) or 0) <= stage_tokens:
            return (f"{name} {getattr(train, name)} is longer than the stage's examples ({stage_tokens} tokens): "
                    f"lower it, or set it to null for {null_means}")
    for step in train.form_curriculum:
        if not (step.text_tokens or 0) <= stage_tokens:
            return (f"form_curriculum's step {step.label} is longer than the stage's examples ({stage_tokens} "
                    f"tokens): lower its text_tokens to at most {stage_tokens}")
    return None


def label_smoothing_problem(model: ModelSettings, train: TrainSettings, architecture: str | None = None) -> str | None:
    """Why these settings cannot smooth labels, if they cannot: smoothing applies to the
    encoder's classifier on each example's last segment (`architecture`: a checkpoint's)."""
    if not train.label_smoothing_factor:
        return None
    if (architecture or model.architecture) != "encoder":
        return decoder_smoothing_problem(train.label_smoothing_factor)
    if model.loss_on_all_segments:
        return (f"label_smoothing_factor {train.label_smoothing_factor} applies to the loss on each example's last "
                "segment, and loss_on_all_segments is on: set label_smoothing_factor to 0 or "
                "loss_on_all_segments to false")
    return None


def decoder_smoothing_problem(factor: float) -> str:
    return (f"label_smoothing_factor {factor} applies to the encoder's classifier, and this model is a decoder: set it to 0 "
            "(train.label_smoothing_factor: 0 in your configuration; params.yaml smooths the encoder's targets)")
