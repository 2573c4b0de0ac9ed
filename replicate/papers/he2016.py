"""He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027), CIFAR-10 and -100.

This paper's place: its runs (params.yaml's `he2016` section: the protocol's changes, the grid of
Tables 1 to 3, the quick look), its report (Tables 1 to 3 as the median of the runs with mean and
std beside it, Figures 1, 3 and 6, the paper's numbers beside ours), and its claims. Its nets are
replicate/preact.py's, and the 2015 `resnet` as the "original" unit. The protocol is 2015's but for
a warm-up at lr 0.01 over the first 400 iterations of every net (train.Config.warmup_iterations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..data import source, suffix
from ..preact import ARCHS, TABLE1, TABLE2
from ..report import TEST_STYLE, TRAIN_STYLE, Runs, _figure, _markdown, _yes, cell, save

YEAR = "2016"
TITLE = "He et al. 2016, Identity Mappings in Deep Residual Networks (arXiv:1603.05027)"
SECTION = "he2016"
NETS = ("resnet", *ARCHS)
DATASETS = ("cifar10", "cifar100")  # Table 3's ResNet-164 and -1001 also on CIFAR-100
QUICK_NOTE = "Nets of 56 layers (the paper's: 110 and 164), no warm-up (the paper's: 400 iterations at lr 0.01)."
OUTPUTS = {"paper": ("tables.csv", "tables.md", "tables.json", "fig1.png", "fig3.png", "fig6.png"),
           "quick": ("tables.csv", "tables.md", "tables.json", "quick.png")}
FAIL = 20.0   # the paper's "fail": a CIFAR-10 test error above 20%

# The paper's CIFAR-10 test errors (%), median of 5 runs ("fail": above 20%), by row.
PAPER_TABLE1 = {"original": 6.61, "constant scaling 0, 1": "fail", "constant scaling 0.5, 1": "fail",
                "constant scaling 0.5, 0.5": 12.35, "exclusive gating b_g=0": "fail",
                "exclusive gating b_g=-5": "fail", "exclusive gating b_g=-6": 8.70, "exclusive gating b_g=-7": 9.81,
                "shortcut-only gating b_g=0": 12.86, "shortcut-only gating b_g=-6": 6.91, "1x1 conv shortcut": 12.22,
                "dropout shortcut": "fail"}
PAPER_TABLE2 = {"original": (6.61, 5.93), "BN after addition": (8.17, 6.50), "ReLU before addition": (7.84, 6.14),
                "ReLU-only pre-activation": (6.71, 5.91), "full pre-activation": (6.37, 5.46)}
# Table 3: data, net, depth, (original arch, its error), (pre-activation arch, its error).
PAPER_TABLE3 = [("cifar10", "ResNet-110, 1-layer skip", 110, ("onelayer", 9.90), ("preactonelayer", 8.91)),
                ("cifar10", "ResNet-110", 110, ("resnet", 6.61), ("preact", 6.37)),
                ("cifar10", "ResNet-164", 164, ("bottleneck", 5.93), ("preactbottleneck", 5.46)),
                ("cifar10", "ResNet-1001", 1001, ("bottleneck", 7.61), ("preactbottleneck", 4.92)),
                ("cifar100", "ResNet-164", 164, ("bottleneck", 25.16), ("preactbottleneck", 24.33)),
                ("cifar100", "ResNet-1001", 1001, ("bottleneck", 27.82), ("preactbottleneck", 22.71))]
FIG3 = ["resnet", "scaling05x05", "exclusivegatingneg6", "shortcutgating0", "convshortcut"]  # at 110

# The claims the quick look shows (docs/sequel.md, "The quick look": measured over seeds on real
# images), as (claim, the net that ends lower, the others), at the quick look's depth. At 480
# iterations they are differences in how fast the nets train, which the paper's figures show too.
QUICK_CLAIMS = [
    ("the identity shortcut ends lower than constant scaling (0.5, 0.5) (Table 1, Fig. 3)", "resnet", ["scaling05x05"]),
    ("the original unit ends lower than BN after addition (Table 2, Fig. 6 left)", "resnet", ["bnafter"]),
    ("full pre-activation ends lowest of the three orders (Table 2)", "preact", ["resnet", "bnafter"]),
]
# What short runs cannot show, and why (docs/sequel.md).
NOT_QUICK = [
    "Table 1's gating, 1x1 conv and dropout shortcuts, and Table 2's ReLU before addition and ReLU-only "
    "pre-activation: not tested by the quick look (`make repro PAPER=2016`)",
    "the pre-activation gain grows with depth: not tested by the quick look (it needs ResNet-1001)",
    "pre-activation ResNet-164 ends with the higher training loss and the lower test error: not tested by the "
    "quick look (the end of the full schedule; early on, pre-activation trains faster)",
]


def rows() -> list[tuple[str, str, str, int, object, str]]:
    """(table, case, arch, depth, the paper's error, data set) of every cell of Tables 1 to 3."""
    cells = [("Table 1", case, arch, 110, PAPER_TABLE1[case], "cifar10") for case, arch in TABLE1.items()]
    for case, archs in TABLE2.items():
        cells += [("Table 2", case, arch, d, err, "cifar10")
                  for arch, d, err in zip(archs, (110, 164), PAPER_TABLE2[case])]
    for data, net, d, (orig, e_orig), (pre, e_pre) in PAPER_TABLE3:
        net = f"{net} ({source(data).name})"
        cells += [("Table 3", f"{net}, original", orig, d, e_orig, data),
                  ("Table 3", f"{net}, pre-activation", pre, d, e_pre, data)]
    return cells


def net(arch: str, depth: int, dataset: str = "cifar10") -> str:
    """A net as its runs are named: preact-110, preactbottleneck-164-cifar100."""
    return f"{arch}-{depth}{suffix(dataset)}"


def _paper_row(arch: str, dataset: str = "cifar10") -> tuple[str, object]:
    """The first cell of Tables 1 to 3 that runs `arch` at the paper's depth: (where, the paper's error)."""
    for table, case, a, d, err, data in rows():
        if a == arch and data == dataset:
            return f"{table}, {case}, {d} layers", err
    return "", None


# --- our numbers -----------------------------------------------------------------------------

def final_loss(runs: Runs, arch: str, depth: int) -> pd.Series:
    """Each finished seed's training loss over its last logged interval."""
    h = runs.history
    h = h[(h.arch == arch) & (h.depth == depth)].dropna(subset=["train_loss"])
    return h.sort_values("iteration").groupby("seed")["train_loss"].last()


def stats(runs: Runs, arch: str, depth: int, column: str = "test_error", fail: bool = True) -> dict:
    """Median, mean and std (ddof 1) over the finished seeds of a final-iteration number, and the
    text the tables print: '6.43 (6.50±0.10, 5 runs)', 'missing', 'diverged', and with `fail` (the
    paper's protocol, not a quick look) 'fail (23.10)' for a test error above FAIL."""
    sel = runs.select(arch, depth, None)
    done = sel[~sel.diverged]
    values = (final_loss(runs, arch, depth)[lambda s: s.index.isin(done.seed)] if column == "train_loss"
              else done[column].dropna())
    n_div = int(sel.diverged.sum())
    out = {"runs": len(values), "diverged": n_div, "median": math.nan, "mean": math.nan, "std": math.nan}
    if values.empty:
        return {**out, "text": cell(len(sel), n_div, None)}
    out.update(median=float(values.median()), mean=float(values.mean()),
               std=float(values.std()) if len(values) > 1 else math.nan)
    text = f"{out['median']:.2f}" if len(values) == 1 else (
        f"{out['median']:.2f} ({out['mean']:.2f}±{out['std']:.2f}, {len(values)} runs)")
    if fail and column == "test_error" and out["median"] > FAIL:
        text = f"fail ({text})"
    return {**out, "text": cell(len(sel), n_div, text)}


def _paper_text(err) -> str:
    return "" if err is None else err if isinstance(err, str) else f"{err:.2f}"


# --- tables ----------------------------------------------------------------------------------

def table(runs: Runs, kind: str = "paper") -> pd.DataFrame:
    """The paper's: every cell of Tables 1 to 3 (CIFAR-10), ours (test error, median over seeds)
    beside the paper's, then any other net that has runs. The quick look's: each net it ran, final
    training and test error."""
    if kind == "paper":
        found, cells = [], {(arch, depth, data) for _, _, arch, depth, _, data in rows()}
        others = [("Other runs", net(a, d, data), a, d, None, data) for data in DATASETS
                  for a, d in ran(runs.on(data)) if (a, d, data) not in cells]
        for table_name, case, arch, depth, paper, data in rows() + others:
            s = stats(runs.on(data), arch, depth, fail=data == "cifar10")  # CIFAR-100's errors are all above FAIL
            found.append({"table": table_name, "case": case, "net": net(arch, depth, data), "data": source(data).name,
                          "ours": s["text"], **{k: s[k] for k in ("runs", "diverged", "median", "mean", "std")},
                          "paper": _paper_text(paper)})
        return pd.DataFrame(found)
    found = []
    for data in DATASETS:
        found += _quick_rows(runs.on(data), data)
    return pd.DataFrame(found)


def _quick_rows(runs: Runs, data: str) -> list[dict]:
    found = []
    for arch, depth in ran(runs):
        where, paper = _paper_row(arch, data)
        train, test = stats(runs, arch, depth, "train_error"), stats(runs, arch, depth, fail=False)
        found.append({"net": net(arch, depth, data), "train error (%)": train["text"], "test error (%)": test["text"],
                      "train_error": train["median"], "test_error": test["median"], "runs": test["runs"],
                      "paper (%)": _paper_text(paper), "paper's cell": where})
    return found


def ran(runs: Runs) -> list[tuple[str, int]]:
    """The (arch, depth) that have runs, in the order of NETS."""
    nets = {(a, int(d)) for a, d in runs.metrics[["arch", "depth"]].itertuples(index=False)}
    return sorted(nets, key=lambda n: (NETS.index(n[0]) if n[0] in NETS else len(NETS), n[0], n[1]))


def markdown(t: pd.DataFrame, kind: str = "paper") -> list[str]:
    """The tables for people, each with its caption."""
    if kind != "paper":
        caption = ("The quick look's nets: final training and test error (%), median over seeds (mean±std with "
                   "several). The paper's number is its full protocol's test error at its own depth: a reference, "
                   "not what these short runs should reach.")
        return [caption + "\n\n" + _markdown(t[["net", "train error (%)", "test error (%)", "paper (%)", "paper's cell"]],
                                             right=set())]
    out = []
    for name, part in t.groupby("table", sort=False):
        data = " and ".join(dict.fromkeys(part.data))
        caption = (f"{name}: {data} test error (%) at the final iteration, the median over seeds (mean±std with "
                   f"several), as the paper reports them; 'fail' is a CIFAR-10 test error above {FAIL:g}%."
                   if name != "Other runs" else "Other runs: nets that are in none of the paper's tables.")
        out.append(f"{caption}\n\n" + _markdown(part[["case", "net", "ours", "paper"]].rename(
            columns={"ours": "ours (%)", "paper": "paper (%)"}), right={"paper (%)"}))
    return out


def tables(runs: Runs, out: Path, note: str, kind: str = "paper") -> list[str]:
    """The tables, written to `out` as tables.csv, tables.md and tables.json; returned as markdown."""
    t, out = table(runs, kind), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = markdown(t, kind)
    t.to_csv(out / "tables.csv", index=False)
    (out / "tables.md").write_text("\n\n".join(texts) + (f"\n\n{note}" if note else "") + "\n")
    clean = t.astype(object).where(t.notna(), None)
    (out / "tables.json").write_text(json.dumps(clean.to_dict("records"), indent=2, ensure_ascii=False) + "\n")
    return texts


# --- figures ---------------------------------------------------------------------------------

def curves(ax, runs: Runs, nets: list[tuple[str, int]], title: str = "", colours: dict | None = None) -> None:
    """The paper's Figures 1, 3 and 6: test error solid (left axis), training loss dashed (right
    axis), against iterations; several seeds averaged; a missing net named in the legend. `colours`:
    net -> colour, the same in every panel of a figure."""
    colours = colours or {net: f"C{i}" for i, net in enumerate(nets)}
    loss_ax = ax.twinx()
    scale, x = (1e4, "iter. (1e4)") if (runs.history.iteration.max() or 0) >= 10_000 else (1, "iterations")
    handles = []
    for arch, depth in nets:
        colour = colours[(arch, depth)]
        h = runs.history
        h = h[(h.arch == arch) & (h.depth == depth)]
        h = h.assign(**{x: h.iteration / scale})
        test = h.dropna(subset=["test_error"]).groupby(x)["test_error"].mean()
        loss = h.dropna(subset=["train_loss"]).groupby(x)["train_loss"].mean()
        ax.plot(test.index, test.to_numpy(), color=colour, **TEST_STYLE)
        loss_ax.plot(loss.index, loss.to_numpy(), color=colour, **TRAIN_STYLE)
        name = f"{arch}-{depth}" + ("" if len(h) else " (missing)")
        handles.append(Line2D([], [], color=colour, label=name, **TEST_STYLE))
    handles += [Line2D([], [], color="k", label="test error (solid)", **TEST_STYLE),
                Line2D([], [], color="k", label="training loss (dashed)", **TRAIN_STYLE)]
    ax.legend(handles=handles, fontsize="small", loc="upper right")
    ax.set(xlabel=x, ylabel="test error (%)", title=title)
    ax.set_ylim(bottom=0)
    loss_ax.set(ylabel="training loss")
    loss_ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(6))


