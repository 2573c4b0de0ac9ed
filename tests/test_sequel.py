"""The sequel (He et al. 2016) as a paper of its own: its protocol (a fixed 400-iteration warm-up
for every net, each net's own shortcut), its grid in params.yaml checked before anything trains,
its stages in dvc.yaml, and its report (medians beside the paper's numbers, fail, missing,
diverged, the verdicts) on runs made up here."""

import dataclasses
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from replicate import papers, pipeline, preact
from replicate.models import build
from replicate.papers import he2016
from replicate.report import HISTORY, RUN_KEYS, Runs
from replicate.train import Config, PaperSchedule, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return pipeline.load_params(ROOT / "params.yaml")


# --- the protocol ----------------------------------------------------------------------------

def test_fixed_warmup_is_lr_001_for_exactly_its_iterations_whatever_the_error():
    schedule = PaperSchedule([32_000, 48_000], 0.1, warming=True, warmup_iterations=400)
    factors = [schedule(i) for i in (0, 399, 400, 401, 32_000)]
    assert factors == pytest.approx([0.1, 0.1, 1.0, 1.0, 0.1])
    assert PaperSchedule([10], 0.1, warming=True)(10_000) == pytest.approx(0.01)  # 2015's: until told


def test_a_sequel_run_warms_up_for_its_iterations_then_goes_on_at_lr(small_dataset, tmp_path):
    cfg = Config(arch="preactbottleneck", depth=11, shortcut=None, iterations=12, milestones=[9], batch_size=16,
                 log_every=2, eval_every=6, checkpoint_every=4, warmup=True, warmup_iterations=4,
                 warmup_until=0.0, device="cpu", compile=False)
    result = train(cfg, dataset=small_dataset, out_dir=tmp_path, progress=False)
    # lr of each logged interval's last step: the warm-up ends after iteration 4, though the error
    # never fell below warmup_until (0%): the sequel's rule counts iterations
    assert result.history.lr.round(6).tolist() == [0.01, 0.01, 0.1, 0.1, 0.01, 0.01]
    assert result.metrics["warmup_ended_at"] == 4 and result.metrics["shortcut"] == "B"


def test_warmup_iterations_must_end_before_the_run():
    with pytest.raises(ValueError, match="warmup_iterations must be less than iterations, got 400 and 300"):
        Config(iterations=300, milestones=[100], warmup=True, warmup_iterations=400)
    with pytest.raises(ValueError, match="warmup_iterations must be 0"):
        Config(warmup_iterations=-1)


def test_bottleneck_nets_train_with_their_own_shortcut_not_the_2015_option_a():
    assert Config(arch="preactbottleneck", depth=164, shortcut=None).shortcut is None
    with pytest.raises(ValueError, match="shortcut must be 'B' \\(or None, its own: null in params.yaml, --shortcut null\\)"):
        Config(arch="preactbottleneck", depth=164, shortcut="A")


# --- the grid --------------------------------------------------------------------------------

def test_the_sequel_grid_is_every_cell_of_tables_1_to_3(params):
    runs = pipeline.runs(params, pipeline.profile_of("2016"))
    cells = {(arch, depth, data) for _, _, arch, depth, _, data in he2016.rows()}
    assert {(r.arch, r.depth, r.dataset) for r in runs} == cells and len(runs) == len(cells) == 29
    assert {r.seed for r in runs} == {0} and sum(r.dataset == "cifar100" for r in runs) == 4


def test_the_sequel_protocol_is_2015_but_its_warmup_and_shortcuts(params):
    paper, quick = pipeline.profile_of("2016"), pipeline.profile_of("2016", "quick")
    base = pipeline.config(params, pipeline.Run("resnet", 110, 0))
    cfg = pipeline.config(params, pipeline.Run("preactbottleneck", 1001, 0), paper)
    assert (cfg.warmup, cfg.warmup_iterations, cfg.warmup_lr, cfg.shortcut) == (True, 400, 0.01, None)
    same = {"warmup", "warmup_iterations", "shortcut", "arch", "depth"}
    assert {k: v for k, v in dataclasses.asdict(cfg).items() if k not in same} == {
        k: v for k, v in dataclasses.asdict(base).items() if k not in same}
    assert pipeline.config(params, pipeline.Run("resnet", 20, 0), paper).warmup  # every net, not depth >= 110
    short = pipeline.config(params, pipeline.runs(params, quick)[0], quick)
    assert short.iterations < 1000 and not short.warmup and short.lr_ramp > 0
    # every net of the grid builds at its depth
    for run in pipeline.runs(params, paper):
        if run.depth < 1001:
            build(run.arch, run.depth, shortcut=pipeline.config(params, run, paper).shortcut)


