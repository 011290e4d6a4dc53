"""A task's dataset on disk, ready for DVC: curriculum lengths materialized as token ids,
test lengths (up to millions of tokens) as a manifest from which examples are streamed.

    data/<task>/
      config.json                  the settings it was built from (DataConfig)
      card.json                    the data card: counts, label balance, lengths, noise, hashes
      noise.txt                    the noise sentences used, one per line
      samples.jsonl                the first examples of each split, as text
      train/segments-<n>/tokens.npy, labels.npy     (examples, n * segment_length), (examples,)
      valid/segments-<n>/...
      test.json                    manifest: lengths and example counts of the streamed test split

The same settings give byte-identical files on any machine (no timestamps, no absolute
paths, seeded NumPy generators that do not depend on the platform); the whole directory is
written to a temporary sibling and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections import Counter
from pathlib import Path
from typing import Annotated, Iterator, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rmt.data.generator import GENERATOR_VERSION, SPLITS, Placement, TaskGenerator, stable_int
from rmt.data.noise import load_noise
from rmt.data.tasks import TASKS, TRAINING_FORMS, get_task
from rmt.hub import MINILM, load_tokenizer
from rmt.layout import DATASET_CARD
from rmt.utils import atomic_directory, claim_output, has_marker, progress_bar

STORED_SPLITS = ("train", "valid")
STREAMED_SPLIT = "test"
DEFAULT_TEST_SEGMENTS = list(range(1, 16)) + [2**k for k in range(4, 13)]  # 1..15, 16..4096


class DataConfig(BaseModel):
    """Everything that decides a task's dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    tokenizer: str = MINILM
    noise: str = "pydoc"
    noise_max_documents: int | None = Field(default=None, ge=1)
    segment_length: int = Field(default=64, ge=1, description="Text tokens per segment")
    placement: Placement = "sentence"
    curriculum_segments: list[int] = Field(default_factory=lambda: list(range(1, 8)), min_length=1)
    train_examples: int = Field(default=10_000, ge=1)
    valid_examples: int = Field(default=500, ge=1)
    test_segments: list[int] = Field(default_factory=lambda: list(DEFAULT_TEST_SEGMENTS), min_length=1)
    test_examples: int = Field(default=1000, ge=1)
    # Very long examples are costly to evaluate: fewer of them from this length on.
    long_test_from_segments: int = Field(default=512, ge=1)
    long_test_examples: int = Field(default=100, ge=1)
    # Exceptions by length, e.g. {32768: 10}: the longest inputs cost minutes per example.
    test_examples_by_segments: dict[int, int] = Field(default_factory=dict)
    samples: int = Field(default=5, ge=0, description="Examples per split written as text to samples.jsonl")
    # A saddle the whole task does not leave may be left through a simpler form of it
    # (Reasoning's middle-room lookup, docs/research.md): mixed into every stage's training
    # examples, never switched to. Validation and test stay the task's. Not the paper's.
    train_forms: dict[str, Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=dict, description="Share of the training examples drawn from each named simpler form of the "
        "task (rmt.data.tasks.TRAINING_FORMS) instead of the task itself; null or a share of 0 clears one")
    seed: int = 0

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: choose one of {', '.join(sorted(TASKS))}")
        return task

    @field_validator("curriculum_segments", "test_segments")
    @classmethod
    def _positive_distinct(cls, values: list[int]) -> list[int]:
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{values}: segment counts must be distinct and at least 1")
        return sorted(values)

    @field_validator("train_forms", mode="before")
    @classmethod
    def _null_clears_forms(cls, forms):
        """An overlay clears a file's forms with null (an empty mapping would merge into them)."""
        return {} if forms is None else forms

    @field_validator("train_forms")
    @classmethod
    def _zero_shares_clear_forms(cls, forms: dict[str, float]) -> dict[str, float]:
        return {name: share for name, share in forms.items() if share}

    @model_validator(mode="after")
    def _known_forms(self) -> "DataConfig":
        forms = TRAINING_FORMS.get(self.task, {})
        unknown = sorted(set(self.train_forms) - set(forms))
        if unknown:
            where = ", ".join(f"tasks.{task}.data.train_forms" for task in TRAINING_FORMS)
            choose = f"choose from {', '.join(forms)}" if forms else f"it has none: set forms per task ({where})"
            raise ValueError(f"train_forms {unknown} are not forms of the task {self.task}: {choose}")
        itself = sorted(name for name in self.train_forms if forms[name] == TASKS[self.task])
        if itself:
            raise ValueError(f"train_forms {itself} is the task itself: its share would change nothing; name a "
                             "simpler form, or leave it out")
        if sum(self.train_forms.values()) >= 1:
            raise ValueError(f"train_forms {self.train_forms}: the shares add up to 1 or more; keep them below 1 "
                             "(the rest of the training examples are the task's own)")
        return self

    def train_form(self, index: int) -> str | None:
        """The form the training example `index` is drawn from at every length (None: the task)."""
        if not self.train_forms:  # every example of every dataset passes here: no draw without forms
            return None
        draw = np.random.default_rng([self.seed, stable_int("train_forms"), index]).random()
        for name, share in sorted(self.train_forms.items()):
            if draw < share:
                return name
            draw -= share
        return None

    def test_examples_at(self, segments: int) -> int:
        if segments in self.test_examples_by_segments:
            return self.test_examples_by_segments[segments]
        if segments >= self.long_test_from_segments:
            return min(self.long_test_examples, self.test_examples)
        return self.test_examples

    def settings(self) -> dict:
        """The settings as config.json holds them: without forms, as before forms existed (so
        the dataset's hash and files stay those of earlier versions)."""
        return self.model_dump(exclude=set() if self.train_forms else {"train_forms"})

    def canonical_json(self) -> str:
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))


