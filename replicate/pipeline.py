"""The DVC pipeline's glue: params.yaml, the runs of each profile, and the entry points of its stages.

    python -m replicate.pipeline fetch     # make repro, first step: the tarball, checked
    python -m replicate.pipeline check     # stage `check`: every run of both profiles is valid
    python -m replicate.pipeline train --run resnet-56-0 --out results/resnet-56-0
    python -m replicate.pipeline train --profile quick --run plain-56-0 --out results/quick/plain-56-0
    python -m replicate.pipeline report [--profile quick]   # stages `report`, `quick-report`
    python -m replicate.pipeline report --results DIR --out DIR   # every run below DIR
    python -m replicate.pipeline import-data SOURCE   # re-pin the tarball (a mirror, a local copy)

params.yaml is read once per command, here, and nothing else reads it: `train` holds the paper's
protocol, `grid` the paper's runs (one `train@<arch>-<depth>-<seed>` stage each), `quick` the quick
look's runs and the `train` keys it shortens, `data` the md5 the tarball must have. Running the
stages side by side is replicate/grid.py's job.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import TRAINING_CODE
from . import data as cifar
from .train import NO_EFFECT, Config, did_you_mean, type_errors

PARAMS = "params.yaml"
NOTEBOOK = "notebooks/train.ipynb"
REPORT_NOTEBOOK = "notebooks/report.ipynb"
DVC_YAML = "dvc.yaml"
DATA_PIN = "data.dvc"
# What stage `check` writes. The train stages depend on it, so they run after the check; it never
# changes, so widening the grid reruns the check but not the runs that already exist.
CHECKED = "every run of both profiles in params.yaml is valid\n"


@dataclass(frozen=True)
class Run:
    """One run; `name` is its folder and DVC's stage key: `train@<name>`."""

    arch: str
    depth: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.depth}-{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "Run":
        match = re.fullmatch(r"([a-z]+)-(\d+)-(\d+)", str(name))
        if not match:
            raise ValueError(f"{name!r} is not a run name: write <arch>-<depth>-<seed>, e.g. resnet-110-0")
        return cls(match[1], int(match[2]), int(match[3]))


@dataclass(frozen=True)
class Profile:
    """Where a profile's runs live in dvc.yaml and on disk. The quick look's are kept apart from the
    paper's so that a quick run can never reach Table 6."""

    name: str
    stage: str           # the DVC foreach stage: `<stage>@<run>`
    report_stage: str
    results: str         # run folders: <results>/<run>/
    reports: str
    make: str            # the command that runs it, named in messages: run it again to resume


PROFILES = {
    "paper": Profile("paper", "train", "report", "results", "reports", "make repro"),
    "quick": Profile("quick", "quick", "quick-report", "results/quick", "reports/quick", "make quick"),
}


def load_yaml(path: str | Path):
    """A YAML file (params.yaml, dvc.yaml, data.dvc) as Python. A syntax error is one line naming the
    file, the line and the column, not PyYAML's traceback; a tab, YAML's commonest trap, is named."""
    text = Path(path).read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        if mark is None:
            raise ValueError(f"{path} is not valid YAML: {problem}") from None
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        if "\t" in line[:len(line) - len(line.lstrip())] or "'\\t'" in problem:
            problem += ": YAML indents with spaces, never tabs; replace the tab with spaces"
        elif getattr(e, "context", None):
            problem += f" ({e.context})"
        raise ValueError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {problem}") from None


def load_params(path: str | Path = PARAMS) -> dict:
    """params.yaml as a dict; it must hold the `train` section, the `grid` list and `quick`."""
    params = load_yaml(path) or {}
    missing = [s for s, kind in (("train", dict), ("grid", list), ("quick", dict)) if not isinstance(params.get(s), kind)]
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} section (see the README's params.yaml)")
    return params


def runs(params: dict, profile: str = "paper") -> list[Run]:
    """A profile's runs, in the order of params.yaml (DVC's foreach keeps it)."""
    grid = params["grid"] if profile == "paper" else params["quick"].get("grid")
    where = "grid" if profile == "paper" else "quick.grid"
    if not isinstance(grid, list) or not grid:
        raise ValueError(f"{where} must be a non-empty list of runs such as resnet-20-0, got {grid!r}")
    found = [Run.parse(name) for name in grid]
    twice = sorted({r.name for r in found if found.count(r) > 1})
    if twice:
        raise ValueError(f"{where} lists {twice} twice")
    return found


def train_params(params: dict, profile: str = "paper") -> dict:
    """The protocol of a profile's runs: `train`, with the quick look's shortened keys over it."""
    if profile == "paper":
        return params["train"]
    quick = params["quick"].get("train") or {}
    unknown = sorted(set(quick) - set(params["train"]))
    if unknown:
        raise ValueError(f"quick.train sets {unknown}, which the train section does not have")
    return {**params["train"], **quick}


def config(params: dict, run: Run, profile: str = "paper") -> Config:
    """The full training config of one run: its profile's protocol plus the run's arch, depth, seed."""
    protocol = train_params(params, profile)
    clash = sorted({"arch", "depth", "seed"} & set(protocol))
    if clash:
        raise ValueError(f"train.{clash[0]} belongs in the run names of the grid (<arch>-<depth>-<seed>), not in train")
    return Config.from_dict({**protocol, **dataclasses.asdict(run)})


def check(params: dict, notebook: str | Path | None = NOTEBOOK, dvc_yaml: str | Path | None = DVC_YAML) -> list[Run]:
    """Validate every run of both profiles at once, so a typo fails before any training starts.

    Raises ValueError naming each bad value once (`train.lr must be a number, got '0.1x'`), then
    each bad run. With `notebook`, also checks that the notebook takes every parameter the stage
    will pass (a renamed parameter would otherwise be ignored). With `dvc_yaml`, that each report
    stage depends on exactly its profile's runs, and each stage declares exactly the params it
    reads (DVC cannot derive either from params.yaml, so dvc.yaml spells them out). Returns the
    paper's runs.
    """
    problems = [f"  {where} {e}" for where, e in section_errors(params)]
    if not problems:  # an unknown key or a wrong type is named once, not once per run
        problems = run_problems(params)
    if problems:
        raise ValueError("params.yaml: invalid value(s) or run(s), nothing was trained:\n" + "\n".join(problems))
    if notebook is not None:
        import papermill

        expected = set(notebook_parameters(params, runs(params)[0], "data", "out"))
        missing = sorted(expected - set(papermill.inspect_notebook(str(notebook))))
        if missing:
            raise ValueError(f"{notebook} has no parameter(s) {missing} in its `parameters` cell")
    if dvc_yaml is not None:
        check_dvc_yaml(params, dvc_yaml)
    return runs(params)


def run_problems(params: dict) -> list[str]:
    """One line per problem of the runs of either profile that are not a valid Config, naming the
    runs it concerns (`lr_ramp: 800` of 720 iterations: one line, not one per quick run)."""
    problems = []
    for name, profile in PROFILES.items():
        try:
            found: dict[str, list[str]] = {}
            for run in runs(params, name):
                try:
                    config(params, run, name)
                except (ValueError, TypeError) as e:
                    found.setdefault(str(e), []).append(f"{profile.stage}@{run.name}")
            problems += [f"  {', '.join(stages)}: {e}" for e, stages in found.items()]
        except ValueError as e:
            problems.append(f"  {e}")
    return problems


def section_errors(params: dict) -> list[tuple[str, str]]:
    """(params.yaml key, problem) for every unknown protocol key and every value of the wrong type,
    each named once, with the closest known key rather than the whole list."""
    quick = params["quick"].get("train") or {}
    fields = {f.name for f in dataclasses.fields(Config)} - {"arch", "depth", "seed"}
    found = []
    for section, values in (("train", params["train"]), ("quick.train", quick)):
        for key in values:
            if key in ("arch", "depth", "seed"):
                found.append((f"{section}.{key}", "belongs in the run names of the grid (<arch>-<depth>-<seed>)"))
            elif key not in fields:
                hint = did_you_mean(key, sorted(fields))
                found.append((f"{section}.{key}", f"is not a training parameter (replicate.train.Config){hint}"))
            elif section == "quick.train" and key not in params["train"]:
                found.append((f"quick.train.{key}", "replaces a key that train does not have: add it to train too"))
    found += [(f"train.{k}", p) for k, p in type_errors(params["train"])]
    return found + [(f"quick.train.{k}", p) for k, p in type_errors(quick)]


def stage_params(params: dict, stage: str) -> list[str]:
    """The params.yaml keys a DVC stage reads that can change its outputs. dvc.yaml declares exactly
    these, so a change reruns the stages it affects and no other: `checkpoint_every` (NO_EFFECT)
    reruns nothing, since resume is exact."""
    quick = params["quick"].get("train") or {}

    def keys(section: str, names) -> list[str]:
        return [f"{section}.{k}" for k in names if k not in NO_EFFECT]
    if stage == "train":
        return keys("train", params["train"])
    if stage == "quick":
        return keys("train", [k for k in params["train"] if k not in quick]) + keys("quick.train", quick)
    if stage == "check":
        return ["grid", "quick.grid"]
    if stage == "report":
        return ["grid", "data.name", "data.md5"]
    if stage == "quick-report":  # the runs, and what the caption says of them
        shown = ("iterations", "milestones", "lr", "lr_ramp", "eval_subset")
        return (["quick.grid", "data.name", "data.md5"]
                + [f"quick.train.{k}" if k in quick else f"train.{k}" for k in shown])
    raise ValueError(f"no stage {stage!r} in dvc.yaml")


def check_dvc_yaml(params: dict, dvc_yaml: str | Path) -> None:
    """Each report stage depends on exactly its profile's runs; each stage declares exactly the
    params it reads (stage_params). Says which lines to add or remove."""
    stages = load_yaml(dvc_yaml)["stages"]

    def differ(what: str, stage: str, have: list, want: list) -> None:
        if sorted(have) != sorted(want):
            lines = [f"  add    - {d}" for d in want if d not in have] + [f"  remove - {d}" for d in have if d not in want]
            raise ValueError(f"{dvc_yaml}: stage {stage} must {what}. Edit its lines:\n" + "\n".join(lines))
    for name, profile in PROFILES.items():
        want = [f"{profile.results}/{run.name}/metrics.json" for run in runs(params, name)]
        have = [d for d in stages[profile.report_stage].get("deps", []) if d.endswith("/metrics.json")]
        differ("depend on every run of its profile, and on nothing else", profile.report_stage, have, want)
    for stage in ("check", "train", "quick", "report", "quick-report"):
        spec = stages[stage].get("do", stages[stage])
        differ("declare exactly the params it reads (pipeline.stage_params)", stage,
               spec.get("params", []), stage_params(params, stage))
    for stage in ("train", "quick"):  # a checkpoint made by other code is not resumed: DVC must rerun it too
        code = [d for d in stages[stage]["do"].get("deps", []) if d.startswith(("replicate/", "notebooks/"))]
        differ("depend on exactly the training code (replicate.TRAINING_CODE)", stage, code, list(TRAINING_CODE))


def notebook_parameters(params: dict, run: Run, data_root: str, out_dir: str, profile: str = "paper") -> dict:
    """What papermill injects into notebooks/train.ipynb for one run: the run, its paths, and its
    profile's protocol as one dict (the notebook restates no field of Config)."""
    return {**dataclasses.asdict(run), "data_root": data_root, "out_dir": out_dir,
            "protocol": train_params(params, profile)}


class NotebookFailed(RuntimeError):
    """A cell of an executed notebook raised; the notebook saved at `out` holds the traceback."""


def execute_notebook(notebook: str | Path, out: str | Path, parameters: dict, *, cwd: str | Path | None = None,
                     stream: bool = False) -> Path:
    """Execute `notebook` with papermill into `out` (its folder made first: papermill does not).

    `stream`: the kernel's output (the training bar) goes to this process's stdout and stderr as
    is, carriage returns included, and the saved notebook keeps its last state, not one output per
    refresh. A failing cell is NotebookFailed, one line: papermill's own error repeats the
    kernel's whole traceback at the end of train.log, and the executed notebook holds it anyway."""
    import papermill

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    streams = dict(stdout_file=sys.stdout, stderr_file=sys.stderr, coalesce_streams=True) if stream else {}
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=parameters, progress_bar=False,
                                   cwd=None if cwd is None else str(cwd), **streams)
    except papermill.PapermillExecutionError as e:
        raise NotebookFailed(f"{e.ename}: {e.evalue} (the full traceback: In [{e.exec_count}] of the executed "
                             f"notebook {out})") from None
    return out


