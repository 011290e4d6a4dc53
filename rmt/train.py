"""One curriculum stage: train an encoder RMT on N-segment examples of one task.

    results/<...>/stage-N/
      config.json        the resolved settings of the stage
      history.jsonl      one line per evaluation: step, train loss, learning rate, accuracy, loss
      checkpoints/last/  the latest checkpoint, plus training_state.pt to resume from
      checkpoints/best/  the best checkpoint so far
    written when the stage ends:
      best/              the checkpoint with the best validation accuracy (RMT + tokenizer)
      metrics.json       outcome: best accuracy, steps, stop reason, time

Resuming. The batch of step s is a pure function of (seed, s), and the model, optimizer,
scheduler, torch RNG and counters are saved together at every evaluation; a stage killed at
any moment and started again with the same command continues from its last checkpoint and
ends exactly as an uninterrupted run would. Workflow managers delete a job's declared
outputs (best/, metrics.json, history.jsonl) before they rerun it: checkpoints/ is not one
of them, so a rerun resumes, and a finished stage only publishes its outputs again. Started
with other settings, the stage starts afresh and discards the previous run.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
from filelock import SoftFileLock, Timeout
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from rmt.checkpoint import check_fits
from rmt.data.dataset import TaskDataset
from rmt.data.generator import SPLITS, stable_int
from rmt.data.tasks import TRAINING_FORMS, get_task
from rmt.distributed import Distributed
from rmt.drifted_memory import DriftedMemory
from rmt.hub import load_tokenizer
from rmt.layout import StageFiles
from rmt.objective import Objective, objective_for
from rmt.peak_memory import PeakMemory
from rmt.model.auto import is_checkpoint_folder
from rmt.model.base import read_checkpoint_config
from rmt.form_curriculum import FORM_VALID_EXAMPLES, FormCurriculum
from rmt.settings import (TRAINING_WRAPPER_SETTINGS, FormStep, ModelSettings, TrainSettings, form_curriculum_problem,
                          form_length_problem, label_smoothing_problem)
from rmt.utils import UserError, atomic_directory, claim_output, progress_bar, recover_directory, write_atomic

if TYPE_CHECKING:
    from rmt.tracking import Run



class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class StageBusy(UserError):
    """Another process trains the same stage folder."""


def train_stage(
    *,
    data_dir: str | Path,
    segments: int,
    output: str | Path,
    model: ModelSettings,
    train: TrainSettings,
    init: str | Path | None = None,
    progress: bool = True,
    tracking: "Callable[[str | None], ContextManager[Run | None]] | None" = None,
) -> dict:
    """Run (or resume) one stage; returns the contents of metrics.json.

    tracking: opens the stage's MLflow run (rmt.tracking) given the id of the run an
    interrupted attempt of this stage had opened, so that a resumed stage continues its own
    run; every step's loss and learning rate, every validation and the stage's files go to it.
    """
    output = Path(output)
    inputs = _StageInputs.check(data_dir, segments, model=model, train=train, init=init)
    parallel = Distributed.from_environment()
    micro = micro_batch_size(train, parallel.world_size)
    if train.batch_size % (parallel.world_size * micro):
        raise ValueError(
            f"batch_size {train.batch_size} must split evenly over {parallel.world_size} processes x "
            f"micro_batch_size {micro}"
        )
    device = parallel.device(train.device)
    claim_output(output, kind="a curriculum stage", ours=_is_stage_folder)
    with stage_lock(output, parallel, device):
        folder = _StageFolder(output, parallel)
        folder.prepare(inputs.resolved_settings(segments, model=model, train=train, init=init))
        torch.manual_seed(train.seed + parallel.rank)  # each process its own dropout masks
        trainer = _Trainer.start(inputs, folder, segments=segments, model=model, train=train, init=init,
                                 parallel=parallel, device=device)
        with (tracking or _untracked)(trainer.progress.run_id) as run:
            trainer.progress.run_id = run.run_id if run is not None else None
            finished_before = trainer.progress.stop_reason is not None  # only its outputs are published again
            if not finished_before:
                with PeakMemory(device) as memory:
                    trainer.run(run, show_progress=progress)
            metrics = folder.publish(trainer.progress, segments, unfinished_form=trainer.unfinished_form)
            if run is not None and not finished_before:
                _log_outcome(run, metrics, folder, peak_memory_mb=memory.absolute_mb)
    return metrics


def padded_right(sequences: list, pad_token_id: int) -> np.ndarray:
    """(examples, longest) token ids, the shorter sequences padded on the right (an encoder reads
    an example without its padding)."""
    ids = np.full((len(sequences), max(map(len, sequences))), pad_token_id, dtype=np.int64)
    for row, tokens in zip(ids, sequences):
        row[: len(tokens)] = tokens
    return ids


def _own_rows(rows: np.ndarray | list, parallel: Distributed) -> np.ndarray | list:
    """A process's rows of what every process draws whole (a batch, the validation set): every
    world_size-th."""
    return rows[parallel.rank :: parallel.world_size]


def micro_batch_size(train: TrainSettings, world_size: int) -> int:
    """Examples per forward pass: as set, else each process's whole share of the batch (the
    paper's batch of 32 on 4 GPUs is 8 per GPU, with no accumulation)."""
    return train.micro_batch_size or max(train.batch_size // world_size, 1)


@contextlib.contextmanager
def _untracked(_previous_run_id):
    yield None


def _log_outcome(run: "Run", metrics: dict, folder: "_StageFolder", *, peak_memory_mb: float) -> None:
    """The stage's headline figures (columns of the runs table) and its files. The time is
    the stage's over all its attempts; the peak memory this attempt's, absolute."""
    run.log_metrics({"best_valid_accuracy": metrics["best_valid_accuracy"], "seconds": metrics["seconds"],
                     "peak_memory_mb": round(peak_memory_mb, 1)}, step=metrics["steps"])
    run.set_tags({"rmt.stop_reason": metrics["stop_reason"]})
    for path in (folder.metrics, folder.history, folder.settings):
        run.log_artifact(path)


@dataclass
class _StageInputs:
    """The data of a stage, checked against its settings and starting checkpoint before
    anything is written."""

    data: TaskDataset
    train_arrays: dict[int, tuple[np.ndarray, np.ndarray]]  # tokens and labels by number of segments
    valid_tokens: np.ndarray
    valid_labels: np.ndarray
    valid_kinds: np.ndarray | None  # the question kind of each validation example, where the task has kinds
    objective: Objective  # the model kind: how it is built, its loss and its answers

    @classmethod
    def check(cls, data_dir, segments: int, *, model: ModelSettings, train: TrainSettings, init) -> "_StageInputs":
        data = TaskDataset(data_dir)
        if init is not None:
            objective = check_fits(init, data, option="--init", same_segment_length=False)
        else:
            tokenizer = load_tokenizer(model.backbone)
            data.check_vocabulary(tokenizer, f"the backbone '{model.backbone}'")
            objective = objective_for(model.architecture, classes=data.card["classes"], tokenizer=tokenizer)
        problem = (label_smoothing_problem(model, train, objective.model_class.architecture)
                   or form_curriculum_problem(data.config.task, train))
        if problem:
            raise ValueError(problem)  # before any array is read or validation example generated
        _check_form_length(data, segments, train, objective)
        _warn_if_forms_cannot_finish(train)
        if train.drifted_memory_every is not None:
            _check_drift(data, segments, train, init=init, model=model)
        lengths = [n for n in data.config.curriculum_segments if n < segments] if train.mixed_lengths else []
        # A stage length the data lacks fails here, before anything is written.
        train_arrays = {n: data.arrays("train", n) for n in (*lengths, segments)}
        valid_tokens, valid_labels = validation_set(data, segments * train.valid_length_factor, train.eval_examples)
        valid_kinds = None
        if get_task(data.config.task).kinds:
            count = len(valid_labels) if train.eval_examples is None else min(train.eval_examples, len(valid_labels))
            valid_kinds = data.kinds("valid", segments * train.valid_length_factor, range(count))
        return cls(data, train_arrays, valid_tokens, valid_labels, valid_kinds, objective)

    def resolved_settings(self, segments: int, *, model: ModelSettings, train: TrainSettings, init) -> dict:
        """What the stage's config.json records: a rerun with other values starts afresh."""
        return {"data": str(self.data.directory), "segments": segments, "init": None if init is None else str(init),
                "model": model.model_dump(), "train": train.model_dump(),
                "data_config_hash": self.data.card["config_hash"]}


@dataclass
class _Progress:
    """The counters of a stage, saved with every checkpoint, and its stopping policy."""

    step: int = 0
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_step: int = 0
    evaluations_without_gain: int = 0
    stop_reason: str | None = None
    seconds: float = 0.0
    history: list = field(default_factory=list)
    run_id: str | None = None  # the MLflow run the stage logs to, continued on resume
    form_phase: int = 0  # train.form_curriculum: the newest form being ramped in (its length: the task)
    form_phase_step: int = 0  # the step at which it came in

    def record(self, record: dict) -> bool:
        """Add a validation; True when it is the best so far. Ties in accuracy (common at
        100%) go to the lower validation loss: a model that keeps training past the first
        perfect score is kept, and it extrapolates further."""
        self.history.append(record)
        accuracy, loss = record["valid_accuracy"], record["valid_loss"]
        if (accuracy, -loss) > (self.best_accuracy, -self.best_loss):
            self.best_accuracy, self.best_loss, self.best_step = accuracy, loss, self.step
            self.evaluations_without_gain = 0
            return True
        self.evaluations_without_gain += 1
        return False

    def decide(self, train: TrainSettings, accuracy: float, *, forms_done: bool = True) -> None:
        """Stop on the target accuracy or patience (never before min_steps, nor while the form
        curriculum has yet to bring the task in), or at max_steps."""
        may_stop = self.step >= train.min_steps and forms_done
        if may_stop and train.target_accuracy is not None and accuracy >= train.target_accuracy:
            self.stop_reason = "target_accuracy"
        elif may_stop and self.evaluations_without_gain >= train.patience:
            self.stop_reason = "early_stopping"
        elif self.step >= train.max_steps:
            self.stop_reason = "max_steps"


def _with_defaults(recorded: dict) -> dict:
    """A stage's recorded settings with every setting rmt gained since at its default: a
    stage trained before a setting existed ran as its default does, and stays the same run."""
    try:
        return {**recorded, "model": ModelSettings(**recorded["model"]).model_dump(),
                "train": TrainSettings(**recorded["train"]).model_dump()}
    except (KeyError, TypeError, ValueError):  # a setting since removed or renamed: another run
        return recorded


@dataclass(frozen=True)
class _StageFolder(StageFiles):
    """The stage's files (their names: StageFiles) as this run writes them: its settings,
    working checkpoints, history and published outputs. Only the main process writes; the
    others wait for it at the barriers."""

    parallel: Distributed = field(default_factory=Distributed)

    def prepare(self, resolved: dict) -> None:
        """Start afresh when the folder holds a run of other settings; repair a checkpoint
        swap that a kill -9 interrupted."""
        changed = self.settings.exists() and _with_defaults(json.loads(self.settings.read_text())) != resolved
        self.parallel.barrier()  # every process has checked the folder before the first one writes to it
        if self.parallel.is_main:
            if changed:
                print(f"{self.folder} holds a stage run with other settings: starting the stage afresh", file=sys.stderr)
                for folder in (self.checkpoints, self.best):
                    shutil.rmtree(folder, ignore_errors=True)
                for path in (self.metrics, self.history):
                    path.unlink(missing_ok=True)
            write_atomic(self.settings, json.dumps(resolved, indent=2, sort_keys=True) + "\n")
            for folder in (self.last, self.best_so_far):
                recover_directory(folder)
        self.parallel.barrier()

    @property
    def resumable(self) -> bool:
        return (self.last / StageFiles.TRAINING_STATE).is_file()

    def save(self, folder: Path, model, tokenizer, state: dict | None = None) -> None:
        if not self.parallel.is_main:
            return
        with atomic_directory(folder, ours=is_checkpoint_folder, kind="an RMT checkpoint") as staging:
            model.save_into(staging)
            tokenizer.save_pretrained(staging)
            if state is not None:
                torch.save(state, staging / StageFiles.TRAINING_STATE)

    def write_history(self, progress: _Progress) -> None:
        if self.parallel.is_main:
            _write_lines(self.history, progress.history)

    def publish(self, progress: _Progress, segments: int, *, unfinished_form: str | None = None) -> dict:
        """The stage's final outputs, from its saved state: idempotent. unfinished_form: the form
        a form curriculum was still on when the stage stopped (max_steps), if it was."""
        metrics = {"segments": segments, "best_valid_accuracy": progress.best_accuracy,
                   "best_valid_loss": progress.best_loss, "best_step": progress.best_step, "steps": progress.step,
                   "stop_reason": progress.stop_reason, "seconds": round(progress.seconds, 1),
                   **({"unfinished_form": unfinished_form} if unfinished_form else {})}
        if self.parallel.is_main:
            self.write_history(progress)
            if not (self.best.is_dir() and any(self.best.iterdir())):
                with atomic_directory(self.best, ours=is_checkpoint_folder, kind="an RMT checkpoint") as staging:
                    shutil.copytree(self.best_so_far, staging, dirs_exist_ok=True)
            # Last: its presence means the stage is complete.
            write_atomic(self.metrics, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        self.parallel.barrier()
        return metrics


class _Trainer:
    """The model, optimizer and schedule of a stage, and its loop: one step, validation,
    the stopping decision, a checkpoint at every validation."""

    def __init__(self, *, inputs, folder, segments, train, parallel, device, model, tokenizer, progress):
        self.inputs, self.folder, self.segments, self.train = inputs, folder, segments, train
        self.parallel, self.device, self.model, self.tokenizer = parallel, device, model, tokenizer
        self.progress = progress
        self.micro = micro_batch_size(train, parallel.world_size)
        self.network = parallel.wrap(model, device)  # what the step calls: DDP with several processes
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay,
                                           betas=(0.9, train.adam_beta2))
        self.scheduler = (get_linear_schedule_with_warmup(self.optimizer, train.warmup_steps, train.max_steps)
                          if train.schedule == "linear" else
                          get_constant_schedule_with_warmup(self.optimizer, train.warmup_steps))
        self.pending_metrics: list[tuple[dict, int]] = []
        self.forms = FormCurriculum.of(train)
        self._form_valid: tuple = (None, None, None)  # (phase, tokens, labels) of the newest form
        # Built once: a batch generates an example of a form per row.
        task_forms = TRAINING_FORMS.get(inputs.data.config.task)  # validated: every step's form is one of them
        self.form_generators = {step.form: inputs.data.generator.for_form(task_forms[step.form])
                                for step in train.form_curriculum}
        self.drifted = None if train.drifted_memory_every is None else DriftedMemory(
            noise=inputs.data.generator.noise["train"], segment_length=inputs.data.config.segment_length,
            batch_size=train.batch_size, block_segments=segments, max_segments=train.drifted_memory_segments,
            seed=train.seed, window_sentences=train.drifted_memory_noise_sentences, rank=parallel.rank,
            world_size=parallel.world_size)

    @classmethod
    def start(cls, inputs: _StageInputs, folder: _StageFolder, *, segments, model, train, init, parallel,
              device) -> "_Trainer":
        """From the stage's last checkpoint when it has one, else from `init`, else new."""
        resume = folder.resumable
        source = folder.last if resume else init
        segment_length = inputs.data.config.segment_length
        if source is not None:
            try:
                network = inputs.objective.load(source, segment_length=segment_length,
                                                **model.wrapper_settings(TRAINING_WRAPPER_SETTINGS))
                tokenizer = load_tokenizer(str(source))
            except (ValueError, OSError) as error:
                if not resume:
                    raise
                raise ValueError(f"The stage's resume checkpoint is unusable: {error}. Delete "
                                 f"{folder.checkpoints} to train the stage afresh") from None
        else:
            network = inputs.objective.new_model(model, segment_length=segment_length)
            tokenizer = load_tokenizer(model.backbone)
        network.to(device).train()
        trainer = cls(inputs=inputs, folder=folder, segments=segments, train=train, parallel=parallel, device=device,
                      model=network, tokenizer=tokenizer, progress=_Progress())
        if resume:
            trainer.restore(_load_training_state(folder.last / StageFiles.TRAINING_STATE))
        return trainer

    def restore(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if len(saved["rng"]) != self.parallel.world_size:
            raise ValueError(
                f"{self.folder.last} was saved by {len(saved['rng'])} process(es), this run has "
                f"{self.parallel.world_size}: resume with the same number of processes"
            )
        torch_rng, cuda_rng = saved["rng"][self.parallel.rank]
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)
        # A state saved before drift steps existed has none: the stage's settings then had no
        # drift either (other settings start a stage afresh).
        if self.drifted is not None and saved.get("drifted_memory"):
            self.drifted.load_state_dict(saved["drifted_memory"][self.parallel.rank], self.device)
        try:
            self.progress = _Progress(**saved["counters"])
        except TypeError:
            raise ValueError(f"{self.folder.last} holds counters this version of rmt does not know "
                             f"({sorted(saved['counters'])}): delete {self.folder.checkpoints} to train "
                             "the stage afresh") from None
        if self.parallel.is_main and self.progress.stop_reason is None:
            print(f"Resuming the stage at step {self.progress.step} from {self.folder.last}", file=sys.stderr)

    def run(self, run: "Run | None", *, show_progress: bool) -> None:
        progress, train = self.progress, self.train
        started = time.perf_counter() - progress.seconds
        bar = progress_bar(total=train.max_steps, initial=progress.step, desc=f"stage {self.segments}", unit="step",
                   disable=not (show_progress and self.parallel.is_main))
        losses = []
        while progress.stop_reason is None:
            losses.append(self.step(progress.step))
            progress.step += 1
            self.pending_metrics.append(({"train_loss": losses[-1], "learning_rate": self.learning_rate},
                                         progress.step))
            bar.update(1)
            if progress.step % train.eval_every == 0 or progress.step == train.max_steps:
                record = self.validate(losses)
                losses = []
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", accuracy=f"{record['valid_accuracy']:.3f}")
                progress.seconds = time.perf_counter() - started
                self.checkpoint(run)
        bar.close()

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's share of step `step`'s batch: arrays and the indices of its rows in
        them. The batch is a function of (seed, step) and the saved counters only, so that a
        resumed run sees the same data, and every process draws the same batch and keeps every
        world_size-th row of it (a generated batch: generates only those)."""
        rng = np.random.default_rng([self.train.seed, step])
        if self.is_long_step(step):
            return self._long_batch(rng)
        if not self.forms_done:
            return self._form_batch(rng, step)
        lengths = sorted(self.inputs.train_arrays)
        length = lengths[rng.integers(len(lengths))] if len(lengths) > 1 else lengths[0]
        tokens, labels = self.inputs.train_arrays[length]
        return tokens, labels, _own_rows(rng.choice(len(labels), size=self.train.batch_size), self.parallel)

    @property
    def steps_in_form_phase(self) -> int:
        return self.progress.step - self.progress.form_phase_step

    @property
    def forms_done(self) -> bool:
        """No form curriculum, or it has brought the task in whole."""
        return self.forms is None or self.forms.done(self.progress.form_phase, self.steps_in_form_phase)

    @property
    def unfinished_form(self) -> str | None:
        if self.forms_done:
            return None
        step = self.forms.forms[self.progress.form_phase]
        return step.label if step else self.inputs.data.config.task

    def _form_batch(self, rng: np.random.Generator, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's share of a batch of the form curriculum's mix at `step`, generated from
        training examples drawn by `rng`."""
        data, phase = self.inputs.data, self.progress.form_phase
        forms = self.forms.rows(phase, step - self.progress.form_phase_step, self.train.batch_size)
        drawn = rng.choice(data.config.train_examples, size=self.train.batch_size)
        mine = _own_rows(list(zip(forms, drawn)), self.parallel)
        pairs = [self._form_example(form_step, "train", int(index)) for form_step, index in mine]
        return self._padded(pairs)

    def _padded(self, pairs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids (examples, longest) of (layout, tokens) pairs, shorter ones padded with [PAD] on
        the right (form_text_tokens; the encoder reads an example without its padding), and labels."""
        ids = padded_right([tokens for _, tokens in pairs], self.tokenizer.pad_token_id)
        return ids, np.array([layout.sample.label for layout, _ in pairs]), np.arange(len(pairs))

    def _form_example(self, form_step: FormStep | None, split: str, index: int):
        """An example of a form curriculum's step at its length, else form_text_tokens (None: the
        task, as its dataset holds it, at the stage's length)."""
        data = self.inputs.data
        num_tokens = self.segments * data.config.segment_length
        if form_step is None:
            return data.example(split, index, num_tokens)
        length = form_step.text_tokens or self._form_length(split, index) or num_tokens
        return self.form_generators[form_step.form].example(split, index, length)

    def _form_length(self, split: str, index: int) -> int | None:
        """Text tokens of a form's example `index` of `split` (None: the stage's length)."""
        shortest, longest = self.train.form_text_tokens, self.train.form_text_tokens_max
        if longest is None or longest == shortest:
            return shortest
        rng = np.random.default_rng([self.train.seed, stable_int("form_text_tokens"), SPLITS.index(split), index])
        return int(rng.integers(shortest, longest + 1))

    def _check_form(self, record: dict) -> None:
        """Score the newest form on its own validation examples once it is ramped in whole, and
        ramp in the next one when it is learned."""
        progress, phase = self.progress, self.progress.form_phase
        record["form"] = self.unfinished_form
        record["form_share"] = self.forms.share(phase, self.steps_in_form_phase)
        self.pending_metrics.append(({"form_phase": phase}, progress.step))
        if not self.forms.may_advance(phase, self.steps_in_form_phase):
            return
        if self._form_valid[0] != phase:  # generated once per form
            pairs = [self._form_example(self.forms.forms[phase], "valid", index) for index in range(FORM_VALID_EXAMPLES)]
            self._form_valid = (phase, *self._padded(pairs)[:2])
        _, tokens, labels = self._form_valid
        accuracy, _ = evaluate_arrays(self.model, self.inputs.objective, tokens, labels, None, self.micro, self.device,
                                      self.parallel)
        self.model.train()
        record["form_accuracy"] = accuracy
        self.pending_metrics.append(({"valid_accuracy/form": accuracy}, progress.step))
        if accuracy >= self.forms.advance_accuracy:
            progress.form_phase, progress.form_phase_step = phase + 1, progress.step

    def is_drift_step(self, step: int) -> bool:
        return _is_kth(step, self.train.drifted_memory_every)

    def is_long_step(self, step: int) -> bool:
        return _is_kth(step, self.train.long_step_every)

    @contextlib.contextmanager
    def bptt_depth(self, step: int):
        """A long step's truncated back-propagation (long_step_bptt_depth), for that step only."""
        depth, config = self.train.long_step_bptt_depth, self.model.config
        if depth is None or not self.is_long_step(step):
            yield
            return
        kept, config.bptt_depth = config.bptt_depth, depth
        try:
            yield
        finally:
            config.bptt_depth = kept

    def _long_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch at a long length (long_step_factors, or the validation's), generated from
        training examples drawn by `rng`."""
        data, factors = self.inputs.data, self.train.long_step_factors or [self.train.valid_length_factor]
        factor = factors[rng.integers(len(factors))] if len(factors) > 1 else factors[0]
        num_tokens = self.segments * factor * data.config.segment_length
        drawn = rng.choice(data.config.train_examples, size=self.train.batch_size)
        pairs = [data.example("train", int(index), num_tokens) for index in _own_rows(drawn, self.parallel)]
        tokens = np.stack([tokens for _, tokens in pairs])  # (share, num_tokens): this process's rows
        labels = np.array([layout.sample.label for layout, _ in pairs])
        return tokens, labels, np.arange(len(labels))

    def step(self, step: int) -> float:
        """One optimizer step; the mean training loss over the processes."""
        train, parallel, device = self.train, self.parallel, self.device
        share = train.batch_size // parallel.world_size  # examples per process and step
        accumulation = share // self.micro
        tokens, labels, indices = self.batch(step)
        drifted = self.drifted.advance(self.model, step=step) if self.is_drift_step(step) else None  # (share, m, H)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for start in range(0, share, self.micro):
            order = np.argsort(indices[start : start + self.micro], kind="stable")
            rows = indices[start : start + self.micro][order]
            inputs = _token_tensor(tokens[rows], device)
            targets = torch.as_tensor(labels[rows], device=device)
            memory = None if drifted is None else drifted[torch.as_tensor(start + order, device=drifted.device)]
            last_micro_batch = start + self.micro >= share
            # Gradients are averaged across processes once per step, on the last micro-batch.
            with (contextlib.nullcontext() if last_micro_batch or parallel.world_size == 1 else self.network.no_sync(),
                  self.bptt_depth(step)):
                loss = self.inputs.objective.loss(self.network, inputs, targets, memory=memory,
                                                  label_smoothing=train.label_smoothing_factor) / accumulation
                finite = parallel.sum(float(torch.isfinite(loss)), device) == parallel.world_size
                if finite:
                    loss.backward()
            if not finite:
                raise TrainingDiverged(
                    f"The loss became {loss.item()} at step {step + 1}: stopped; the last good checkpoint is in "
                    f"{self.folder.last}. Lower the learning rate or clip gradients harder."
                )
            step_loss += loss.item()
        if train.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), train.clip_value)
        if train.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return parallel.sum(step_loss, device) / parallel.world_size

    def validate(self, losses: list[float]) -> dict:
        """Score the validation set, keep the best checkpoint, decide whether to stop."""
        inputs, progress = self.inputs, self.progress
        accuracy, valid_loss, *by_kind = evaluate_arrays(
            self.model, inputs.objective, inputs.valid_tokens, inputs.valid_labels, self.train.eval_examples,
            self.micro, self.device, self.parallel, kinds=inputs.valid_kinds)
        by_kind = by_kind[0] if by_kind else {}
        self.model.train()
        record = {"step": progress.step, "train_loss": float(np.mean(losses)), "learning_rate": self.learning_rate,
                  "valid_accuracy": accuracy, "valid_loss": valid_loss,
                  "valid_segments": self.segments * self.train.valid_length_factor,
                  **({"valid_accuracy_by_kind": by_kind} if by_kind else {})}
        self.pending_metrics.append(({"valid_accuracy": accuracy, "valid_loss": valid_loss,
                                      **{f"valid_accuracy/{kind}": value for kind, value in by_kind.items()}},
                                     progress.step))
        forms_running = not self.forms_done
        if forms_running:
            self._check_form(record)
        if progress.record(record):
            self.folder.save(self.folder.best_so_far, self.model, self.tokenizer)
        if forms_running:  # patience counts from the task on: the forms take as long as they take
            progress.evaluations_without_gain = 0
        # The stage stops on its weakest kind of question: a shortcut that answers one kind
        # (Reasoning's end-room questions) must not end the stage.
        progress.decide(self.train, min([accuracy, *by_kind.values()]), forms_done=self.forms_done)
        return record

    def checkpoint(self, run: "Run | None") -> None:
        """Save everything a resumed run needs, then log the metrics since the last
        checkpoint: a run killed between the two loses those points, but a resumed run
        never logs a step twice."""
        # Every process's RNG state, so that a resumed run draws the same dropout masks.
        rng = self.parallel.gather((torch.get_rng_state(),
                                    torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None))
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
                 "counters": asdict(self.progress)}
        if self.drifted is not None:  # every process's own rows
            state["drifted_memory"] = self.parallel.gather(self.drifted.state_dict())
        self.folder.save(self.folder.last, self.model, self.tokenizer, state)
        # The history is part of the saved state, so a crash never loses or repeats a line.
        self.folder.write_history(self.progress)
        if run is not None:
            run.log_metric_steps(self.pending_metrics)
        self.pending_metrics = []


def validation_set(data: TaskDataset, segments: int, examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validation token ids (examples, segments * segment_length) and labels: the stored
    split at a curriculum length, else generated from the validation split's noise."""
    if segments in data.config.curriculum_segments:
        return data.arrays("valid", segments)
    num_tokens = segments * data.config.segment_length
    pairs = [data.example("valid", index, num_tokens) for index in range(examples or data.config.valid_examples)]
    return np.stack([tokens for _, tokens in pairs]), np.array([layout.sample.label for layout, _ in pairs])


def _check_form_length(data: TaskDataset, segments: int, train: TrainSettings, objective: Objective) -> None:
    """The form curriculum's lengths (form_text_tokens, form_text_tokens_max, a step's own
    text_tokens) fit the task (its facts and question) and the stage, on an encoder."""
    if not train.form_curriculum:
        return
    stage_tokens = segments * data.config.segment_length
    if problem := form_length_problem(train, stage_tokens):
        raise ValueError(problem)
    # (what names the length, its tokens, how to leave it at the stage's length)
    lengths = [(f"form_curriculum's step {step.label}", step.text_tokens, f"set its text_tokens to {stage_tokens}")
               for step in train.form_curriculum if step.text_tokens is not None]
    if train.form_text_tokens is not None:
        lengths.insert(0, (f"form_text_tokens {train.form_text_tokens}", train.form_text_tokens, "set it to null"))
    fewest, architecture = data.generator.min_tokens, objective.model_class.architecture
    for name, tokens, fix in lengths:
        if tokens < fewest:
            raise ValueError(f"{name} cannot hold the {data.config.task} facts and question ({fewest} tokens): "
                             f"raise it to {fewest} or more")
        if tokens < stage_tokens and architecture != "encoder":
            raise ValueError(f"{name} pads a form's examples to the stage's length, and a {architecture} would "
                             f"read the padding: {fix}")


def _warn_if_forms_cannot_finish(train: TrainSettings) -> None:
    forms = FormCurriculum.of(train)
    if forms is not None and train.max_steps < (fewest := forms.fewest_steps(train.eval_every)):
        warnings.warn(f"max_steps {train.max_steps} stops the stage before its form_curriculum can bring the task in "
                      f"(at least {fewest} steps with form_ramp_steps {train.form_ramp_steps} and eval_every "
                      f"{train.eval_every}): the stage will end on a form (metrics.json: unfinished_form)",
                      stacklevel=3)


def _is_kth(step: int, every: int | None) -> bool:
    """Whether 0-based `step` is an every-th one (the every-th, 2*every-th, ...); never without `every`."""
    return every is not None and step % every == every - 1


def _check_drift(data: TaskDataset, segments: int, train: TrainSettings, *, init, model: ModelSettings) -> None:
    """Drift steps read whole blocks of the stage's segments, need a memory to carry, and a
    window of noise the training split holds."""
    if train.drifted_memory_segments < segments:
        raise ValueError(f"drifted_memory_segments {train.drifted_memory_segments} is less than the {segments} "
                         "segments a drift step's memories read at a time: raise it, or set "
                         "drifted_memory_every to null for this stage")
    memory_tokens = read_checkpoint_config(init).num_memory_tokens if init is not None else model.num_memory_tokens
    if not memory_tokens:
        raise ValueError(f"drifted_memory_every {train.drifted_memory_every} carries memories, and the model has no "
                         "memory tokens: set drifted_memory_every to null, or num_memory_tokens above 0")
    window, sentences = train.drifted_memory_noise_sentences, data.generator.noise["train"].num_sentences
    if window is not None and window > sentences:
        raise ValueError(f"drifted_memory_noise_sentences {window} exceeds the {sentences} sentences of the "
                         f"training split's noise in {data.directory}: lower it, or set it to null")


def _load_training_state(path: Path) -> dict:
    """The optimizer, scheduler, RNG and counters saved with a checkpoint. Tensors and plain
    values only (weights_only): a state file can travel through `dvc pull`, and unpickling
    arbitrary objects from it would run whatever code it names."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable, truncated or not ours: the same problem
        raise ValueError(
            f"{path} is not a training state rmt can resume from ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}). It is never unpickled beyond tensors "
            f"and plain values: if you did not put it there, delete {path.parent.parent} to train the stage afresh"
        ) from None


def _is_stage_folder(path: Path) -> bool:
    """A stage folder rmt may reuse: empty, or holding the stage settings rmt writes."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {child.name for child in path.iterdir()}
    if names <= {StageFiles.LOCK}:
        return True
    try:
        settings = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and {"data", "segments", "model", "train"} <= set(settings)


@contextlib.contextmanager
def stage_lock(output: Path, parallel: Distributed = Distributed(), device: torch.device = torch.device("cpu")):
    """One trainer per stage folder: a second `rmt train` on the same output refuses at
    once, naming the process that holds it. filelock's soft lock records the holder's PID
    and host, and takes over a lock whose process is gone (kill -9), on this host; it works
    on the shared file systems of clusters, where OS locks may not. In a torchrun job the
    main process takes it and every process learns whether it did."""
    lock, holder = None, None
    if parallel.is_main:
        output.mkdir(parents=True, exist_ok=True)
        lock = SoftFileLock(StageFiles(output).lock, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder, lock = lock.pid or "unknown", None
    if parallel.sum(float(lock is not None or not parallel.is_main), device) < parallel.world_size:
        raise StageBusy(
            f"{output} is being trained by another process (PID {holder}; lock {StageFiles(output).lock}): wait for it "
            "to finish, or stop it. If that process is on another machine and no longer runs, delete the lock file"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@torch.no_grad()
def evaluate_arrays(model, objective: Objective, tokens, labels, limit: int | None, batch_size: int, device,
                    parallel: Distributed = Distributed(), kinds: np.ndarray | None = None):
    """Accuracy and mean cross-entropy over the classes (as the objective scores them) on
    stored examples (the first `limit` of them), shared out among processes; with the
    question `kinds` of the examples, also the accuracy of each kind: (accuracy, loss,
    {kind: accuracy})."""
    model.eval()
    count = len(labels) if limit is None else min(limit, len(labels))
    mine = _own_rows(np.arange(count), parallel)
    hits, loss_sum = np.zeros(count, dtype=bool), 0.0
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        targets = torch.as_tensor(labels[rows], device=device, dtype=torch.long)
        logits = objective.class_logits(model, _token_tensor(tokens[rows], device))
        hits[rows] = (logits.argmax(-1) == targets).cpu().numpy()
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
    accuracy, loss = parallel.sum(int(hits.sum()), device) / count, parallel.sum(loss_sum, device) / count
    if kinds is None:
        return accuracy, loss
    by_kind = {str(kind): parallel.sum(int(hits[kinds[:count] == kind].sum()), device) / int((kinds[:count] == kind).sum())
               for kind in sorted(set(kinds[:count].tolist()))}
    return accuracy, loss, by_kind


def _token_tensor(tokens: np.ndarray, device) -> torch.Tensor:
    """Token ids (stored as uint16 or int32, often memory-mapped) as a long tensor."""
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)


def _write_lines(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))