def _sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def vocabulary_sha256(tokenizer) -> str:
    return _sha256(json.dumps(sorted(tokenizer.get_vocab().items())))


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _array_to(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, array, allow_pickle=False)


def build_dataset(config: DataConfig, output: str | Path, *, progress: bool = True) -> Path:
    """Generate the dataset of `config` into `output` (replacing it whole on success)."""
    # Everything that can fail for a reason the user can fix fails here, before any file.
    output = claim_output(output, kind="a dataset", ours=has_marker(DATASET_CARD))
    task, tokenizer = get_task(config.task), load_tokenizer(config.tokenizer)
    noise = load_noise(config.noise, max_documents=config.noise_max_documents)
    generator = TaskGenerator(
        task=task, noise_sentences=noise.sentences, tokenizer=tokenizer,
        segment_length=config.segment_length, placement=config.placement, seed=config.seed,
    )
    _check_room(config, output, np.dtype(generator.dtype).itemsize)
    _check_lengths_hold_the_task(config, generator)
    config_hash = _sha256(
        json.dumps([config.canonical_json(), noise.sha256, vocabulary_sha256(tokenizer), GENERATOR_VERSION])
    )
    splits_card, samples = {}, []
    counts = {"train": config.train_examples, "valid": config.valid_examples}
    # The same rows take the same form at every length: counted once for the card.
    forms = dict(Counter(config.train_form(i) or config.task for i in range(counts["train"]))) \
        if config.train_forms else None
    with atomic_directory(output, marker=DATASET_CARD, kind="a dataset") as staging:
        (staging / "noise.txt").write_text("\n".join(noise.sentences) + "\n")
        jobs = [(split, n) for split in STORED_SPLITS for n in config.curriculum_segments]
        for split, segments in progress_bar(jobs, desc=f"{task.name}: writing", unit="length", disable=not progress):
            num_tokens = segments * config.segment_length
            card = _write_length(staging / split / f"segments-{segments}", config, generator, split, counts[split],
                                 num_tokens)
            if split == "train" and forms:
                card["examples_by_form"] = forms
            splits_card.setdefault(split, {})[str(segments)] = card
            if segments == config.curriculum_segments[0]:
                samples += [_sample_record(example_generator(config, generator, split, i), tokenizer, split, i,
                                           num_tokens) for i in range(config.samples)]
        test_lengths = [
            {"segments": n, "tokens": n * config.segment_length, "examples": config.test_examples_at(n)}
            for n in config.test_segments
        ]
        samples += [
            _sample_record(generator, tokenizer, STREAMED_SPLIT, i, config.test_segments[0] * config.segment_length)
            for i in range(config.samples)
        ]
        _write_json(staging / "test.json", {"split": STREAMED_SPLIT, "lengths": test_lengths, "config_hash": config_hash})
        with open(staging / "samples.jsonl", "w") as handle:
            handle.writelines(json.dumps(record, sort_keys=True) + "\n" for record in samples)
        _write_json(staging / "config.json", config.settings())
        card = _dataset_card(config, generator, tokenizer, noise, config_hash=config_hash, splits=splits_card,
                             test=test_lengths)
        _write_json(staging / DATASET_CARD, card)  # last: it marks the folder as a whole dataset
    return output


