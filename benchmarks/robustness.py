"""Does the recipe's extrapolation hold on seeds and settings it was not tuned on?

    .venv/bin/python benchmarks/robustness.py --label today
    .venv/bin/python benchmarks/robustness.py --label mixed --config my-recipe.yaml --reuse-from today
    .venv/bin/python benchmarks/robustness.py --label today --table-only --quote-in README.md
    .venv/bin/python benchmarks/robustness.py --label params --table-only --any-label --quote-in README.md

For every task x setting x seed: generate the task's data with that seed and setting, train
the curriculum (params.yaml's recipe, overlaid by --config files) with that training seed,
and score the last stage at 16, 64, 512 and 4096 segments (100 test examples each). Prints
one row per run and the mean and spread over seeds per task and setting; every finished run
is kept in <workdir>/<label>/<task>/<setting>/seed-<s>/run.json, so a killed benchmark
continues where it stopped, and the table goes next to the runs' folder (results/benchmarks/robustness-<label>.md).

The settings change what the recipe was never tuned on (params.yaml was tuned on
64-token segments of pydoc noise, data seed 0):

    segment-48     48 text tokens per segment (the same noise)
    stdlib-noise   noise from the docstrings of the standard library's modules (the same
                   segment length), a local .txt file written by this script

`--any-label` tabulates what params.yaml (with any --config) trains now, whichever label
measured it: for each task, setting and seed, a finished run of any label whose settings
hash is the recipe's (a lever measured from a recipe file and then adopted into params.yaml
counts as params.yaml's).

`--skip-below 0.5` stops scoring a run at longer lengths once it falls below 50% at a
shorter one (accuracy only decays with length here); such cells print as "skip".
"""

from __future__ import annotations

import importlib
import inspect
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "benchmarks"
PAPER_AT_4096 = {"memorize": 0.906, "detect_and_memorize": 0.961, "reasoning": 0.819}
# Modules whose docstrings make the held-out noise: prose about APIs, far from pydoc's
# language reference topics, and present in every CPython.
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq",
    "hmac", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "platform", "pprint", "queue", "random", "sched", "secrets", "selectors", "shelve", "shutil",
    "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest",
    "unittest.mock", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def stdlib_noise(path: Path) -> Path:
    """A .txt file of standard-library docstrings (modules, their classes and functions)."""
    if not path.is_file():
        texts = []
        for name in STDLIB_MODULES:
            module = importlib.import_module(name)
            texts.append(inspect.getdoc(module) or "")
            for attribute in sorted(vars(module)):
                value = getattr(module, attribute)
                if not attribute.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)):
                    texts.append(inspect.getdoc(value) or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(text for text in texts if text) + "\n")
    return path


def setting_overlay(setting: str, workdir: Path) -> dict:
    overlays = {
        "default": {},
        "segment-48": {"data": {"segment_length": 48}},
        "stdlib-noise": {"data": {"noise": str(stdlib_noise(workdir / "stdlib-noise.txt"))}},
    }
    if setting not in overlays:
        raise typer.BadParameter(f"unknown setting {setting!r}: choose from {', '.join(overlays)}")
    return overlays[setting]


