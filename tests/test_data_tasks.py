"""The three tasks: answers follow from the facts, classes are balanced, the registry."""

import re
from collections import Counter

import numpy as np
import pytest

from rmt.data.tasks import PLACES, TASKS, get_task
from rmt.data.tasks.qa4 import _FACT as FACT


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_answer_follows_from_the_facts(name):
    task = get_task(name)
    rng = np.random.default_rng(0)
    labels = Counter()
    for _ in range(3000):
        sample = task.sample(rng)
        assert len(sample.facts) == task.num_facts
        assert task.solve(sample.facts, sample.question) == sample.answer
        assert task.classes[sample.label] == sample.answer
        assert set(sample.facts + (sample.question,)) <= set(task.all_texts())
        labels[sample.label] += 1
    assert task.classes == PLACES
    # Balanced classes: every place within 15% of an even share.
    assert all(abs(count - 500) < 75 for count in labels.values()), labels


def test_memorize_is_the_papers_qa1_template():
    task = get_task("memorize")
    sample = task.sample(np.random.default_rng(1))
    assert re.fullmatch(r"(Mary|John|Daniel|Sandra) (moved|went|went back|journeyed|travelled) to the \w+\.", sample.facts[0])
    assert re.fullmatch(r"Where is (Mary|John|Daniel|Sandra)\?", sample.question)
    assert task.fact_position == "first" and get_task("detect_and_memorize").fact_position == "anywhere"


def test_reasoning_needs_exactly_one_of_its_two_facts():
    """QA4: both facts share a room; one of them answers, the other alone cannot."""
    task = get_task("reasoning")
    rng = np.random.default_rng(2)
    for _ in range(500):
        sample = task.sample(rng)
        rooms = [set(re.findall(r"the (\w+)", fact, flags=re.IGNORECASE)) for fact in sample.facts]
        assert len(rooms[0] & rooms[1]) == 1
        answering = []
        for fact in sample.facts:
            try:
                answering.append(task.solve((fact,), sample.question) == sample.answer)
            except AssertionError:  # this fact alone does not answer
                answering.append(False)
        assert sorted(answering) == [False, True], sample


def test_reasoning_asks_as_babi_qa4_does():
    """The distribution of bAbI's IsDir generator (rmt/data/tasks/qa4.py): half of the
    questions name the middle room, and facts come worded from either side of it."""
    task = get_task("reasoning")
    rng = np.random.default_rng(3)
    names_middle, middle_slots = 0, set()
    for _ in range(2000):
        sample = task.sample(rng)
        parsed = [FACT.match(fact).groups() for fact in sample.facts]  # (room, direction, room)
        (middle,) = {parsed[0][0], parsed[0][2]} & {parsed[1][0], parsed[1][2]}
        names_middle += re.search(rf"\b{middle}\b", sample.question) is not None
        middle_slots.add(tuple(sorted("subject" if fact[0] == middle else "object" for fact in parsed)))
    assert abs(names_middle / 2000 - 0.5) < 0.04, names_middle
    # bAbI's first example has the middle room as the object of both facts.
    assert middle_slots == {("object", "object"), ("object", "subject"), ("subject", "subject")}, middle_slots


def test_the_papers_reasoning_example_is_solved():
    task = get_task("reasoning")
    facts = ("The hallway is east of the bathroom.", "The bedroom is west of the bathroom.")
    assert task.solve(facts, "What is the bathroom east of?") == "bedroom"
    assert task.solve(facts, "What is east of the bathroom?") == "hallway"


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="detect_and_memorize, memorize, reasoning"):
        get_task("qa99")


def test_the_middle_lookup_is_reasonings_simplest_form():
    """Facts worded from the middle room, questions about it in one phrasing; every answer
    still follows from the facts, and each question needs its direction's fact."""
    from rmt.data.tasks import TRAINING_FORMS

    lookup, reasoning = TRAINING_FORMS["reasoning"]["middle_lookup"], get_task("reasoning")
    rng = np.random.default_rng(0)
    for _ in range(500):
        sample = lookup.sample(rng)
        assert reasoning.solve(sample.facts, sample.question) == sample.answer
        middle, = set.intersection(*[set(FACT.match(fact).group(1, 3)) for fact in sample.facts])
        assert all(FACT.match(fact).group(1) == middle for fact in sample.facts)  # worded from the middle room
        assert sample.question.startswith(f"What is the {middle} ") and reasoning.kind(sample) == "middle_room"


def test_reasonings_forms_add_one_feature_each_up_to_its_middle_room_questions():
    """Beyond the lookup, each form varies one more of what a middle-room answer depends on
    (the side of each fact the middle room stands on, or the question's phrasing), and the
    last varies both: the task's own middle-room questions."""
    from rmt.data.tasks import TRAINING_FORMS

    forms, reasoning = TRAINING_FORMS["reasoning"], get_task("reasoning")
    assert list(forms) == ["middle_lookup", "middle_lookup_either_wording", "middle_lookup_both_phrasings",
                           "middle_room_questions", "whole_task"]
    rng = np.random.default_rng(1)
    for name, phrasings, middle_first in (("middle_lookup_either_wording", {"the"}, {True, False}),
                                          ("middle_lookup_both_phrasings", {"the", "direction"}, {True}),
                                          ("middle_room_questions", {"the", "direction"}, {True, False})):
        seen_phrasings, seen_sides = set(), set()
        for _ in range(300):
            sample = forms[name].sample(rng)
            assert reasoning.solve(sample.facts, sample.question) == sample.answer
            assert reasoning.kind(sample) == "middle_room"
            middle, = set.intersection(*[set(FACT.match(fact).group(1, 3)) for fact in sample.facts])
            seen_phrasings.add("the" if sample.question.startswith("What is the ") else "direction")
            seen_sides |= {FACT.match(fact).group(1) == middle for fact in sample.facts}
        assert (seen_phrasings, seen_sides) == (phrasings, middle_first), name


def test_the_whole_task_as_a_form_is_the_task_almost_without_noise_at_short_form_text_tokens(tmp_path):
    """Generated at a length that holds little more than the facts and the question, the
    task's form is an example of the task almost without noise; at the stored length, the
    example the dataset holds."""
    from rmt.data.dataset import DataConfig, TaskDataset, build_dataset
    from rmt.data.tasks import TRAINING_FORMS

    data = TaskDataset(build_dataset(DataConfig(task="reasoning", segment_length=64, train_examples=8, valid_examples=4,
                                                curriculum_segments=[1], test_segments=[1], test_examples=2, samples=0),
                                     tmp_path / "reasoning", progress=False))
    whole = data.generator.for_form(TRAINING_FORMS["reasoning"]["whole_task"])
    for index in range(8):
        stored_layout, stored = data.example("train", index, 64)
        short_layout, short = whole.example("train", index, 24)
        assert get_task("reasoning").solve(short_layout.sample.facts, short_layout.sample.question) == \
            short_layout.sample.answer
        text = data.generator.tokenizer.decode(short, skip_special_tokens=True)
        parts = [*short_layout.sample.facts, short_layout.sample.question]
        where = [text.find(part.lower()) for part in parts]  # facts and question in order, whole
        assert -1 not in where and where == sorted(where)
        assert len(text) - sum(map(len, parts)) < 20  # of noise, the word or two the length leaves room for
        assert whole.example("train", index, 64)[0].sample == stored_layout.sample
        assert (whole.example("train", index, 64)[1] == stored).all()

