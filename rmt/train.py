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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import SoftFileLock, Timeout
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, get_linear_schedule_with_warmup

from rmt.data.dataset import TaskDataset, vocabulary_sha256
from rmt.distributed import Distributed
from rmt.hub import load_tokenizer, resolve
from rmt.model import RMTConfig, RecurrentMemoryEncoder
from rmt.model.config import CONFIG_NAME
from rmt.settings import ModelSettings, TrainSettings
from rmt.model.base import read_checkpoint_config
from rmt.utils import UserError, atomic_directory, claim_output, recover_directory, write_atomic

if TYPE_CHECKING:
    from rmt.tracking import Run

STATE_NAME = "training_state.pt"
LOCK_NAME = ".lock"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def build_model(settings: ModelSettings, *, segment_length: int, num_labels: int) -> RecurrentMemoryEncoder:
    rmt = dict(
        num_memory_tokens=settings.num_memory_tokens, segment_length=segment_length, num_labels=num_labels,
        bptt_depth=settings.bptt_depth, memory_efficient_backprop=settings.memory_efficient_backprop,
        loss_on_all_segments=settings.loss_on_all_segments, classifier_dropout=settings.classifier_dropout,
    )
    location = resolve(settings.backbone)
    if settings.pretrained:
        model = RecurrentMemoryEncoder.from_pretrained(location, backbone_kwargs=settings.backbone_overrides, **rmt)
        model.config = model.config.replace(backbone=settings.backbone)  # the name, not this machine's path
        return model
    backbone_config = AutoConfig.from_pretrained(location, **settings.backbone_overrides)
    backbone = AutoModel.from_config(backbone_config)
    tokenizer = load_tokenizer(settings.backbone)
    config = RMTConfig.for_tokenizer(tokenizer, backbone=settings.backbone, **rmt)
    return RecurrentMemoryEncoder(backbone=backbone, config=config)


class StageBusy(UserError):
    """Another process trains the same stage folder."""


def _check_init(init: Path, data: TaskDataset, segments: int) -> None:
    saved = read_checkpoint_config(init)
    if saved.num_labels != len(data.card["classes"]):
        raise ValueError(f"--init {init} classifies {saved.num_labels} classes, the data has {len(data.card['classes'])}")
    tokenizer = load_tokenizer(str(init))
    if vocabulary_sha256(tokenizer) != data.card["tokenizer"]["vocabulary_sha256"]:
        raise ValueError(f"The data in {data.directory} was tokenized with another vocabulary than --init {init} uses")


def train_stage(
    *,
    data_dir: str | Path,
    segments: int,
    output: str | Path,
    model: ModelSettings,
    train: TrainSettings,
    init: str | Path | None = None,
    progress: bool = True,
    run: "Run | None" = None,
) -> dict:
    """Run (or resume) one stage; returns the contents of metrics.json. With an MLflow `run`
    (rmt.tracking), every step's loss and learning rate, every validation accuracy and the
    stage's files are logged to it."""
    output = Path(output)
    data = TaskDataset(data_dir)
    train_tokens, train_labels = data.arrays("train", segments)  # fails early if the length is missing
    valid_tokens, valid_labels = validation_set(data, segments * train.valid_length_factor, train.eval_examples)
    if init is not None:
        _check_init(Path(init), data, segments)
    else:
        tokenizer = load_tokenizer(model.backbone)
        if vocabulary_sha256(tokenizer) != data.card["tokenizer"]["vocabulary_sha256"]:
            raise ValueError(
                f"The data in {data_dir} was tokenized with '{data.config.tokenizer}', whose vocabulary differs from "
                f"the backbone's ('{model.backbone}'): regenerate the data with the backbone's tokenizer"
            )
    parallel = Distributed.from_environment()
    micro = train.micro_batch_size or train.batch_size
    if train.batch_size % (parallel.world_size * micro):
        raise ValueError(
            f"batch_size {train.batch_size} must split evenly over {parallel.world_size} processes x "
            f"micro_batch_size {micro}"
        )
    device = parallel.device(train.device)
    claim_output(output, kind="a curriculum stage", ours=_is_stage_folder)
    with stage_lock(output, hold=parallel.is_main):
        return _train_locked(data=data, data_dir=data_dir, segments=segments, output=output, model=model, train=train,
                             init=init, progress=progress, run=run, parallel=parallel, device=device,
                             train_tokens=train_tokens, train_labels=train_labels, valid_tokens=valid_tokens,
                             valid_labels=valid_labels, micro=micro)