def figures(runs: Runs, out: Path, note: str, kind: str = "paper") -> list[Path]:
    """The paper's: Fig. 1 right (ResNet-1001), Fig. 3 (Table 1's variants), Fig. 6 (ResNet-110
    BN after addition; ResNet-164 pre-activation), all on CIFAR-10, as in the paper. The quick
    look's: one figure of its pairs."""
    runs = runs.on("cifar10")
    if kind != "paper":
        return [save(_draw(runs, quick_panels(runs)), Path(out) / "quick.png", note)]
    drawn = {"fig1": [([("bottleneck", 1001), ("preactbottleneck", 1001)], "ResNet-1001: original, pre-activation")],
             "fig3": [([(a, 110) for a in FIG3], "ResNet-110: shortcut variants (Table 1)")],
             "fig6": [([("resnet", 110), ("bnafter", 110)], "ResNet-110: original, BN after addition"),
                      ([("bottleneck", 164), ("preactbottleneck", 164)], "ResNet-164: original, pre-activation")]}
    return [save(_draw(runs, panels), Path(out) / f"{name}.png", note) for name, panels in drawn.items()]


def _draw(runs: Runs, panels: list[tuple[list[tuple[str, int]], str]]):
    fig, axes = _figure(1, len(panels), (6.2 * len(panels), 4.6))
    every = list(dict.fromkeys(net for nets, _ in panels for net in nets))
    for ax, (nets, title) in zip(axes, panels):
        curves(ax, runs, nets, title, {net: f"C{i}" for i, net in enumerate(every)})
    return fig


