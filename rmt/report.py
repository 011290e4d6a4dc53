"""Figures and tables from the result files (never from memory): `rmt report`.

    reports/accuracy.{png,svg}         accuracy against segments per task, paper beside ours
    reports/generalization.{png,svg}   trained segments x evaluated segments (paper's Figure 5)
    reports/training.{png,svg}         validation accuracy through the curriculum, by kind of question
    reports/accuracy.csv               every length: ours (mean and spread over seeds), paper
    reports/accuracy.md                the same as a Markdown table
    reports/flops.{png,svg}            forward FLOPs against length, full attention and RMT
    reports/attention-<task>.{png,svg} attention of [CLS] and memory per segment (Figure 6)
    reports/seeds.csv, seeds.md        every configuration in the tracking store: accuracy against
                                       length, mean and spread over its seeds (read from MLflow)
    reports/memory.{png,svg}           measured peak memory and time per token against length
    reports/training-memory.{png,svg}  training step peak memory and time against segments
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
# SVG text stays text (searchable, editable in a paper), and the files are the same bytes
# from the same results: fixed element ids, no creation date.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "rmt"})
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from rmt.paper import paper_accuracy  # noqa: E402
from rmt.layout import (ATTENTION, ATTENTION_TASKS, EVALUATION, FLOPS, GRID, KIND_ACCURACY, MEMORY,  # noqa: E402
                        STAGE, StageFiles, report_files)
from rmt.utils import claim_output  # noqa: E402

FIGURE_FORMATS = ("png", "svg")


def _read(files: dict[Path, int], what: str) -> pd.DataFrame:
    """The CSVs (path -> seed) in one table with a seed column."""
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"No {what} results at {', '.join(missing)}: run the pipeline's evaluations first")
    return pd.concat([pd.read_csv(path).assign(seed=seed) for path, seed in files.items()], ignore_index=True)


def kind_columns(frame: pd.DataFrame) -> dict[str, str]:
    """The accuracy column of each kind of question present (Reasoning's end and middle room)."""
    prefix, suffix = KIND_ACCURACY.split("{kind}")
    return {column.removeprefix(prefix).removesuffix(suffix): column for column in frame.columns
            if column.startswith(prefix) and column.endswith(suffix) and column != "accuracy_std"}


def accuracy_table(evaluations: pd.DataFrame) -> pd.DataFrame:
    """One row per task and length: mean accuracy over seeds, its spread, the paper's value,
    and the mean accuracy of each kind of question where the task has kinds."""
    grouped = evaluations.groupby(["task", "evaluated_segments"])
    by_kind = {column: (column, "mean") for column in kind_columns(evaluations).values()}
    table = grouped.agg(trained_segments=("trained_segments", "first"), tokens=("tokens", "first"),
                        seeds=("seed", "nunique"), examples=("examples", "sum"), accuracy=("accuracy", "mean"),
                        accuracy_std=("accuracy", "std"), ci_low=("ci_low", "mean"),
                        ci_high=("ci_high", "mean"), **by_kind).reset_index()
    table["accuracy_std"] = table["accuracy_std"].fillna(0.0)
    table["paper_accuracy"] = [paper_accuracy(task).get(n) for task, n in
                               zip(table["task"], table["evaluated_segments"])]
    return table


SEEDS_CONFIG = "config/seeds.yaml"  # three seeds, where make reproduce's time budget holds one


def seeds_sentence(table: pd.DataFrame) -> str:
    """What the figures are: one run's, or a mean over seeds (a single run is a data point)."""
    seeds = int(table["seeds"].max()) if len(table) else 0
    if seeds > 1:
        return (f"Mean ± standard deviation over {seeds} seeds (the 95% CI: mean of the seeds' Wilson intervals).\n")
    return ("One seed: each figure is one run, not yet a mean over seeds (`make reproduce` runs one seed to stay "
            f"within its time budget; `snakemake --configfile {SEEDS_CONFIG}` runs three, and this table then "
            "shows mean ± standard deviation).\n")


def markdown_table(table: pd.DataFrame) -> str:
    kinds = kind_columns(table)
    header = "| task | segments | tokens | examples | seeds | ours (%) | 95% CI | paper (%) |"
    lines = [seeds_sentence(table), header + "".join(f" {kind.replace('_', ' ')} (%) |" for kind in kinds),
             "|---|---:|---:|---:|---:|---:|---|---:|" + "---:|" * len(kinds)]
    for row in table.to_dict("records"):
        spread = f" ± {100 * row['accuracy_std']:.1f}" if row["seeds"] > 1 else ""
        paper = _percent(row["paper_accuracy"])
        lines.append(f"| {row['task']} | {row['evaluated_segments']} | {row['tokens']:,} | {row['examples']} | "
                     f"{row['seeds']} | {100 * row['accuracy']:.1f}{spread} | {100 * row['ci_low']:.1f}-"
                     f"{100 * row['ci_high']:.1f} | {paper} |" + "".join(f" {_percent(row[c])} |" for c in kinds.values()))
    return "\n".join(lines) + "\n"


def _percent(value) -> str:
    return "" if value is None or pd.isna(value) else f"{100 * value:.1f}"


SEED_SUMMARY_FIELDS = ("task", "config", "config_files", "trained_segments", "evaluated_segments", "seeds",
                       "accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max")


def seed_summary(runs: list[dict]) -> pd.DataFrame:
    """The extrapolation runs of the tracking store (rmt.tracking.search_runs with the
    accuracy history), one row per task, configuration (the `rmt.config` hash: every setting
    but the seed), trained and evaluated segments: mean, spread and range over the seeds.
    A configuration evaluated again keeps its newest run per seed."""
    newest = {}
    for run in sorted(runs, key=lambda r: r["start_time"] or 0, reverse=True):
        tags = run["tags"]
        if tags.get("rmt.step") != "evaluate" or run["status"] != "FINISHED" or "rmt.config" not in tags:
            continue
        newest.setdefault((tags["rmt.task"], tags["rmt.config"], tags.get("rmt.stage"), tags["rmt.seed"]), run)
    rows = [{"task": task, "config": config, "config_files": run["tags"].get("rmt.config_files", ""),
             "trained_segments": int(stage) if stage else None, "seed": int(seed), "evaluated_segments": int(step),
             "accuracy": value}
            for (task, config, stage, seed), run in newest.items()
            for step, value in run.get("history", {}).get("accuracy", {}).items()]
    if not rows:
        return pd.DataFrame(columns=SEED_SUMMARY_FIELDS)
    keys = ["task", "config", "config_files", "trained_segments", "evaluated_segments"]
    table = pd.DataFrame(rows).groupby(keys, dropna=False).agg(
        seeds=("seed", "nunique"), accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        accuracy_min=("accuracy", "min"), accuracy_max=("accuracy", "max")).reset_index()
    table["accuracy_std"] = table["accuracy_std"].fillna(0.0)
    return table[list(SEED_SUMMARY_FIELDS)]


def seed_summary_markdown(table: pd.DataFrame) -> str:
    """Configurations side by side: a column per (task's) configuration, a row per length."""
    if table.empty:
        return "No finished evaluation runs in the tracking store yet (rmt evaluate logs them).\n"
    sections = []
    for task, rows in table.groupby("task", sort=False):
        configurations = list(dict.fromkeys(zip(rows["config"], rows["config_files"], rows["trained_segments"])))
        header = ["segments"] + [f"{files} [{config}], trained on {trained}, "
                                 f"{int(rows[rows['config'] == config]['seeds'].max())} seed(s)"
                                 for config, files, trained in configurations]
        lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for segments, at in rows.groupby("evaluated_segments"):
            cells = []
            for config, _, trained in configurations:
                match = at[(at["config"] == config) & (at["trained_segments"] == trained)]
                if match.empty:
                    cells.append("")
                    continue
                row = match.iloc[0]
                spread = f" ± {100 * row.accuracy_std:.1f}" if row.seeds > 1 else ""
                cells.append(f"{100 * row.accuracy_mean:.1f}{spread}")
            lines.append(f"| {segments} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return ("Accuracy (%) against input length, mean ± standard deviation over seeds, for every configuration "
            "in the tracking store.\n\n" + "\n\n".join(sections) + "\n")


def _save(figure, output: Path, name: str) -> list[Path]:
    paths = [output / f"{name}.{fmt}" for fmt in FIGURE_FORMATS]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight", metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(figure)
    return paths


def accuracy_figure(table: pd.DataFrame, output: Path) -> list[Path]:
    tasks = list(dict.fromkeys(table["task"]))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, sharey=True)
    for axis, task in zip(axes[0], tasks):
        ours = table[table["task"] == task]
        axis.fill_between(ours["evaluated_segments"], 100 * ours["ci_low"], 100 * ours["ci_high"], alpha=0.2)
        sns.lineplot(x=ours["evaluated_segments"], y=100 * ours["accuracy"], marker="o", ax=axis, label="ours")
        paper = paper_accuracy(task)
        if paper:
            sns.lineplot(x=list(paper), y=[100 * v for v in paper.values()], marker="s", linestyle="--", ax=axis,
                         label="paper")
        trained = int(ours["trained_segments"].iloc[0])
        for kind, column in kind_columns(ours.dropna(axis="columns", how="all")).items():
            sns.lineplot(x=ours["evaluated_segments"], y=100 * ours[column], marker=".", linestyle=":", ax=axis,
                         label=kind.replace("_", " "))
        axis.axvline(trained, color="grey", linewidth=0.8, linestyle=":", label=f"trained on {trained}")
        axis.set(xscale="log", title=task.replace("_", " "), xlabel="input length (segments)",
                 ylabel="accuracy (%)", ylim=(0, 102))
        tokens_per_segment = int(ours["tokens"].iloc[0]) // int(ours["evaluated_segments"].iloc[0])
        tokens = axis.secondary_xaxis("top", functions=(lambda s, k=tokens_per_segment: s * k,
                                                        lambda t, k=tokens_per_segment: t / k))
        tokens.set_xlabel("input length (tokens)")
        axis.legend(loc="lower left")
    figure.tight_layout()
    return _save(figure, output, "accuracy")


