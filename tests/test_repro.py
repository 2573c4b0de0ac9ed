"""The pipeline end to end, in temporary copies of the project, on a small generated tarball:
`make repro`'s grid runner (replicate.grid) on a 2x2 grid two at a time, a second run that trains
nothing, `make quick`'s profile apart from the paper's, a failing run that does not stop the others,
the whole process tree killed with SIGKILL and resumed to identical weights, and `make repro`
without the data, with a wrong copy, with a right copy, and with a bad grid."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from conftest import make_tarball
from replicate import data as cifar
from replicate import pipeline
from replicate.outputs import read as read_outputs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
TINY = dict(iterations=20, milestones=[10, 15], batch_size=16, log_every=5, eval_every=10,
            checkpoint_every=5, device="cpu", compile=False)
GRID = ["plain-8-0", "resnet-8-0", "plain-20-0", "resnet-20-0"]
QUICK = ["plain-8-0", "resnet-8-0"]
GRID2016 = ["preact-8-0", "preactbottleneck-11-0", "preactbottleneck-11-0-cifar100"]  # basic, bottleneck; CIFAR-100
QUICK2016 = ["resnet-8-0", "scaling05x05-8-0"]

pytestmark = pytest.mark.slow


def copy_project(dst: Path) -> Path:
    """The files a clone would have (tracked, or new and not ignored), but no dvc.lock: a fresh start."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in listed:
        if rel and rel != "dvc.lock" and (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def set_params(project: Path, md5: str, grid: list[str], quick: list[str] = QUICK, md5_100: str | None = None,
               **train) -> None:
    """Tiny params for `grid` and `quick`; dvc.yaml's report deps follow, as the README says to."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["md5"] = md5
    if md5_100:
        params["data"]["cifar100"]["md5"] = md5_100
    params["train"].update(TINY, **train)
    params["grid"] = grid
    params["quick"] = {"grid": quick, "train": {"iterations": 12, "milestones": [6, 9], "lr_ramp": 2, "log_every": 3,
                                                "eval_every": 6, "eval_subset": 20, "checkpoint_every": 3}}
    params["he2016"]["train"]["warmup_iterations"] = 5  # the sequel's fixed warm-up, in a 20-iteration run
    params["he2016"]["grid"] = GRID2016
    params["he2016"]["quick"]["grid"] = QUICK2016
    params["he2016"]["quick"]["train"].update(params["quick"]["train"])  # its keys: dvc.yaml declares them
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    for (paper, name), runs in ((("2015", "paper"), grid), (("2015", "quick"), quick), (("2016", "paper"), GRID2016),
                                (("2016", "quick"), QUICK2016)):
        profile = pipeline.profile_of(paper, name)
        stage = stages["stages"][profile.report_stage]
        stage["deps"] = [d for d in stage["deps"] if not d.endswith("metrics.json")] + [
            f"{profile.results}/{r}/metrics.json" for r in runs]
    (project / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))


def run(*cmd, cwd, check=True, env=ENV):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def dvc(*args, cwd, check=True):
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def grid(*args, cwd, check=True, env=ENV):
    """What `make repro JOBS=2` runs after fetching."""
    return run(sys.executable, "-m", "replicate.grid", "--jobs", "2", "--every", "2", *args, cwd=cwd, check=check,
               env=env)


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    return make_tarball(tmp_path_factory.mktemp("tarball") / cifar.TARBALL, cifar.synthetic(320, 80, seed=5))


@pytest.fixture(scope="module")
def tarball100(tmp_path_factory):
    return make_tarball(tmp_path_factory.mktemp("tarball100") / "cifar-100-python.tar.gz",
                        cifar.synthetic(320, 100, seed=6, classes=100), "cifar100")


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory, tarball, tarball100):
    """A copy of the project whose data.dvc (data-cifar100.dvc) imports the small tarball from a local
    path, with tiny params for a 2x2 grid, after one run of the grid runner, two at a time (timed)."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    pipeline.import_data(str(tarball), project / "data.dvc")
    pipeline.import_data(str(tarball100), project / "data-cifar100.dvc", "cifar100")
    set_params(project, cifar.md5sum(tarball), GRID, md5_100=cifar.md5sum(tarball100))
    start = time.perf_counter()
    first = grid(cwd=project)
    print(f"\nfirst grid run of the 2x2 grid, 2 at a time: {time.perf_counter() - start:.1f} s")
    return project, first


def test_grid_trains_every_run_two_at_a_time_then_the_report(grid_project):
    project, first = grid_project
    assert "4 runs of `make repro`: 0 up to date, 4 to train (2 at a time: OMP_NUM_THREADS=" in first.stdout
    for name in GRID:
        out = project / "results" / name
        metrics = read_outputs(out)
        arch, depth, seed = name.split("-")
        assert (metrics["arch"], metrics["depth"], metrics["seed"]) == (arch, int(depth), int(seed))
        assert (metrics["iterations"], metrics["diverged"], metrics["device"]) == (20, False, "cpu")
        # where it ran: its slot's share of the cores
        assert metrics["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert 0 <= metrics["test_error"] <= 100 and metrics["params"] > 0 and metrics["seconds"] > 0
        assert metrics["config"]["batch_size"] == 16 and metrics["config"]["milestones"] == [10, 15]
        history = pd.read_csv(out / "history.csv")
        assert list(history.columns[:5]) == ["iteration", "lr", "train_loss", "train_error", "test_error"]
        assert history["iteration"].tolist() == [5, 10, 15, 20]
        assert history["test_error"].notna().tolist() == [False, True, False, True]
        assert history["lr"].round(6).tolist() == [0.1, 0.1, 0.01, 0.001]
        assert len(pd.read_csv(out / "responses.csv")) == int(depth) - 1  # one per 3x3 conv layer
        assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
        executed = json.loads((out / "train.ipynb").read_text())
        assert not executed["metadata"]["papermill"]["exception"]
        # the run's whole output is in its log, next to its results, and not on the terminal
        log = (out / "train.log").read_text()
        assert f"dvc --wait-for-lock repro -s train@{name}" in log and f"Running stage 'train@{name}'" in log
        assert f"Running stage 'train@{name}'" not in first.stdout
    # two at a time, the deepest first
    events = [line.split("] ", 1)[1].split()[:2] for line in first.stdout.splitlines()
              if line.startswith("[grid") and ("running  " in line or "done     " in line)]
    assert events[:3] == [["running", "plain-20-0"], ["running", "resnet-20-0"], ["done", events[2][1]]], events
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {f"train@{n}" for n in GRID} | {"prepare", "check", "report"} <= set(lock)
    assert not any(s.startswith("quick") for s in lock)
    table = pd.read_csv(project / "reports" / "table6.csv")
    assert sorted(table.dropna(subset=["iterations"]).net) == ["ResNet-20", "ResNet-8", "plain-20", "plain-8"]
    assert "4/4 done" in first.stdout and "report in reports/" in first.stdout
    # nothing left to do: `dvc status` of the report and its upstream is clean
    assert "Data and pipelines are up to date." in dvc("status", "--with-deps", "report", cwd=project).stdout


def test_second_grid_run_trains_nothing(grid_project):
    project, _ = grid_project
    logs = {n: (project / "results" / n / "train.log").read_text() for n in GRID}
    again = grid(cwd=project)
    assert "4 up to date, 0 to train\n" in again.stdout  # no "(0 at a time: )"
    assert "Running stage 'train@" not in again.stdout and "running  " not in again.stdout
    assert {n: (project / "results" / n / "train.log").read_text() for n in GRID} == logs


def test_a_key_that_changes_no_result_reruns_nothing(grid_project):
    """Each stage declares the params keys it reads, and checkpoint_every cannot change a result
    (resume is exact): on a finished grid, changing it leaves every stage up to date; changing
    eval_every does not."""
    project, _ = grid_project
    path = project / "params.yaml"
    before = path.read_text()
    params = yaml.safe_load(before)
    try:
        params["train"]["checkpoint_every"] = 7
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        status = dvc("status", "--with-deps", "report", cwd=project).stdout
        print(f"\n`dvc status --with-deps report` after train.checkpoint_every: 5 -> 7:\n{status}")
        assert "Data and pipelines are up to date." in status
        params["train"]["eval_every"] = 5
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        status = dvc("status", "--with-deps", "report", cwd=project).stdout
        assert all(f"train@{name}" in status for name in GRID) and "train.eval_every" in status
    finally:
        path.write_text(before)


def test_quick_profile_keeps_its_runs_and_report_apart(grid_project):
    project, _ = grid_project
    paper_table = (project / "reports" / "table6.csv").read_bytes()
    done = make(project, "quick", "JOBS=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 runs of `make quick`: 0 up to date, 2 to train" in done.stdout
    for name in QUICK:
        metrics = read_outputs(project / "results" / "quick" / name)
        assert metrics["iterations"] == 12 and metrics["config"]["milestones"] == [6, 9]
        paper_run = read_outputs(project / "results" / name)
        assert metrics["config"]["lr_ramp"] == 2 and paper_run["config"]["lr_ramp"] == 0  # quick.train's, not train's
        history = pd.read_csv(project / "results" / "quick" / name / "history.csv")
        assert history["test_error"].notna().tolist() == [False, True, False, True]
        # the paper's run of the same name is untouched
        assert paper_run["iterations"] == 20
    for f in ("report.ipynb", "table6.csv", "table6.md", "table6.json", "fig1.png", "fig6.png", "fig7.png", "verdicts.md"):
        assert (project / "reports" / "quick" / f).is_file(), f
    quick_md = (project / "reports" / "quick" / "table6.md").read_text()
    assert "Quick look, not the paper's protocol: 12 iterations" in quick_md and "first 20 test images" in quick_md
    assert "linear ramp over the first 2 iterations" in quick_md
    assert "2 runs on 320 training and 80 test images" in quick_md
    quick_table = pd.read_csv(project / "reports" / "quick" / "table6.csv")
    assert sorted(quick_table.dropna(subset=["iterations"]).iterations.unique()) == [12]
    # the paper's report: same bytes, and no quick run in it
    assert (project / "reports" / "table6.csv").read_bytes() == paper_table
    assert "Data and pipelines are up to date." in dvc("status", "--with-deps", "report", "quick-report",
                                                       cwd=project).stdout


def test_the_sequels_quick_look_and_grid_keep_apart_from_2015s(grid_project):
    """`make quick PAPER=2016` and `make repro PAPER=2016`: the sequel's runs, protocol and report
    in their own places; the 2015 runs and reports untouched."""
    project, _ = grid_project
    before = {p: p.read_bytes() for p in sorted((project / "results").glob("*/metrics.json"))}
    done = make(project, "quick", "PAPER=2016", "JOBS=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 runs of `make quick PAPER=2016`: 0 up to date, 2 to train" in done.stdout
    for name in QUICK2016:
        metrics = read_outputs(project / "results" / "2016" / "quick" / name)
        assert metrics["iterations"] == 12 and metrics["config"]["lr_ramp"] == 2 and metrics["warmup"] is False
    quick_md = (project / "reports" / "2016" / "quick" / "tables.md").read_text()
    assert "resnet-8" in quick_md and "scaling05x05-8" in quick_md and "Quick look, not the paper's protocol" in quick_md
    verdicts = (project / "reports" / "2016" / "quick" / "verdicts.md").read_text()
    assert "not tested by the quick look (it does not run bnafter-8)" in verdicts  # QUICK2016 has none
    assert "training error, 8 layers: " in verdicts  # the identity shortcut against scaling: tested
    assert (project / "reports" / "2016" / "quick" / "quick.png").is_file()

    assert not (project / "data" / "cifar-100-python").exists()  # the quick look prepares no CIFAR-100
    done = make(project, "repro", "PAPER=2016", "JOBS=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dvc repro prepare prepare-cifar100 check" in done.stdout
    c100 = read_outputs(project / "results" / "2016" / "preactbottleneck-11-0-cifar100")
    assert (c100["dataset"], c100["test_images"], c100["params"]) == ("cifar100", 100, read_outputs(
        project / "results" / "2016" / "preactbottleneck-11-0")["params"] + 257 * 90)  # fc: 256 inputs and a bias to 100 classes, not 10
    for name in GRID2016:
        out = project / "results" / "2016" / name
        metrics = read_outputs(out)
        assert (metrics["warmup"], metrics["warmup_ended_at"], metrics["iterations"]) == (True, 5, 20)
        assert metrics["shortcut"] == ("B" if "bottleneck" in name else "A")
        # lr 0.01 for the first 5 iterations, then 0.1: the interval ending at 5 was all warm-up
        assert pd.read_csv(out / "history.csv")["lr"].round(6).tolist() == [0.01, 0.1, 0.01, 0.001]
    tables = pd.read_csv(project / "reports" / "2016" / "tables.csv")
    others = tables[tables.table == "Other runs"]  # no net of the tiny grid is at a depth of Tables 1-3
    assert sorted(others.net) == ["preact-8", "preactbottleneck-11", "preactbottleneck-11-cifar100"]
    assert others["median"].notna().all() and others.set_index("net").data["preactbottleneck-11-cifar100"] == "CIFAR-100"
    assert (tables[tables.table != "Other runs"].ours == "missing").all()
    for f in ("report.ipynb", "tables.md", "fig1.png", "fig3.png", "fig6.png", "verdicts.md"):
        assert (project / "reports" / "2016" / f).is_file(), f
    assert {p: p.read_bytes() for p in sorted((project / "results").glob("*/metrics.json"))} == before
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {f"train2016@{n}" for n in GRID2016} | {f"quick2016@{n}" for n in QUICK2016} <= set(lock)
    assert "Data and pipelines are up to date." in dvc("status", "--with-deps", "report", "report2016",
                                                       "quick2016-report", cwd=project).stdout
    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)  # the sequel's runs, a row each
    rows = next(iter(shown.values()))["data"]
    for name in GRID2016:
        assert rows[f"results/2016/{name}/metrics.json"]["data"]["test_error"] == read_outputs(
            project / "results" / "2016" / name)["test_error"]


def test_a_failing_run_does_not_stop_the_others_and_no_report_is_built(grid_project):
    project, _ = grid_project
    broken, other = project / "results" / "plain-20-0", project / "results" / "resnet-8-0"
    saved = {p: p.read_bytes() for p in (broken / "checkpoint.pt", other / "checkpoint.pt")}
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")  # its stage now fails when it loads it
    (broken / "model.pt").unlink()
    (other / "model.pt").unlink()  # so this one trains again too
    (project / "reports" / "table6.md").unlink()
    failed = grid(cwd=project, check=False)
    assert failed.returncode != 0
    assert "failed   plain-20-0" in failed.stdout and "done     resnet-8-0" in failed.stdout
    # DVC's own exit code for a failed stage (255 with DVC 3.67), not the notebook's
    assert re.search(rf"FAILED plain-20-0: exit [1-9]\d*; its log: {re.escape(str(Path('results/plain-20-0/train.log')))}",
                     failed.stderr), failed.stderr
    assert "1 of 4 runs failed, so the report (report) was not built" in failed.stderr
    assert not (project / "reports" / "table6.md").exists()
    assert "Error" in (broken / "train.log").read_text()
    (broken / "checkpoint.pt").write_bytes(saved[broken / "checkpoint.pt"])
    mended = grid(cwd=project)
    assert "3 up to date, 1 to train" in mended.stdout and (project / "reports" / "table6.md").is_file()


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL dvc and everything under it, the notebook's kernel too (it runs in its own session)."""
    tree = psutil.Process(process.pid)
    for p in [*tree.children(recursive=True), tree]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


# sitecustomize.py for the run killed mid-way: in a process where HELD_ENV names a file, the first
# checkpoint replicate.train saves is followed by that file and then a wait until the kill. The
# kill lands at a known iteration (the first checkpoint's) whatever the machine's speed.
HELD_ENV = "REPLICATE_TEST_HOLD_AFTER_CHECKPOINT"
HOLD_AFTER_CHECKPOINT = f"""import os, sys, time
held = os.environ.get({HELD_ENV!r})
if held:
    import importlib.abc, importlib.util

    class Hold(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "replicate.train":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                save = module.save

                def save_then_hold(*args):
                    save(*args)
                    open(held, "w").close()
                    while True:
                        time.sleep(1)
                module.save = save_then_hold
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, Hold())
"""


def test_grid_killed_with_sigkill_resumes_and_ends_identical(grid_project, tmp_path):
    """kill -9 of the grid runner's whole process tree (DVC, papermill, kernels) mid-run, then the
    same command again: no hand clears a lock, the interrupted run resumes from its checkpoint to
    the same weights as an uninterrupted one, and the finished runs are not trained again."""
    project, _ = grid_project
    out = project / "results" / "resnet-8-0"
    reference = {k: v.clone() for k, v in torch.load(out / "model.pt").items()}
    ref_metrics = read_outputs(out)
    ref_history = pd.read_csv(out / "history.csv")

    (out / "checkpoint.pt").unlink()  # the stage's persisted output: now it has to train again
    hook, held = tmp_path / "hook", tmp_path / "held"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_AFTER_CHECKPOINT)
    path = os.pathsep.join(p for p in (str(hook), ENV.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "replicate.grid", "--jobs", "2"], cwd=project,
                            env={**ENV, "PYTHONPATH": path, HELD_ENV: str(held)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not held.exists():  # the run has saved its first checkpoint, and waits
        assert proc.poll() is None, "the grid ended before the run's first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.05)
    kill_tree(proc)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    saved = checkpoint["state"]["iteration"]
    assert 0 < saved < 20 and saved == TINY["checkpoint_every"], f"not interrupted mid-run (checkpoint at iteration {saved})"
    assert not (out / "metrics.json").exists()
    # Mark the checkpoint: training time adds up across resumes, so the final metrics show whether
    # the rerun started from it (a run from scratch would end with the same weights).
    checkpoint["state"]["seconds"] = 1e6
    torch.save(checkpoint, out / "checkpoint.pt")

    resumed = grid(cwd=project)
    assert "3 up to date, 1 to train" in resumed.stdout and "done     resnet-8-0" in resumed.stdout
    assert resumed.stdout.count("running  ") == 1
    weights = torch.load(out / "model.pt")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    metrics = read_outputs(out)
    assert metrics["seconds"] > 1e6, "the stage did not resume from the checkpoint"
    assert {k: v for k, v in metrics.items() if k != "seconds"} == {k: v for k, v in ref_metrics.items() if k != "seconds"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv"), ref_history)
    assert (out / "train.log").read_text().count("=== ") >= 3  # every attempt's output kept


# --- make repro on a machine without the data ---------------------------------------------------


def make(project: Path, *targets: str):
    """`make TARGET...` with this environment: -o keeps make from reinstalling it."""
    venv = Path(sys.prefix)
    return run("make", "-o", f"{venv}/.installed", f"VENV={venv}", *targets, cwd=project, check=False)


def make_repro(project: Path):
    return make(project, "repro")


def test_make_repro_offline(tmp_path, tarball):
    project = copy_project(tmp_path)
    pin = project / "data.dvc"
    pin.write_text(pin.read_text().replace(cifar.URL, "http://127.0.0.1:9/cifar-10-python.tar.gz"))
    pipeline.restamp(pin)
    md5 = cifar.md5sum(tarball)
    pin.write_text(pin.read_text().replace(cifar.MD5, md5))
    pipeline.restamp(pin)
    set_params(project, md5, ["resnet-8-0"], iterations=10, milestones=[5])
    pinned = pin.read_text()
    target = project / "data" / cifar.TARBALL
    extracted = project / "data" / cifar.FOLDER

    missing = make_repro(project)  # the download fails: say where the tarball goes
    assert missing.returncode != 0
    assert f"Put a copy of the CIFAR-10 python tarball at {target}" in missing.stderr
    assert f"md5 {md5}" in missing.stderr
    assert pin.read_text() == pinned

    target.parent.mkdir(exist_ok=True)
    target.write_bytes(tarball.read_bytes()[:-100])  # truncated
    wrong = make_repro(project)
    assert wrong.returncode != 0 and f"expected {md5}" in wrong.stderr
    assert not extracted.exists() and pin.read_text() == pinned

    shutil.copy(tarball, target)  # a good copy, by hand: used, with no download (there is none)
    good = make_repro(project)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert read_outputs(project / "results" / "resnet-8-0")["iterations"] == 10
    assert pin.read_text() == pinned

    # `dvc repro` without make: stage `prepare` itself refuses a tarball without the pinned md5
    set_params(project, "0" * 32, ["resnet-8-0"], iterations=10, milestones=[5])
    refused = dvc("repro", "prepare", cwd=project, check=False)
    assert refused.returncode != 0 and f"has md5 {md5}, expected {'0' * 32}" in refused.stderr
    assert not extracted.exists()

    # an unknown arch or depth: a clear error from stage `check`, before any run trains
    set_params(project, md5, ["resnet-8-0", "resnext-9-0"])
    bad = make_repro(project)
    assert bad.returncode != 0
    assert "nothing was trained" in bad.stderr and "train@resnext-9-0" in bad.stderr
    assert "Running stage 'train@" not in bad.stdout
    assert sorted(p.name for p in (project / "results").iterdir() if p.is_dir()) == ["resnet-8-0"]
