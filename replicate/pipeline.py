"""The DVC pipeline's glue: params.yaml, the grid of runs, and the entry points of its stages.

    python -m replicate.pipeline fetch     # make repro, first step: the tarball, checked
    python -m replicate.pipeline check     # stage `check`: every run of the grid is valid
    python -m replicate.pipeline train --arch resnet --depth 56 --seed 0 --out results/resnet-56-0
    python -m replicate.pipeline collect   # after `dvc queue start -j N`: the runs, into the workspace
    python -m replicate.pipeline import-data SOURCE   # re-pin the tarball (a mirror, a local copy)

params.yaml is read once per command, here, and nothing else reads it: the `train` section holds
the protocol of every run, the `grid` section the runs (archs x depths x seeds, the order of DVC's
matrix), the `data` section the md5 the tarball must have.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import data as cifar
from .train import Config

PARAMS = "params.yaml"
NOTEBOOK = "notebooks/train.ipynb"
DATA_PIN = "data.dvc"
GRID_KEYS = {"archs": "arch", "depths": "depth", "seeds": "seed"}
# What stage `check` writes. The train stages depend on it, so they run after the check; it never
# changes, so widening the grid reruns the check but not the runs that already exist.
CHECKED = "every run of the grid in params.yaml is valid\n"


@dataclass(frozen=True)
class Run:
    """One entry of the grid; `name` is its folder under results/ and DVC's `train@<name>`."""

    arch: str
    depth: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.depth}-{self.seed}"


def load_params(path: str | Path = PARAMS) -> dict:
    """params.yaml as a dict; it must hold the `train` and `grid` sections."""
    params = yaml.safe_load(Path(path).read_text()) or {}
    missing = [s for s in ("train", "grid") if not isinstance(params.get(s), dict)]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} section")
    return params


def runs(params: dict) -> list[Run]:
    """The grid's runs, archs x depths x seeds, in the order DVC's matrix expands them."""
    grid = params["grid"]
    for key in GRID_KEYS:
        values = grid.get(key)
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{key} must be a non-empty list, got {values!r}")
        if len(set(map(str, values))) != len(values):
            raise ValueError(f"grid.{key} lists a value twice: {values}")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"unknown grid key(s) {unknown}; the grid is {sorted(GRID_KEYS)}")
    return [Run(*v) for v in itertools.product(grid["archs"], grid["depths"], grid["seeds"])]


def config(params: dict, run: Run) -> Config:
    """The full training config of one run: the `train` section plus the run's arch, depth, seed."""
    clash = sorted(set(GRID_KEYS.values()) & set(params["train"]))
    if clash:
        raise ValueError(f"train.{clash[0]} belongs in the grid (grid.{clash[0]}s), not in train")
    return Config.from_dict({**params["train"], **dataclasses.asdict(run)})


def check(params: dict, notebook: str | Path | None = NOTEBOOK) -> list[Run]:
    """Validate every run of the grid at once, so a typo fails before any training starts.

    Raises ValueError naming each bad run. With `notebook`, also checks that the notebook takes
    every parameter the stage will pass (a renamed parameter would otherwise be ignored).
    """
    problems = []
    all_runs = runs(params)
    for run in all_runs:
        try:
            config(params, run)
        except (ValueError, TypeError) as e:
            problems.append(f"  train@{run.name}: {e}")
    if problems:
        raise ValueError("params.yaml: invalid run(s) in the grid, nothing was trained:\n" + "\n".join(problems))
    if notebook is not None:
        import papermill

        expected = set(notebook_parameters(params, all_runs[0], "data", "out"))
        missing = sorted(expected - set(papermill.inspect_notebook(str(notebook))))
        if missing:
            raise ValueError(f"{notebook} has no parameter(s) {missing} in its `parameters` cell")
    return all_runs


def notebook_parameters(params: dict, run: Run, data_root: str, out_dir: str) -> dict:
    """What papermill injects into notebooks/train.ipynb for one run: the protocol and paths."""
    return {**dataclasses.asdict(run), **params["train"], "data_root": data_root, "out_dir": out_dir}