def generalization_figure(grid: pd.DataFrame, output: Path) -> list[Path]:
    tasks = list(dict.fromkeys(grid["task"]))
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        cells = (grid[grid["task"] == task].groupby(["trained_segments", "evaluated_segments"])["accuracy"].mean()
                 .mul(100).unstack("evaluated_segments"))
        sns.heatmap(cells, ax=axis, vmin=0, vmax=100, cmap="viridis", annot=cells.shape[1] <= 16, fmt=".0f",
                    annot_kws={"size": 6}, cbar_kws={"label": "accuracy (%)"})
        axis.set(title=task.replace("_", " "), xlabel="evaluated on (segments)", ylabel="trained on (segments)")
    figure.tight_layout()
    return _save(figure, output, "generalization")


def read_histories(stages: dict[Path, dict]) -> pd.DataFrame:
    """Every validation of the given stages (folder -> task, seed, segments), one row per
    validation and kind of question ("all": the whole validation set), with the step
    counted from the start of the seed's curriculum."""
    rows = []
    for folder, keys in stages.items():
        history = StageFiles(folder).history
        if not history.is_file():
            raise FileNotFoundError(f"No training history at {history}: train the curriculum first")
        for record in map(json.loads, history.read_text().splitlines()):
            scores = {"all": record["valid_accuracy"], **record.get("valid_accuracy_by_kind", {})}
            rows += [{**keys, "step": record["step"], "kind": kind, "accuracy": value} for kind, value in scores.items()]
    table = pd.DataFrame(rows)
    # Each stage starts where its predecessor's last validation ended.
    last = table.groupby(["task", "seed", "segments"])["step"].max().groupby(["task", "seed"]).cumsum()
    offsets = last.groupby(["task", "seed"]).shift(fill_value=0).rename("offset")
    table = table.join(offsets, on=["task", "seed", "segments"])
    return table.assign(curriculum_step=table["step"] + table["offset"]).drop(columns="offset")


