"""The task registry. To add a task: write a module with a class that follows
`rmt.data.tasks.base.Task`, and add its instance to TASKS below."""

from __future__ import annotations

from rmt.data.tasks.base import PLACES, Sample, Task
from rmt.data.tasks.qa1 import DETECT_AND_MEMORIZE, MEMORIZE
from rmt.data.tasks.qa4 import (MIDDLE_LOOKUP, MIDDLE_LOOKUP_BOTH_PHRASINGS, MIDDLE_LOOKUP_EITHER_WORDING,
                                MIDDLE_ROOM_QUESTIONS, REASONING)

TASKS: dict[str, Task] = {task.name: task for task in (MEMORIZE, DETECT_AND_MEMORIZE, REASONING)}
# Simpler forms of a task for training only, by name: mixed into its stored training split
# (DataConfig.train_forms) or ramped in one after another (TrainSettings.form_curriculum).
TRAINING_FORMS: dict[str, dict[str, Task]] = {"reasoning": {
    "middle_lookup": MIDDLE_LOOKUP,
    "middle_lookup_either_wording": MIDDLE_LOOKUP_EITHER_WORDING,
    "middle_lookup_both_phrasings": MIDDLE_LOOKUP_BOTH_PHRASINGS,
    "middle_room_questions": MIDDLE_ROOM_QUESTIONS,
    # The task itself, generated as a form: at a short form_text_tokens (24), its facts and
    # question with at most a word of noise, a step between the forms and the task as its
    # dataset holds it.
    "whole_task": REASONING,
}}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["PLACES", "Sample", "TASKS", "TRAINING_FORMS", "Task", "get_task"]