def run_one(job: dict) -> dict:
    """One task x setting x seed: data, curriculum, extrapolation; results kept in run.json."""
    import torch

    from rmt.data.dataset import build_dataset
    from rmt.evaluate import evaluate_checkpoint
    from rmt.train import train_stage

    folder = Path(job["folder"])
    done = folder / "run.json"
    if done.is_file():
        return json.loads(done.read_text())
    if job["reuse"] and not folder.exists():
        reuse_stages(Path(job["reuse"]), folder)
    torch.set_num_threads(job["threads"])
    seed, lengths = job["seed"], job["segments"]
    settings, settings_hash = run_settings(job), trained_settings(job)  # as the run starts, not as it ends
    started = time.perf_counter()
    data = build_dataset(settings.data, folder / "data", progress=False)
    stages, init = [], None
    for segments in settings.curriculum:
        metrics = train_stage(data_dir=data, segments=segments, output=folder / f"stage-{segments}",
                              model=settings.model, train=settings.train_for(segments), init=init, progress=False)
        stages.append({key: metrics[key] for key in ("segments", "steps", "best_step", "best_valid_accuracy",
                                                    "stop_reason", "seconds")})
        init = folder / f"stage-{segments}" / "best"
    train_seconds = sum(stage["seconds"] for stage in stages)  # also of stages an earlier attempt trained
    accuracy = {}
    for length in lengths:
        if job["skip_below"] is not None and any(a is None or a["accuracy"] < job["skip_below"]
                                                 for a in accuracy.values()):
            accuracy[str(length)] = None
            continue
        row, = evaluate_checkpoint(checkpoint=init, data_dir=data, output=folder / f"evaluation-{length}.csv",
                                   segments=[length], max_examples=job["examples"], batch_size=job["examples"],
                                   progress=False)
        accuracy[str(length)] = {k: row[k] for k in ("accuracy", "ci_low", "ci_high", "examples", "seconds")}
    result = {"task": job["task"], "setting": job["setting"], "seed": seed, "recipe": recipe(job["configs"]),
              "settings": settings_hash,
              "stages": stages,
              "train_seconds": round(train_seconds, 1), "accuracy": accuracy,
              "seconds": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(f"done {job['task']} {job['setting']} seed {seed}: " + ", ".join(
        f"{n}: {'skip' if a is None else format(a['accuracy'], '.2f')}" for n, a in accuracy.items()), flush=True)
    return result


def run_settings(job: dict):
    """The run's validated settings: params.yaml and the recipe, with the setting and seed."""
    from rmt.config import PipelineConfig, merge, read_config_files

    seed = job["seed"]
    overlay = merge(job["overlay"], {"tasks": {job["task"]: {}}, "seeds": [seed],
                                     "data": {"seed": seed, "test_segments": job["segments"],
                                              "long_test_examples": job["examples"]},
                                     "train": {"seed": seed}})
    return PipelineConfig(**merge(read_config_files(*job["configs"]), overlay)).for_task(job["task"])


def trained_settings(job: dict) -> str:
    """The hash of what a run trains on, whatever it is scored at: files of the same names
    (params.yaml above all) can hold another recipe later."""
    return run_settings({**job, "segments": [1], "examples": 1}).config_hash()


def recipe(configs: list[str]) -> str:
    """The recipe's name in tables and run.json: its files, in the order they are laid."""
    return " + ".join(Path(config).name for config in configs)


def check_jobs(jobs: list[dict]) -> None:
    """Refuse, before any work, a recipe that does not validate, a run with nothing to reuse,
    and a label whose finished runs were trained with another recipe (they would be tabulated
    as this one's)."""
    for job in jobs:
        done = Path(job["folder"], "run.json")
        finished = json.loads(done.read_text()) if done.is_file() else {}
        trained = finished.get("recipe")
        if trained is not None and trained != recipe(job["configs"]):
            raise typer.BadParameter(f"{done.parent} was trained with {trained}, not {recipe(job['configs'])}: "
                                     "give this recipe a --label of its own, or the same --config files",
                                     param_hint="--label")
        unscored = sorted(set(job["segments"]) - {int(n) for n in finished.get("accuracy", job["segments"])})
        if unscored:
            raise typer.BadParameter(f"{done.parent} is finished and was not scored at {unscored} segments: give a "
                                     "--label of its own with --reuse-from this one (its stages are reused, only "
                                     "the scoring runs), or the same --segments", param_hint="--segments")
        settings = validated_settings_hash(job)
        if "settings" in finished and finished["settings"] != settings:
            raise typer.BadParameter(f"{done.parent} was trained with other settings than {trained} holds now "
                                     "(a file of the recipe changed since): give this recipe a --label of its own",
                                     param_hint="--label")
        source = Path(job["reuse"]) if job["reuse"] else None
        if source and not Path(job["folder"]).exists() and not finished_curriculum(source):
            raise typer.BadParameter(f"{source} holds no finished curriculum to reuse: run that label on this "
                                     "task, setting and seed first, or leave out --reuse-from", param_hint="--reuse-from")


def validated_settings_hash(job: dict) -> str:
    """The hash of what the job trains, or a refusal naming the recipe's problems."""
    from pydantic import ValidationError

    from rmt.config import problem_lines

    try:
        return trained_settings(job)
    except (ValueError, OSError) as error:
        problems = "; ".join(problem_lines(error)) if isinstance(error, ValidationError) else error
        raise typer.BadParameter(f"{job['task']} {job['setting']} seed {job['seed']}: {problems}",
                                 param_hint="--config") from None


def same_settings_runs(jobs: list[dict], labels: Path, label: str) -> list[dict]:
    """For each job, a finished run of any label under `labels` that trained what the job's
    recipe trains now (the same settings hash). Of several: `label`'s own, then one scored at
    every length asked, then the first label by name (the same table on every machine).
    Each result names its label."""
    results = []
    for job in jobs:
        settings, found = validated_settings_hash(job), []
        for done in sorted(labels.glob(f"*/{job['task']}/{job['setting']}/seed-{job['seed']}/run.json")):
            run = json.loads(done.read_text())
            if run.get("settings") == settings:
                found.append({**run, "label": done.parents[3].name})
        if found:
            results.append(min(found, key=lambda run: (run["label"] != label,
                                                       not {str(n) for n in job["segments"]} <= set(run["accuracy"]),
                                                       run["label"])))
    return results


def finished_curriculum(run: Path) -> bool:
    stages = list(run.glob("stage-*"))
    return bool(stages) and all((stage / "metrics.json").is_file() for stage in stages)


def reuse_stages(source: Path, folder: Path) -> None:
    """Start from another benchmark's finished stages of the same run (hard links: nothing of
    theirs is changed). Each stage whose settings are the same is only published again;
    the first that differs, and every stage after it, trains afresh (rmt.train). The source
    needs its curriculum trained, not its evaluation finished."""
    if not finished_curriculum(source):
        raise FileNotFoundError(f"{source} holds no finished curriculum to reuse")
    shutil.copytree(source, folder, copy_function=os.link, ignore=shutil.ignore_patterns("run.json", "evaluation-*"))
    for config in folder.glob("stage-*/config.json"):
        text = config.read_text().replace(str(source), str(folder))  # `init` names the stage before
        config.unlink()  # a new file, not the linked one
        config.write_text(text)


NOT_SCORED = "not scored"  # a length this run was not asked for (an earlier --segments)


def _cell(entry: dict | str | None) -> str:
    return "-" if entry == NOT_SCORED else "skip" if entry is None else f"{100 * entry['accuracy']:.0f}"


def table(results: list[dict], lengths: list[int]) -> str:
    """One row per run, then the mean and range over seeds per task and setting."""
    labelled = any("label" in r for r in results)  # --any-label: which benchmark measured each run
    head = ["task", "setting", "seed", *[f"{n}" for n in lengths], "steps", "train min", *["label"] * labelled]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        steps = "+".join(str(s["steps"]) for s in r["stages"])
        lines.append(f"| {r['task']} | {r['setting']} | {r['seed']} | "
                     + " | ".join(_cell(r["accuracy"].get(str(n), NOT_SCORED)) for n in lengths)
                     + f" | {steps} | {r['train_seconds'] / 60:.1f} |" + (f" {r['label']} |" if labelled else ""))
    return "\n".join(lines) + "\n\n" + summary_table(results, lengths)


def summary_table(results: list[dict], lengths: list[int]) -> str:
    """Per task and setting: mean and range over seeds, and how many runs reach the paper."""
    lines = ["Over seeds (mean, min-max; a skipped length counts as chance, 1/6):", "",
             "| task | setting | seeds | " + " | ".join(map(str, lengths)) + " | runs >= paper at 4096 |",
             "|" + "---|" * (len(lengths) + 4)]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["setting"]), []).append(r)
    for (task, setting), runs in groups.items():
        cells = []
        for n in lengths:
            values = [100 * (r["accuracy"][str(n)] or {"accuracy": 1 / 6})["accuracy"] for r in runs
                      if str(n) in r["accuracy"]]
            cells.append(f"{statistics.mean(values):.0f} ({min(values):.0f}-{max(values):.0f})" if values else "-")
        at_4096 = [r["accuracy"].get("4096") for r in runs]
        passed = sum(a is not None and a["accuracy"] >= PAPER_AT_4096[task] for a in at_4096)
        lines.append(f"| {task} | {setting} | {len(runs)} | " + " | ".join(cells) + f" | {passed}/{len(runs)} |")
    return "\n".join(lines) + "\n"


