"""The Reasoning recipe search (issue 15): named recipes, one segment, a fixed step budget;
accuracy overall and by question kind (end room, middle room) as training goes.

    .venv/bin/python benchmarks/reasoning_search.py                       # every recipe
    .venv/bin/python benchmarks/reasoning_search.py --recipes escape --seeds 0 --seeds 1 --seeds 2
    .venv/bin/python benchmarks/reasoning_search.py --steps 3000 --table-only

Every recipe is laid over params.yaml (and --config files) for the Reasoning task's first
curriculum stage, trained for exactly --steps steps (no early stop) and validated every
--eval-every steps on 1000 examples. The models of earlier searches learn a shortcut: the
end-room questions (one fact names the room asked about) reach 100%, the middle-room ones
(both facts name it; only the directions tell which answers) stay at chance, so the
overall score sits near 75%. A recipe that escapes shows the middle-room column rising.

Prints, per recipe and seed: the step at which middle-room accuracy first reached 90%
("escape"), and the last validation's accuracy overall / end room / middle room, with the
minutes it took. Runs are kept in <workdir>/<recipe>/seed-<s>/ (rerun: continues), the
table next to <workdir> (results/benchmarks/reasoning-search.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from rmt.config import read_config_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "benchmarks"

# Each form adds one feature of the middle-room answer's parity: the facts' wording first,
# then the question's phrasing (the other order stalled at 90% on its second form, docs/research.md).
REASONING_FORMS = ["middle_lookup", "middle_lookup_either_wording", "middle_room_questions"]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# The probe's escape on the simplest variant: lr 1e-3 held after warm-up, no dropout,
# weight decay 0.01, clipping by norm 1, batch 64.
ESCAPE = {"train": {"learning_rate": 1e-3, "schedule": "constant", "warmup_steps": 100, "weight_decay": 0.01,
                    "clip_value": None, "clip_norm": 1.0, "batch_size": 64},
          "model": {"classifier_dropout": 0.0, "backbone_overrides": NO_DROPOUT}}
# Each recipe changes params.yaml's: 2-layer 128-wide BERT, lr 5e-4 decaying linearly to 0
# within the stage, dropout 0.1, clipping by value at 5, batch 32, 10,000 training examples.
RECIPES = {
    "params": {},
    "escape": ESCAPE,
    # The same with ten times the data, so that nothing is memorised.
    "escape-100k": {**ESCAPE, "data": {"train_examples": 100_000}},
    # Held learning rate alone, the project's other settings kept.
    "constant-lr": {"train": {"schedule": "constant"}},
    # Half the training examples from the middle-room lookup, which the escape recipe learns
    # where the whole task stays at its shortcut; validation stays the whole task (a
    # deviation from the paper's training data, data.train_forms).
    "escape-mix-lookup": {**ESCAPE, "data": {"train_forms": {"middle_lookup": 0.5}}},
    # The forms ramped in one after another, simplest first, the task last (train.form_curriculum,
    # a deviation from the paper's training data), with 100,000 training examples as each form
    # draws its examples from them and the stored split's 10,000 were memorised in earlier searches.
    "escape-forms-100k": {**ESCAPE, "data": {"train_examples": 100_000},
                          "train": {**ESCAPE["train"], "form_curriculum": REASONING_FORMS}},
    # config/reasoning-long.yaml's stage 1: the same with plain cross-entropy and the forms'
    # examples 24 tokens long (facts and question, no noise), the task at the stage's 64.
    "reasoning-long": read_config_files(ROOT / "config" / "reasoning-long.yaml"),
}


def run_recipe(name: str, seed: int, *, configs: list[Path], steps: int, eval_every: int, examples: int,
               workdir: Path) -> dict:
    from rmt.config import LAST_STAGE, PipelineConfig, merge, read_config_files
    from rmt.data.dataset import build_dataset
    from rmt.train import train_stage

    folder = workdir / name / f"seed-{seed}"
    # The budget is the same for every recipe, and wins over params.yaml's Reasoning stage 1.
    # The one stage is also the curriculum's last: params.yaml's lower last-stage rate, for a
    # stage that starts from a converged model, is no part of a first stage's recipe.
    budget = {"seed": seed, "max_steps": steps, "min_steps": steps, "eval_every": eval_every,
              "eval_examples": examples, "target_accuracy": None, "patience": steps}
    overlay = merge(RECIPES[name], {
        "seeds": [seed], "stage_train": {LAST_STAGE: None}, "tasks": {"reasoning": {"stage_train": {1: budget}}},
        "data": {"seed": seed, "valid_examples": examples, "curriculum_segments": [1], "test_segments": [1]},
    })
    merged = merge(read_config_files(*configs), overlay)
    merged["tasks"] = {"reasoning": merged["tasks"]["reasoning"]}
    settings = PipelineConfig(**merged).for_task("reasoning")
    done = folder / "run.json"
    if done.is_file():
        finished = json.loads(done.read_text())
        if finished.get("settings", settings.config_hash()) != settings.config_hash():
            raise typer.BadParameter(f"{folder} was trained with other settings than recipe {name} gives now (a "
                                     "config file changed since): pass another --workdir", param_hint="--workdir")
        return finished
    started = time.perf_counter()
    data = build_dataset(settings.data, folder / "data", progress=False)
    train_stage(data_dir=data, segments=1, output=folder / "stage-1", model=settings.model,
                train=settings.train_for(1), progress=False)
    history = [json.loads(line) for line in (folder / "stage-1" / "history.jsonl").read_text().splitlines()]
    escape = next((r["step"] for r in history if r["valid_accuracy_by_kind"]["middle_room"] >= 0.9), None)
    last = history[-1]
    result = {"recipe": name, "seed": seed, "settings": settings.config_hash(), "steps": last["step"], "escape_step": escape,
              "accuracy": last["valid_accuracy"], **{k: v for k, v in last["valid_accuracy_by_kind"].items()},
              "minutes": round((time.perf_counter() - started) / 60, 1),
              "curve": [(r["step"], r["valid_accuracy_by_kind"]["middle_room"]) for r in history]}
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(results: list[dict]) -> str:
    lines = ["| recipe | seed | steps | escape (middle room >= 90%) | accuracy | end room | middle room | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['escape_step'] or 'no'} | "
                     f"{100 * r['accuracy']:.1f} | {100 * r['end_room']:.1f} | {100 * r['middle_room']:.1f} | "
                     f"{r['minutes']} |")
    return "\n".join(lines) + "\n"


def main(
    recipes: list[str] = typer.Option(list(RECIPES), help=f"Recipes to run (repeat): {', '.join(RECIPES)}."),
    seeds: list[int] = typer.Option([0], help="Training (and data) seeds (repeat)."),
    steps: int = typer.Option(3000, min=1, help="Steps per run: a fixed budget, no early stop."),
    eval_every: int = typer.Option(250, min=1),
    examples: int = typer.Option(1000, min=2, help="Validation examples (half of each kind)."),
    configs: list[Path] = typer.Option([], "--config", help="Files laid over params.yaml before each recipe."),
    workdir: Path = typer.Option(RESULTS / "reasoning-search-work", help="The runs' folder; the table goes next "
                                 "to it."),
    table_only: bool = typer.Option(False, "--table-only", help="Only tabulate the runs finished so far."),
):
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise typer.BadParameter(f"unknown recipes {unknown}: choose from {', '.join(RECIPES)}", param_hint="--recipes")
    configs = [ROOT / "params.yaml", *configs]
    results = []
    for name in recipes:
        for seed in seeds:
            if table_only:
                done = workdir / name / f"seed-{seed}" / "run.json"
                if done.is_file():
                    results.append(json.loads(done.read_text()))
                continue
            results.append(run_recipe(name, seed, configs=configs, steps=steps, eval_every=eval_every,
                                      examples=examples, workdir=workdir))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    text = (f"# Reasoning recipe search\n\nOne segment, {steps} steps per run, validation on {examples} examples "
            f"every {eval_every} steps.\n\n" + table(results))
    # Next to the runs: a test's --workdir never replaces the table of the user's own search.
    workdir.parent.mkdir(parents=True, exist_ok=True)
    (workdir.parent / "reasoning-search.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    typer.run(main)
