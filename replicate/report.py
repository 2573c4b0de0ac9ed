"""What every paper's report is made of: the runs read back, the label under each figure and
table, and the figure and table helpers. Each paper's own tables, figures and verdicts are in
replicate/papers/; `notebooks/report.ipynb` only calls them and shows what they return.

Everything here reads run folders as `replicate.train` writes them (metrics.json and run.json,
history.csv, responses.csv) and returns pandas frames, matplotlib Figures or strings. Our numbers
are always computed from the runs; the papers' and other replications' numbers are constants of
each paper's module and only ever appear beside ours. A run is identified by the arch, depth, shortcut and seed in its run.json, never by its folder
name. Figures are built on `matplotlib.figure.Figure` (not pyplot), so nothing is shown twice in
a notebook and nothing piles up in pyplot's registry.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from . import code_commit
from .models import ARCHS, build
from . import outputs

RUN_KEYS = ["arch", "depth", "shortcut", "seed", "dataset"]
HISTORY = ["iteration", "lr", "train_loss", "train_error", "test_error"]

# One colour per depth in every figure: the paper's depths (and 1202) first, any other after them.
_DEPTH_ORDER = (20, 32, 44, 56, 110, 1202)
_PALETTE = sns.color_palette("tab10")  # blue, orange, green, red, purple, brown: far apart


def depth_colours(depths=()) -> dict[int, tuple]:
    """depth -> colour; the paper's depths get the same colour whatever else is present."""
    extra = sorted(set(int(d) for d in depths) - set(_DEPTH_ORDER))
    return {d: _PALETTE[i % len(_PALETTE)] for i, d in enumerate(_DEPTH_ORDER + tuple(extra))}


def net_name(arch: str, depth: int, shortcut: str = "A") -> str:
    """The paper's spelling: plain-20, ResNet-110 (option B is marked, it is not Table 6's net)."""
    name = f"{'ResNet' if arch == 'resnet' else arch}-{depth}"
    return f"{name} (B)" if arch == "resnet" and shortcut == "B" else name


# --- collecting runs -------------------------------------------------------------------------

@dataclass
class Runs:
    """All runs under a results folder, one frame per file kind, each keyed by RUN_KEYS."""

    metrics: pd.DataFrame    # one row per run
    history: pd.DataFrame    # history.csv rows of every run
    responses: pd.DataFrame  # responses.csv rows of every run (layer, std)

    def on(self, dataset: str) -> "Runs":
        """The runs on one data set: a report never mixes CIFAR-10 and CIFAR-100 runs in a number."""
        return Runs(*(f[f.dataset == dataset] for f in (self.metrics, self.history, self.responses)))

    def select(self, arch: str, depth: int, shortcut: str | None = "A") -> pd.DataFrame:
        """One net's runs; shortcut None: whatever its shortcut (the sequel's nets each have their own)."""
        m = self.metrics
        return m[(m.arch == arch) & (m.depth == depth) & ((m.shortcut == shortcut) if shortcut else True)]


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A run's CSV file; one that lacks a column the report plots is named, not drawn empty."""
    try:
        frame = pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):  # a diverged run has no responses
        return pd.DataFrame(columns=columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} column: it was not written by replicate.train, or "
                         f"was edited. Train the run again (delete its folder), or restore the file")
    return frame


