"""The DVC pipeline end to end, in temporary copies of the project, on a small generated tarball:
`dvc repro` of a 2x2 grid, a second `dvc repro` that does nothing, a stage killed and resumed, and
`make repro` without the data, with a wrong copy, with a right copy, and with a bad grid."""

import json
import os
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

ROOT = Path(__file__).resolve().parents[1]
# One torch thread per process: the stages share a small CPU with each other and with other work,
# and OpenMP threads that spin-wait for a busy core make every run several times slower.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "OMP_NUM_THREADS": "1"}
TINY = dict(iterations=20, milestones=[10, 15], batch_size=16, log_every=5, eval_every=10,
            checkpoint_every=5, device="cpu", compile=False)

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


def set_params(project: Path, md5: str, grid: dict, **train) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["md5"] = md5
    params["train"].update(TINY, **train)
    params["grid"] = grid
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run(*cmd, cwd, check=True):
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def dvc(*args, cwd, check=True):
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    return make_tarball(tmp_path_factory.mktemp("tarball") / cifar.TARBALL, cifar.synthetic(320, 80, seed=5))


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory, tarball):
    """A copy of the project whose data.dvc imports the small tarball from a local path, with tiny
    params for a 2x2 grid, after one `dvc repro` (timed)."""
    project = copy_project(tmp_path_factory.mktemp("project"))
    pipeline.import_data(str(tarball), project / "data.dvc")
    set_params(project, cifar.md5sum(tarball), {"archs": ["plain", "resnet"], "depths": [8, 20], "seeds": [0]})
    start = time.perf_counter()
    first = dvc("repro", cwd=project)
    print(f"\nfirst dvc repro of the 2x2 grid: {time.perf_counter() - start:.1f} s")
    return project, first