def train_stage(run: Run, out: str | Path, params_path: str | Path = PARAMS,
                notebook: str | Path = NOTEBOOK, data_root: str | Path = "data") -> Path:
    """Stage `train@<run>`: execute the notebook with papermill into `out/train.ipynb`.

    The kernel runs in `out`, and the paths it gets are relative to `out`, so the executed
    notebook can be opened and rerun in JupyterLab where it lies. A checkpoint left in `out` by an
    interrupted run is resumed (DVC keeps it: `persist: true`).
    """
    import papermill

    params = load_params(params_path)
    config(params, run)  # a clear error now, not from inside the kernel
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # papermill does not create it
    result = out / "train.ipynb"
    papermill.execute_notebook(
        str(notebook), str(result),
        parameters=notebook_parameters(params, run, os.path.relpath(data_root, out), "."),
        cwd=str(out),
        progress_bar=False,
        # The training bar reaches the terminal as is, carriage returns included ...
        stdout_file=sys.stdout, stderr_file=sys.stderr,
        # ... and the saved notebook keeps its last state, not one output per refresh.
        coalesce_streams=True,
    )
    return result


def fetch(md5: str, dvc_file: str | Path = DATA_PIN) -> Path:
    """Make sure the tarball that `dvc_file` imports is in place, has `md5`, and is in DVC's cache.

    Missing: `dvc update` downloads it; offline, the error says where to put a copy by hand. A copy
    put there by hand is checked and then committed to the cache, because `dvc repro` would
    otherwise try to "verify" the frozen import against its URL, and rewrite the pin to whatever
    file it finds. Nothing here trusts data.dvc's own md5 for the same reason.
    """
    dvc_file = Path(dvc_file)
    pin = yaml.safe_load(dvc_file.read_text())
    url, out = pin["deps"][0]["path"], pin["outs"][0]
    tarball = dvc_file.parent / out["path"]
    by_hand = (
        f"Put a copy of the CIFAR-10 python tarball at {tarball.resolve()} (md5 {md5}, "
        f"{out.get('size', '?')} bytes, from {url}), then run `make repro` again: the copy is "
        "checked and used with no download."
    )
    if not tarball.exists():
        before = dvc_file.read_text()
        done = subprocess.run([sys.executable, "-m", "dvc", "update", str(dvc_file)], cwd=dvc_file.parent)
        if done.returncode != 0 or not tarball.exists():
            dvc_file.write_text(before)
            raise FileNotFoundError(f"could not download {url} (offline?). {by_hand}")
        if cifar.md5sum(tarball) != md5:
            dvc_file.write_text(before)  # dvc update pinned what it got; keep the real pin
    got = cifar.md5sum(tarball)
    if got != md5:
        raise ValueError(f"{tarball} has md5 {got}, expected {md5}: it is corrupt, truncated or "
                         f"not the official tarball. Delete it and run `make repro` again. {by_hand}")
    _commit_to_cache(dvc_file)
    return tarball


def import_data(source: str, dvc_file: str | Path = DATA_PIN) -> Path:
    """Pin the tarball at `source` (a URL, or a plain local path: not file://) as `dvc_file`.

    How data.dvc is made: DVC 3's import-url has no --file, so import into data/, then move the
    .dvc file up beside dvc.yaml with its `outs` path made relative to the new place. The import
    stays frozen: `dvc repro` never downloads, `dvc update data.dvc` does.
    """
    dvc_file = Path(dvc_file)
    root, out = dvc_file.parent, f"data/{cifar.TARBALL}"
    dvc_file.unlink(missing_ok=True)
    (root / "data").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "import-url", "--force", source, out], cwd=root, check=True)
    made = root / f"{out}.dvc"
    stage = yaml.safe_load(made.read_text())
    stage["outs"][0]["path"] = out
    dvc_file.write_text(yaml.safe_dump(stage, sort_keys=False))
    made.unlink()
    restamp(dvc_file)
    return dvc_file


def restamp(dvc_file: str | Path) -> None:
    """Recompute the stage md5 at the top of a hand-edited .dvc file; DVC takes a stale one as a
    changed stage, and would then rerun the frozen import (network) instead of trusting it."""
    from dvc.repo import Repo

    dvc_file = Path(dvc_file).resolve()
    with Repo(str(dvc_file.parent)) as repo:
        stage = repo.stage.load_one(str(dvc_file))
        stage.md5 = stage.compute_md5()
        stage.dump()


def _commit_to_cache(dvc_file: Path) -> None:
    """Put the (checked) workspace copy of the import's output into DVC's cache, as `dvc update`
    would have, without touching the network or the .dvc file."""
    from dvc.repo import Repo

    with Repo(str(dvc_file.parent)) as repo, repo.lock:
        out = repo.stage.load_one(str(dvc_file)).outs[0]
        if out.changed_cache():
            out.save()
            out.commit()


