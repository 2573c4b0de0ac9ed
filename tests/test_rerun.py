"""A finished grid rerun after a change retrains what the change reaches, with no manual step, and
each run records what produced its new numbers: the iterations changed, a protocol key changed,
the data swapped the documented way, the training code changed. End to end: the grid runner and
DVC in a temporary copy of the project, on small generated tarballs."""

import json
import os
import re
import time

import pandas as pd
import pytest
import yaml

from conftest import make_tarball
from replicate import data as cifar
from replicate import pipeline
from test_repro import ENV, copy_project, dvc, set_params
from test_repro import grid as repro_grid

pytestmark = pytest.mark.slow
RUNS = ["plain-8-0", "resnet-8-0"]


def grid(project):
    """test_repro's grid run, with the copy's own package first on the path: the notebooks' kernels
    must run the code the test edits, not the checkout's."""
    path = f"{project}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return repro_grid(cwd=project, env={**ENV, "PYTHONPATH": path})


def made_by(project, name: str) -> dict:
    return json.loads((project / "results" / name / "run.json").read_text())["made_by"]


def edit_train(project, **values) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def rerun(project, changed: str) -> dict:
    """The grid again: every run retrained from iteration 0, its stale checkpoint moved aside with
    `changed` in its name and said so in its log. Returns what made each run now."""
    start = time.perf_counter()
    done = grid(project)
    print(f"\nrerun after a change of {changed}: {time.perf_counter() - start:.1f} s")
    assert "2 to train" in done.stdout
    for name in RUNS:
        folder = project / "results" / name
        log = (folder / "train.log").read_text().split("\n=== ")[-1]  # this rerun's part of the log
        assert re.search(rf"was made otherwise \([^)]*\): moved aside to stale-checkpoint-\S*changed-\S*{changed}", log)
        assert "training from iteration 0" in log and "resuming from" not in log
        assert len(list(folder.glob(f"stale-checkpoint-*changed-*{changed}*.pt"))) == 1
    return {name: made_by(project, name) for name in RUNS}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tarball = make_tarball(tmp_path_factory.mktemp("tarball") / cifar.TARBALL, cifar.synthetic(320, 80, seed=5))
    project = copy_project(tmp_path_factory.mktemp("project"))
    pipeline.import_data(str(tarball), project / "data.dvc")
    set_params(project, cifar.md5sum(tarball), RUNS)
    grid(project)
    return project


def test_each_change_retrains_and_records_what_made_the_run(project, tmp_path):
    before = {name: made_by(project, name) for name in RUNS}

    edit_train(project, iterations=15, milestones=[10])  # the quick.train.iterations 40 -> 35
    now = rerun(project, "iterations")
    for name in RUNS:
        assert now[name]["config"]["iterations"] == 15 and now[name]["data"] == before[name]["data"]
        assert pd.read_csv(project / "results" / name / "history.csv").iteration.max() == 15

    edit_train(project, lr=0.05)  # a protocol key: docs/quick-look.md's bn_batch_size is one too
    now = rerun(project, "lr")
    assert all(now[name]["config"]["lr"] == 0.05 for name in RUNS)

    other = make_tarball(tmp_path / cifar.TARBALL, cifar.synthetic(300, 70, seed=6))  # the data swapped
    pipeline.import_data(str(other), project / "data.dvc")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["md5"] = cifar.md5sum(other)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    now = rerun(project, "data")
    for name in RUNS:
        ran = json.loads((project / "results" / name / "run.json").read_text())
        assert ran["test_images"] == 70 and now[name]["data"] != before[name]["data"]

    with open(project / "replicate" / "models.py", "a") as f:  # a fix in the training code
        f.write("# a fix\n")
    now = rerun(project, "code")
    assert all(now[name]["code"] != before[name]["code"] for name in RUNS)

    again = grid(project)  # nothing changed since: nothing retrains
    assert "2 up to date, 0 to train" in again.stdout


def test_dvc_metrics_show_gives_the_metrics_of_each_run_only(project):
    shown = dvc("metrics", "show", "--json", cwd=project).stdout
    files = next(iter(json.loads(shown).values()))["data"]
    for name in RUNS:
        metrics = files[f"results/{name}/metrics.json"]["data"]
        assert set(metrics) == {"train_error", "test_error", "diverged", "seconds"}
    print("\n" + dvc("metrics", "show", cwd=project).stdout)
