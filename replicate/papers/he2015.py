"""He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), CIFAR-10.

This paper's place: its runs (params.yaml's top-level `grid`, `train` and `quick`: the project's
default paper), its report (Table 6, Figures 1, 6 and 7, beside the paper's), its claims, and
what its quick look can and cannot show. The machinery is shared (replicate/report.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..models import ARCHS
from ..report import (NO_LINE, TEST_STYLE, TRAIN_STYLE, Runs, _figure, _markdown, _status, _yes, cell, count_params,
                      depth_colours, net_name, params_m, save)

YEAR = "2015"
TITLE = "He et al. 2015, Deep Residual Learning for Image Recognition (arXiv:1512.03385)"
SECTION = None     # params.yaml's top level: train, grid, quick
NETS = ARCHS       # what its runs may be: plain and resnet
DATASETS = ("cifar10",)  # what they train on (replicate.data.DATASETS)
QUICK_NOTE = ""    # its quick look runs the paper's depths 20 and 56: nothing to add to the caption
_FILES = ("table6.csv", "table6.md", "table6.json", "fig1.png", "fig6.png", "fig7.png")
OUTPUTS = {"paper": _FILES, "quick": _FILES}


def tables(runs: Runs, out: Path, note: str, kind: str = "paper") -> list[str]:
    """Table 6, written to `out` (csv, md, json); returned as markdown."""
    table = table6(runs.on("cifar10"), kind)
    write_table(table, out, note, kind)
    return [table6_markdown(table, kind)]


def figures(runs: Runs, out: Path, note: str, kind: str = "paper") -> list[Path]:
    """Figures 6, 1 and 7 as PNGs in `out`."""
    runs = runs.on("cifar10")
    return [save(fig(runs, kind), Path(out) / f"{fig.__name__}.png", note) for fig in (fig6, fig1, fig7)]


PAPER_DEPTHS = (20, 32, 44, 56, 110)   # the grid the table always lists, run or not
# He et al. 2015 (arXiv:1512.03385), Table 6: CIFAR-10 test error (%) of the ResNets, option A.
# The best run; for ResNet-110 also (mean, std) over 5 runs, printed "6.43 (6.61±0.16)".
PAPER_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_SPREAD = {110: (6.61, 0.16)}
# The paper gives no plain-net numbers. Two published replications do (test error %), as collected
# in the project's spec PAPER.md, "The paper gives no numbers for plain nets; replications found".
THEIRS_PLAIN = {
    "a-martyn/resnet (theirs, best epoch)": {20: 9.5, 32: 9.92, 44: 11.35, 56: 12.76},
    "wooyeolBaek (theirs, final, 45k/5k)": {20: 9.74, 32: 10.41, 44: 11.73, 56: 11.86},
}

def grid(runs: Runs, profile: str = "paper") -> list[tuple[str, int, str]]:
    """The table's rows: the paper's grid (plain and ResNet x 20..110, option A) plus every other
    (arch, depth, shortcut) that has a run, so an absent run is listed and a present one kept. The
    quick look lists only the nets it ran."""
    keys = {(a, d, "A") for a in ARCHS for d in PAPER_DEPTHS} if profile == "paper" else set()
    keys |= {(a, int(d), s) for a, d, s in runs.metrics[["arch", "depth", "shortcut"]].itertuples(index=False)}
    return sorted(keys, key=lambda k: (ARCHS.index(k[0]) if k[0] in ARCHS else len(ARCHS), k[0], k[1], k[2]))


def best_mean_std(errors: pd.Series) -> str:
    """'8.75' for one run; the paper's 'best (mean±std)' for several (std with ddof=1)."""
    if len(errors) == 1:
        return f"{errors.iloc[0]:.2f}"
    return f"{errors.min():.2f} ({errors.mean():.2f}±{errors.std():.2f})"


def paper_text(depth: int) -> str:
    """Table 6's ResNet entry as the paper prints it: '8.75', or '6.43 (6.61±0.16)'."""
    if depth in PAPER_SPREAD:
        return f"{PAPER_TABLE6[depth]:.2f} ({PAPER_SPREAD[depth][0]:.2f}±{PAPER_SPREAD[depth][1]:.2f})"
    return f"{PAPER_TABLE6[depth]:.2f}"


