"""The DVC pipeline's glue: params.yaml, the runs of each profile, and the entry points of its stages.

    python -m replicate.pipeline fetch     # make repro, first step: the tarball, checked
    python -m replicate.pipeline check     # stage `check`: every run of every profile is valid
    python -m replicate.pipeline train --run resnet-56-0 --out results/resnet-56-0
    python -m replicate.pipeline train --profile quick --run plain-56-0 --out results/quick/plain-56-0
    python -m replicate.pipeline train --paper 2016 --run preact-110-0 --out results/2016/preact-110-0
    python -m replicate.pipeline report [--paper 2016] [--profile quick]   # stages `report`, `quick-report`, ...
    python -m replicate.pipeline report --results DIR --out DIR   # every run below DIR
    python -m replicate.pipeline import-data SOURCE   # re-pin the tarball (a mirror, a local copy)

params.yaml is read once per command, here, and nothing else reads it: `train` holds the 2015
paper's protocol, `grid` its runs (one `train@<arch>-<depth>-<seed>` stage each), `quick` its quick
look's runs and the `train` keys it shortens, `data` the md5 the tarball must have. Another paper
(replicate/papers/) has a section of its own (`he2016`) with the same three parts, its `train`
holding only what it changes. A profile is a paper's grid or its quick look: each has its train
and report stages in dvc.yaml. Running the stages side by side is replicate/grid.py's job.
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
CHECKED = "every run of every profile in params.yaml is valid\n"


@dataclass(frozen=True)
class Run:
    """One run; `name` is its folder and DVC's stage key: `train@<name>`. A run on another data set
    than CIFAR-10 carries it at the end: preactbottleneck-164-0-cifar100."""

    arch: str
    depth: int
    seed: int
    dataset: str = cifar.DEFAULT

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.depth}-{self.seed}{cifar.suffix(self.dataset)}"

    @classmethod
    def parse(cls, name: str) -> "Run":
        match = re.fullmatch(r"([a-z][a-z0-9]*)-(\d+)-(\d+)(?:-([a-z][a-z0-9]*))?", str(name))
        if not match:
            raise ValueError(f"{name!r} is not a run name: write <arch>-<depth>-<seed>, e.g. resnet-110-0 "
                             "(on CIFAR-100: <arch>-<depth>-<seed>-cifar100)")
        if match[4] == cifar.DEFAULT:
            raise ValueError(f"{name!r}: a CIFAR-10 run's name has no data set, write {name.rsplit('-', 1)[0]}")
        try:
            cifar.source(match[4] or cifar.DEFAULT)
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
        return cls(match[1], int(match[2]), int(match[3]), match[4] or cifar.DEFAULT)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(Run))  # a run's name, never a key of train


@dataclass(frozen=True)
class Profile:
    """A paper's grid (kind "paper") or its quick look (kind "quick"): where its runs live in
    dvc.yaml and on disk, and where its params are. The quick look's runs are kept apart from the
    paper's so that a quick run can never reach the paper's tables."""

    paper: str           # papers.PAPERS key: "2015"
    kind: str            # "paper" or "quick"
    stage: str           # the DVC foreach stage: `<stage>@<run>`
    report_stage: str
    results: str         # run folders: <results>/<run>/
    reports: str
    make: str            # the command that runs it, named in messages: run it again to resume

    @property
    def section(self) -> str:
        """Its params.yaml prefix: '' (the default paper's top level) or 'he2016.'."""
        section = _papers().get(self.paper).SECTION
        return f"{section}." if section else ""

    @property
    def grid_key(self) -> str:
        return f"{self.section}{'quick.' if self.kind == 'quick' else ''}grid"


def _papers():
    """replicate/papers, imported on use: it draws the reports, and what it tells a run (its paper's
    params.yaml section, its nets) is in the run's config, so it is no dep of the train stages."""
    from . import papers
    return papers


def _profile(paper: str, kind: str) -> Profile:
    """The default paper keeps the plain names (train, report, results/); another carries its year."""
    year = "" if paper == _papers().DEFAULT else paper
    at, flag = (f"/{year}" if year else ""), (f" PAPER={year}" if year else "")
    if kind == "paper":
        return Profile(paper, kind, f"train{year}", f"report{year}", f"results{at}", f"reports{at}", f"make repro{flag}")
    return Profile(paper, kind, f"quick{year}", f"quick{year}-report", f"results{at}/quick", f"reports{at}/quick",
                   f"make quick{flag}")


def profiles() -> list[Profile]:
    """Every paper's grid and quick look: ("2015", "paper") is `make repro`, ("2016", "quick")
    `make quick PAPER=2016`."""
    return [_profile(paper, kind) for paper in _papers().PAPERS for kind in ("paper", "quick")]


def profile_of(paper: str | None = None, kind: str = "paper") -> Profile:
    """A paper's (default: the 2015 one) grid (kind "paper") or quick look ("quick")."""
    paper = str(paper or _papers().DEFAULT)
    _papers().get(paper)
    if kind not in ("paper", "quick"):
        raise ValueError(f"profile must be paper or quick, got {kind!r}")
    return _profile(paper, kind)


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
    """params.yaml as a dict; it must hold the `train` section, the `grid` list and `quick`, and
    each other paper's section with its own `grid` and `quick`."""
    params = load_yaml(path) or {}
    missing = [s for s, kind in (("train", dict), ("grid", list), ("quick", dict)) if not isinstance(params.get(s), kind)]
    for paper in _papers().PAPERS.values():
        section = params.get(paper.SECTION) if paper.SECTION else None
        if paper.SECTION and not (isinstance(section, dict) and isinstance(section.get("quick"), dict)):
            missing.append(f"{paper.SECTION} (with its grid and quick)")
    if missing:
        raise ValueError(f"{path} has no {' or '.join(missing)} section (see the README's params.yaml)")
    return params


def _section(params: dict, profile: Profile) -> dict:
    paper = _papers().get(profile.paper)
    return params[paper.SECTION] if paper.SECTION else params


def runs(params: dict, profile: Profile | str = "paper") -> list[Run]:
    """A profile's runs, in the order of params.yaml (DVC's foreach keeps it)."""
    profile = _as_profile(profile)
    section = _section(params, profile)
    grid = section.get("grid") if profile.kind == "paper" else section["quick"].get("grid")
    where = profile.grid_key
    if not isinstance(grid, list) or not grid:
        raise ValueError(f"{where} must be a non-empty list of runs such as resnet-20-0, got {grid!r}")
    found = [Run.parse(name) for name in grid]
    twice = sorted({r.name for r in found if found.count(r) > 1})
    if twice:
        raise ValueError(f"{where} lists {twice} twice")
    return found


def _as_profile(profile: Profile | str) -> Profile:
    """A Profile, or "paper"/"quick" of the default paper (the 2015 one)."""
    return profile if isinstance(profile, Profile) else profile_of(None, profile)


def layers(params: dict, profile: Profile | str = "paper") -> list[tuple[str, dict]]:
    """(params.yaml prefix, keys) of each part of a profile's protocol, each over the one before:
    `train`, the paper's own changes (`he2016.train`), then its quick look's (`quick.train`)."""
    profile = _as_profile(profile)
    section, prefix = _section(params, profile), profile.section
    found = [("train", params["train"])]
    if prefix:
        found.append((f"{prefix}train", section.get("train") or {}))
    if profile.kind == "quick":
        found.append((f"{prefix}quick.train", section["quick"].get("train") or {}))
    return found


def train_params(params: dict, profile: Profile | str = "paper") -> dict:
    """The protocol of a profile's runs: `train`, with its paper's and its quick look's keys over it."""
    merged = {}
    for where, keys in layers(params, profile):
        if not isinstance(keys, dict):
            raise ValueError(f"{where} must be a mapping of training parameters, got {keys!r}")
        unknown = sorted(set(keys) - set(params["train"]))
        if unknown and where != "train":
            raise ValueError(f"{where} sets {unknown}, which the train section does not have")
        merged.update(keys)
    return merged


def config(params: dict, run: Run, profile: Profile | str = "paper") -> Config:
    """The full training config of one run: its profile's protocol plus the run's arch, depth, seed.
    The run must be a net of its profile's paper."""
    paper = _papers().get(_as_profile(profile).paper)
    if run.dataset not in paper.DATASETS:
        raise ValueError(f"{paper.TITLE} has no {cifar.source(run.dataset).name} runs: its data sets are "
                         f"{', '.join(paper.DATASETS)}")
    if run.arch not in paper.NETS:
        known = ", ".join(paper.NETS) if len(paper.NETS) < 5 else "those of docs/sequel.md"
        raise ValueError(f"{run.arch} is not a net of {paper.TITLE}{did_you_mean(run.arch, paper.NETS)} "
                         f"(its nets: {known})")
    protocol = train_params(params, profile)
    clash = sorted(set(RUN_FIELDS) & set(protocol))
    if clash:
        raise ValueError(f"train.{clash[0]} belongs in the run names of the grid (<arch>-<depth>-<seed>), not in train")
    return Config.from_dict({**protocol, **dataclasses.asdict(run)})


def check(params: dict, notebook: str | Path | None = NOTEBOOK, dvc_yaml: str | Path | None = DVC_YAML) -> list[Run]:
    """Validate every run of every profile at once, so a typo fails before any training starts.

    Raises ValueError naming each bad value once (`train.lr must be a number, got '0.1x'`), then
    each bad run. With `notebook`, also checks that the notebook takes every parameter the stage
    will pass (a renamed parameter would otherwise be ignored). With `dvc_yaml`, that each report
    stage depends on exactly its profile's runs, and each stage declares exactly the params it
    reads (DVC cannot derive either from params.yaml, so dvc.yaml spells them out). Returns the
    default paper's runs.
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
    """One line per problem of the runs of any profile that are not a valid Config, naming the
    runs it concerns (`lr_ramp: 800` of 720 iterations: one line, not one per quick run)."""
    problems = []
    for profile in profiles():
        try:
            found: dict[str, list[str]] = {}
            for run in runs(params, profile):
                try:
                    config(params, run, profile)
                except (ValueError, TypeError) as e:
                    found.setdefault(str(e), []).append(f"{profile.stage}@{run.name}")
            problems += [f"  {', '.join(stages)}: {e}" for e, stages in found.items()]
        except ValueError as e:
            problems.append(f"  {e}")
    return problems


def section_errors(params: dict) -> list[tuple[str, str]]:
    """(params.yaml key, problem) for every unknown protocol key and every value of the wrong type,
    each named once, with the closest known key rather than the whole list."""
    fields = {f.name for f in dataclasses.fields(Config)} - set(RUN_FIELDS)
    sections = dict(kv for profile in profiles() for kv in layers(params, profile))  # each part once
    found = []
    for section, values in sections.items():
        if not isinstance(values, dict):
            found.append((section, f"must be a mapping of training parameters, got {values!r}"))
            continue
        for key in values:
            if key in RUN_FIELDS:
                found.append((f"{section}.{key}", "belongs in the run names of the grid (<arch>-<depth>-<seed>)"))
            elif key not in fields:
                hint = did_you_mean(key, sorted(fields))
                found.append((f"{section}.{key}", f"is not a training parameter (replicate.train.Config){hint}"))
            elif section != "train" and key not in params["train"]:
                found.append((f"{section}.{key}", "replaces a key that train does not have: add it to train too"))
        found += [(f"{section}.{k}", p) for k, p in type_errors(values)]
    return found


def stage_params(params: dict, stage: str) -> list[str]:
    """The params.yaml keys a DVC stage reads that can change its outputs. dvc.yaml declares exactly
    these, so a change reruns the stages it affects and no other: `checkpoint_every` (NO_EFFECT)
    reruns nothing, since resume is exact. A protocol key is declared where its value comes from:
    the last of the profile's `layers` that sets it."""
    def source(profile: Profile, key: str) -> str:
        return [f"{where}.{key}" for where, keys in layers(params, profile) if key in keys][-1]

    if stage == "check":
        return [p.grid_key for p in profiles()]
    for dataset in cifar.DATASETS:
        if stage == prepare_stage(dataset):
            return [f"{data_section(dataset)}.md5"]
    for profile in profiles():
        if stage == profile.stage:
            return [source(profile, k) for k in train_params(params, profile) if k not in NO_EFFECT]
        if stage == profile.report_stage:  # the runs, and what the caption says of them
            shown = ("iterations", "milestones", "lr", "lr_ramp", "eval_subset") if profile.kind == "quick" else ()
            data = [f"{data_section(d)}.{k}" for d in datasets(params, profile) for k in ("name", "md5")]
            return [profile.grid_key, *data] + [source(profile, k) for k in shown]
    raise ValueError(f"no stage {stage!r} in dvc.yaml")


def check_dvc_yaml(params: dict, dvc_yaml: str | Path) -> None:
    """Each report stage depends on exactly its profile's runs; each stage declares exactly the
    params it reads (stage_params). Says which lines to add or remove."""
    stages = load_yaml(dvc_yaml)["stages"]

    def differ(what: str, stage: str, have: list, want: list) -> None:
        if sorted(have) != sorted(want):
            lines = [f"  add    - {d}" for d in want if d not in have] + [f"  remove - {d}" for d in have if d not in want]
            raise ValueError(f"{dvc_yaml}: stage {stage} must {what}. Edit its lines:\n" + "\n".join(lines))
    missing = [s for p in profiles() for s in (p.stage, p.report_stage) if s not in stages]
    if missing:
        raise ValueError(f"{dvc_yaml} has no stage {', '.join(missing)}: every profile needs its train and report "
                         "stages (copy another paper's and change its names)")
    for profile in profiles():
        want = [f"{profile.results}/{run.name}/metrics.json" for run in runs(params, profile)]
        have = [d for d in stages[profile.report_stage].get("deps", []) if d.endswith("/metrics.json")]
        differ("depend on every run of its profile, and on nothing else", profile.report_stage, have, want)
    for stage in ["check"] + [s for p in profiles() for s in (p.stage, p.report_stage)]:
        spec = stages[stage].get("do", stages[stage])
        differ("declare exactly the params it reads (pipeline.stage_params)", stage,
               spec.get("params", []), stage_params(params, stage))
    for profile in profiles():  # a checkpoint made by other code is not resumed
        stage, deps = profile.stage, stages[profile.stage]["do"].get("deps", [])
        code = [d for d in deps if d.startswith(("replicate/", "notebooks/"))]
        differ("depend on exactly the training code (replicate.TRAINING_CODE)", stage, code, list(TRAINING_CODE))
        folders = [f"data/{cifar.source(d).folder}" for d in datasets(params, profile)]
        differ("depend on the data of its runs", stage, [d for d in deps if d.startswith("data/")], folders)


def notebook_parameters(params: dict, run: Run, data_root: str, out_dir: str, profile: Profile | str = "paper") -> dict:
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
                data_root: str | Path = "data", profile: Profile | str = "paper") -> Path:
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


