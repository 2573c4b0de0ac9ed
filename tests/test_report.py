"""The report (issue #4): Table 6, Figures 1, 6 and 7 and the verdicts, built from run folders.

tests/fixtures/runs holds short real runs made by tests/fixtures/make_runs.py: a partial grid on
purpose (missing nets, a diverged net, a net with one diverged seed of two, nets with one seed and
with two). Expected numbers here are read from those metrics.json files directly, not through
`report.collect`.

The strict notebook test: notebooks/report.ipynb is committed without outputs and with the
defaults a user wants (../results, ../reports). tests/fixtures/report.ipynb is that notebook
executed by papermill on the fixture (results_dir="runs", out_dir="reports", both relative to
the notebook's folder), keeping the outputs of the table, run-list and verdict cells; the figure
cells are tagged nbval-ignore-output. One test checks that its cells are still the committed
notebook's; another copies it next to a copy of the runs and runs `pytest --nbval` (strict) on it,
so the current code must print exactly the committed table and verdicts.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import nbformat  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from replicate import pipeline, report  # noqa: E402
from replicate.papers import he2015  # noqa: E402
from replicate.outputs import METRIC_KEYS  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = FIXTURES / "runs"
EXPECTED_NOTEBOOK = FIXTURES / "report.ipynb"
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "report.ipynb"
# He et al. 2015, Table 6 (ResNets, CIFAR-10 test error %), copied from the paper independently of
# he2015.PAPER_TABLE6, so that a wrong constant there fails here.
THE_PAPERS_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
FILES = ["table6.csv", "table6.md", "table6.json", "fig6.png", "fig1.png", "fig7.png", "verdicts.md"]
PAPER_GRID = [f"{n}-{d}" for n in ("plain", "ResNet") for d in (20, 32, 44, 56, 110)]


def raw_metrics() -> pd.DataFrame:
    """Each fixture run's metrics.json and run.json, read as plain JSON."""
    return pd.DataFrame([{**json.loads((p.parent / "run.json").read_text()), **json.loads(p.read_text())}
                         for p in sorted(RUNS.glob("*/metrics.json"))])


def results(tmp_path: Path, names: list[str]) -> Path:
    """A results folder holding only the named fixture runs."""
    root = tmp_path / "results"
    root.mkdir(exist_ok=True)
    for name in names:
        shutil.copytree(RUNS / name, root / name)
    return root


def fake_run(root: Path, source: str, name: str, **changes) -> None:
    """A run folder copied from a fixture run with some metrics changed (e.g. another depth)."""
    shutil.copytree(RUNS / source, root / name)
    for file, keys in (("metrics.json", METRIC_KEYS), ("run.json", set(changes) - set(METRIC_KEYS))):
        path = root / name / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **{k: changes[k] for k in keys if k in changes}}))


def legend(ax) -> dict[str, tuple]:
    """Legend label -> line colour."""
    leg = ax.get_legend()
    return {t.get_text(): matplotlib.colors.to_rgb(h.get_color()) for t, h in zip(leg.get_texts(), leg.legend_handles)}


def row(table: pd.DataFrame, net: str) -> pd.Series:
    (i,) = table.index[table.net == net]
    return table.loc[i]


@pytest.fixture(scope="module")
def runs() -> report.Runs:
    return report.collect(RUNS)


@pytest.fixture(scope="module")
def table(runs) -> pd.DataFrame:
    return he2015.table6(runs)


def test_runs_are_read_by_content_not_folder_name(tmp_path):
    root = tmp_path / "anything"
    for i, src in enumerate(sorted(RUNS.iterdir())):
        shutil.copytree(src, root / f"nested{i % 2}" / f"run{i}")
    renamed, original = report.collect(root), report.collect(RUNS)
    cols = report.RUN_KEYS + ["test_error", "train_error", "diverged"]
    pd.testing.assert_frame_equal(renamed.metrics[cols], original.metrics[cols])
    assert len(renamed.history) == len(original.history) and len(renamed.responses) == len(original.responses)