def table6(runs: Runs, profile: str = "paper") -> pd.DataFrame:
    """One row per net of the grid: parameters, our final-iteration test error (%), the paper's.

    `test_error` is the best seed's final test error (the paper reports its best run), `mean` and
    `std` are over the finished seeds; `diff` is ours minus the paper's, both best runs, and only
    for the paper's protocol: the quick look's far shorter runs show the paper's number as a
    reference, never subtracted. Diverged seeds never enter the numbers but are counted and named
    in `ours`; a net without runs says 'missing'. The two replications' plain-net numbers are their
    own, never ours.
    """
    rows = []
    for arch, depth, shortcut in grid(runs, profile):
        sel = runs.select(arch, depth, shortcut)
        done = sel[~sel.diverged & sel.test_error.notna()]
        errors, n_div = done.test_error, int(sel.diverged.sum())
        ours = cell(len(sel), n_div, None if done.empty else best_mean_std(errors))
        params = int(sel.params.iloc[0]) if len(sel) else count_params(arch, depth, shortcut)
        paper = PAPER_TABLE6.get(depth) if (arch, shortcut) == ("resnet", "A") else None
        row = {
            "net": net_name(arch, depth, shortcut), "arch": arch, "depth": depth, "shortcut": shortcut,
            "params": params, "params (M)": params_m(params),
            "iterations": "/".join(str(i) for i in sorted(set(sel.iterations))) if len(sel) else "",
            "runs": len(done), "diverged": n_div,
            "test_error": errors.min() if len(done) else math.nan,
            "mean": errors.mean() if len(done) else math.nan,
            "std": errors.std() if len(done) > 1 else math.nan,
            "ours": ours,
            "paper": paper if paper is not None else math.nan,
            "paper_text": "" if paper is None else paper_text(depth),
        }
        row["diff"] = row["test_error"] - row["paper"] if profile == "paper" else math.nan
        for source, values in THEIRS_PLAIN.items():
            row[source] = values.get(depth, math.nan) if (arch, shortcut) == ("plain", "A") else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def table6_markdown(table: pd.DataFrame, profile: str = "paper") -> str:
    """Table 6 for people: ours beside the paper's, empty cells where a source gives no number. The
    quick look's table gives the paper's numbers as a reference only."""
    def num(x, fmt="{:.2f}"):
        return "" if pd.isna(x) else fmt.format(x)

    columns = {
        "net": table.net,
        "params": table.params.map("{:,}".format),
        "params (M)": table["params (M)"],
        "iterations": table.iterations,
        "ours: test error (%)": table.ours,
    }
    if profile != "paper":
        view = pd.DataFrame({**columns, "paper, 64k iterations (%): a reference, not comparable": table.paper_text})
        caption = ("CIFAR-10 test error (%) at the final iteration of the quick look's short runs; several seeds: "
                   "best (mean±std). The paper's numbers come from 64,000 iterations: they show where the "
                   "full protocol ends, not what these runs should reach.")
        return caption + "\n\n" + _markdown(view, right={"params", "params (M)", "iterations"})
    view = pd.DataFrame({
        **columns,
        "paper (%)": table.paper_text,
        "ours − paper": table["diff"].map(lambda x: num(x, "{:+.2f}")),
        **{source: table[source].map(num) for source in THEIRS_PLAIN},
    })
    caption = ("CIFAR-10 test error (%) at the final iteration (never the best one); several seeds: "
               "best (mean±std). 'ours − paper' compares best runs. The paper gives no plain-net "
               "numbers; the last two columns are other replications' (theirs), not ours.")
    return caption + "\n\n" + _markdown(view, right={"params", "params (M)", "iterations", "ours − paper",
                                                    *THEIRS_PLAIN})