def training_figure(histories: pd.DataFrame, output: Path) -> list[Path]:
    """Validation accuracy through each task's curriculum, per kind of question and seed: a
    shortcut that answers one kind (Reasoning's end room) shows as one line at 100% and
    another at chance. Dotted lines: where a stage starts (the first seed's)."""
    tasks = list(dict.fromkeys(histories["task"]))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, sharey=True)
    for axis, task in zip(axes[0], tasks):
        rows = histories[histories["task"] == task].assign(accuracy=lambda t: 100 * t["accuracy"])
        sns.lineplot(data=rows, x="curriculum_step", y="accuracy", hue="kind", units="seed", estimator=None,
                     linewidth=1, ax=axis)
        first = rows[rows["seed"] == rows["seed"].min()]
        for segments, start in (first["curriculum_step"] - first["step"]).groupby(first["segments"]).min().items():
            axis.axvline(start, color="grey", linewidth=0.6, linestyle=":")
            axis.text(start, 101, str(segments), fontsize=7, ha="left", va="bottom")
        axis.set(title=task.replace("_", " "), xlabel="training step (stage's segments above)",
                 ylabel="validation accuracy (%)", ylim=(0, 108))
    figure.tight_layout()
    return _save(figure, output, "training")


def flops_figure(flops: pd.DataFrame, output: Path) -> list[Path]:
    figure, axis = plt.subplots(figsize=(6, 4.5))
    sns.lineplot(data=flops, x="tokens", y="normalized", hue="model", style="method", markers=True, ax=axis)
    axis.set(xscale="log", yscale="log", xlabel="input length (tokens)",
             ylabel="forward FLOPs / one 512-token pass")
    figure.tight_layout()
    return _save(figure, output, "flops")


