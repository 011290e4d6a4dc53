"""A stage that learns a task through simpler forms of it first (train.form_curriculum).

The stage trains on the first form alone. Once that form scores form_advance_accuracy on
its own validation examples, the next form is ramped in: its share of every batch rises
linearly from form_start_share to the whole batch over form_ramp_steps, the rest still
drawn from the form before it, which keeps answering most of the batch while the new
feature is learned. The task itself comes last, ramped in the same way; from then on the
stage trains on its stored data as any other stage. Why: docs/research.md (a middle-room
Reasoning question is a parity of four features, learned one at a time, never all at once).
A step may also be a form at a length of its own (FormStep.text_tokens): a form learned on
short examples is then carried, a few tokens at a time, to the stage's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rmt.settings import FormStep, TrainSettings

# Validation examples of a form, to decide when the next one comes in: 1.9 points of
# standard error at 90%, enough to tell a learned form (95%+) from the shortcut (50-75%).
FORM_VALID_EXAMPLES = 256


@dataclass(frozen=True)
class FormCurriculum:
    forms: tuple[FormStep | None, ...]  # simplest first; None, the task itself, last
    ramp_steps: int
    start_share: float
    advance_accuracy: float

    @classmethod
    def of(cls, train: TrainSettings) -> "FormCurriculum | None":
        if not train.form_curriculum:
            return None
        return cls(forms=(*train.form_curriculum, None), ramp_steps=train.form_ramp_steps,
                   start_share=train.form_start_share, advance_accuracy=train.form_advance_accuracy)

    def share(self, phase: int, steps_in_phase: int) -> float:
        """The share of each batch drawn from phase `phase`'s form (the rest: the phase before)."""
        if phase == 0 or steps_in_phase >= self.ramp_steps:
            return 1.0
        return self.start_share + (1 - self.start_share) * steps_in_phase / self.ramp_steps

    def rows(self, phase: int, steps_in_phase: int, batch_size: int) -> list[FormStep | None]:
        """The form of each row of a batch, the newest form's rows first: at least one of them,
        however small the batch."""
        newest = min(batch_size, math.ceil(self.share(phase, steps_in_phase) * batch_size))
        older = self.forms[phase - 1] if phase else None
        return [self.forms[phase]] * newest + [older] * (batch_size - newest)

    def ramped_in(self, phase: int, steps_in_phase: int) -> bool:
        return phase == 0 or steps_in_phase >= self.ramp_steps

    def done(self, phase: int, steps_in_phase: int) -> bool:
        """The task itself is the whole batch: the stage trains on its stored data."""
        return phase == len(self.forms) - 1 and self.ramped_in(phase, steps_in_phase)

    def may_advance(self, phase: int, steps_in_phase: int) -> bool:
        """Whether phase `phase`'s form is due a check of its accuracy (a form, fully ramped in)."""
        return phase < len(self.forms) - 1 and self.ramped_in(phase, steps_in_phase)

    def fewest_steps(self, eval_every: int) -> int:
        """The fewest steps before the task is the whole batch: every form learned at the first
        validation after its ramp."""
        steps = 0
        for _ in self.forms[:-1]:
            steps = -(-(steps + (self.ramp_steps if steps else 1)) // eval_every) * eval_every
        return steps + self.ramp_steps