def collect(results_dir: str | Path, names: list[str] | None = None) -> Runs:
    """Read the run folders `names` of `results_dir` (those that have finished), or with no names
    every run folder (any folder holding a metrics.json) below it.

    Two folders holding the same (arch, depth, shortcut, seed) are an error, not a choice: the
    table would otherwise count one seed twice or silently drop one of them.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results_dir {root} is not a folder (relative paths start at {Path.cwd()})")
    rows, hists, resps = [], [], []
    found = sorted(root.rglob("metrics.json")) if names is None else [root / n / "metrics.json" for n in names]
    for path in (p for p in found if p.is_file()):
        m = outputs.read(path.parent)
        if not {"arch", "depth", "seed"} <= set(m):
            raise ValueError(f"{path.parent} is not a training run's folder: its run.json (or metrics.json) names no "
                             "arch, depth or seed")
        key = {"arch": m["arch"], "depth": int(m["depth"]), "shortcut": m.get("shortcut", "A"), "seed": int(m["seed"]),
               "dataset": m.get("dataset", "cifar10")}  # runs from before CIFAR-100 are CIFAR-10's
        rows.append({**key, "params": m.get("params"), "iterations": m.get("iterations"),
                     "train_error": m.get("train_error"), "test_error": m.get("test_error"),
                     "diverged": bool(m.get("diverged")), "diverged_at": m.get("diverged_at"),
                     "run": path.parent.relative_to(root).as_posix(),
                     **{k: m.get(k) for k in PROVENANCE}})
        hists.append(_read_csv(path.parent / "history.csv", HISTORY).assign(**key))
        resps.append(_read_csv(path.parent / "responses.csv", ["layer", "std"]).assign(**key))
    columns = RUN_KEYS + ["params", "iterations", "train_error", "test_error", "diverged", "diverged_at", "run",
                          *PROVENANCE]
    metrics = pd.DataFrame(rows, columns=columns).astype(
        {"depth": int, "seed": int, "diverged": bool, "test_error": float, "train_error": float})
    twice = metrics[metrics.duplicated(RUN_KEYS, keep=False)]
    if len(twice):
        raise ValueError(f"several run folders hold the same run (arch, depth, shortcut, seed, dataset): "
                         f"{sorted(twice.run)}")
    metrics = metrics.sort_values(RUN_KEYS, key=_arch_order).reset_index(drop=True)
    history = pd.concat(hists, ignore_index=True) if hists else pd.DataFrame(columns=RUN_KEYS + HISTORY)
    responses = pd.concat(resps, ignore_index=True) if resps else pd.DataFrame(columns=RUN_KEYS + ["layer", "std"])
    return Runs(metrics, history, responses)


PROVENANCE = ["train_images", "test_images", "device", "device_name", "precision"]


def label(runs: Runs, caption: str = "") -> str:
    """What the figures and the table show, in one line under them: the caption (a quick look says
    it is one), the data, iterations and hardware read from the runs, the date and the commit."""
    m = runs.metrics
    def values(column, fmt="{}"):
        return "/".join(fmt.format(v) for v in sorted(set(m[column].dropna()), key=str)) or "?"
    commit = code_commit()  # the code's: the data is named by the caption, with its md5
    hardware = "/".join(sorted({f"{d.upper()} {n}" for d, n in zip(m["device"], m["device_name"])
                                if isinstance(d, str)})) or "?"
    facts = (f"{len(m)} runs on {values('train_images', '{:,}')} training and {values('test_images', '{:,}')} test "
             f"images, {values('iterations', '{:,}')} iterations, {hardware} ({values('precision')}); "
             f"report of {datetime.date.today()}, commit {commit or 'unknown'}.")
    return f"{caption} {facts}".strip()


def _arch_order(col: pd.Series) -> pd.Series:
    return col.map({a: i for i, a in enumerate(ARCHS)}).fillna(len(ARCHS)) if col.name == "arch" else col


def summary(runs: Runs) -> pd.DataFrame:
    """One line per run: what the report is built from."""
    m = runs.metrics
    return pd.DataFrame({"net": [net_name(*k) for k in zip(m.arch, m.depth, m.shortcut)], "seed": m.seed,
                         "iterations": m.iterations, "train error (%)": m.train_error.round(2),
                         "test error (%)": m.test_error.round(2),
                         "diverged at": m.diverged_at.astype("Int64") if len(m) else m.diverged_at})


# --- tables ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def count_params(arch: str, depth: int, shortcut: str = "A") -> int:
    """Parameters of a net that has no run, from the same builder the runs used."""
    return sum(p.numel() for p in build(arch, depth, shortcut=shortcut).parameters())


def params_m(params: int) -> str:
    """As the paper prints them: 0.27M ... 0.85M, 1.7M, 19.4M."""
    return f"{params / 1e6:.2f}M" if params < 1e6 else f"{params / 1e6:.1f}M"


def _markdown(df: pd.DataFrame, right: set[str]) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which we do not depend on)."""
    lines = ["| " + " | ".join(df.columns) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in df.columns) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------

def _status(runs: Runs, arch: str, depth: int) -> tuple[list, str]:
    """The seeds to plot and the legend label that says what they are (mean, diverged, missing)."""
    sel = runs.select(arch, depth)
    done = sel[~sel.diverged]
    name = net_name(arch, depth)
    if sel.empty:
        return [], f"{name} (missing)"
    if done.empty:
        return list(sel.seed), f"{name} (diverged at {', '.join(str(int(i)) for i in sel.diverged_at)})"
    notes = [f"mean of {len(done)}"] if len(done) > 1 else []
    if len(done) < len(sel):
        notes.append(f"{len(sel) - len(done)} of {len(sel)} diverged")
    return list(done.seed), name + (f" ({', '.join(notes)})" if notes else "")


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    with sns.axes_style("ticks"):
        fig = Figure(figsize=size, layout="constrained")
        return fig, np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())


TRAIN_STYLE = {"linestyle": "--", "linewidth": 1.0}   # the paper: training error dashed,
TEST_STYLE = {"linestyle": "-", "linewidth": 2.5}     # test error bold
NO_LINE = {"linestyle": "none"}                       # legend entry of a net with nothing to draw


def plot_curves(history: pd.DataFrame, title: str = "") -> Figure:
    """One run's error against iterations as in the paper's Fig. 6 (the training notebook's plot):
    training error dashed, test error bold. Rows without a test evaluation (NaN) are skipped, not
    drawn as gaps."""
    fig, (ax,) = _figure(1, 1, (7, 4))
    x = history["iteration"] / 1e4
    ax.plot(x, history["train_error"], label="training error", **TRAIN_STYLE)
    test = history["test_error"].notna()
    ax.plot(x[test], history["test_error"][test], label="test error", **TEST_STYLE)
    ax.set(xlabel="iter. (1e4)", ylabel="error (%)", title=title, ylim=(0, None))
    ax.legend()
    return fig


def save(fig: Figure, path: str | Path, note: str = "") -> Path:
    """Write `fig` as a PNG, with `note` (what it shows: `label`) as its title line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if note:
        fig.suptitle(note, fontsize="small", color="0.3", wrap=True)
    fig.savefig(path, dpi=120)
    return path


# --- verdicts --------------------------------------------------------------------------------

def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cell(runs: int, diverged: int, numbers: str | None) -> str:
    """What a table says of a net with `runs` runs, `diverged` of them diverged: 'missing',
    'diverged (2 of 2)', or its `numbers` (None: none finished) and '; 1 of 5 diverged'."""
    if runs == 0:
        return "missing"
    if numbers is None:
        return "diverged" if diverged == 1 else f"diverged ({diverged} of {diverged})"
    return numbers + (f"; {diverged} of {runs} diverged" if diverged else "")


def write_verdicts(lines: list[str], out_dir: str | Path) -> Path:
    path = Path(out_dir) / "verdicts.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"- {line}\n" for line in lines))
    return path