def _train_locked(*, data, data_dir, segments, output, model, train, init, progress, run, parallel, device,
                  train_tokens, train_labels, valid_tokens, valid_labels, micro) -> dict:
    """The stage itself, once its inputs are checked and its folder is this process's."""
    num_labels, segment_length = len(data.card["classes"]), data.config.segment_length
    resolved = {"data": str(data_dir), "segments": segments, "init": None if init is None else str(init),
                "model": model.model_dump(), "train": train.model_dump(), "data_config_hash": data.card["config_hash"]}
    config_file = output / "config.json"
    changed = config_file.exists() and json.loads(config_file.read_text()) != resolved
    parallel.barrier()  # every process has checked the folder before the first one writes to it
    if parallel.is_main:
        if changed:
            print(f"{output} holds a stage run with other settings: starting the stage afresh", file=sys.stderr)
            for name in ("checkpoints", "best"):
                shutil.rmtree(output / name, ignore_errors=True)
            for name in ("metrics.json", "history.jsonl"):
                (output / name).unlink(missing_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    parallel.barrier()

    torch.manual_seed(train.seed + parallel.rank)  # each process its own dropout masks
    last, best = output / "checkpoints" / "last", output / "checkpoints" / "best"
    if parallel.is_main:
        for folder in (last, best):
            recover_directory(folder)
    parallel.barrier()
    resume = (last / STATE_NAME).is_file()
    source = last if resume else init
    if source is not None:
        rmt = RecurrentMemoryEncoder.from_pretrained(
            source, segment_length=segment_length, bptt_depth=model.bptt_depth,
            memory_efficient_backprop=model.memory_efficient_backprop, loss_on_all_segments=model.loss_on_all_segments,
        )
        tokenizer = load_tokenizer(str(source))
    else:
        rmt = build_model(model, segment_length=segment_length, num_labels=num_labels)
        tokenizer = load_tokenizer(model.backbone)
    rmt.to(device).train()
    network = parallel.wrap(rmt, device)  # what the training step calls: DDP with several processes
    optimizer = torch.optim.AdamW(rmt.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, train.warmup_steps, train.max_steps)
    state = {"step": 0, "best_accuracy": -1.0, "evaluations_without_gain": 0, "stop_reason": None, "seconds": 0.0,
             "history": []}
    if resume:
        saved = _load_training_state(last / STATE_NAME)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if len(saved["rng"]) != parallel.world_size:
            raise ValueError(
                f"{last} was saved by {len(saved['rng'])} process(es), this run has {parallel.world_size}: "
                "resume with the same number of processes"
            )
        torch_rng, cuda_rng = saved["rng"][parallel.rank]
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, device)
        state = saved["counters"]
        if parallel.is_main and state["stop_reason"] is None:
            print(f"Resuming the stage at step {state['step']} from {last}", file=sys.stderr)
    history = output / "history.jsonl"

    def publish() -> dict:
        """The stage's final outputs, from its saved state: idempotent."""
        metrics = {"segments": segments, "best_valid_accuracy": state["best_accuracy"],
                   "best_valid_loss": state["best_loss"], "best_step": state["best_step"], "steps": state["step"],
                   "stop_reason": state["stop_reason"], "seconds": round(state["seconds"], 1)}
        if parallel.is_main:
            _write_lines(history, state["history"])
            if not (output / "best" / CONFIG_NAME).is_file():
                with atomic_directory(output / "best", marker=CONFIG_NAME, kind="an RMT checkpoint") as staging:
                    shutil.copytree(best, staging, dirs_exist_ok=True)
            # Last: its presence means the stage is complete.
            write_atomic(output / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        parallel.barrier()
        return metrics

    if state["stop_reason"] is not None:  # already finished: publish its outputs again if they are gone
        return publish()

    def save(folder: Path, *, with_state: bool) -> None:
        # Every process's RNG state, so that a resumed run draws the same dropout masks.
        rng = parallel.gather((torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
        if not parallel.is_main:
            return
        with atomic_directory(folder, marker=CONFIG_NAME, kind="an RMT checkpoint") as staging:
            rmt.save_into(staging)
            tokenizer.save_pretrained(staging)
            if with_state:
                torch.save({
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                    "counters": state,
                }, staging / STATE_NAME)

    started = time.perf_counter() - state["seconds"]
    bar = tqdm(total=train.max_steps, initial=state["step"], desc=f"stage {segments}", unit="step",
               disable=not (progress and parallel.is_main))
    share = train.batch_size // parallel.world_size  # examples per process and step
    accumulation = share // micro
    losses = []
    while state["stop_reason"] is None:
        step = state["step"]
        # The batch of step s depends on (seed, s) only: a resumed run sees the same data.
        # Every process draws the same indices and takes its own share of them.
        indices = np.random.default_rng([train.seed, step]).choice(len(train_labels), size=train.batch_size)
        indices = indices[parallel.rank :: parallel.world_size]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for start in range(0, share, micro):
            rows = np.sort(indices[start : start + micro])
            inputs = _token_tensor(train_tokens[rows], device)
            labels = torch.as_tensor(train_labels[rows], device=device)
            last_micro_batch = start + micro >= share
            # Gradients are averaged across processes once per step, on the last micro-batch.
            with contextlib.nullcontext() if last_micro_batch or parallel.world_size == 1 else network.no_sync():
                loss = network(inputs, labels=labels).loss / accumulation
                finite = parallel.sum(float(torch.isfinite(loss)), device) == parallel.world_size
                if finite:
                    loss.backward()
            if not finite:
                state["stop_reason"] = "diverged"
                bar.close()
                raise TrainingDiverged(
                    f"The loss became {loss.item()} at step {step + 1}: stopped; the last good checkpoint is in {last}. "
                    "Lower the learning rate or clip gradients harder."
                )
            step_loss += loss.item()
        if train.clip_value is not None:
            torch.nn.utils.clip_grad_value_(rmt.parameters(), train.clip_value)
        if train.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(rmt.parameters(), train.clip_norm)
        optimizer.step()
        scheduler.step()
        losses.append(parallel.sum(step_loss, device) / parallel.world_size)
        if run is not None:
            run.log_metrics({"train_loss": losses[-1], "learning_rate": scheduler.get_last_lr()[0]}, step=step + 1)
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % train.eval_every == 0 or state["step"] == train.max_steps:
            accuracy, valid_loss = evaluate_arrays(rmt, valid_tokens, valid_labels, train.eval_examples, micro,
                                                   device, parallel)
            rmt.train()
            record = {"step": state["step"], "train_loss": float(np.mean(losses)), "learning_rate": scheduler.get_last_lr()[0],
                      "valid_accuracy": accuracy, "valid_loss": valid_loss,
                      "valid_segments": segments * train.valid_length_factor}
            losses = []
            state["history"].append(record)
            if run is not None:
                run.log_metrics({"valid_accuracy": accuracy, "valid_loss": valid_loss}, step=state["step"])
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", accuracy=f"{accuracy:.3f}")
            # Ties in accuracy (common at 100%) go to the lower validation loss: a model that
            # keeps training past the first perfect score is kept, and it extrapolates further.
            if (accuracy, -valid_loss) > (state["best_accuracy"], -state.get("best_loss", math.inf)):
                state.update(best_accuracy=accuracy, best_loss=valid_loss, evaluations_without_gain=0,
                             best_step=state["step"])
                save(best, with_state=False)
            else:
                state["evaluations_without_gain"] += 1
            may_stop = state["step"] >= train.min_steps
            if may_stop and train.target_accuracy is not None and accuracy >= train.target_accuracy:
                state["stop_reason"] = "target_accuracy"
            elif may_stop and state["evaluations_without_gain"] >= train.patience:
                state["stop_reason"] = "early_stopping"
            elif state["step"] >= train.max_steps:
                state["stop_reason"] = "max_steps"
            state["seconds"] = time.perf_counter() - started
            save(last, with_state=True)
            # The history is part of the saved state, so a crash never loses or repeats a line.
            if parallel.is_main:
                _write_lines(history, state["history"])
    bar.close()
    metrics = publish()
    if run is not None:
        run.log_metrics({"best_valid_accuracy": metrics["best_valid_accuracy"]}, step=metrics["steps"])
        run.set_tags({"rmt.stop_reason": metrics["stop_reason"]})
        for name in ("metrics.json", "history.jsonl", "config.json"):
            run.log_artifact(output / name)
    return metrics


def validation_set(data: TaskDataset, segments: int, examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validation token ids (examples, segments * segment_length) and labels: the stored
    split at a curriculum length, else generated from the validation split's noise."""
    if segments in data.config.curriculum_segments:
        return data.arrays("valid", segments)
    num_tokens = segments * data.config.segment_length
    pairs = [data.generator.example("valid", index, num_tokens) for index in range(examples or data.config.valid_examples)]
    return np.stack([tokens for _, tokens in pairs]), np.array([layout.sample.label for layout, _ in pairs])


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
    if names <= {LOCK_NAME}:
        return True
    try:
        settings = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and {"data", "segments", "model", "train"} <= set(settings)


@contextlib.contextmanager
def stage_lock(output: Path, *, hold: bool = True):
    """One trainer per stage folder: a second `rmt train` on the same output refuses at
    once, naming the process that holds it. filelock's soft lock records the holder's PID
    and host, and takes over a lock whose process is gone (kill -9), on this host; it works
    on the shared file systems of clusters, where OS locks may not."""
    if not hold:  # the other processes of a torchrun job: their main process holds it
        yield
        return
    output.mkdir(parents=True, exist_ok=True)
    lock = SoftFileLock(output / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StageBusy(
            f"{output} is being trained by another process (PID {lock.pid or 'unknown'}; lock {lock.lock_file}): "
            "wait for it to finish, or stop it. If that process is on another machine and no longer runs, delete "
            "the lock file"
        ) from None
    try:
        yield
    finally:
        lock.release()


@torch.no_grad()
def evaluate_arrays(model, tokens, labels, limit: int | None, batch_size: int, device,
                    parallel: Distributed = Distributed()) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on stored examples (the first `limit` of them), shared
    out among processes."""
    model.eval()
    count = len(labels) if limit is None else min(limit, len(labels))
    mine = np.arange(parallel.rank, count, parallel.world_size)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(mine), batch_size):
        rows = mine[start : start + batch_size]
        targets = torch.as_tensor(labels[rows], device=device, dtype=torch.long)
        logits = model(_token_tensor(tokens[rows], device)).logits
        correct += int((logits.argmax(-1) == targets).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
    return parallel.sum(correct, device) / count, parallel.sum(loss_sum, device) / count


def _token_tensor(tokens: np.ndarray, device) -> torch.Tensor:
    """Token ids (stored as uint16 or int32, often memory-mapped) as a long tensor."""
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)


def _write_lines(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))