def _check_lengths_hold_the_task(config: DataConfig, generator: TaskGenerator) -> None:
    shortest = min(config.curriculum_segments + config.test_segments)
    if shortest * config.segment_length < generator.min_tokens:
        raise ValueError(
            f"{shortest * config.segment_length} tokens ({shortest} segment(s) of {config.segment_length}) cannot "
            f"hold the {generator.task.name} facts and question ({generator.min_tokens} tokens): raise segment_length"
        )


def example_generator(config: DataConfig, generator: TaskGenerator, split: str, index: int) -> TaskGenerator:
    """The generator of the example `index` of `split` as the dataset holds it: the task's own,
    or for a training example drawn from a form (train_forms), the form's."""
    form = config.train_form(index) if split == "train" else None
    return generator if form is None else generator.for_form(TRAINING_FORMS[config.task][form])


def _write_length(folder: Path, config: DataConfig, generator: TaskGenerator, split: str, count: int,
                  num_tokens: int) -> dict:
    """The first `count` examples of a split at one length, as token and label arrays; their card."""
    tokens = np.empty((count, num_tokens), dtype=generator.dtype)
    labels = np.empty(count, dtype=np.int64)
    fact_positions = []
    for index in range(count):
        layout, tokens[index] = example_generator(config, generator, split, index).example(split, index, num_tokens)
        labels[index] = layout.sample.label
        fact_positions.extend(layout.fact_positions)
    folder.mkdir(parents=True)
    _array_to(folder / "tokens.npy", tokens)
    _array_to(folder / "labels.npy", labels)
    return _length_card(tokens, labels, fact_positions, generator.task.classes)


def _dataset_card(config: DataConfig, generator: TaskGenerator, tokenizer, noise, *, config_hash: str, splits: dict,
                  test: list[dict]) -> dict:
    """What the dataset is: task, lengths, noise and tokenizer, and the hash that ties it to its settings."""
    task = generator.task
    return {
        "task": task.name,
        "classes": list(task.classes),
        "facts_per_example": task.num_facts,
        "fact_position": task.fact_position if task.fact_position == "first" else f"random ({config.placement})",
        "question_position": "last",
        "seed": config.seed,
        "config_hash": config_hash,
        "generator_version": GENERATOR_VERSION,
        "segment_length": config.segment_length,
        "splits": splits,
        "test": test,
        "noise": {
            "source": noise.source, "description": noise.description, "license": noise.license,
            "sha256": noise.sha256, "sentences": len(noise.sentences),
            "usable_tokens_per_split": {split: len(generator.noise[split].tokens) for split in SPLITS},
            "usable_sentences_per_split": {split: generator.noise[split].num_sentences for split in SPLITS},
        },
        "tokenizer": {
            "name": config.tokenizer, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocabulary_sha256": vocabulary_sha256(tokenizer), "dtype": np.dtype(generator.dtype).name,
        },
        "built_with": {"python": platform.python_version()},
    }


def _check_room(config: DataConfig, output: Path, bytes_per_token: int) -> None:
    """Refuse, before writing, a dataset larger than the free space where it goes."""
    tokens = (config.train_examples + config.valid_examples) * sum(config.curriculum_segments) * config.segment_length
    needed = tokens * bytes_per_token
    folder = next(parent for parent in (output.absolute(), *output.absolute().parents) if parent.exists())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ValueError(
            f"The dataset would take {needed / 2**30:,.1f} GiB ({config.train_examples + config.valid_examples} "
            f"examples at each of {config.curriculum_segments} segments of {config.segment_length} tokens), and "
            f"{folder} has {free / 2**30:,.1f} GiB free: store fewer or shorter curriculum lengths (longer inputs "
            "belong in test_segments, which are streamed, not stored)"
        )


def _length_card(tokens: np.ndarray, labels: np.ndarray, fact_positions: list[int], classes) -> dict:
    counts = Counter(labels.tolist())
    positions = np.asarray(fact_positions) / tokens.shape[1]
    return {
        "examples": int(tokens.shape[0]),
        "tokens_per_example": int(tokens.shape[1]),
        "label_counts": {name: counts.get(i, 0) for i, name in enumerate(classes)},
        "fact_position_fraction": {
            "min": round(float(positions.min()), 4), "mean": round(float(positions.mean()), 4),
            "max": round(float(positions.max()), 4),
        },
        "tokens_sha256": _sha256(tokens.tobytes()),
    }


def _sample_record(generator: TaskGenerator, tokenizer, split: str, index: int, num_tokens: int) -> dict:
    layout, tokens = generator.example(split, index, num_tokens)
    return {
        "split": split, "index": index, "tokens": num_tokens,
        "facts": list(layout.sample.facts), "fact_positions": list(layout.fact_positions),
        "question": layout.sample.question, "answer": layout.sample.answer, "label": layout.sample.label,
        "text": tokenizer.decode(tokens),
    }


