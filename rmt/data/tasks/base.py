"""What a task is: a source of (facts, question, answer) samples over a fixed set of classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

# bAbI's six rooms are the answer classes of every task in the paper.
PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")

FactPosition = Literal["first", "anywhere"]


@dataclass(frozen=True)
class Sample:
    facts: tuple[str, ...]  # sentences hidden in the noise, in the order they appear
    question: str  # always the last thing in the input
    answer: str
    label: int  # index of `answer` in the task's classes


class Task(Protocol):
    name: str
    classes: tuple[str, ...]
    num_facts: int  # facts per sample
    # Where the facts go: "first" (Memorize) or "anywhere" (at random places).
    fact_position: FactPosition
    # Words that make a noise sentence unusable: it could answer or confuse the question.
    reserved_words: frozenset[str]

    def sample(self, rng: np.random.Generator) -> Sample:
        """One random sample."""

    def solve(self, facts: tuple[str, ...], question: str) -> str:
        """The answer, recomputed from the fact sentences alone (tests check every sample)."""

    def all_texts(self) -> list[str]:
        """Every fact and question the task can produce (finite), to check sizes up front."""

    # Kinds of question a task tells apart in its diagnostics (Reasoning: questions about an
    # end room of the chain, which one fact answers, and about the middle room, which needs
    # both directions); empty for a task with one kind.
    kinds: tuple[str, ...]

    def kind(self, sample: Sample) -> str:
        """Which of `kinds` a sample's question is ("" for a task with none)."""