def test_a_2015_net_or_a_typo_in_the_sequel_grid_fails_before_anything_trains(params):
    bad = {**params, "he2016": {**params["he2016"], "grid": ["plain-110-0", "preactt-110-0", "preact-111-0",
                                                               "preact-110-0"]}}
    with pytest.raises(ValueError) as e:
        pipeline.check(bad, notebook=None, dvc_yaml=None)
    msg = str(e.value)
    assert "train2016@plain-110-0: plain is not a net of He et al. 2016" in msg
    assert "train2016@preactt-110-0: preactt is not a net of He et al. 2016" in msg and "did you mean 'preact'" in msg
    assert "train2016@preact-111-0: preact has basic units" in msg and "preact-110-0:" not in msg
    with pytest.raises(ValueError, match="he2016.train.warmup_iteration is not a training parameter.*'warmup_iterations'"):
        pipeline.check({**params, "he2016": {**params["he2016"], "train": {"warmup_iteration": 400}}}, None, None)


def test_each_paper_has_its_stages_and_places(params):
    p, q = pipeline.profile_of("2016"), pipeline.profile_of("2016", "quick")
    assert (p.stage, p.report_stage, p.results, p.reports, p.make) == (
        "train2016", "report2016", "results/2016", "reports/2016", "make repro PAPER=2016")
    assert (q.stage, q.report_stage, q.results, q.reports) == (
        "quick2016", "quick2016-report", "results/2016/quick", "reports/2016/quick")
    assert pipeline.profile_of().stage == "train" and pipeline.profile_of(None, "quick").results == "results/quick"
    # each protocol key is declared where its value comes from
    declared = pipeline.stage_params(params, "quick2016")
    assert {"he2016.quick.train.iterations", "he2016.quick.train.warmup", "he2016.train.shortcut",
            "he2016.train.warmup_iterations", "train.lr"} <= set(declared)
    assert "train.warmup" not in declared and "he2016.quick.train.checkpoint_every" not in declared
    with pytest.raises(ValueError, match="no paper '2017': PAPER is one of 2015, 2016"):
        pipeline.profile_of("2017")