class TaskDataset:
    """A dataset written by build_dataset: stored splits as memory-mapped arrays, the test
    split streamed example by example from the same generator."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / DATASET_CARD).is_file():
            raise FileNotFoundError(f"{self.directory} is not a dataset (no card.json): build it with `rmt data generate`")
        try:
            self.config = DataConfig(**json.loads((self.directory / "config.json").read_text()))
            self.card = json.loads((self.directory / DATASET_CARD).read_text())
            self.test_lengths = json.loads((self.directory / "test.json").read_text())["lengths"]
            self.card["classes"], self.card["tokenizer"]["vocabulary_sha256"], self.card["config_hash"]
        except Exception as error:  # noqa: BLE001 - a missing, truncated or edited file: one problem
            raise ValueError(f"The dataset {self.directory} is damaged or incomplete ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): generate it again with "
                             "`rmt data generate`") from None
        self._generator: TaskGenerator | None = None

    def check_vocabulary(self, tokenizer, who: str) -> None:
        """Refuse a tokenizer (a backbone's, a checkpoint's) whose vocabulary is not the one
        these token ids were written with."""
        if vocabulary_sha256(tokenizer) != self.card["tokenizer"]["vocabulary_sha256"]:
            raise ValueError(
                f"The data in {self.directory} was tokenized with '{self.config.tokenizer}', whose vocabulary differs "
                f"from that of {who}: generate the data with the same tokenizer"
            )

    def arrays(self, split: str, segments: int) -> tuple[np.ndarray, np.ndarray]:
        """(examples, tokens) token ids, memory-mapped, and (examples,) labels."""
        folder = self.directory / split / f"segments-{segments}"
        if not folder.is_dir():
            stored = sorted(int(p.name.split("-")[1]) for p in (self.directory / split).glob("segments-*"))
            raise FileNotFoundError(f"No {split} data with {segments} segments in {self.directory}: it has {stored}")
        try:
            tokens, labels = np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "labels.npy")
        except (OSError, ValueError) as error:  # e.g. "mmap length is greater than file size": truncated
            raise ValueError(f"{folder} is damaged ({error}): generate the dataset {self.directory} again with "
                             "`rmt data generate`") from None
        if tokens.ndim != 2 or len(tokens) != len(labels):
            raise ValueError(f"{folder} holds {tokens.shape} tokens for {labels.shape} labels: generate the dataset "
                             f"{self.directory} again with `rmt data generate`")
        return tokens, labels

    @property
    def generator(self) -> TaskGenerator:
        """The generator, rebuilt from the stored noise and the tokenizer named in the card."""
        if self._generator is None:
            tokenizer = load_tokenizer(self.config.tokenizer)
            self.check_vocabulary(tokenizer, f"'{self.config.tokenizer}' as loaded on this machine")
            sentences = (self.directory / "noise.txt").read_text().splitlines()
            self._generator = TaskGenerator(
                task=get_task(self.config.task), noise_sentences=sentences, tokenizer=tokenizer,
                segment_length=self.config.segment_length, placement=self.config.placement, seed=self.config.seed,
            )
        return self._generator

    def generator_for(self, split: str, index: int) -> TaskGenerator:
        """The generator of one example as this dataset holds it (in its form, for a training
        example drawn from one), at any length."""
        return example_generator(self.config, self.generator, split, index)

    def example(self, split: str, index: int, num_tokens: int):
        """The layout and (num_tokens,) token ids of an example as this dataset holds it."""
        return self.generator_for(split, index).example(split, index, num_tokens)

    def kinds(self, split: str, segments: int, indices: Sequence[int]) -> np.ndarray:
        """The question kind of each example (the task's `kinds`; "" for a task with none)."""
        task, num_tokens = self.generator.task, segments * self.config.segment_length
        return np.array([task.kind(self.generator_for(split, i).layout(split, i, num_tokens).sample) for i in indices])

    def stream(
        self, segments: int, indices: Sequence[int], *, split: str = STREAMED_SPLIT, chunk_size: int = 1 << 16
    ) -> tuple[np.ndarray, Iterator[np.ndarray]]:
        """Labels (B,) and the token chunks (B, c) of examples `indices` at `segments` segments."""
        num_tokens = segments * self.config.segment_length
        labels = np.array([self.generator.label(split, i, num_tokens) for i in indices])
        return labels, self.generator.batch_chunks(split, indices, num_tokens, chunk_size)
