"""The pipeline's steps, planned from the configuration: one source for Snakemake and dvc.yaml.

    rmt data generate -> rmt train (stage n starts from stage n-1's best/) -> rmt evaluate
    (the last stage at long inputs; --grid: every stage on 1..15 segments) -> rmt profile
    (flops, attention, memory) -> rmt report; where each writes: rmt/layout.py.

The steps are defined once, here: `plan()` lists every job with its command, the files
it reads (code found from the import graph, data, the previous stage) and its outputs;
`dvc_yaml()` writes it as dvc.yaml, and each Snakemake rule (workflow/rules/*.smk) takes
its job's command and inputs from it by the job's wildcards (`STEP_NAMES`). A rule adds
only what Snakemake alone needs: output patterns, log, benchmark, resources, report
captions. Why this way round: the rules stay the native, readable Snakemake users expect
(profiles set resources per rule name), while the logic (curriculum links, which code a
step runs) lives in Python that DVC shares. tests/test_workflow.py checks Snakemake's dry
run against the plan job by job: rule, command, inputs and outputs.
"""

from __future__ import annotations

import ast
import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from rmt.config import LAST_STAGE, PipelineConfig, last_stage, load_config, read_config_files
from rmt.layout import ATTENTION, ATTENTION_TASKS, DATA, EVALUATION, EVALUATION_METRICS, FLOPS, GRID, MEMORY, \
    MEMORY_FILES, REPORT, STAGE, DVC_CHECKED, StageFiles
from rmt.utils import UserError, text_starts_with, write_atomic

# The library module each rule's command calls. The code a rule depends on is every rmt
# module that one imports, directly or through others, read from the import graph
# (`code_dependencies`): the DVC deps and, file by file, the Snakemake inputs. Both tools
# compare contents (DVC hashes, Snakemake checksums of small files), so an edit reruns
# exactly the jobs whose code it touches. The command layer (rmt/cli.py,
# rmt/profile/commands.py) only passes arguments to these modules and is left out.
ENTRY_MODULES = {
    "data": "rmt.data.dataset",
    "train": "rmt.train",
    "grid": "rmt.evaluate",
    "evaluate": "rmt.evaluate",
    "attention": "rmt.profile.attention",
    "flops": "rmt.profile.flops",
    "memory": "rmt.profile.memory",
    "report": "rmt.report",
}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder that holds rmt/
# Each step's name (its DVC stage) from its rule and the rule's wildcards: how a Snakemake
# job finds its planned step.
STEP_NAMES = {
    "data": "data-{task}",
    "train": "train-{task}-seed{seed}-stage{segments}",
    "grid": "grid-{task}-seed{seed}-stage{segments}",
    "evaluate": "evaluate-{task}-seed{seed}",
    "attention": "attention-{task}",
    "flops": "flops",
    "memory": "memory",
    "report": "report",
}


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path, module: str, *, lazy_exports: bool = False) -> set[str]:
    """The rmt modules a file imports when it runs: at module level and inside functions
    (lazy imports run when the function does), relative imports resolved, not under
    `if TYPE_CHECKING:`. A package's `__getattr__` (lazy re-exports) is skipped, or read
    alone with `lazy_exports`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        return f"{base}.{node.module}" if node.module else base

    def visit(node: ast.AST, inside_getattr: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, inside_getattr)
            return
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            inside_getattr = True
        if inside_getattr == lazy_exports:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "rmt")
            elif isinstance(node, ast.ImportFrom) and absolute(node).split(".")[0] == "rmt":
                found.add(absolute(node))
                found.update(f"{absolute(node)}.{alias.name}" for alias in node.names)  # submodules, where they are
        for child in ast.iter_child_nodes(node):
            visit(child, inside_getattr)

    visit(ast.parse(path.read_text()), False)
    return found


def code_dependencies(module: str, root: str | Path = PACKAGE_ROOT) -> list[str]:
    """Every file of rmt that importing and running `module` executes: the module, the
    modules it imports (transitively), the packages' __init__ files on the way, and what a
    package's lazy `__getattr__` loads when a name is taken from it."""
    root = Path(root)
    # Worked out once per version of the source tree: Snakemake asks for every job's code.
    tree = tuple((str(path), path.stat().st_mtime_ns) for path in sorted((root / "rmt").rglob("*.py")))
    return list(_code_dependencies(module, str(root), tree))


