"""Where a Reasoning checkpoint is wrong on a training form: its accuracy on a form's examples
split by what the example is made of (question phrasing, how the answering fact is worded,
which fact comes first, whether the distracting fact holds the question's direction word,
the answer room). Behind docs/research.md's eighth search (the third form's stall).

From the project root, on a run's dataset and a stage's checkpoint:

  HF_HUB_OFFLINE=1 .venv/bin/python docs/research/form_errors.py \
      results/benchmarks/robustness-work/reasoning-long/reasoning/default/seed-0/data \
      results/benchmarks/robustness-work/reasoning-long/reasoning/default/seed-0/stage-1/checkpoints/last \
      --form middle_room_questions --examples 2048
"""
import collections
from pathlib import Path

import torch
import typer
from transformers import AutoTokenizer

from rmt.data.dataset import TaskDataset
from rmt.data.tasks import TRAINING_FORMS
from rmt.data.tasks.qa4 import _FACT, _WHAT_IS_X_DIR_OF
from rmt.objective import objective_for
from rmt.train import padded_right

DIRECTIONS = ("east", "west", "north", "south")


def features(sample) -> dict:
    """What one example is made of, by name."""
    x_dir_of = _WHAT_IS_X_DIR_OF.match(sample.question)  # "What is the X east of?", else "What is east of the X?"
    subject = x_dir_of.group(1) if x_dir_of else sample.question.rstrip("?").split()[-1]
    direction = next(word for word in sample.question.rstrip("?").split() if word in DIRECTIONS)
    answering = next(fact for fact in sample.facts if subject in fact and sample.answer in fact)
    distractor = next(fact for fact in sample.facts if fact != answering)
    return {"phrasing": "the X <dir> of" if x_dir_of else "<dir> of the X",
            "answering fact worded from the subject": _FACT.match(answering).group(1) == subject,
            "answering fact first": sample.facts[0] == answering,
            "distractor holds the question's direction": direction in distractor,
            "answer": sample.answer}


def main(data: Path, checkpoint: Path, form: str = typer.Option("middle_room_questions"),
         examples: int = typer.Option(1024, min=1), split: str = typer.Option("valid"),
         text_tokens: int = typer.Option(24, help="As the stage's form_text_tokens."),
         batch_size: int = typer.Option(64, min=1)):
    torch.set_num_threads(1)
    dataset = TaskDataset(data)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    objective = objective_for("encoder", classes=dataset.card["classes"], tokenizer=tokenizer)
    model = objective.load(checkpoint).eval()
    generator = dataset.generator.for_form(TRAINING_FORMS[dataset.config.task][form])
    counts = collections.defaultdict(lambda: [0, 0])  # (feature, value, phrasing) -> [right, seen]
    for start in range(0, examples, batch_size):
        pairs = [generator.example(split, index, text_tokens) for index in range(start, min(examples, start + batch_size))]
        ids = padded_right([tokens for _, tokens in pairs], tokenizer.pad_token_id)
        with torch.inference_mode():
            predicted = objective.class_logits(model, torch.from_numpy(ids)).argmax(-1).tolist()
        for (layout, _), guess in zip(pairs, predicted):
            found = features(layout.sample)
            right = dataset.card["classes"][guess] == layout.sample.answer
            for name, value in [("all", ""), *found.items()]:
                for phrasing in ("any", found["phrasing"]):
                    counts[name, str(value), phrasing][0] += right
                    counts[name, str(value), phrasing][1] += 1
    print(f"{form}, {split} split, {examples} examples, {checkpoint}\n")
    print("| feature | value | phrasing | accuracy | examples |\n|---|---|---|---|---|")
    for (name, value, phrasing), (right, seen) in sorted(counts.items()):
        if phrasing == "any" or name not in ("all", "phrasing"):
            print(f"| {name} | {value} | {phrasing} | {100 * right / seen:.1f} | {seen} |")


if __name__ == "__main__":
    typer.run(main)