def test_table_numbers_are_the_fixture_metrics(table, tmp_path):
    raw = raw_metrics()
    for (arch, depth), sel in raw.groupby(["arch", "depth"]):
        r = row(table, report.net_name(arch, depth))
        errors = sel[~sel.diverged].test_error.astype(float)
        assert r.params == sel.params.iloc[0]
        assert (r.runs, r.diverged) == (len(errors), int(sel.diverged.sum()))
        if len(errors):
            assert r.test_error == errors.min() and r["mean"] == errors.mean()
        if len(errors) > 1:
            assert r["std"] == errors.std()
        if arch == "resnet":
            assert r.paper == THE_PAPERS_TABLE6[depth]
            assert r["diff"] == errors.min() - r.paper if len(errors) else pd.isna(r["diff"])
    he2015.write_table(table, tmp_path)
    csv = pd.read_csv(tmp_path / "table6.csv")
    for col in ["params", "runs", "diverged", "test_error", "mean", "std", "paper", "diff"]:
        pd.testing.assert_series_equal(csv[col], table[col], check_dtype=False)
    metrics = json.loads((tmp_path / "table6.json").read_text())
    assert metrics["ResNet-110"]["test_error"] == row(table, "ResNet-110").test_error
    assert metrics["plain-44"]["test_error"] is None
    md = (tmp_path / "table6.md").read_text()
    assert all(f"| {net} |" in md for net in table.net)


def test_table_lists_the_whole_grid_with_missing_and_diverged(table):
    assert list(table.net) == PAPER_GRID
    ours = dict(zip(table.net, table.ours))
    for net in ("plain-44", "plain-110", "ResNet-44"):
        assert ours[net] == "missing"
    assert ours["plain-32"] == "diverged"
    assert ours["ResNet-32"] == f"{row(table, 'ResNet-32').test_error:.2f}; 1 of 2 diverged"
    assert ours["ResNet-20"] == f"{row(table, 'ResNet-20').test_error:.2f}"
    r = row(table, "ResNet-110")
    assert ours["ResNet-110"] == f"{r.test_error:.2f} ({r['mean']:.2f}±{r['std']:.2f})"
    assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d±\d+\.\d\d\)", ours["plain-20"])
    # The paper's and the replications' numbers sit only in their own columns.
    assert row(table, "ResNet-110").paper_text == "6.43 (6.61±0.16)"
    assert table[table.arch == "plain"].paper.isna().all()
    theirs = list(he2015.THEIRS_PLAIN)
    assert row(table, "plain-56")[theirs].tolist() == [12.76, 11.86]
    assert table[table.arch == "resnet"][theirs].isna().all().all()


def test_parameters_exact_and_in_millions(table):
    # Option A counts (PAPER.md) and Table 6's rounding, for rows with runs and without.
    exact = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
    assert dict(zip(table.depth, table.params)) == exact
    assert list(table["params (M)"][:5]) == ["0.27M", "0.46M", "0.66M", "0.85M", "1.7M"]
    assert report.params_m(19_421_274) == "19.4M"


@pytest.mark.parametrize("names, net, expected", [
    ([], "ResNet-110", "missing"),
    (["resnet-110-0"], "ResNet-110", "single"),
    (["resnet-110-0", "resnet-110-1"], "ResNet-110", "several"),
    (["plain-32-0"], "plain-32", "diverged"),
])
def test_partial_grids(tmp_path, names, net, expected):
    runs = report.collect(results(tmp_path, names))
    table = he2015.table6(runs)
    assert list(table.net) == PAPER_GRID  # never shorter
    ours = row(table, net).ours
    figs = {"fig6": he2015.fig6(runs), "fig1": he2015.fig1(runs), "fig7": he2015.fig7(runs)}
    assert {k: len(f.axes) for k, f in figs.items()} == {"fig6": 3, "fig1": 2, "fig7": 2}
    panel = figs["fig6"].axes[0 if net.startswith("plain") else 1]
    labels = list(legend(panel))
    assert labels[-2:] == ["train error (dashed)", "test error (bold)"]
    name = {"missing": f"{net} (missing)", "single": net, "several": f"{net} (mean of 2)",
            "diverged": f"{net} (diverged at 4)"}[expected]
    assert name in labels
    assert {"missing": ours == "missing", "diverged": ours == "diverged",
            "single": re.fullmatch(r"\d+\.\d\d", ours), "several": "±" in ours}[expected]
    verdicts = he2015.verdicts(runs)
    assert len(verdicts) == 7 and all(re.search(r": (yes|no|unknown) \(", v) for v in verdicts)


def test_resnet_1202_gets_a_row_and_the_third_panel(tmp_path):
    root = results(tmp_path, ["resnet-110-0"])
    fig = he2015.fig6(report.collect(root))
    assert "ResNet-1202 (missing)" in legend(fig.axes[2])
    assert "no ResNet-1202 run" in [t.get_text() for t in fig.axes[2].texts]
    fake_run(root, "resnet-110-0", "resnet-1202-0", depth=1202, params=19_421_274)
    runs = report.collect(root)
    table = he2015.table6(runs)
    assert list(table.net) == PAPER_GRID + ["ResNet-1202"]
    assert (row(table, "ResNet-1202").paper, row(table, "ResNet-1202")["params (M)"]) == (7.93, "19.4M")
    third = he2015.fig6(runs).axes[2]
    assert set(legend(third)) >= {"ResNet-110", "ResNet-1202"} and not third.texts