def test_dvc_yaml_must_have_every_profiles_stages(params, tmp_path):
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del stages["stages"]["quick2016-report"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    with pytest.raises(ValueError, match="has no stage quick2016-report: every profile needs"):
        pipeline.check_dvc_yaml(params, tmp_path / "dvc.yaml")


def test_papers_are_registered_by_year():
    assert set(papers.PAPERS) == {"2015", "2016"} and papers.DEFAULT == "2015"
    for paper in papers.PAPERS.values():
        assert paper.YEAR in paper.TITLE and callable(paper.tables) and set(paper.OUTPUTS) == {"paper", "quick"}


# --- the report ------------------------------------------------------------------------------

def made_up(finals: dict[tuple, list], iterations: int = 100) -> Runs:
    """Runs whose final test errors (None: diverged) are given by (arch, depth[, dataset]);
    training error and loss follow."""
    rows, hist = [], []
    for (arch, depth, *data), errors in finals.items():
        for seed, err in enumerate(errors):
            key = {"arch": arch, "depth": depth, "shortcut": "A", "seed": seed, "dataset": (data or ["cifar10"])[0]}
            rows.append({**key, "params": 1, "iterations": iterations, "train_error": None if err is None else err / 2,
                         "test_error": err, "diverged": err is None, "diverged_at": 50 if err is None else None,
                         "run": f"{arch}-{depth}-{seed}"})
            for it in (50, 100):
                hist.append({**key, "iteration": it, "lr": 0.1, "train_loss": (err or 0) / 10 + 100 / it,
                             "train_error": (err or 0) / 2, "test_error": err})
    metrics = pd.DataFrame(rows).astype({"diverged": bool, "test_error": float, "train_error": float})
    return Runs(metrics, pd.DataFrame(hist, columns=RUN_KEYS + HISTORY), pd.DataFrame(columns=RUN_KEYS + ["layer", "std"]))


def test_tables_give_the_median_with_mean_and_std_beside_the_papers():
    runs = made_up({("resnet", 110): [6.0, 7.0, 6.5, 9.0, 6.2], ("scaling05x05", 110): [12.0],
                    ("scaling0x1", 110): [35.0], ("dropoutshortcut", 110): [None]})
    t = he2016.table(runs).set_index(["table", "case"])
    original = t.loc[("Table 1", "original")]
    assert original["median"] == 6.5 and original["runs"] == 5
    errors = [6.0, 7.0, 6.5, 9.0, 6.2]
    assert original.ours == f"6.50 ({statistics.mean(errors):.2f}±{statistics.stdev(errors):.2f}, 5 runs)"
    assert original.paper == "6.61"
    assert t.loc[("Table 1", "constant scaling 0.5, 0.5")].ours == "12.00"
    assert t.loc[("Table 1", "constant scaling 0, 1")].ours == "fail (35.00)"  # the paper's "fail": above 20%
    assert t.loc[("Table 1", "constant scaling 0, 1")].paper == "fail"
    assert t.loc[("Table 1", "dropout shortcut")].ours == "diverged"
    assert t.loc[("Table 3", "ResNet-1001 (CIFAR-10), pre-activation")].ours == "missing"
    assert t.loc[("Table 3", "ResNet-1001 (CIFAR-10), pre-activation")].paper == "4.92"
    md = he2016.markdown(he2016.table(runs))
    assert len(md) == 3 and md[0].startswith("Table 1: CIFAR-10 test error (%) at the final iteration, the median")
    assert md[2].startswith("Table 3: CIFAR-10 and CIFAR-100 test error (%)")


def test_cifar100_runs_fill_table_3s_cifar100_rows_and_no_cifar10_cell():
    runs = made_up({("preactbottleneck", 164): [5.5], ("preactbottleneck", 164, "cifar100"): [24.0, 25.0],
                    ("bottleneck", 1001, "cifar100"): [30.0]})
    t = he2016.table(runs).set_index(["table", "case"])
    assert t.loc[("Table 3", "ResNet-164 (CIFAR-10), pre-activation")].ours == "5.50"
    c100 = t.loc[("Table 3", "ResNet-164 (CIFAR-100), pre-activation")]
    assert c100.ours == "24.50 (24.50±0.71, 2 runs)" and c100.paper == "24.33" and c100.net == "preactbottleneck-164-cifar100"
    assert t.loc[("Table 2", "full pre-activation")].set_index("net").loc["preactbottleneck-164"].ours == "5.50"
    # the paper's "fail" (above 20%) is CIFAR-10's: CIFAR-100's errors are all above it
    assert t.loc[("Table 3", "ResNet-1001 (CIFAR-100), original")].ours == "30.00"
    assert he2016.verdicts(runs)[-2:] == [
        "full pre-activation beats the original on CIFAR-100 (ResNet-164, Table 3): unknown (nothing to compare: "
        "bottleneck-164 missing)",
        "full pre-activation beats the original on CIFAR-100 (ResNet-1001, Table 3): unknown (preactbottleneck-1001 "
        "missing)"]
    both = made_up({("preactbottleneck", 1001, "cifar100"): [23.0], ("bottleneck", 1001, "cifar100"): [28.0],
                    ("bottleneck", 1001): [5.0]})  # a CIFAR-10 run never stands in for a CIFAR-100 one
    assert he2016.verdicts(both)[-1].endswith("(ResNet-1001, Table 3): yes (preactbottleneck-1001 23.00% vs "
                                              "bottleneck-1001 28.00%)")


def test_verdicts_answer_each_claim_from_the_medians():
    runs = made_up({("resnet", 110): [6.6], ("scaling05x05", 110): [12.3], ("convshortcut", 110): [5.0],
                    ("preact", 110): [6.3], ("bnafter", 110): [8.1], ("relubefore", 110): [7.8],
                    ("relupreact", 110): [6.7],
                    ("bottleneck", 164): [5.9], ("preactbottleneck", 164): [5.4],
                    ("bottleneck", 1001): [7.6], ("preactbottleneck", 1001): [4.9]})
    lines = he2016.verdicts(runs)
    assert lines[0].startswith("the identity shortcut beats every other of Table 1 (ResNet-110): no (resnet-110 6.60%")
    assert "convshortcut-110 5.00%" in lines[0] and "scaling0x1-110 missing" in lines[0]
    assert lines[1].startswith("full pre-activation beats every other order (ResNet-110): yes (preact-110 6.30%")
    assert lines[2].startswith("full pre-activation beats every other order (ResNet-164): yes (preactbottleneck-164 "
                               "5.40% vs bottleneck-164 5.90%; bnafterbottleneck-164 missing; ")
    assert lines[3] == "the pre-activation gain grows with depth: yes (+0.30 points at 110, +2.70 at 1001)"
    # made_up's final loss grows with the test error: pre-activation has the lower loss here
    assert lines[4].startswith("pre-activation ResNet-164 ends with the higher training loss (no (bottleneck-164")
    assert "and the lower test error (yes (preactbottleneck-164 5.40% vs bottleneck-164 5.90%))" in lines[4]


def test_quick_verdicts_test_only_what_the_quick_look_runs():
    runs = made_up({("resnet", 56): [50.0, 52.0], ("scaling05x05", 56): [66.0, 70.0], ("preact", 56): [48.0, 47.0],
                    ("bnafter", 56): [67.0, 65.0]}, iterations=480)
    lines = he2016.verdicts(runs, "quick")
    claims = [claim for claim, _, _ in he2016.QUICK_CLAIMS]
    assert lines[0] == f"{claims[0]}, training error, 56 layers: yes (resnet-56 25.50% vs scaling05x05-56 34.00%)"
    assert lines[5] == (f"{claims[2]}, test error, 56 layers: yes (preact-56 47.50% vs resnet-56 51.00%, "
                        "bnafter-56 66.00%)")
    assert lines[6:] == he2016.NOT_QUICK and all("not tested by the quick look" in line for line in lines[6:])
    worse = made_up({("resnet", 56): [50.0], ("scaling05x05", 56): [66.0], ("preact", 56): [55.0],
                     ("bnafter", 56): [60.0]}, iterations=480)
    assert he2016.verdicts(worse, "quick")[4].startswith(f"{claims[2]}, training error, 56 layers: no (")
    partial = made_up({("resnet", 56): [50.0], ("scaling05x05", 56): [66.0]}, iterations=480)
    assert f"{claims[1]}: not tested by the quick look (it does not run bnafter-56)" in he2016.verdicts(partial, "quick")
    t = he2016.table(runs, "quick")
    assert t.net.tolist() == ["resnet-56", "preact-56", "bnafter-56", "scaling05x05-56"]  # NETS' order
    assert t.set_index("net").loc["resnet-56", "test error (%)"] == "51.00 (51.00±1.41, 2 runs)"  # no "fail"
    assert t.set_index("net").loc["scaling05x05-56", "paper (%)"] == "12.35"
    assert [len(nets) for nets, _ in he2016.quick_panels(runs)] == [2, 2, 3]


def test_figures_and_tables_are_written(tmp_path):
    runs = made_up({("resnet", 110): [6.6], ("bnafter", 110): [8.1]})
    texts = he2016.tables(runs, tmp_path, "a note")
    assert (tmp_path / "tables.md").read_text().endswith("a note\n") and len(texts) == 3
    assert pd.read_csv(tmp_path / "tables.csv").shape[0] == 34  # 29 nets; some in two tables
    paths = he2016.figures(runs, tmp_path, "a note")
    assert [p.name for p in paths] == ["fig1.png", "fig3.png", "fig6.png"] and all(p.stat().st_size > 0 for p in paths)
    quick = he2016.figures(made_up({("resnet", 56): [50.0]}), tmp_path / "q", "", "quick")
    assert [p.name for p in quick] == ["quick.png"]


def test_the_papers_numbers_are_the_specs():
    # PAPER2016.md's Tables 1-3: a wrong constant fails here
    assert he2016.PAPER_TABLE1["exclusive gating b_g=-6"] == 8.70 and he2016.PAPER_TABLE1["dropout shortcut"] == "fail"
    assert he2016.PAPER_TABLE2["full pre-activation"] == (6.37, 5.46)
    assert [row[4][1] for row in he2016.PAPER_TABLE3] == [8.91, 6.37, 5.46, 4.92, 24.33, 22.71]
    assert [row[3][1] for row in he2016.PAPER_TABLE3] == [9.90, 6.61, 5.93, 7.61, 25.16, 27.82]
    assert set(he2016.PAPER_TABLE1) == set(preact.TABLE1) and set(he2016.PAPER_TABLE2) == set(preact.TABLE2)
    assert not math.isnan(he2016.FAIL)
