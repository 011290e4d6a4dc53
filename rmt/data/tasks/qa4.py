"""bAbI QA4-style two-argument relations, the paper's Reasoning task:

    "The hallway is east of the bathroom." "The bedroom is west of the bathroom."
    "What is the bathroom east of?" -> bedroom

Three distinct rooms lie on one line along one axis (a - b - c, "a" west or north of "b");
the two facts state the relations a-b and b-c, each worded from either side; the question
asks for a neighbour of one room through one of the facts, so one fact answers it and the
other shares a room with it and distracts.

This is the distribution of bAbI's own generator (task IsDir): its question relates the
middle room to one end of the line and blanks either room, so half of the questions name
the middle room, which both facts mention (only the directions tell which fact answers),
and half name an end room, which one fact mentions; its facts come worded from either side
("The office is north of the kitchen. The garden is south of the kitchen.").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rmt.data.tasks.base import PLACES, FactPosition, Sample

# For each axis: the direction from the first room of a pair to the second, and back.
AXES = (("east", "west"), ("south", "north"))
OPPOSITE = {"east": "west", "west": "east", "north": "south", "south": "north"}
_FACT = re.compile(r"^The (\w+) is (\w+) of the (\w+)\.$")
_WHAT_IS_DIR_OF = re.compile(r"^What is (\w+) of the (\w+)\?$")  # What is east of the office?
_WHAT_IS_X_DIR_OF = re.compile(r"^What is the (\w+) (\w+) of\?$")  # What is the office east of?


def _fact(first: str, direction: str, second: str) -> str:
    return f"The {first} is {direction} of the {second}."


@dataclass(frozen=True)
class TwoRelationTask:
    name: str = "reasoning"
    fact_position: FactPosition = "anywhere"
    classes: tuple[str, ...] = PLACES
    num_facts: int = 2
    reserved_words: frozenset[str] = frozenset(PLACES) | frozenset(OPPOSITE)
    kinds: tuple[str, ...] = ("end_room", "middle_room")
    # Simpler forms of the task, for training only (data.train_forms): facts always worded
    # from the middle room, questions only about it, in one phrasing. The defaults are bAbI's.
    wording: Literal["either", "middle"] = "either"
    subjects: Literal["any", "middle"] = "any"
    question_phrasings: Literal[1, 2] = 2

    def kind(self, sample: Sample) -> str:
        """A question about the middle room names the room both facts mention."""
        rooms = [set(_FACT.match(fact).group(1, 3)) for fact in sample.facts]
        middle = set.intersection(*rooms)
        match = _WHAT_IS_X_DIR_OF.match(sample.question)
        subject = match.group(1) if match else _WHAT_IS_DIR_OF.match(sample.question).group(2)
        return "middle_room" if subject in middle else "end_room"

    def sample(self, rng: np.random.Generator) -> Sample:
        a, b, c = (self.classes[i] for i in rng.choice(len(self.classes), size=3, replace=False))
        # On the line a - b - c, "toward" is the direction from a to b (b is `toward` of a).
        toward, back = AXES[rng.integers(len(AXES))]
        relations = [(b, toward, a), (b, back, c)]  # b is east of a; b is west of c
        # Every coin is drawn whatever the form, so that a simpler form's example differs from
        # the task's own only in what the form fixes (its noise and fact positions are the same).
        # Each fact may be worded from either side: "b is east of a" or "a is west of b".
        facts = [
            _fact(*relation) if rng.integers(2) or self.wording == "middle"
            else _fact(relation[2], OPPOSITE[relation[1]], relation[0])
            for relation in relations
        ]
        order = rng.permutation(2)
        facts = tuple(facts[i] for i in order)
        # Ask about one relation, from one of its two rooms, in one of two phrasings.
        subject, direction, other = relations[rng.integers(2)]
        if rng.integers(2) and self.subjects == "any":  # turn "subject is direction of other" around
            subject, direction, other = other, OPPOSITE[direction], subject
        if rng.integers(2) or self.question_phrasings == 1:
            question, answer = f"What is the {subject} {direction} of?", other
        else:
            question, answer = f"What is {OPPOSITE[direction]} of the {subject}?", other
        return Sample(facts=facts, question=question, answer=answer, label=self.classes.index(answer))

    def solve(self, facts: tuple[str, ...], question: str) -> str:
        # Every stated relation and its converse: (x, direction, y) means x is `direction` of y.
        known = set()
        for fact in facts:
            x, direction, y = _FACT.match(fact).groups()
            known |= {(x, direction, y), (y, OPPOSITE[direction], x)}
        if match := _WHAT_IS_X_DIR_OF.match(question):  # the subject is `direction` of what?
            subject, direction = match.groups()
            answers = {y for x, d, y in known if x == subject and d == direction}
        else:  # what is `direction` of the subject?
            direction, subject = _WHAT_IS_DIR_OF.match(question).groups()
            answers = {x for x, d, y in known if y == subject and d == direction}
        assert len(answers) == 1, f"{question} has answers {answers} from {facts}"
        return answers.pop()

    def all_texts(self) -> list[str]:
        directions = list(OPPOSITE)
        facts = [_fact(x, d, y) for x in self.classes for y in self.classes if x != y for d in directions]
        questions = [f"What is the {x} {d} of?" for x in self.classes for d in directions]
        questions += [f"What is {d} of the {x}?" for x in self.classes for d in directions]
        return facts + questions


REASONING = TwoRelationTask()
# Simpler forms, from the simplest up; each adds one of the binary features whose parity
# answers a middle-room question (docs/research.md). The form curriculum that learns the
# task (train.form_curriculum) ramps in middle_lookup, middle_lookup_either_wording,
# middle_room_questions, in this order.
# The lookup a plain BERT learns within ~1100 steps where the whole task stays at its
# end-room shortcut: which of the two facts about the middle room points the way the
# question asks.
MIDDLE_LOOKUP = TwoRelationTask(wording="middle", subjects="middle", question_phrasings=1)
# + facts worded from either side ("a is west of b" or "b is east of a").
MIDDLE_LOOKUP_EITHER_WORDING = TwoRelationTask(subjects="middle", question_phrasings=1)
# + the second phrasing instead ("What is west of the b?"), answered by the opposite direction word.
MIDDLE_LOOKUP_BOTH_PHRASINGS = TwoRelationTask(wording="middle", subjects="middle", question_phrasings=2)
# Both: the task's own middle-room questions.
MIDDLE_ROOM_QUESTIONS = TwoRelationTask(subjects="middle")