def test_one_colour_per_depth_in_every_figure(runs):
    seen: dict[int, set] = {}
    for fig in (he2015.fig6(runs), he2015.fig1(runs), he2015.fig7(runs)):
        for ax in fig.axes:
            if ax.get_legend() is None:
                continue
            for label, colour in legend(ax).items():
                if m := re.match(r"(plain|ResNet)-(\d+)", label):
                    seen.setdefault(int(m[2]), set()).add(colour)
    assert all(len(c) == 1 for c in seen.values()), seen
    assert len({c for cs in seen.values() for c in cs}) == len(seen)  # depths differ in colour


def test_iterations_axis_is_in_1e4_as_the_papers_for_long_runs_and_plain_for_short_ones(runs):
    """The fixture's runs are tens of iterations, like the quick look's 720: plain counts. The same
    runs stretched to the paper's length are drawn in units of 1e4."""
    longest = runs.history.iteration.max()
    short = he2015.fig1(runs).axes[0]
    assert short.get_xlabel() == "iterations" and max(l.get_xdata().max() for l in short.lines if len(l.get_xdata())) == longest
    stretched = dataclasses.replace(runs, history=runs.history.assign(iteration=runs.history.iteration * 1000))
    long = he2015.fig1(stretched).axes[0]
    assert long.get_xlabel() == "iter. (1e4)"
    assert max(l.get_xdata().max() for l in long.lines if len(l.get_xdata())) == pytest.approx(longest * 1000 / 1e4)


def test_figures_decode_as_images(runs, tmp_path):
    for name, (fig, axes) in {"fig6": (he2015.fig6(runs), 3), "fig1": (he2015.fig1(runs), 2),
                              "fig7": (he2015.fig7(runs), 2)}.items():
        assert len(fig.axes) == axes
        image = mpimg.imread(report.save(fig, tmp_path / f"{name}.png"))
        assert image.ndim == 3 and min(image.shape[:2]) > 300