def quick_depth(runs: Runs) -> int:
    """The depth the quick look ran its nets at (the commonest; 56 in params.yaml)."""
    depths = runs.metrics.depth
    return int(depths.mode().iloc[0]) if len(depths) else 56


def quick_panels(runs: Runs) -> list[tuple[list[tuple[str, int]], str]]:
    """A panel per claim of the quick look: its nets at the quick look's depth."""
    d = quick_depth(runs)
    return [([(winner, d)] + [(o, d) for o in others], claim.split(" (")[0]) for claim, winner, others in QUICK_CLAIMS]


# --- verdicts --------------------------------------------------------------------------------

def beats(runs: Runs, winner: tuple[str, int], others: list[tuple[str, int]], column: str = "test_error") -> str:
    """'yes (resnet-110 6.61% vs scaling05x05-110 12.35%, ...)': does `winner` end below every other
    (medians over seeds)? Missing and diverged nets are named, never counted as beaten."""
    unit = "" if column == "train_loss" else "%"
    w = stats(runs, *winner, column)
    if math.isnan(w["median"]):
        return f"unknown ({winner[0]}-{winner[1]} {w['text']})"
    shown, gone, wins = [], [], []
    for arch, depth in others:
        s = stats(runs, arch, depth, column)
        if math.isnan(s["median"]):
            gone.append(f"{arch}-{depth} {s['text']}")
        else:
            wins.append(w["median"] < s["median"])
            shown.append(f"{arch}-{depth} {s['median']:.2f}{unit}")
    if not wins:
        return f"unknown (nothing to compare: {'; '.join(gone)})"
    detail = f"{winner[0]}-{winner[1]} {w['median']:.2f}{unit} vs " + ", ".join(shown)
    return f"{_yes(all(wins))} ({detail}{'; ' + '; '.join(gone) if gone else ''})"