def test_repro_trains_every_run_of_the_grid(grid_project):
    project, first = grid_project
    for name in ("plain-8-0", "plain-20-0", "resnet-8-0", "resnet-20-0"):
        assert f"Running stage 'train@{name}'" in first.stdout
        out = project / "results" / name
        metrics = json.loads((out / "metrics.json").read_text())
        arch, depth, seed = name.split("-")
        assert (metrics["arch"], metrics["depth"], metrics["seed"]) == (arch, int(depth), int(seed))
        assert (metrics["iterations"], metrics["diverged"], metrics["device"]) == (20, False, "cpu")
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
        assert not [o for c in executed["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    # papermill read the tarball's own md5 from params: prepare checked it against that
    assert (project / "data" / cifar.FOLDER / "test_batch").is_file()


def test_second_repro_does_nothing(grid_project):
    project, _ = grid_project
    again = dvc("repro", cwd=project)
    assert "Running stage" not in again.stdout, again.stdout
    assert "Data and pipelines are up to date." in dvc("status", cwd=project).stdout


def test_plots_and_metrics_show(grid_project):
    project, _ = grid_project
    shown = json.loads(dvc("plots", "show", "--json", cwd=project).stdout)["data"]
    # the top-level plots name the default grid: of this grid's runs, they find plain-20 and resnet-20
    for family, run in (("plain nets", "plain-20-0"), ("residual nets", "resnet-20-0")):
        for kind, column in (("training", "train_error"), ("test", "test_error")):
            values = shown[f"{family}, {kind} error (%)"][0]["content"]["data"]["values"]
            assert {v["filename"] for v in values} == {f"{run}/history.csv"}
            assert [float(v[column]) for v in values if v[column]] == pytest.approx(
                pd.read_csv(project / "results" / run / "history.csv")[column].dropna().tolist())
    metrics = dvc("metrics", "show", "--json", cwd=project).stdout
    assert all(f"results/{n}/metrics.json" in metrics for n in ("plain-8-0", "resnet-20-0"))


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL dvc and everything under it, the notebook's kernel too (it runs in its own session)."""
    tree = psutil.Process(process.pid)
    for p in [*tree.children(recursive=True), tree]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def test_killed_stage_resumes_and_ends_identical(grid_project):
    project, _ = grid_project
    out = project / "results" / "resnet-8-0"
    reference = {k: v.clone() for k, v in torch.load(out / "model.pt").items()}
    ref_metrics = json.loads((out / "metrics.json").read_text())
    ref_history = pd.read_csv(out / "history.csv")

    (out / "checkpoint.pt").unlink()  # the stage's persisted output: now it has to train again
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@resnet-8-0"], cwd=project, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before its first checkpoint"
        time.sleep(0.02)
    kill_tree(proc)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    saved = checkpoint["state"]["iteration"]
    assert 0 < saved < 20, f"not interrupted mid-run (checkpoint at iteration {saved})"
    assert not (out / "metrics.json").exists()
    # Mark the checkpoint: training time adds up across resumes, so the final metrics show whether
    # the rerun started from it (a run from scratch would end with the same weights).
    checkpoint["state"]["seconds"] = 1e6
    torch.save(checkpoint, out / "checkpoint.pt")

    resumed = dvc("repro", "train@resnet-8-0", cwd=project)
    assert "Running stage 'train@resnet-8-0'" in resumed.stdout
    weights = torch.load(out / "model.pt")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seconds"] > 1e6, "the stage did not resume from the checkpoint"
    assert {k: v for k, v in metrics.items() if k != "seconds"} == {k: v for k, v in ref_metrics.items() if k != "seconds"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "history.csv"), ref_history)


# --- make repro on a machine without the data ---------------------------------------------------


def make_repro(project: Path):
    """`make repro` with this environment: -o keeps make from reinstalling it."""
    venv = Path(sys.prefix)
    return run("make", "-o", f"{venv}/.installed", f"VENV={venv}", "repro", cwd=project, check=False)


def test_make_repro_offline(tmp_path, tarball):
    project = copy_project(tmp_path)
    pin = project / "data.dvc"
    pin.write_text(pin.read_text().replace(cifar.URL, "http://127.0.0.1:9/cifar-10-python.tar.gz"))
    pipeline.restamp(pin)
    md5 = cifar.md5sum(tarball)
    pin.write_text(pin.read_text().replace(cifar.MD5, md5))
    pipeline.restamp(pin)
    set_params(project, md5, {"archs": ["resnet"], "depths": [8], "seeds": [0]}, iterations=10,
               milestones=[5])
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
    assert json.loads((project / "results" / "resnet-8-0" / "metrics.json").read_text())["iterations"] == 10
    assert pin.read_text() == pinned

    # `dvc repro` without make: stage `prepare` itself refuses a tarball without the pinned md5
    set_params(project, "0" * 32, {"archs": ["resnet"], "depths": [8], "seeds": [0]}, iterations=10,
               milestones=[5])
    refused = dvc("repro", "prepare", cwd=project, check=False)
    assert refused.returncode != 0 and f"has md5 {md5}, expected {'0' * 32}" in refused.stderr
    assert not extracted.exists()

    # an unknown arch or depth: a clear error from stage `check`, before any run trains
    set_params(project, md5, {"archs": ["resnet", "resnext"], "depths": [8, 9], "seeds": [0]})
    bad = make_repro(project)
    assert bad.returncode != 0
    assert "nothing was trained" in bad.stderr and "train@resnext-9-0" in bad.stderr
    assert "Running stage 'train@" not in bad.stdout
    assert sorted(p.name for p in (project / "results").iterdir() if p.is_dir()) == ["resnet-8-0"]


# --- the grid in parallel: docs/pipeline.md's recipe, on stages that only record their GPU ------


def test_queue_one_gpu_per_worker_then_collect(tmp_path):
    """Queued experiments, workers spawned one by one with their own CUDA_VISIBLE_DEVICES, then
    `collect`: every run lands in the workspace and dvc.lock, and `dvc repro` has nothing to do."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"iterations": 3},
                                                          "grid": {"archs": ["plain", "resnet"], "depths": [20, 56]}}))
    (tmp_path / "run.sh").write_text('mkdir -p results/$1 && sleep 3 && echo "gpu=$CUDA_VISIBLE_DEVICES" > results/$1/gpu.txt'
                                     ' && touch results/$1/checkpoint.pt\n')
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "matrix": {"arch": "${grid.archs}", "depth": "${grid.depths}"},
        "cmd": "sh run.sh ${key}", "params": ["train"], "deps": ["run.sh"],
        "outs": ["results/${key}/gpu.txt", {"results/${key}/checkpoint.pt": {"persist": True}}]}}}))
    (tmp_path / ".gitignore").write_text("/results/\n")
    run("git", "init", "-q", cwd=tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    run("git", "add", "-A", cwd=tmp_path)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "grid", cwd=tmp_path)
    stages = [s for s in dvc("stage", "list", "--name-only", cwd=tmp_path).stdout.split() if s.startswith("train@")]
    for stage in stages:
        dvc("exp", "run", "--queue", stage, "--name", stage.replace("@", "-"), cwd=tmp_path)
    try:
        for gpu in (0, 1):  # not captured: the worker would hold the pipe open until it exits
            subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(gpu + 1)], cwd=tmp_path,
                           env={**ENV, "CUDA_VISIBLE_DEVICES": str(gpu)}, stdout=subprocess.DEVNULL, check=True)
        deadline = time.monotonic() + 240
        while dvc("queue", "status", cwd=tmp_path).stdout.count("Success") < len(stages):
            status = dvc("queue", "status", cwd=tmp_path).stdout
            assert "Failed" not in status and time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        dvc("queue", "stop", cwd=tmp_path, check=False)
    done = run(sys.executable, "-m", "replicate.pipeline", "collect", cwd=tmp_path)
    assert all(s in done.stdout for s in stages)
    gpus = [(tmp_path / "results" / s.split("@")[1] / "gpu.txt").read_text().strip() for s in stages]
    assert set(gpus) == {"gpu=0", "gpu=1"}, gpus  # two workers, each with its own GPU
    assert "Running stage" not in dvc("repro", cwd=tmp_path).stdout