def test_verdicts_from_the_data(runs, tmp_path):
    raw = raw_metrics()
    done = raw[~raw.diverged]
    p56, p20 = (done[(done.arch == "plain") & (done.depth == d)].train_error.mean() for d in (56, 20))
    lines = he2015.verdicts(runs)
    assert lines[0] == (f"plain-56 ends with a higher training error than plain-20: "
                        f"{'yes' if p56 > p20 else 'no'} ({p56:.2f}% vs {p20:.2f}%)")
    r56 = done[(done.arch == "resnet") & (done.depth == 56)].train_error.mean()
    assert lines[2] == (f"ResNet-56 ends with a lower training error than plain-56: "
                        f"{'yes' if r56 < p56 else 'no'} ({r56:.2f}% vs {p56:.2f}%)")
    assert lines[4].endswith("; ResNet-44 missing)")
    root = results(tmp_path, ["plain-20-0"])
    assert he2015.degradation(report.collect(root)) == \
        "plain-56 ends with a higher training error than plain-20: unknown (plain-56 missing)"
    fake_run(root, "plain-32-0", "plain-56-0", depth=56)
    assert he2015.degradation(report.collect(root)).endswith("unknown (plain-56 diverged)")
    assert he2015.residual_fix(report.collect(root)).endswith("unknown (ResNet-56 missing; plain-56 diverged)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert all(": unknown (" in v for v in he2015.verdicts(report.collect(empty)))


def test_bad_results_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        report.collect(tmp_path / "nowhere")
    root = results(tmp_path, ["plain-20-0"])
    shutil.copytree(RUNS / "plain-20-0", root / "old-name")
    with pytest.raises(ValueError, match="same run"):
        report.collect(root)


def code_cells(nb) -> list[tuple]:
    return [(c.source, c.metadata.get("tags", [])) for c in nb.cells
            if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def test_expected_notebook_is_the_committed_notebook():
    committed, expected = nbformat.read(NOTEBOOK, 4), nbformat.read(EXPECTED_NOTEBOOK, 4)
    assert code_cells(expected) == code_cells(committed), \
        "notebooks/report.ipynb changed: run `.venv/bin/python tests/fixtures/make_runs.py --notebook`"
    assert not any(c.get("outputs") for c in committed.cells), "commit notebooks/report.ipynb without outputs"
    assert 'results_dir = "../results"' in committed.cells[1].source
    injected = [c.source for c in expected.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected == ['# Parameters\nresults_dir = "runs"\nout_dir = "reports"\n']


def test_notebook_strict_nbval_on_the_fixture(tmp_path):
    shutil.copytree(RUNS, tmp_path / "runs")
    shutil.copy(EXPECTED_NOTEBOOK, tmp_path / "report.ipynb")
    done = subprocess.run([sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
                           "-q", "report.ipynb"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = tmp_path / "reports"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name in ("fig6.png", "fig1.png", "fig7.png"):
        assert mpimg.imread(out / name).ndim == 3
    csv = pd.read_csv(out / "table6.csv")
    table = he2015.table6(report.collect(RUNS))
    pd.testing.assert_series_equal(csv.test_error, table.test_error)


def test_stage_command_writes_the_executed_notebook_and_every_file(tmp_path):
    """The report on any results folder: `python -m replicate.pipeline report --results ... --out ...`."""
    out = tmp_path / "new" / "reports"  # the entry point creates it; papermill alone would not
    pipeline.main(["report", "--notebook", str(NOTEBOOK), "--results", str(RUNS), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES + ["report.ipynb"])
    executed = nbformat.read(out / "report.ipynb", 4)
    assert any("plain-56 ends with" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


def test_label_says_what_the_runs_are(tmp_path):
    """The line under every figure and the table: the caption, then the facts read from the runs
    (images, iterations, hardware, precision), the date and the commit."""
    root = tmp_path / "results"
    root.mkdir()
    for i, source in enumerate(["plain-20-0", "resnet-20-0"]):
        fake_run(root, source, source, train_images=5085, test_images=1017, precision="bf16", iterations=600,
                 device="cpu", device_name="x86_64")
    note = report.label(report.collect(root), "Quick look.")
    assert note.startswith("Quick look. 2 runs on 5,085 training and 1,017 test images, 600 iterations, "
                           "CPU x86_64 (bf16); report of ")
    assert re.search(r"report of \d{4}-\d\d-\d\d, commit [0-9a-f]{7}(\+modified)?\.$", note), note
    # older runs without the provenance fields: "?" rather than a guess
    assert "runs on ? training and ? test images" in report.label(report.collect(RUNS))


QUICK = ["plain-20-0", "plain-56-0", "resnet-20-0", "resnet-56-0"]


def test_the_quick_report_shows_only_what_the_quick_look_ran(tmp_path):
    """Its four nets only: no 'missing' rows, no 'ours - paper' against a far shorter run, no empty
    panel, and no verdict it cannot give."""
    runs = report.collect(results(tmp_path, QUICK))
    table = he2015.table6(runs, "quick")
    assert list(table.net) == ["plain-20", "plain-56", "ResNet-20", "ResNet-56"]
    assert "missing" not in set(table.ours) and table["diff"].isna().all()
    assert list(table.paper[table.arch == "resnet"]) == [THE_PAPERS_TABLE6[20], THE_PAPERS_TABLE6[56]]
    md = he2015.table6_markdown(table, "quick")
    assert "ours − paper" not in md and "a reference, not comparable" in md and "| 8.75 |" in md
    assert "ours − paper" in he2015.table6_markdown(he2015.table6(runs))  # the paper's report keeps it
    fig = he2015.fig6(runs, "quick")
    assert [ax.get_title() for ax in fig.axes] == ["plain", "ResNet"]
    labels = [label for ax in fig.axes for label in legend(ax)]
    assert not [label for label in labels if "missing" in label] and not [t for ax in fig.axes for t in ax.texts]
    assert sorted(label for label in legend(he2015.fig7(runs, "quick").axes[0])) == [
        "ResNet-20", "ResNet-56", "plain-20", "plain-56"]
    lines = he2015.verdicts(runs, "quick")
    assert len(lines) == 7 and lines[:4] == he2015.verdicts(runs)[:4]
    assert lines[4].endswith("not tested by the quick look (Table 6's ordering needs the paper's 64,000 "
                             "iterations: `make repro`)")
    assert re.search(r"deeper ResNets have smaller responses .*: (yes|no) \(20: [\d.]+, 56: [\d.]+\)$", lines[6])
    assert not [line for line in lines if "unknown" in line or "missing" in line]
    (tmp_path / "small").mkdir()
    small = report.collect(results(tmp_path / "small", ["plain-20-0", "resnet-20-0"]))
    assert [len(legend(ax)) - 2 for ax in he2015.fig6(small, "quick").axes] == [1, 1]  # one net a panel
    assert he2015.verdicts(small, "quick")[0] == ("plain-56 ends with a higher training error than plain-20: "
                                                  "not tested by the quick look (it does not run plain-56)")


# --- verdicts and curves from planted numbers: expectations set by construction -----------------

def planted(errors: dict, responses: dict | None = None, history: dict | None = None) -> "report.Runs":
    """Runs whose final errors {(arch, depth): (train, test)}, mean responses {(arch, depth): std}
    and histories {(arch, depth): [(iteration, train, test)]} are the given numbers, one seed each."""
    keys = lambda a, d: {"arch": a, "depth": d, "shortcut": "A", "seed": 0, "dataset": "cifar10"}  # noqa: E731
    metrics = pd.DataFrame([{**keys(a, d), "train_error": tr, "test_error": te, "diverged": False}
                            for (a, d), (tr, te) in errors.items()])
    resp = pd.DataFrame([{**keys(a, d), "layer": i, "std": std * f} for (a, d), std in (responses or {}).items()
                         for i, f in ((1, 0.5), (2, 1.5))], columns=report.RUN_KEYS + ["layer", "std"])
    hist = pd.DataFrame([{**keys(a, d), "iteration": it, "lr": 0.1, "train_loss": 1.0, "train_error": tr,
                          "test_error": te} for (a, d), rows in (history or {}).items() for it, tr, te in rows],
                        columns=report.RUN_KEYS + report.HISTORY)
    return report.Runs(metrics, hist, resp)


@pytest.mark.parametrize("holds", [True, False])
def test_each_verdict_follows_the_planted_numbers_both_ways(holds):
    """Every claim answered 'yes' when the planted numbers make it true, and 'no' when they are
    swapped: an inverted comparison in any verdict fails here."""
    good, bad = (10.0, 30.0) if holds else (30.0, 10.0)  # the better net's error, the worse one's
    runs = planted({("plain", 20): (good, good + 1), ("plain", 56): (bad, bad + 1),
                    ("resnet", 20): (good, good), ("resnet", 56): (good - 5, good - 4)},
                   responses={("plain", 20): 3.0, ("resnet", 20): 1.0 if holds else 5.0,
                              ("plain", 56): 3.0, ("resnet", 56): 0.5 if holds else 6.0})
    answer = "yes" if holds else "no"
    assert he2015.degradation(runs, "train_error") == (
        f"plain-56 ends with a higher training error than plain-20: {answer} ({bad:.2f}% vs {good:.2f}%)")
    assert he2015.degradation(runs, "test_error").split(": ")[1].startswith(answer)
    # ResNet-56 at good-5 beats plain-56 only when plain-56 is the worse net
    assert he2015.residual_fix(runs, "train_error").split(": ")[1].startswith(answer)
    assert he2015.responses_smaller(runs).split(": ")[1].startswith(answer)
    assert he2015.deeper_responses_smaller(runs, (20, 56)).split(": ")[1].startswith(answer)
    falling = {20: 9.0, 32: 8.0, 44: 7.0, 56: 6.0, 110: 5.0}
    table6 = planted({("resnet", d): (1.0, e if holds else 20.0 - e) for d, e in falling.items()})
    assert he2015.deeper_resnets_better(table6).split(": ")[1].startswith(answer)


def test_a_trend_with_one_step_the_wrong_way_is_no():
    runs = planted({("resnet", d): (1.0, e) for d, e in {20: 9.0, 32: 8.0, 44: 8.5, 56: 6.0, 110: 5.0}.items()})
    assert he2015.deeper_resnets_better(runs).split(": ")[1].startswith("no")


def test_fig1_draws_each_nets_own_curve_training_dashed_test_solid():
    rows = {("plain", 20): [(100, 50.0, 60.0), (200, 40.0, 55.0)], ("plain", 56): [(100, 70.0, 75.0), (200, 65.0, 68.0)]}
    runs = planted({net: rows[net][-1][1:] for net in rows}, history=rows)
    left, right = he2015.fig1(runs).axes
    for ax, column, style in ((left, 1, "--"), (right, 2, "-")):
        drawn = sorted((tuple(line.get_xdata()), tuple(line.get_ydata()), line.get_linestyle())
                       for line in ax.get_lines() if len(line.get_xdata()))
        expected = sorted(((100.0, 200.0), tuple(r[column] for r in rows[net]), style) for net in rows)
        assert drawn == expected


def test_a_history_without_its_test_error_column_is_named(tmp_path):
    root = results(tmp_path, ["plain-20-0"])
    path = root / "plain-20-0" / "history.csv"
    pd.read_csv(path).drop(columns="test_error").to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"plain-20-0/history.csv has no test_error column: .*Train the run again"):
        report.collect(root)
