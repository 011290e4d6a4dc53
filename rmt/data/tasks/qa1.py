"""bAbI QA1-style single supporting fact: "Mary went to the kitchen." -> "Where is Mary?"

Memorize puts the fact first; Detect & Memorize puts it at a random place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from rmt.data.tasks.base import PLACES, FactPosition, Sample

NAMES = ("Mary", "John", "Daniel", "Sandra")
VERBS = ("moved", "went", "went back", "journeyed", "travelled")
_FACT = re.compile(r"^(\w+) (?:" + "|".join(VERBS) + r") to the (\w+)\.$")
_QUESTION = re.compile(r"^Where is (\w+)\?$")


@dataclass(frozen=True)
class SingleFactTask:
    name: str
    fact_position: FactPosition
    classes: tuple[str, ...] = PLACES
    num_facts: int = 1
    reserved_words: frozenset[str] = frozenset(word.lower() for word in NAMES + PLACES)
    kinds: tuple[str, ...] = ()

    def kind(self, sample: Sample) -> str:
        return ""

    def sample(self, rng: np.random.Generator) -> Sample:
        person = NAMES[rng.integers(len(NAMES))]
        verb = VERBS[rng.integers(len(VERBS))]
        label = int(rng.integers(len(self.classes)))
        fact = f"{person} {verb} to the {self.classes[label]}."
        return Sample(facts=(fact,), question=f"Where is {person}?", answer=self.classes[label], label=label)

    def solve(self, facts: tuple[str, ...], question: str) -> str:
        person = _QUESTION.match(question).group(1)
        places = [match.group(2) for match in map(_FACT.match, facts) if match and match.group(1) == person]
        assert places, f"no fact about {person} in {facts}"
        return places[-1]

    def all_texts(self) -> list[str]:
        facts = [f"{n} {v} to the {p}." for n in NAMES for v in VERBS for p in self.classes]
        return facts + [f"Where is {n}?" for n in NAMES]


MEMORIZE = SingleFactTask(name="memorize", fact_position="first")
DETECT_AND_MEMORIZE = SingleFactTask(name="detect_and_memorize", fact_position="anywhere")