def train_stage(run: Run, out: str | Path, params_path: str | Path = PARAMS, notebook: str | Path = NOTEBOOK,
                data_root: str | Path = "data", profile: str = "paper") -> Path:
    """Stage `train@<run>` (or `quick@<run>`): execute the notebook with papermill into `out/train.ipynb`.

    The kernel runs in `out`, and the paths it gets are relative to `out`, so the executed
    notebook can be opened and rerun in JupyterLab where it lies. A checkpoint left in `out` by an
    interrupted run is resumed (DVC keeps it: `persist: true`).
    """
    from .gpus import check_gpus_usable  # here: it cannot change results, so no dep of the stages (dvc.yaml)

    params = load_params(params_path)
    check_gpus_usable(config(params, run, profile).device)  # a clear error now, not from inside the kernel
    out = Path(out)
    parameters = notebook_parameters(params, run, os.path.relpath(data_root, out), ".", profile)
    return execute_notebook(notebook, out / "train.ipynb", parameters, cwd=out, stream=True)


def report_stage(params_path: str | Path = PARAMS, profile: str = "paper", notebook: str | Path = REPORT_NOTEBOOK,
                 results: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Stage `report` (or `quick-report`): the report notebook on exactly the profile's runs. With
    `results` (and `out`), on every run below that folder instead."""
    p = PROFILES[profile]
    if results is not None:
        names, caption_text = None, ""
        out = Path(out or p.reports)
    else:
        params = load_params(params_path)
        names, results, out = [r.name for r in runs(params, profile)], p.results, Path(p.reports)
        caption_text = caption(params, profile)
    parameters = {"results_dir": str(results), "runs": names, "out_dir": str(out), "caption": caption_text,
                  "profile": profile}
    return execute_notebook(notebook, out / "report.ipynb", parameters)


def caption(params: dict, profile: str = "paper") -> str:
    """What a report shows, in its own words: the data (params.yaml's data.name and md5), and for
    the quick look that it is not the paper's protocol."""
    md5 = params["data"].get("md5")
    data = f"Data: {params['data'].get('name') or 'CIFAR-10'}{f' (md5 {md5})' if md5 else ''}."
    if profile != "quick":
        return data
    cfg = config(params, runs(params, profile)[0], profile)
    subset = (f"intermediate test errors on the first {cfg.eval_subset:,} test images, the final one on all"
              if cfg.eval_subset else "test errors on the whole test set")
    ramp = f", reached by a linear ramp over the first {cfg.lr_ramp:,} iterations" if cfg.lr_ramp else ""
    return (f"Quick look, not the paper's protocol: {cfg.iterations:,} iterations (the paper: 64,000), "
            f"lr {cfg.lr:g}{ramp}, divided by 10 at {', '.join(f'{m:,}' for m in cfg.milestones)}; {subset}. {data}")


def fetch(md5: str, dvc_file: str | Path = DATA_PIN) -> Path:
    """Make sure the tarball that `dvc_file` imports is in place, has `md5`, and is in DVC's cache.

    Missing: `dvc update` downloads it; offline, the error says where to put a copy by hand. A copy
    put there by hand is checked and then committed to the cache, because `dvc repro` would
    otherwise try to "verify" the frozen import against its URL, and rewrite the pin to whatever
    file it finds. So params.yaml's md5 decides what is accepted, and a copy that has it but is not
    the file data.dvc pins is refused with how to pin it: DVC would try to fetch the pinned one.
    """
    dvc_file = Path(dvc_file)
    pin = load_yaml(dvc_file)
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
    got, pinned = cifar.md5sum(tarball), load_yaml(dvc_file)["outs"][0].get("md5")  # after any dvc update
    if got != md5:
        raise ValueError(cifar.md5_mismatch(tarball, got, md5, pinned))
    if pinned and got != pinned:
        raise ValueError(
            f"{tarball} has the md5 data.md5 asks for ({got}), but {dvc_file} pins another tarball (md5 "
            f"{pinned}, from {url}), which `dvc repro` would try to fetch. Pin this copy: move it out of data/ "
            f"(`mv {tarball} ~/`), run `python -m replicate.pipeline import-data ~/{tarball.name}`, keep "
            f"data.md5 {got} in params.yaml, then run `make repro` (or `make quick`) again.")
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m replicate.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=PARAMS)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="the tarball of data.dvc: in place, checked, cached").add_argument(
        "--dvc-file", default=DATA_PIN)
    pc = sub.add_parser("check", help="validate every run of both profiles; list the paper's stage names")
    pc.add_argument("--notebook", default=NOTEBOOK)
    pc.add_argument("--dvc-yaml", default=DVC_YAML)
    pc.add_argument("--stamp", help=f"then write {CHECKED.strip()!r} to this file")
    sub.add_parser("import-data", help="pin another source of the tarball as data.dvc").add_argument(
        "source", help="a URL, or a plain local path (not file://)")
    pt = sub.add_parser("train", help="run notebooks/train.ipynb for one run")
    pt.add_argument("--run", required=True, help="<arch>-<depth>-<seed>, e.g. resnet-56-0")
    pt.add_argument("--out", required=True)
    pt.add_argument("--data", default="data", help="root holding cifar-10-batches-py/")
    pt.add_argument("--notebook", default=NOTEBOOK)
    pr = sub.add_parser("report", help="run notebooks/report.ipynb on the profile's runs")
    pr.add_argument("--results", help="instead: every run below this folder")
    pr.add_argument("--out", help="with --results: the report's folder (default: the profile's)")
    pr.add_argument("--notebook", default=REPORT_NOTEBOOK)
    for q in (pt, pr):
        q.add_argument("--profile", choices=sorted(PROFILES), default="paper")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            md5 = load_params(args.params).get("data", {}).get("md5")
            if not md5:
                raise ValueError(f"{args.params} has no data.md5: the md5 the tarball must have")
            print(f"ready: {fetch(md5, args.dvc_file)}")
        elif args.cmd == "check":
            for run in check(load_params(args.params), args.notebook, args.dvc_yaml):
                print(f"train@{run.name}")
            if args.stamp:
                Path(args.stamp).parent.mkdir(parents=True, exist_ok=True)
                Path(args.stamp).write_text(CHECKED)
        elif args.cmd == "import-data":
            print(f"pinned {import_data(args.source)}: check that data.md5 in {args.params} is its md5")
        elif args.cmd == "report":
            print(f"executed {report_stage(args.params, args.profile, args.notebook, args.results, args.out)}")
        else:
            run = Run.parse(args.run)
            print(f"executed {train_stage(run, args.out, args.params, args.notebook, args.data, args.profile)}")
    except (FileNotFoundError, ValueError, NotebookFailed) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