def memory_figure(inference: pd.DataFrame, summary: dict, output: Path) -> list[Path]:
    """Peak memory and time per token against input length, RMT streaming against full
    attention; projected points (never run) hollow, on dashed lines."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(dict.fromkeys(inference["method"]))
    colors = dict(zip(methods, sns.color_palette(n_colors=len(methods))))
    for axis, column, label in ((axes[0], "peak_memory_mb", "peak memory (MB)"),
                                (axes[1], "us_per_token", "time per token (µs)")):
        for method in methods:
            rows = inference[inference["method"] == method].sort_values("tokens")
            measured, projected = rows[rows["measured"]], rows[~rows["measured"]]
            axis.plot(measured["tokens"], measured[column], marker="o", color=colors[method], label=method)
            if not projected.empty:  # dashed from the last measured point on
                tail = pd.concat([measured.tail(1), projected])
                axis.plot(tail["tokens"], tail[column], linestyle="--", marker="o", markerfacecolor="none",
                          color=colors[method], label=f"{method} (projected)")
        axis.set(xscale="log", yscale="log", xlabel="input length (tokens)", ylabel=label)
    for method, crossover in summary.get("crossover", {}).items():
        if crossover["memory_from_tokens"]:
            axes[0].axvline(crossover["memory_from_tokens"], color=colors[method], linewidth=0.8, linestyle=":")
        if crossover["time_from_tokens"]:
            axes[1].axvline(crossover["time_from_tokens"], color=colors[method], linewidth=0.8, linestyle=":")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"inference, batch {summary['batch_size']}, {summary['segment_length']}-token segments, "
                    f"{summary['device']} (dotted: RMT cheaper from here)", fontsize=9)
    figure.tight_layout()
    return _save(figure, output, "memory")


def training_memory_figure(training: pd.DataFrame, summary: dict, output: Path) -> list[Path]:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    sns.lineplot(data=training, x="segments", y="peak_memory_mb", hue="backprop", marker="o", ax=axes[0])
    sns.lineplot(data=training, x="segments", y="step_seconds", hue="backprop", marker="o", ax=axes[1])
    axes[0].set(xscale="log", xlabel="segments per example", ylabel="peak memory (MB)")
    axes[1].set(xscale="log", xlabel="segments per example", ylabel="optimizer step (s)")
    for axis in axes:
        axis.set_xticks(sorted(training["segments"].unique()), labels=sorted(training["segments"].unique()))
    figure.suptitle(f"training step (forward, backward, AdamW), batch {summary['train_batch_size']}, "
                    f"{summary['segment_length']}-token segments, {summary['device']}", fontsize=9)
    figure.tight_layout()
    return _save(figure, output, "training-memory")


def attention_figure(result: dict, output: Path) -> list[Path]:
    segments, memory = result["segments"], result["num_memory_tokens"]
    figure, axes = plt.subplots(1, segments, figsize=(4.5 * segments, 3.2), sharey=True)
    top = max(float(np.max(cells)) for cells in result["maps"])  # one color scale for every segment
    for segment, (axis, cells) in enumerate(zip(axes, result["maps"])):
        sns.heatmap(np.asarray(cells), ax=axis, cmap="magma", vmin=0, vmax=top, cbar=segment == segments - 1,
                    cbar_kws={"label": "attention (last layer, mean of heads)"}, yticklabels=result["rows"],
                    xticklabels=False)
        axis.axvline(memory, color="white", linewidth=1)  # memory | tokens
        for column in result["fact_columns"][segment]:
            axis.axvspan(column, column + 1, ymin=0.97, ymax=1.0, color="cyan", clip_on=False)
        has_fact = "fact" if result["fact_columns"][segment] else "no fact"
        axis.set(title=f"segment {segment + 1} ({has_fact})", xlabel=f"memory ({memory}) | tokens")
    figure.suptitle(f"{result['task'].replace('_', ' ')}: {' '.join(result['facts'])} {result['question']} "
                    f"answer {result['answer']}, predicted {result['predicted']} (fact tokens marked in cyan)",
                    fontsize=8)
    figure.tight_layout()
    return _save(figure, output, f"attention-{result['task']}")


def _holds_only_report_files(folder: Path) -> bool:
    """A folder rmt may write its report into: nothing in it but the files `rmt report`
    writes (for any task) and Snakemake's `--report` page."""
    from rmt.data.tasks import TASKS

    known = {*report_files(TASKS), "report.html"}
    return folder.is_dir() and all(child.name in known and child.is_file() for child in folder.iterdir())