@functools.lru_cache(maxsize=None)
def _code_dependencies(module: str, root: str, tree: tuple) -> tuple[str, ...]:
    root = Path(root)
    files: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = _module_file(".".join(parts[:depth]), root)
            if path is not None and path not in files:
                files.add(path)
                pending.extend(_imported_modules(path, ".".join(parts[:depth])))
        package = _module_file(name.rpartition(".")[0], root) if "." in name else None
        if _module_file(name, root) is None and package is not None and package.name == "__init__.py":
            # `from package import Name`: Name may be a lazy re-export of the package's __getattr__.
            pending.extend(m for m in _imported_modules(package, name.rpartition(".")[0], lazy_exports=True)
                           if _module_file(m, root) not in files)
    return tuple(sorted(str(path.relative_to(root)) for path in files))


def noise_files(data) -> tuple[str, ...]:
    """The local noise text a dataset reads (a .txt file, or a folder's .txt files), so that
    editing it regenerates the dataset; none for the named sources (pydoc, quality, pg19)."""
    from rmt.data.noise import SOURCES

    if data.noise in SOURCES:
        return ()
    path = Path(data.noise)
    return tuple(sorted(map(str, path.rglob("*.txt")))) if path.is_dir() else (str(path),)


def source_files(rule: str, root: str | Path = PACKAGE_ROOT) -> list[str]:
    """The Python files a rule's command runs, relative to `root` (Snakemake inputs)."""
    return code_dependencies(ENTRY_MODULES[rule], root)