def collect(root: str | Path = ".") -> list[str]:
    """Bring the runs that queued experiments finished (`dvc queue start -j N`) into the workspace.

    `dvc exp apply` takes one experiment and drops the others, and DVC keeps no run-cache for
    stages with a persistent output, so `dvc repro` would train them all again. Instead: copy into
    dvc.lock each stage entry an experiment of HEAD changed (the newest wins), then `dvc checkout`
    puts their outputs, already in the shared cache, in place. Returns the stage names taken.
    """
    root = Path(root)

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    def lock_at(rev):
        shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=root, capture_output=True, text=True)
        return yaml.safe_load(shown.stdout)["stages"] if shown.returncode == 0 else {}

    head, base = git("rev-parse", "HEAD").strip(), lock_at("HEAD")
    path = root / "dvc.lock"
    lock = yaml.safe_load(path.read_text()) if path.exists() else {"schema": "2.0", "stages": {}}
    taken = {}
    # refs/exps/<baseline sha[:2]>/<baseline sha[2:]>/<name>, oldest first so the newest wins
    for line in git("for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)", "refs/exps").split("\n"):
        if not line:
            continue
        ref, rev = line.split()
        parts = ref.split("/")
        if len(parts) != 5 or parts[2] + parts[3] != head:
            continue
        for name, entry in lock_at(rev).items():
            if entry != base.get(name):
                taken[name] = entry
    if taken:
        lock["stages"].update(taken)
        path.write_text(yaml.safe_dump(lock, sort_keys=False))
        subprocess.run([sys.executable, "-m", "dvc", "checkout", *taken], cwd=root, check=True)
    return sorted(taken)


def plot_curves(history, title: str = ""):
    """One run's error against iterations as in the paper's Fig. 6: training error dashed, test
    error bold. Rows without a test evaluation (NaN) are skipped, not drawn as gaps."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .report import TEST_STYLE, TRAIN_STYLE  # the same look as the report's figures

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 4))
    x = history["iteration"] / 1e4
    ax.plot(x, history["train_error"], label="training error", **TRAIN_STYLE)
    test = history["test_error"].notna()
    ax.plot(x[test], history["test_error"][test], label="test error", **TEST_STYLE)
    ax.set(xlabel="iter. (1e4)", ylabel="error (%)", title=title, ylim=(0, None))
    ax.legend()
    return fig


def summary(metrics: dict):
    """The final numbers of one run as a one-column table (errors at the final iteration, %)."""
    import pandas as pd

    keys = ("arch", "depth", "params", "seed", "iterations", "train_error", "test_error",
            "diverged", "diverged_at", "warmup_ended_at", "seconds", "device", "device_name")
    return pd.Series({k: metrics.get(k) for k in keys}, name="final", dtype=object).to_frame()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m replicate.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=PARAMS)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="the tarball of data.dvc: in place, checked, cached").add_argument(
        "--dvc-file", default=DATA_PIN)
    pc = sub.add_parser("check", help="validate every run of the grid; list the stage names")
    pc.add_argument("--notebook", default=NOTEBOOK)
    pc.add_argument("--stamp", help=f"then write {CHECKED.strip()!r} to this file")
    sub.add_parser("collect", help="bring the runs of finished queued experiments into the workspace")
    sub.add_parser("import-data", help="pin another source of the tarball as data.dvc").add_argument(
        "source", help="a URL, or a plain local path (not file://)")
    pt = sub.add_parser("train", help="run notebooks/train.ipynb for one run of the grid")
    pt.add_argument("--arch", required=True)
    pt.add_argument("--depth", type=int, required=True)
    pt.add_argument("--seed", type=int, required=True)
    pt.add_argument("--out", required=True)
    pt.add_argument("--data", default="data", help="root holding cifar-10-batches-py/")
    pt.add_argument("--notebook", default=NOTEBOOK)
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            md5 = load_params(args.params).get("data", {}).get("md5")
            if not md5:
                raise ValueError(f"{args.params} has no data.md5: the md5 the tarball must have")
            print(f"ready: {fetch(md5, args.dvc_file)}")
        elif args.cmd == "check":
            for run in check(load_params(args.params), args.notebook):
                print(f"train@{run.name}")
            if args.stamp:
                Path(args.stamp).parent.mkdir(parents=True, exist_ok=True)
                Path(args.stamp).write_text(CHECKED)
        elif args.cmd == "import-data":
            print(f"pinned {import_data(args.source)}: check that data.md5 in {args.params} is its md5")
        elif args.cmd == "collect":
            print("collected:", *collect() or ["nothing (no finished experiment of HEAD)"])
        else:
            run = Run(args.arch, args.depth, args.seed)
            print(f"executed {train_stage(run, args.out, args.params, args.notebook, args.data)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