def claim_report_folder(output: str | Path) -> Path:
    return claim_output(output, kind="a report folder", ours=_holds_only_report_files)


def build_report(*, tasks: list[str], seeds: list[int], curricula: dict[str, list[int]], output: str | Path,
                 root: str | Path = ".", runs: list[dict] = ()) -> list[Path]:
    """Every figure and table of the report, from the result files under `root`, and the
    seed summary from `runs` (the tracking store's, rmt.tracking.search_runs)."""
    output, root = claim_report_folder(output), Path(root)
    evaluations = _read({root / EVALUATION.format(task=t, seed=s): s for t in tasks for s in seeds}, "evaluation")
    grid = _read({root / GRID.format(task=t, seed=s, segments=n): s for t in tasks for s in seeds for n in curricula[t]},
                 "grid")
    histories = read_histories({root / STAGE.format(task=t, seed=s, segments=n): {"task": t, "seed": s, "segments": n}
                                for t in tasks for s in seeds for n in curricula[t]})
    output.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="paper")
    table = accuracy_table(evaluations)
    table.to_csv(output / "accuracy.csv", index=False)
    (output / "accuracy.md").write_text(markdown_table(table))
    seeds_table = seed_summary(list(runs))
    seeds_table.to_csv(output / "seeds.csv", index=False)
    (output / "seeds.md").write_text(seed_summary_markdown(seeds_table))
    flops = _read({root / FLOPS: 0}, "FLOP")
    attention = []
    for task in (t for t in tasks if t in ATTENTION_TASKS):
        path = root / ATTENTION.format(task=task)
        if not path.is_file():
            raise FileNotFoundError(f"No attention maps at {path}: run `rmt profile attention` first")
        attention += attention_figure(json.loads(path.read_text()), output)
    memory = root / MEMORY
    inference, training = _read({memory / "inference.csv": 0}, "memory"), _read({memory / "training.csv": 0}, "memory")
    summary = json.loads((memory / "summary.json").read_text())
    return [*accuracy_figure(table, output), *generalization_figure(grid, output),
            *training_figure(histories, output), *flops_figure(flops, output),
            *attention, *memory_figure(inference, summary, output), *training_memory_figure(training, summary, output),
            output / "accuracy.csv", output / "accuracy.md", output / "seeds.csv", output / "seeds.md"]