def report_stage(params_path: str | Path = PARAMS, profile: Profile | str = "paper",
                 notebook: str | Path = REPORT_NOTEBOOK, results: str | Path | None = None,
                 out: str | Path | None = None, label: str = "") -> Path:
    """Stage `report` (or `quick-report`, `report2016`, ...): the report notebook on exactly the
    profile's runs. With `results` (and `out`), on every run below that folder instead, captioned
    with `label` (what those runs are: params.yaml does not say)."""
    p = profile = _as_profile(profile)
    if results is not None:
        names, caption_text = None, label
        out = Path(out or p.reports)
    else:
        params = load_params(params_path)
        names, results, out = [r.name for r in runs(params, profile)], p.results, Path(p.reports)
        caption_text = caption(params, profile)
    parameters = {"results_dir": str(results), "runs": names, "out_dir": str(out), "caption": caption_text,
                  "profile": p.kind, "paper": p.paper}
    return execute_notebook(notebook, out / "report.ipynb", parameters)


def caption(params: dict, profile: Profile | str = "paper") -> str:
    """What a report shows, in its own words: the data (params.yaml's data.name and md5), and for
    the quick look that it is not the paper's protocol."""
    profile = _as_profile(profile)

    def named(dataset: str) -> str:
        name, md5 = (data_params(params, dataset).get(k) for k in ("name", "md5"))
        return f"{name or cifar.source(dataset).name}{f' (md5 {md5})' if md5 else ''}"
    data = f"Data: {'; '.join(named(d) for d in datasets(params, profile))}."
    if profile.kind != "quick":
        return data
    cfg = config(params, runs(params, profile)[0], profile)
    subset = (f"intermediate test errors on the first {cfg.eval_subset:,} test images, the final one on all"
              if cfg.eval_subset else "test errors on the whole test set")
    ramp = f", reached by a linear ramp over the first {cfg.lr_ramp:,} iterations" if cfg.lr_ramp else ""
    note = _papers().get(profile.paper).QUICK_NOTE
    return (f"Quick look, not the paper's protocol: {cfg.iterations:,} iterations (the paper: 64,000), "
            f"lr {cfg.lr:g}{ramp}, divided by 10 at {', '.join(f'{m:,}' for m in cfg.milestones)}; {subset}. "
            f"{note + ' ' if note else ''}{data}")