def _gain(runs: Runs, depth: int) -> float | None:
    orig, pre = stats(runs, "bottleneck" if depth > 110 else "resnet", depth), stats(
        runs, "preactbottleneck" if depth > 110 else "preact", depth)
    return None if math.isnan(orig["median"]) or math.isnan(pre["median"]) else orig["median"] - pre["median"]


def quick_verdicts(runs: Runs) -> list[str]:
    """QUICK_CLAIMS on the final training and test errors; a net it did not run makes its claim
    "not tested by the quick look"; NOT_QUICK for the others."""
    d, lines = quick_depth(runs), []
    for claim, winner, others in QUICK_CLAIMS:
        absent = [f"{a}-{d}" for a in [winner, *others] if runs.select(a, d, None).empty]
        if absent:
            lines.append(f"{claim}: not tested by the quick look (it does not run {', '.join(absent)})")
            continue
        for column in ("train_error", "test_error"):
            what = "training" if column == "train_error" else "test"
            lines.append(f"{claim}, {what} error, {d} layers: "
                         f"{beats(runs, (winner, d), [(o, d) for o in others], column)}")
    return lines + NOT_QUICK


def verdicts(runs: Runs, kind: str = "paper") -> list[str]:
    """The paper's claims, each answered yes/no/unknown from the runs, with the medians behind it.
    The quick look answers the claims its short runs show (docs/sequel.md says which, and why)."""
    runs, c100 = runs.on("cifar10"), runs.on("cifar100")
    if kind != "paper":
        return quick_verdicts(runs)
    table1 = [(a, 110) for a in TABLE1.values() if a != "resnet"]
    lines = [f"the identity shortcut beats every other of Table 1 (ResNet-110): {beats(runs, ('resnet', 110), table1)}"]
    for depth, col in ((110, 0), (164, 1)):
        orders = [(archs[col], depth) for archs in TABLE2.values()]
        lines.append(f"full pre-activation beats every other order (ResNet-{depth}): "
                     f"{beats(runs, orders[-1], orders[:-1])}")
    gains = {d: _gain(runs, d) for d in (110, 1001)}
    if None in gains.values():
        lines.append("the pre-activation gain grows with depth (ResNet-1001 against ResNet-110): unknown "
                     f"(original or pre-activation missing at {', '.join(str(d) for d, g in gains.items() if g is None)})")
    else:
        lines.append(f"the pre-activation gain grows with depth: {_yes(gains[1001] > gains[110])} "
                     f"({gains[110]:+.2f} points at 110, {gains[1001]:+.2f} at 1001)")
    loss = beats(runs, ("bottleneck", 164), [("preactbottleneck", 164)], "train_loss")
    test = beats(runs, ("preactbottleneck", 164), [("bottleneck", 164)])
    lines.append(f"pre-activation ResNet-164 ends with the higher training loss ({loss}) and the lower test error "
                 f"({test})")
    for depth in (164, 1001):
        lines.append(f"full pre-activation beats the original on CIFAR-100 (ResNet-{depth}, Table 3): "
                     f"{beats(c100, ('preactbottleneck', depth), [('bottleneck', depth)])}")
    return lines
