"""The two ways to install (pip and conda) name the same dependencies, and the entry points
that a new user and CI rely on exist."""

import os
import re
import subprocess
import sys
import tomllib

import pytest

import yaml

from conftest import ROOT

CONDA_TO_PIP = {"pytorch": "torch"}  # conda-forge names that differ from PyPI's
NOT_DEPENDENCIES = {"python", "pip"}


def split_spec(spec: str) -> tuple[str, str]:
    name, version = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", spec).groups()
    return name.lower(), version.replace(" ", "")


def pip_dependencies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]
    return dict(split_spec(s) for s in specs)


def conda_dependencies() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = {}
    for spec in env["dependencies"]:
        if isinstance(spec, str):
            name, version = split_spec(spec.replace("=", "==", 1) if re.search(r"[^<>=!]=[^=]", spec) else spec)
            if name not in NOT_DEPENDENCIES:
                deps[CONDA_TO_PIP.get(name, name)] = version
    return deps


def test_pyproject_and_environment_yml_agree():
    assert conda_dependencies() == pip_dependencies()


def test_the_chosen_dependencies_are_all_declared():
    assert {"torch", "torchvision", "jupyterlab", "papermill", "pandas", "seaborn", "dvc", "pytest",
            "nbval"} <= pip_dependencies().keys()


def test_environment_yml_installs_the_project_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_section


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_how_to_reproduce_names_make_repro_and_make_test():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## How to reproduce", 1)[1].split("\n## ", 1)[0]
    assert "make repro" in quick_start and "make test" in quick_start
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^repro:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


@pytest.mark.parametrize("module, args", [("replicate.pipeline", ["check"]),
                                          ("replicate.data", ["prepare", "data/cifar-10-python.tar.gz", "data"])])
def test_a_python_without_torch_says_to_activate_the_environment(module, args):
    """`dvc repro` with .venv not active: every stage's `python -m replicate...` failed with a bare
    "No module named 'torch'" after DVC had removed the stage's outputs."""
    code = (f"import sys; sys.argv = {[module, *args]!r}; sys.modules['torch'] = None; import runpy; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"error: torch is not installed for {sys.executable}: run DVC from the project's environment "
        "(`source .venv/bin/activate`, made by `make install`), then `dvc repro` again; `dvc checkout` "
        "brings back the outputs a failed stage removed.")


def test_readme_says_how_to_run_dvc_itself():
    readme = (ROOT / "README.md").read_text()
    commands = readme.split("## How to reproduce", 1)[1].split("\n## ", 1)[0]
    assert "dvc repro" in commands and "source .venv/bin/activate" in commands and "dvc checkout" in commands
    assert len(readme.splitlines()) <= 180
