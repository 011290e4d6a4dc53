"""The project's own promises: pinned dependencies in step, the commands the README names."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def pip_pins(requirements) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", requirement.strip())
        assert match, f"{requirement!r} is not pinned with =="
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_environment_yml_has_the_same_pins_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pip_pins(project["optional-dependencies"]["pipeline"] + project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    listed = pip_pins([line for line in pip_section if not line.startswith("-e")])
    assert listed == declared
    assert "-e ." in pip_section
    assert declared["torch"] == "2.13.0"


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, pinned in pip_pins(project["optional-dependencies"]["pipeline"]
                                 + project["optional-dependencies"]["dev"]).items():
        assert version(name).split("+")[0] == pinned, name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make reproduce" in readme
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: ", makefile, flags=re.MULTILINE)
    assert re.search(r"^reproduce: ", makefile, flags=re.MULTILINE)


def test_the_slurm_profile_examples_pass_the_plugins_own_validation():
    """Every resource the example SLURM profile shows, uncommented, is one the pinned plugin
    accepts: its own check of slurm_extra, and the names of the resources it turns into
    sbatch flags."""
    import types

    import snakemake_executor_plugin_slurm as plugin
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    text = (ROOT / "profiles" / "slurm" / "config.yaml").read_text()
    # The commented examples of default-resources ("  # qos: normal"), uncommented.
    lines = [re.sub(r"^  # (?=[a-z_]+: )", "  ", line) for line in text.splitlines()]
    resources = yaml.safe_load("\n".join(lines))["default-resources"]
    assert {"qos", "constraint", "slurm_extra", "slurm_account"} <= set(resources), resources
    validate_slurm_extra(types.SimpleNamespace(resources=types.SimpleNamespace(**resources)))
    known = "".join(path.read_text() for path in Path(plugin.__file__).parent.glob("*.py"))
    for name in resources:
        assert f'"{name}"' in known, f"the plugin does not read the resource {name}"


def test_the_library_needs_only_torch_transformers_and_safetensors():
    """`pip install rmt` is the model library; the pipeline pins are the `pipeline` extra,
    which keeps every library requirement within its range."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    library = {Requirement(entry).name: Requirement(entry).specifier for entry in project["dependencies"]}
    assert sorted(library) == ["safetensors", "torch", "transformers"]
    pins = pip_pins(project["optional-dependencies"]["pipeline"])
    assert all(specifier.contains(pins[name]) for name, specifier in library.items())
    modules = subprocess.run([sys.executable, "-c", "import sys, rmt.model.encoder, rmt.model.decoder; "
                              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
                             capture_output=True, text=True, check=True).stdout.split()
    for pipeline_only in ("typer", "mlflow", "snakemake", "dvc", "pydantic", "pandas", "jsonschema", "matplotlib", "psutil"):
        assert pipeline_only not in modules, pipeline_only


def test_the_gpu_profiles_resources_are_the_plugins_or_snakemakes():
    """profiles/gpu's per-rule resources are ones the pinned SLURM plugin turns into sbatch
    flags (partition, GPUs, CPUs per GPU ...) or Snakemake's own (memory, run time)."""
    import snakemake_executor_plugin_slurm as plugin

    known = "".join(path.read_text() for path in Path(plugin.__file__).parent.glob("*.py"))
    snakemakes = {"mem_mb", "runtime", "disk_mb", "threads"}
    rules = yaml.safe_load((ROOT / "profiles" / "gpu" / "config.yaml").read_text())["set-resources"]
    names = {name for resources in rules.values() for name in resources}
    assert {"slurm_partition", "gpu", "cpus_per_gpu"} <= names
    for name in names - snakemakes:
        assert f'"{name}"' in known, f"the plugin does not read the resource {name}"


def test_every_workflow_profile_runs_locally():
    """A workflow profile given with --workflow-profile replaces profiles/default whole, so
    each names the cores: without them a local run stops before its first job."""
    for profile in ("default", "gpu"):
        assert yaml.safe_load((ROOT / "profiles" / profile / "config.yaml").read_text())["cores"] == "all", profile