def table6_metrics(table: pd.DataFrame) -> dict:
    """Table 6 as nested numbers, for scripts (NaN becomes null)."""
    def clean(x):
        return None if isinstance(x, float) and math.isnan(x) else x

    keys = ["params", "runs", "diverged", "test_error", "mean", "std", "paper", "diff"]
    return {row["net"]: {k: clean(row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys}
            for _, row in table.iterrows()}


def write_table(table: pd.DataFrame, out_dir: str | Path, note: str = "", profile: str = "paper") -> None:
    """table6.csv (every column, full precision), table6.md (with `note` under it) and table6.json
    (DVC metrics)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table6.csv", index=False)
    (out / "table6.md").write_text(table6_markdown(table, profile) + (f"\n\n{note}" if note else "") + "\n")
    (out / "table6.json").write_text(json.dumps(table6_metrics(table), indent=2, ensure_ascii=False) + "\n")


def error_panel(ax, runs: Runs, nets: list[tuple[str, int]], curves=("train", "test"), title: str = "") -> None:
    """Error (%) against iterations (1e4) in the paper's style; several seeds are averaged. Runs
    shorter than 10k iterations (the quick look) count plain iterations: 720 reads badly as 0.07."""
    colours = depth_colours(runs.metrics.depth)
    scale, x = (1e4, "iter. (1e4)") if runs.history.iteration.max() >= 10_000 else (1, "iterations")
    handles = []
    for arch, depth in nets:
        seeds, label = _status(runs, arch, depth)
        h = runs.history
        h = h[(h.arch == arch) & (h.depth == depth) & (h.shortcut == "A") & h.seed.isin(seeds)]
        h = h.assign(**{x: h.iteration / scale})
        colour = colours[depth]
        for curve, style in (("train", TRAIN_STYLE), ("test", TEST_STYLE)):
            points = h.dropna(subset=[f"{curve}_error"])
            if curve in curves and len(points):
                sns.lineplot(points, x=x, y=f"{curve}_error", ax=ax, color=colour,
                             errorbar=None, **style)
        shown = TRAIN_STYLE if tuple(curves) == ("train",) else TEST_STYLE
        handles.append(Line2D([], [], color=colour, label=label, **{**shown, **({} if seeds else NO_LINE)}))
    handles += [Line2D([], [], color="k", label=f"{c} error ({'dashed' if c == 'train' else 'bold'})",
                       **(TRAIN_STYLE if c == "train" else TEST_STYLE)) for c in curves]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set(xlabel=x, ylabel="error (%)", title=title)
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(6))


def fig6(runs: Runs, profile: str = "paper") -> Figure:
    """The paper's Figure 6: plain nets, ResNets, and ResNet-110 against ResNet-1202. The paper's
    report draws all three panels, naming missing nets; the quick look draws only its own nets, in
    the panels that have some."""
    panels = [([("plain", d) for d in (20, 32, 44, 56)], "plain (plain-110 only in the table)"),
              ([("resnet", d) for d in PAPER_DEPTHS], "ResNet"),
              ([("resnet", 110), ("resnet", 1202)], "ResNet-110 and ResNet-1202")]
    if profile != "paper":  # every net it ran, plain ones left, residual ones right
        ran = sorted({(a, int(d)) for a, d in runs.metrics[["arch", "depth"]].itertuples(index=False)})
        panels = [(nets, title) for nets, title in (([n for n in ran if n[0] == "plain"], "plain"),
                                                     ([n for n in ran if n[0] == "resnet"], "ResNet")) if nets]
        panels = panels or [([], "no runs")]
    fig, axes = _figure(1, len(panels), (5.4 * len(panels), 4.5))
    for ax, (nets, title) in zip(axes, panels):
        error_panel(ax, runs, nets, title=title)
    if profile == "paper" and runs.select("resnet", 1202).empty:
        axes[2].text(0.5, 0.5, "no ResNet-1202 run", transform=axes[2].transAxes, ha="center", va="center",
                     color="0.4")
    return fig


def present(runs: Runs, nets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The nets of `nets` that have at least one run."""
    return [(arch, depth) for arch, depth in nets if not runs.select(arch, depth).empty]


def fig1(runs: Runs, profile: str = "paper") -> Figure:
    """The paper's Figure 1: plain-20 and plain-56, training error left, test error right (the
    quick look: the plain nets it ran)."""
    fig, (left, right) = _figure(1, 2, (11, 4.2))
    nets = [("plain", 20), ("plain", 56)]
    if profile != "paper":
        nets = sorted({("plain", int(d)) for d in runs.metrics[runs.metrics.arch == "plain"].depth}) or nets
    error_panel(left, runs, nets, curves=("train",), title="training error")
    error_panel(right, runs, nets, curves=("test",), title="test error")
    return fig


FIG7_NETS = [("plain", 20), ("plain", 56), ("resnet", 20), ("resnet", 56), ("resnet", 110)]


def layer_stds(runs: Runs, arch: str, depth: int) -> pd.Series:
    """Each 3x3 layer's response std in network order, averaged over the finished seeds."""
    seeds, _ = _status(runs, arch, depth)
    r = runs.responses
    r = r[(r.arch == arch) & (r.depth == depth) & (r.shortcut == "A") & r.seed.isin(seeds)]
    return r.groupby("layer")["std"].mean()


def fig7(runs: Runs, profile: str = "paper") -> Figure:
    """The paper's Figure 7: response std per 3x3 layer, in network order (top) and sorted (bottom).
    Colour is the depth, as everywhere; plain nets dotted, ResNets solid. The quick look draws only
    the nets it ran."""
    fig, (top, bottom) = _figure(2, 1, (9, 7))
    colours = depth_colours(runs.metrics.depth)
    handles = []
    for arch, depth in FIG7_NETS if profile == "paper" else present(runs, FIG7_NETS):
        _, label = _status(runs, arch, depth)
        stds = layer_stds(runs, arch, depth)
        style = {"color": colours[depth], "linestyle": ":" if arch == "plain" else "-", "linewidth": 1.5}
        if len(stds):
            ranked = np.sort(stds.to_numpy())[::-1]
            sns.lineplot(x=stds.index.to_numpy(), y=stds.to_numpy(), ax=top, **style)
            sns.lineplot(x=np.arange(1, len(ranked) + 1), y=ranked, ax=bottom, **style)
        handles.append(Line2D([], [], label=label, **{**style, **({} if len(stds) else NO_LINE)}))
    top.set(xlabel="layer index (original)", ylabel="std", title="responses of the 3x3 layers")
    bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    top.legend(handles=handles, fontsize="small", loc="best")
    return fig


def _final(runs: Runs, arch: str, depth: int, column: str) -> tuple[float | None, str]:
    """Mean over finished seeds of a final-iteration number, or why there is none."""
    sel = runs.select(arch, depth)
    done = sel[~sel.diverged][column].dropna()
    if sel.empty:
        return None, f"{net_name(arch, depth)} missing"
    if done.empty:
        return None, f"{net_name(arch, depth)} diverged"
    return float(done.mean()), ""


def _mean_response(runs: Runs, arch: str, depth: int) -> tuple[float | None, str]:
    stds = layer_stds(runs, arch, depth)
    if len(stds):
        return float(stds.mean()), ""
    return None, f"{net_name(arch, depth)} {'missing' if runs.select(arch, depth).empty else 'diverged'}"


def degradation(runs: Runs, column: str = "train_error") -> str:
    """Fig. 1's degradation problem: does the deeper plain net end worse?"""
    what = "training" if column == "train_error" else "test"
    question = f"plain-56 ends with a higher {what} error than plain-20"
    (deep, why56), (shallow, why20) = _final(runs, "plain", 56, column), _final(runs, "plain", 20, column)
    if deep is None or shallow is None:
        return f"{question}: unknown ({'; '.join(w for w in (why56, why20) if w)})"
    return f"{question}: {_yes(deep > shallow)} ({deep:.2f}% vs {shallow:.2f}%)"


def residual_fix(runs: Runs, column: str = "train_error", depth: int = 56) -> str:
    """The fix (Fig. 6, left vs middle): does the residual net end better than the plain net of
    the same depth and parameters?"""
    what = "training" if column == "train_error" else "test"
    question = f"ResNet-{depth} ends with a lower {what} error than plain-{depth}"
    (res, why_r), (plain, why_p) = _final(runs, "resnet", depth, column), _final(runs, "plain", depth, column)
    if res is None or plain is None:
        return f"{question}: unknown ({'; '.join(w for w in (why_r, why_p) if w)})"
    return f"{question}: {_yes(res < plain)} ({res:.2f}% vs {plain:.2f}%)"


def _trend(values: dict[int, float], missing: list[str], unit: str) -> str:
    """'yes (20: 8.75%, 32: 7.51%)' if the values fall strictly with depth; 'unknown' under two."""
    shown = ", ".join(f"{d}: {v:.2f}{unit}" for d, v in values.items())
    gone = f"; {', '.join(missing)}" if missing else ""
    if len(values) < 2:
        return f"unknown (fewer than two ResNets to compare{gone})"
    falling = all(a > b for a, b in zip(list(values.values()), list(values.values())[1:]))
    return f"{_yes(falling)} ({shown}{gone})"


def deeper_resnets_better(runs: Runs) -> str:
    """Table 6 (20 to 110): each deeper ResNet ends with a lower test error (mean over seeds)."""
    values, missing = {}, []
    for d in PAPER_DEPTHS:
        v, why = _final(runs, "resnet", d, "test_error")
        values.update({d: v} if v is not None else {})
        missing += [why] if why else []
    return f"deeper ResNets (20 to 110) end with lower test error: {_trend(values, missing, '%')}"


def responses_smaller(runs: Runs) -> str:
    """Fig. 7: a ResNet's layer responses (mean std over layers) are below the plain net's of its depth."""
    pairs, missing = [], []
    for d in (20, 56):
        (res, why_r), (pln, why_p) = _mean_response(runs, "resnet", d), _mean_response(runs, "plain", d)
        if res is None or pln is None:
            missing += [w for w in (why_r, why_p) if w]
        else:
            pairs.append((d, res, pln))
    question = "ResNet responses are smaller than plain responses (mean std over layers)"
    gone = f"; {', '.join(missing)}" if missing else ""
    if not pairs:
        return f"{question}: unknown (no depth with both nets{gone})"
    shown = "; ".join(f"ResNet-{d} {r:.2f} vs plain-{d} {p:.2f}" for d, r, p in pairs)
    return f"{question}: {_yes(all(r < p for _, r, p in pairs))} ({shown}{gone})"


def deeper_responses_smaller(runs: Runs, depths=(20, 56, 110)) -> str:
    """Fig. 7: deeper ResNets have smaller responses (ResNet-20, 56, 110)."""
    values, missing = {}, []
    for d in depths:
        v, why = _mean_response(runs, "resnet", d)
        values.update({d: v} if v is not None else {})
        missing += [why] if why else []
    return f"deeper ResNets have smaller responses (mean std over layers): {_trend(values, missing, '')}"


def verdicts(runs: Runs, profile: str = "paper") -> list[str]:
    """The paper's claims, each answered yes/no/unknown from our runs with the numbers behind it.

    The quick look answers only what its runs can: Table 6's ordering needs the paper's whole
    schedule, and a claim about nets it does not run is "not tested by the quick look"."""
    runs = runs.on("cifar10")
    fig1 = [degradation(runs, "train_error"), degradation(runs, "test_error"), residual_fix(runs, "train_error"),
            residual_fix(runs, "test_error")]
    if profile == "paper":
        return fig1 + [deeper_resnets_better(runs), responses_smaller(runs), deeper_responses_smaller(runs)]
    table6_claim = ("deeper ResNets (20 to 110) end with lower test error: not tested by the quick look "
                    "(Table 6's ordering needs the paper's 64,000 iterations: `make repro`)")
    depths = [d for d in (20, 56, 110) if not runs.select("resnet", d).empty]
    return [_not_tested(line) for line in
            fig1 + [table6_claim, responses_smaller(runs), deeper_responses_smaller(runs, depths or (20, 56))]]


def _not_tested(line: str) -> str:
    """'claim: unknown (X missing; Y missing)' -> 'claim: not tested by the quick look (it does not run X, Y)'."""
    found = re.fullmatch(r"(.*): unknown \((.*)\)", line)
    reasons = found[2].split("; ") if found else []
    if not reasons or not all(r.endswith(" missing") for r in reasons):
        return line
    return f"{found[1]}: not tested by the quick look (it does not run {', '.join(r[:-8] for r in reasons)})"