def data_section(dataset: str = cifar.DEFAULT) -> str:
    """Where params.yaml keeps a data set's md5 and name: `data` (CIFAR-10), `data.cifar100`."""
    return "data" if dataset == cifar.DEFAULT else f"data.{dataset}"


def data_params(params: dict, dataset: str = cifar.DEFAULT) -> dict:
    section = params.get("data") or {}
    return section if dataset == cifar.DEFAULT else (section.get(dataset) or {})


def datasets(params: dict, profile: Profile | str = "paper") -> list[str]:
    """The data sets a profile's train stage depends on, CIFAR-10 first: every one of its paper's
    for a paper's grid (its runs may be any), those its runs use for a quick look."""
    profile = _as_profile(profile)
    used = set(_papers().get(profile.paper).DATASETS) if profile.kind == "paper" else set()
    used |= {run.dataset for run in runs(params, profile)}
    return [d for d in cifar.DATASETS if d in used]


def prepare_stage(dataset: str) -> str:
    """dvc.yaml's stage that checks and extracts a data set's tarball."""
    return "prepare" if dataset == cifar.DEFAULT else f"prepare-{dataset}"


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
    src = next((d for d in cifar.DATASETS.values() if d.tarball == tarball.name), cifar.DATASETS[cifar.DEFAULT])
    key = cifar.md5_key(src)
    by_hand = (
        f"Put a copy of the {src.name} python tarball at {tarball.resolve()} (md5 {md5}, "
        f"{out.get('size', '?')} bytes, from {url}), then run `{src.make}` again: the copy is "
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
        raise ValueError(cifar.md5_mismatch(tarball, got, md5, pinned, src))
    if pinned and got != pinned:
        flag = "" if src is cifar.DATASETS[cifar.DEFAULT] else f" --dataset {cifar.key_of(src)}"
        raise ValueError(
            f"{tarball} has the md5 {key} asks for ({got}), but {dvc_file} pins another tarball (md5 "
            f"{pinned}, from {url}), which `dvc repro` would try to fetch. Pin this copy: move it out of data/ "
            f"(`mv {tarball} ~/`), run `python -m replicate.pipeline import-data ~/{tarball.name}{flag}`, keep "
            f"{key} {got} in params.yaml, then run `{src.make}`{' (or `make quick`)' if not flag else ''} again.")
    _commit_to_cache(dvc_file)
    return tarball


def import_data(source: str, dvc_file: str | Path = DATA_PIN, dataset: str = cifar.DEFAULT) -> Path:
    """Pin the tarball of `dataset` at `source` (a URL, or a plain local path: not file://) as `dvc_file`.

    How data.dvc is made: DVC 3's import-url has no --file, so import into data/, then move the
    .dvc file up beside dvc.yaml with its `outs` path made relative to the new place. The import
    stays frozen: `dvc repro` never downloads, `dvc update data.dvc` does.
    """
    dvc_file = Path(dvc_file)
    root, out = dvc_file.parent, f"data/{cifar.source(dataset).tarball}"
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
    pf = sub.add_parser("fetch", help="the tarballs a profile's runs need (data.dvc, ...): in place, checked, cached")
    pc = sub.add_parser("check", help="validate every run of every profile; list the default paper's stage names")
    pc.add_argument("--notebook", default=NOTEBOOK)
    pc.add_argument("--dvc-yaml", default=DVC_YAML)
    pc.add_argument("--stamp", help=f"then write {CHECKED.strip()!r} to this file")
    pi = sub.add_parser("import-data", help="pin another source of the tarball as data.dvc (data-cifar100.dvc)")
    pi.add_argument("source", help="a URL, or a plain local path (not file://)")
    pi.add_argument("--dataset", choices=sorted(cifar.DATASETS), default=cifar.DEFAULT)
    pt = sub.add_parser("train", help="run notebooks/train.ipynb for one run")
    pt.add_argument("--run", required=True, help="<arch>-<depth>-<seed>, e.g. resnet-56-0")
    pt.add_argument("--out", required=True)
    pt.add_argument("--data", default="data", help="root holding cifar-10-batches-py/")
    pt.add_argument("--notebook", default=NOTEBOOK)
    pr = sub.add_parser("report", help="run notebooks/report.ipynb on the profile's runs")
    pr.add_argument("--results", help="instead: every run below this folder")
    pr.add_argument("--out", help="with --results: the report's folder (default: the profile's)")
    pr.add_argument("--caption", default="", help="with --results: what the runs are, on every table and figure")
    pr.add_argument("--notebook", default=REPORT_NOTEBOOK)
    for q in (pt, pr, pf):
        q.add_argument("--paper", choices=sorted(_papers().PAPERS), default=_papers().DEFAULT)
        q.add_argument("--profile", choices=("paper", "quick"), default="paper",
                       help="the paper's grid, or its quick look")
    args = p.parse_args(argv)
    try:
        if args.cmd == "fetch":
            params = load_params(args.params)
            for dataset in datasets(params, profile_of(args.paper, args.profile)):
                md5 = data_params(params, dataset).get("md5")
                if not md5:
                    raise ValueError(f"{args.params} has no {cifar.md5_key(cifar.source(dataset))}: the md5 the "
                                     "tarball must have")
                print(f"ready: {fetch(md5, Path(args.params).parent / cifar.source(dataset).pin)}")
        elif args.cmd == "check":
            for run in check(load_params(args.params), args.notebook, args.dvc_yaml):
                print(f"train@{run.name}")
            if args.stamp:
                Path(args.stamp).parent.mkdir(parents=True, exist_ok=True)
                Path(args.stamp).write_text(CHECKED)
        elif args.cmd == "import-data":
            src = cifar.source(args.dataset)
            pinned = import_data(args.source, src.pin, args.dataset)
            print(f"pinned {pinned}: check that {cifar.md5_key(src)} in {args.params} is its md5")
        elif args.cmd == "report":
            profile = profile_of(args.paper, args.profile)
            print(f"executed {report_stage(args.params, profile, args.notebook, args.results, args.out, args.caption)}")
        else:
            run, profile = Run.parse(args.run), profile_of(args.paper, args.profile)
            print(f"executed {train_stage(run, args.out, args.params, args.notebook, args.data, profile)}")
    except (FileNotFoundError, ValueError, NotebookFailed) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