def main(
    label: str = typer.Option("latest", help="Name of this benchmark's results (a recipe, 'before', ...)."),
    tasks: list[str] = typer.Option(["detect_and_memorize", "memorize"], help="Tasks (repeat the option)."),
    settings: list[str] = typer.Option(["segment-48", "stdlib-noise"], help="Held-out settings (repeat)."),
    seeds: list[int] = typer.Option([1, 2, 3], help="Seeds: data and training seed of a run (repeat)."),
    configs: list[Path] = typer.Option([], "--config", help="Recipe files laid over params.yaml, in order."),
    segments: list[int] = typer.Option([16, 64, 512, 4096], help="Evaluated lengths (repeat)."),
    examples: int = typer.Option(100, min=1, help="Test examples per length."),
    skip_below: float = typer.Option(0.5, help="Skip longer lengths once a run scores below this (0: never)."),
    workers: int = typer.Option(2, min=1, help="Runs at once, one thread each."),
    reuse_from: str = typer.Option(None, help="Label of an earlier benchmark whose stages to reuse where this "
                                   "recipe trains them the same way (e.g. a recipe that changes only the last stage)."),
    workdir: Path = typer.Option(RESULTS / "robustness-work", help="The runs' folder; the tables go next to it."),
    table_only: bool = typer.Option(False, "--table-only", help="Only tabulate the runs finished so far."),
    any_label: bool = typer.Option(False, "--any-label", help="With --table-only: the runs of any label that "
                                   "trained what this recipe trains now (the same settings), e.g. the README's "
                                   "table of what params.yaml holds."),
    quote_in: Path = typer.Option(None, help="Also write the table over seeds into this document (README.md) "
                                  "between its robustness-table markers."),
):
    if quote_in:
        check_quotable(quote_in)
    if any_label and not table_only:
        raise typer.BadParameter("--any-label tabulates runs other labels finished: give --table-only too",
                                 param_hint="--any-label")
    reuse = workdir / reuse_from if reuse_from else None
    overlays = {setting: setting_overlay(setting, workdir) for setting in settings}  # shared by every label
    tables, workdir = workdir.parent, workdir / label  # a test's --workdir keeps its tables apart too
    given_configs = bool(configs)
    configs = [str(ROOT / "params.yaml"), *map(str, configs)]
    jobs = [{"task": task, "setting": setting, "seed": seed, "configs": configs, "segments": sorted(segments),
             "examples": examples, "skip_below": skip_below or None, "threads": 1,
             "overlay": overlays[setting], "folder": str(workdir / task / setting / f"seed-{seed}"),
             "reuse": str(reuse / task / setting / f"seed-{seed}") if reuse else None}
            for seed in seeds for task in tasks for setting in settings]  # a first seed of every cell first
    if any_label:
        results = same_settings_runs(jobs, workdir.parent, label)
    elif table_only:  # the runs finished so far, e.g. while the benchmark still runs
        results = [json.loads(Path(job["folder"], "run.json").read_text()) for job in jobs
                   if Path(job["folder"], "run.json").is_file()]
    else:
        check_jobs(jobs)
        print(f"{len(jobs)} runs, {workers} at a time; results in {workdir}", flush=True)
        # Killed, the benchmark takes its workers along (the pool's exit terminates them):
        # an orphaned worker would go on training into the folders of the next run.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_one, jobs, chunksize=1)
    if not results:  # nothing to tabulate: the tables of an earlier --table-only stay as they are
        where = f"no label in {workdir.parent} holds a run trained as this recipe trains," if any_label else \
            f"{workdir} holds no finished run of"
        raise typer.BadParameter(f"{where} these tasks, settings and seeds", param_hint="--label")
    # What the runs recorded, not the command line (--table-only is given no --config or
    # --segments): the recipe (runs from before run.json held it name it only if --config
    # is given), the lengths scored and the test examples per length.
    unrecorded = recipe(configs) if given_configs else "recipe not recorded: pass its --config"
    recipes = " / ".join(sorted({r.get("recipe", unrecorded) for r in results}))
    if any_label:
        measured_by = [r["label"] for r in results]
        recipes = recipe(configs) + ", as trained in " + ", ".join(
            f"{name} ({measured_by.count(name)})" for name in sorted(set(measured_by)))
    lengths = sorted({int(n) for r in results for n in r["accuracy"]})
    counts = sorted({a["examples"] for r in results for a in r["accuracy"].values() if a is not None})
    per_length = "/".join(map(str, counts)) or str(examples)
    # Of the asked runs; --any-label asks for every seed of every setting, most never run.
    runs = f"{len(results)} runs" if any_label else f"{len(results)} of {len(jobs)} runs"
    text = (f"# Robustness: {label}\n\nRecipe: {recipes}; accuracy % at each number of segments, "
            f"{per_length} test examples per length; {runs}.\n\n"
            + table(results, lengths))
    tables.mkdir(parents=True, exist_ok=True)
    (tables / f"robustness-{label}.md").write_text(text)
    (tables / f"robustness-{label}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text)
    print(f"written {tables / f'robustness-{label}.md'}")
    if quote_in:
        quote(quote_in, f"`{label}` ({recipes}), {runs}, {per_length} test examples "
                        f"per length, as of {time.strftime('%Y-%m-%d')}. "
                        + summary_table(results, lengths))
        print(f"quoted in {quote_in}")


QUOTE_BEGIN, QUOTE_END = "<!-- robustness table (benchmarks/robustness.py --quote-in) -->", "<!-- end -->"


def check_quotable(document: Path) -> None:
    """Before any run: the document has the place the table goes."""
    text = document.read_text() if document.is_file() else ""
    if QUOTE_BEGIN not in text or QUOTE_END not in text.split(QUOTE_BEGIN, 1)[1]:
        raise typer.BadParameter(f"{document} has no place for the table: put the lines {QUOTE_BEGIN} and "
                                 f"{QUOTE_END} where it goes", param_hint="--quote-in")


def quote(document: Path, table_text: str) -> None:
    """Replace what lies between the document's markers with the table, nothing else."""
    text = document.read_text()
    head, rest = text.split(QUOTE_BEGIN, 1)
    tail = rest.split(QUOTE_END, 1)[1]
    document.write_text(f"{head}{QUOTE_BEGIN}\n{table_text}{QUOTE_END}{tail}")


if __name__ == "__main__":
    typer.run(main)
