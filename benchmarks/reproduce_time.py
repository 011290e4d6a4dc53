"""Where the time of `make reproduce` goes: a per-job table from Snakemake's benchmark files.

    .venv/bin/python benchmarks/reproduce_time.py --fresh-clone     # clone, make reproduce, table
    .venv/bin/python benchmarks/reproduce_time.py --project .       # the table of a finished run

With --fresh-clone, the repository's HEAD is cloned into a new folder and `make reproduce`
runs there from nothing (virtual environment and install included), timed as a whole. Either
way the table lists every job of the run (each job's benchmark file under results/timings/:
wall seconds, CPU seconds, peak resident memory), the subtotal per rule and the sum; with a
fresh clone also the wall time of install and of the whole command. The table goes to stdout
and to --output (results/benchmarks/reproduce-time.md of this repository).

State the machine's load when you quote it: jobs run one after another on a free machine,
so on a busy one every figure grows.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rmt.layout import TIMINGS  # noqa: E402

RESULT = ROOT / "results" / "benchmarks" / "reproduce-time.md"


def job_timings(project: Path) -> list[dict]:
    """One row per job: its benchmark file's path below results/timings/ (rule first), wall
    seconds, CPU seconds and peak resident set (Snakemake's s, cpu_time, max_rss)."""
    rows = []
    for path in sorted((project / TIMINGS).rglob("*.tsv")):
        with path.open() as file:
            records = list(csv.DictReader(file, delimiter="\t"))
        if not records:
            continue
        last = records[-1]  # a job rerun appends nothing: Snakemake rewrites the file
        job = path.relative_to(project / TIMINGS).with_suffix("")
        rows.append({"job": str(job), "rule": job.parts[0], "seconds": float(last["s"]),
                     "cpu_seconds": _number(last.get("cpu_time")), "max_rss_mb": _number(last.get("max_rss"))})
    return rows


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):  # "NA" where Snakemake could not measure
        return None


def table(rows: list[dict], *, wall: dict[str, float] | None = None) -> str:
    """Markdown: every job, then the subtotal per rule, then the sum (and measured walls)."""
    cell = lambda value, digits=0: "-" if value is None else f"{value:,.{digits}f}"  # noqa: E731
    lines = ["| job | wall s | CPU s | peak RSS MB |", "|---|---|---|---|"]
    lines += [f"| {r['job']} | {cell(r['seconds'], 1)} | {cell(r['cpu_seconds'], 1)} | {cell(r['max_rss_mb'])} |"
              for r in rows]
    per_rule = defaultdict(float)
    for r in rows:
        per_rule[r["rule"]] += r["seconds"]
    total = sum(per_rule.values())
    lines += ["", "| rule | jobs | wall s | share |", "|---|---|---|---|"]
    for rule, seconds in sorted(per_rule.items(), key=lambda item: -item[1]):
        count = sum(r["rule"] == rule for r in rows)
        lines.append(f"| {rule} | {count} | {seconds:,.1f} | {seconds / total:.0%} |" if total else
                     f"| {rule} | {count} | {seconds:,.1f} | - |")
    lines += ["", f"Sum over {len(rows)} jobs: {total:,.1f} s ({total / 60:.1f} min)."]
    for name, seconds in (wall or {}).items():
        lines.append(f"{name}: {seconds:,.1f} s ({seconds / 60:.1f} min) measured.")
    return "\n".join(lines) + "\n"


def fresh_clone_run(folder: Path) -> dict[str, float]:
    """Clone HEAD into `folder` and run `make install`, then `make reproduce`, timed."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    walls = {}
    for target in ("install", "reproduce"):
        started = time.perf_counter()
        subprocess.run(["make", target], cwd=folder, env=env, check=True)
        walls[f"make {target}"] = time.perf_counter() - started
    walls["make reproduce from a fresh clone, install included"] = sum(walls.values())
    return walls


def main(project: Path = typer.Option(None, help="A folder where `make reproduce` (or snakemake) ran."),
         fresh_clone: bool = typer.Option(False, help="Clone HEAD into a new folder and run make reproduce there."),
         output: Path = typer.Option(RESULT, help="Where the table goes (besides stdout).")):
    if fresh_clone == (project is not None):
        raise typer.BadParameter("give either --project DIR (a finished run) or --fresh-clone")
    wall = None
    if fresh_clone:
        project = Path(tempfile.mkdtemp(prefix="rmt-reproduce-")) / "rmt"
        print(f"Running make reproduce in {project}", file=sys.stderr)
        wall = fresh_clone_run(project)
    rows = job_timings(project)
    if not rows:
        raise typer.BadParameter(f"{project / TIMINGS} holds no benchmark files: run the workflow there first")
    text = f"# make reproduce, per job\n\nProject: {project}; load average at the end: " \
           f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.\n\n" + table(rows, wall=wall)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"written {output}", file=sys.stderr)


if __name__ == "__main__":
    typer.run(main)