@dataclass(frozen=True)
class Step:
    """One job of the pipeline: a dvc.yaml stage, a Snakemake job."""

    name: str  # unique; the DVC stage name
    rule: str  # the Snakemake rule that runs it
    command: str  # without the log redirection Snakemake adds
    deps: tuple[str, ...]  # files the step reads: Snakemake inputs, DVC deps
    outs: tuple[str, ...] = ()  # DVC-cached outputs
    persist: tuple[str, ...] = ()  # outputs DVC must not delete before a rerun (resumable work)
    metrics: tuple[str, ...] = ()  # read by `dvc metrics show`; cached like every output (results/ is not in git)
    plots: tuple[str, ...] = ()  # CSVs of accuracy against segments, for `dvc plots show`
    params: tuple[str, ...] = ()  # keys of params.yaml the step reads
    task: str | None = None  # the task of an evaluation step (the parent run's headline results)

    @property
    def code(self) -> tuple[str, ...]:
        """Source the step runs: DVC deps, the same files Snakemake takes (`source_files`)."""
        return tuple(source_files(self.rule))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every file the step reads: its Snakemake inputs."""
        return (*self.deps, *self.code)


def config_arguments(config_files: list[str]) -> str:
    return " ".join(f"--config {path}" for path in config_files)


def plan(config: PipelineConfig, config_files: list[str], *, defined: set[str] | None = None) -> list[Step]:
    """Every step for every task, seed and curriculum stage. `defined`: the keys present in
    the params file, as dotted paths two levels deep (DVC refuses params it cannot find)."""
    configs = config_arguments(config_files)
    defined = defined if defined is not None else set()

    def keys(*names: str) -> tuple[str, ...]:
        return tuple(name for name in names if name in defined)

    steps = []
    for task in config.tasks:
        settings = config.for_task(task)
        data = DATA.format(task=task)
        steps.append(Step(
            name=STEP_NAMES["data"].format(task=task), rule="data",
            command=f"rmt data generate {task} {data} {configs}",
            deps=noise_files(settings.data), outs=(data,), params=keys("data", f"tasks.{task}"),
        ))
        for seed in config.seeds:
            steps += _curriculum_steps(task, seed, settings.curriculum, data=data, configs=configs, keys=keys,
                                       attention=task in ATTENTION_TASKS and seed == config.seeds[0])
    steps.append(Step(name="flops", rule="flops", command=f"rmt profile flops --output {FLOPS}", deps=(),
                      outs=(FLOPS,)))
    steps.append(Step(name="memory", rule="memory", command=f"rmt profile memory --output {MEMORY} {configs}",
                      deps=(), outs=MEMORY_FILES,
                      params=keys("profile", "model", "data.segment_length", f"tasks.{next(iter(config.tasks))}")))
    results = [path for step in steps if step.rule in ("evaluate", "grid") for path in step.plots] + [
        path for step in steps if step.rule in ("flops", "attention", "memory") for path in step.outs] + [
        path for step in steps if step.rule == "train" for path in step.outs if path.endswith(StageFiles.HISTORY)]
    steps.append(Step(
        name="report", rule="report", command=f"rmt report --output {REPORT} {configs}",
        deps=tuple(results), outs=(REPORT,),
    ))
    return steps


def _curriculum_steps(task: str, seed: int, curriculum: list[int], *, data: str, configs: str, keys,
                      attention: bool) -> list[Step]:
    """One seed of one task: each stage (from the previous stage's best) and its grid, the
    attention maps when asked, and the last stage's evaluation."""
    steps, previous = [], None

    def last_entry(segments: int) -> tuple[str, ...]:  # the stage_train entry only the last stage reads
        return (f"stage_train.{LAST_STAGE}",) if segments == last_stage(curriculum) else ()

    for segments in curriculum:
        stage = STAGE.format(task=task, seed=seed, segments=segments)
        init = f" --init {previous}/best" if previous else ""
        steps.append(Step(
            name=STEP_NAMES["train"].format(task=task, seed=seed, segments=segments), rule="train",
            command=f"rmt train --data {data} --segments {segments} --seed {seed} --output {stage}{init} {configs}",
            deps=(data, *((f"{previous}/best",) if previous else ())),
            outs=(f"{stage}/best", f"{stage}/{StageFiles.HISTORY}"),
            # checkpoints/ (resume state, ~4x best/ with the optimizer) is no DVC output at all:
            # DVC neither caches it nor deletes it before a rerun, so a killed stage resumes.
            persist=(f"{stage}/config.json",), metrics=(f"{stage}/metrics.json",),
            params=keys("model", "train", f"stage_train.{segments}", *last_entry(segments), f"tasks.{task}"),
        ))
        grid = GRID.format(task=task, seed=seed, segments=segments)
        steps.append(Step(
            name=STEP_NAMES["grid"].format(task=task, seed=seed, segments=segments), rule="grid",
            command=f"rmt evaluate --grid --checkpoint {stage}/best --data {data} --output {grid} {configs}",
            deps=(f"{stage}/best", data), plots=(grid,),
            params=keys("evaluate.grid_segments", "evaluate.grid_examples", "evaluate.batch_size", f"tasks.{task}"),
        ))
        previous = stage
    if attention:
        maps = ATTENTION.format(task=task)
        steps.append(Step(
            name=STEP_NAMES["attention"].format(task=task), rule="attention",
            command=f"rmt profile attention --checkpoint {previous}/best --data {data} --output {maps}",
            deps=(f"{previous}/best", data), outs=(maps,),
        ))
    evaluation, metrics = EVALUATION.format(task=task, seed=seed), EVALUATION_METRICS.format(task=task, seed=seed)
    steps.append(Step(
        name=STEP_NAMES["evaluate"].format(task=task, seed=seed), rule="evaluate",
        command=f"rmt evaluate --checkpoint {previous}/best --data {data} --output {evaluation} "
                f"--metrics {metrics} {configs}",
        deps=(f"{previous}/best", data), plots=(evaluation,), metrics=(metrics,),
        params=keys("evaluate.segments", "evaluate.batch_size", f"tasks.{task}"), task=task,
    ))
    return steps


def headline_results(steps: list[Step], root: str | Path = ".") -> dict[str, float]:
    """What a reproduction's parent run shows, from the result files: per task, the last
    stage's validation accuracy and the accuracy at every evaluated length, each the mean
    over the seeds that have it (`memorize/accuracy_4096`)."""
    values: dict[str, list[float]] = {}
    for step in (s for s in steps if s.rule == "evaluate"):
        evaluation, stage = Path(root, step.plots[0]), Path(root, step.deps[0]).parent  # <stage>/best
        if evaluation.is_file():
            with evaluation.open() as rows:
                for row in csv.DictReader(rows):
                    name = f"{step.task}/accuracy_{row['evaluated_segments']}"
                    values.setdefault(name, []).append(float(row["accuracy"]))
        if (stage / "metrics.json").is_file():
            outcome = json.loads((stage / "metrics.json").read_text())
            values.setdefault(f"{step.task}/last_stage_valid_accuracy", []).append(outcome["best_valid_accuracy"])
    return {name: sum(found) / len(found) for name, found in values.items()}


def dvc_yaml(steps: list[Step], params: str) -> dict:
    """dvc.yaml for the planned steps: a first stage that fails when dvc.yaml no longer
    matches `params` (a seed added, a task removed), then a stage per step. Resume state is
    kept but not tracked (only results are); the grid of every stage is one plot per run."""
    check = {"cmd": f"rmt pipeline dvc --check --params {params}", "deps": [params, *code_dependencies("rmt.pipeline")],
             "outs": [DVC_CHECKED]}  # cached: `dvc pull` restores it with the results that follow it
    stages, grids = {"check-dvc-yaml": check}, {}
    produced = {path for step in steps for path in (*step.outs, *step.metrics, *step.plots)}
    for step in steps:
        grid = step.plots if step.rule == "grid" else ()
        outs = [*step.outs, *grid, *({path: {"persist": True}} for path in step.persist)]
        first = not any(path in produced for path in step.deps)  # no upstream step: runs after the check
        stage = {"cmd": step.command, "deps": [*step.code, *step.deps, *((DVC_CHECKED,) if first else ())]}
        if step.params:
            stage["params"] = list(step.params)
        if outs:
            stage["outs"] = outs
        if step.metrics:
            stage["metrics"] = list(step.metrics)
        if step.plots and not grid:
            stage["plots"] = [{path: {"x": "evaluated_segments", "y": "accuracy"}} for path in step.plots]
        for path in grid:  # results/<task>/seed-<s>/grid/stage-<n>.csv
            grids.setdefault(str(Path(path).parent.parent), []).append(path)
        stages[step.name] = stage
    plots = [{f"{run}: accuracy by trained stage": {
        "x": "evaluated_segments", "y": {path: "accuracy" for path in paths}, "x_label": "evaluated segments",
        "y_label": "accuracy", "title": f"{run}: each stage on 1..15 segments (the paper's Figure 5)"}}
        for run, paths in grids.items()]
    return {"stages": stages, "plots": plots}


# The configuration dvc.yaml is written from, whose keys its stages track as DVC params
# (DVC's default params file) and which their commands read.
DVC_PARAMS = "params.yaml"
HEADER = """\
# Generated by `rmt pipeline dvc` from params.yaml (rmt/pipeline.py): do not edit.
# The same steps as the Snakemake workflow; tests/test_workflow.py checks they agree.
"""


def dvc_yaml_text(params: str | Path = DVC_PARAMS) -> str:
    """dvc.yaml's text for the pipeline that params.yaml describes."""
    params = Path(params)
    raw = read_config_files(params)
    defined = set(raw) | {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict)
                          for key in values}
    steps = plan(load_config(params), [str(params)], defined=defined)
    return HEADER + yaml.safe_dump(dvc_yaml(steps, str(params)), sort_keys=False, width=200)


def write_dvc_yaml(params: str | Path = DVC_PARAMS, output: str | Path = "dvc.yaml") -> Path:
    """dvc.yaml for the pipeline that params.yaml describes."""
    return write_atomic(output, dvc_yaml_text(params), kind="a generated dvc.yaml",
                        ours=text_starts_with(HEADER.splitlines()[0]))


def check_dvc_yaml(params: str | Path = DVC_PARAMS, output: str | Path = "dvc.yaml") -> Path:
    """Refuse a dvc.yaml that params.yaml no longer describes (DVC cannot see that a new
    seed means new stages); when it is current, record so in DVC_CHECKED."""
    expected = dvc_yaml_text(params)
    if not Path(output).is_file() or Path(output).read_text() != expected:
        raise UserError(f"{output} does not match {params} and the code (a task, seed, stage or a step's imports changed): "
                        f"run `rmt pipeline dvc` to write it anew (--params {params} --output {output}), then `dvc repro` again")
    # The same text whenever the check passes: the stages after it rerun for their own reasons only.
    return write_atomic(DVC_CHECKED, f"{output} matches {params}\n", kind="a dvc.yaml check",
                        ours=text_starts_with(f"{output} matches "))
