"""params.yaml, dvc.yaml, data.dvc and notebooks/train.ipynb agree with each other and with the
paper; the grid is validated before anything trains; `fetch` finds, checks or explains the data."""

import ast
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from conftest import make_tarball
from replicate import data as cifar
from replicate import export, grid, pipeline
from replicate.train import Config

ROOT = Path(__file__).resolve().parents[1]
GRID_FIELDS = {"arch", "depth", "seed", "dataset"}  # a run's name: pipeline.RUN_FIELDS


@pytest.fixture(scope="module")
def params():
    return pipeline.load_params(ROOT / "params.yaml")


def notebook_defaults() -> dict:
    found = papermill.inspect_notebook(str(ROOT / "notebooks" / "train.ipynb"))
    return {name: ast.literal_eval(p["default"]) for name, p in found.items()}


def test_params_hold_the_papers_protocol_and_grid(params):
    train = params["train"]
    assert train["iterations"] == 64_000 and train["milestones"] == [32_000, 48_000]
    assert (train["lr"], train["batch_size"], train["momentum"], train["weight_decay"]) == (0.1, 128, 0.9, 1e-4)
    assert train["warmup"] is None and train["warmup_lr"] == 0.01 and train["warmup_until"] == 80.0
    assert train["shortcut"] == "A" and train["val_size"] == 0 and train["device"] == "auto"
    assert train["eval_subset"] == 0 and train["precision"] == "auto" and train["lr_ramp"] == 0
    # the paper's runs: the ten nets once, ResNet-110 five times (Table 6: best and mean±std of 5)
    ten = [f"{a}-{d}-0" for a in ("plain", "resnet") for d in (20, 32, 44, 56, 110)]
    assert params["grid"] == ten + [f"resnet-110-{s}" for s in (1, 2, 3, 4)]
    assert params["data"]["md5"] == cifar.MD5
    cfg = pipeline.config(params, pipeline.Run("resnet", 110, 0))
    assert cfg.warmup, "ResNet-110 warms up, by the paper's rule"
    # ResNet-1202 is one commented line away
    line = next(l for l in (ROOT / "params.yaml").read_text().splitlines() if "resnet-1202-0" in l)
    assert line.startswith("# - resnet-1202-0")


def test_quick_profile_shortens_the_run_and_keeps_the_rest_of_the_protocol(params):
    """Same lr, momentum, decay and batch; the lr divided at the same fractions (1/2, 3/4) of a
    shorter run; the four nets of Fig. 1 and its fix."""
    quick = params["quick"]
    assert quick["grid"] == ["plain-20-0", "plain-56-0", "resnet-20-0", "resnet-56-0"]
    cfg = pipeline.config(params, pipeline.Run("plain", 56, 0), "quick")
    paper = pipeline.config(params, pipeline.Run("plain", 56, 0))
    assert cfg.iterations < paper.iterations
    assert [m / cfg.iterations for m in cfg.milestones] == [m / paper.iterations for m in paper.milestones] == [0.5, 0.75]
    for key in ("lr", "momentum", "weight_decay", "batch_size", "shortcut", "warmup", "val_size"):
        assert getattr(cfg, key) == getattr(paper, key), key
    assert 0 < cfg.eval_subset and cfg.iterations % cfg.eval_every == 0
    # the one change of protocol: a short ramp to lr 0.1, over before the first milestone
    assert paper.lr_ramp == 0 and 0 < cfg.lr_ramp < cfg.milestones[0]
    assert set(quick["train"]) <= set(params["train"])


def test_the_protocol_has_one_source_configs_defaults_are_params_yaml(params):
    """Config's defaults and params.yaml's train section are the same values (eval_every was 2,000
    in one and 1,000 in the other); the notebook restates none of them."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert set(params["train"]) == set(fields) - GRID_FIELDS
    defaults = {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for name, f in fields.items()}
    assert {k: defaults[k] for k in params["train"]} == params["train"]
    assert set(notebook_defaults()) == GRID_FIELDS | {"data_root", "out_dir", "protocol"}


def test_notebook_defaults_are_the_papers_resnet20_run(params):
    defaults = notebook_defaults()
    assert (defaults["arch"], defaults["depth"], defaults["seed"]) == ("resnet", 20, 0)
    assert defaults["protocol"] == {}  # Config's defaults: params.yaml's train, by the test above
    assert defaults["data_root"] == "../data" and defaults["out_dir"] == "../results/resnet-20-0"


@pytest.mark.parametrize("key, value, error", [
    ("lr", "0.1x", r"train\.lr must be a number, got '0\.1x' \(str\)"),
    ("iterations", "64k", r"train\.iterations must be an integer, got '64k' \(str\)"),
    ("iterations", 64000.0, r"train\.iterations must be an integer, got 64000\.0 \(float\)"),
    ("milestones", [32000, "48k"], r"train\.milestones must be a list of integers"),
    ("deterministic", "yes", r"train\.deterministic must be true or false, got 'yes'"),
])
def test_a_value_of_the_wrong_type_names_its_key_once(params, key, value, error):
    """`lr: 0.1x` gave "'<=' not supported between instances of 'str' and 'int'" for every run."""
    bad = {**params, "train": {**params["train"], key: value}}
    with pytest.raises(ValueError, match=error) as e:
        pipeline.check(bad, notebook=None)
    assert str(e.value).count(f"train.{key} ") == 1 and "train@" not in str(e.value)
    quick = {**params, "quick": {**params["quick"], "train": {**params["quick"]["train"], "iterations": "1k"}}}
    with pytest.raises(ValueError, match=r"quick\.train\.iterations must be an integer, got '1k'"):
        pipeline.check(quick, notebook=None)


def test_each_stage_declares_the_params_it_reads_and_no_others(params, tmp_path):
    """checkpoint_every and activation_checkpointing change no result (train.NO_EFFECT), so no stage
    declares them; the quick runs read quick.train's keys, and train's only where quick.train does
    not replace them."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train_keys = stages["train"]["do"]["params"]
    assert set(train_keys) == {f"train.{k}" for k in params["train"]} - {"train.checkpoint_every",
                                                                         "train.activation_checkpointing"}
    quick_keys = set(stages["quick"]["do"]["params"])
    assert "quick.train.iterations" in quick_keys and "train.iterations" not in quick_keys
    assert "train.lr" in quick_keys and not any(k.endswith("checkpoint_every") for k in quick_keys)
    assert "quick.train.lr_ramp" in stages["quick-report"]["params"]  # the caption names the ramp
    pipeline.check_dvc_yaml(params, ROOT / "dvc.yaml")
    text = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    text["stages"]["train"]["do"]["params"] = ["train"]  # the whole section: checkpoint_every reruns every run
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(text))
    with pytest.raises(ValueError, match=r"stage train must declare exactly the params it reads(.|\n)*\n  add    - train\.lr\n"
                                         r"(.|\n)*  remove - train$"):
        pipeline.check_dvc_yaml(params, tmp_path / "dvc.yaml")


def test_run_names_are_dvcs_foreach_stage_names(params):
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    assert [s for s in listed if s.startswith("train@")] == [f"train@{r.name}" for r in pipeline.runs(params)]
    assert [s for s in listed if s.startswith("quick@")] == [f"quick@{r.name}" for r in pipeline.runs(params, "quick")]
    assert "train@resnet-110-4" in listed and {"prepare", "check", "report", "quick-report"} <= set(listed)


def test_each_report_depends_on_its_profiles_runs_only(params, tmp_path):
    """The paper's report never waits for (nor reads) a quick run, and a run added to the grid
    without its report dep is named by `check`."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert not any(d.startswith("results/quick") or d == "results" for d in stages["report"]["deps"])
    assert all(d.startswith("results/quick/") for d in stages["quick-report"]["deps"] if d.startswith("results"))
    pipeline.check(params, notebook=None)  # dvc.yaml as committed agrees with params.yaml
    wider = {**params, "grid": params["grid"] + ["resnet-1202-0"]}
    with pytest.raises(ValueError, match=r"stage report must depend on every run.*\n  add    - results/resnet-1202-0/metrics.json"):
        pipeline.check(wider, notebook=None)


def test_check_names_every_bad_run_before_training(params):
    bad = {**params, "grid": ["plain-20-0", "resnat-20-0", "resnat-21-0", "plain-21-0"],
           "quick": {**params["quick"], "grid": ["plain-57-0"]}}
    with pytest.raises(ValueError) as e:
        pipeline.check(bad)
    msg = str(e.value)
    assert "nothing was trained" in msg
    for name in ("train@resnat-20-0", "train@resnat-21-0", "train@plain-21-0", "quick@plain-57-0"):
        assert name in msg
    assert "train@plain-20-0" not in msg
    assert "resnat is not a net of He et al. 2015" in msg and "did you mean 'resnet'" in msg and "depth must be 6n+2" in msg


@pytest.mark.parametrize("grid, error", [
    ([], "grid must be a non-empty list"),
    (["plain-20-0", "plain-20-0"], r"lists \['plain-20-0'\] twice"),
    (["plain-20"], "'plain-20' is not a run name: write <arch>-<depth>-<seed>"),
])
def test_malformed_grid_is_refused(params, grid, error):
    with pytest.raises(ValueError, match=error):
        pipeline.check({**params, "grid": grid}, notebook=None)


def test_check_refuses_unknown_train_keys_and_notebook_drift(params, tmp_path):
    with pytest.raises(ValueError, match=r"train\.lr_decay is not a training parameter"):
        pipeline.check({**params, "train": {**params["train"], "lr_decay": 0.1}}, notebook=None)
    with pytest.raises(ValueError, match="belongs in the run names"):
        pipeline.check({**params, "train": {**params["train"], "depth": 20}}, notebook=None)
    with pytest.raises(ValueError, match=r"quick\.train\.iters is not a training parameter.*did you mean 'iterations'"):
        pipeline.check({**params, "quick": {**params["quick"], "train": {"iters": 10}}}, notebook=None)
    no_lr = {k: v for k, v in params["train"].items() if k != "lr"}
    with pytest.raises(ValueError, match=r"quick\.train\.lr replaces a key that train does not have"):
        pipeline.check({**params, "train": no_lr, "quick": {**params["quick"], "train": {"lr": 0.2}}}, notebook=None)
    nb = json.loads((ROOT / "notebooks" / "train.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = [line for line in cell["source"] if not line.startswith("protocol")]
    (tmp_path / "train.ipynb").write_text(json.dumps(nb))
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['protocol'\]"):
        pipeline.check(params, tmp_path / "train.ipynb")


def test_an_unknown_key_is_named_once_per_section_with_the_closest_known_key(params):
    """It was named once per run (18 times), each time with every known key."""
    bad = {**params, "train": {**params["train"], "iteration": 100},
           "quick": {**params["quick"], "train": {**params["quick"]["train"], "iteration": 10}}}
    with pytest.raises(ValueError) as e:
        pipeline.check(bad, notebook=None)
    lines = str(e.value).splitlines()[1:]
    assert lines == ["  train.iteration is not a training parameter (replicate.train.Config); did you mean 'iterations'?",
                     "  quick.train.iteration is not a training parameter (replicate.train.Config); "
                     "did you mean 'iterations'?"]


def test_a_problem_shared_by_runs_is_one_line_naming_them(params):
    """lr_ramp longer than the quick look's iterations was accepted; then named once per quick run."""
    bad = {**params, "quick": {**params["quick"], "train": {**params["quick"]["train"], "lr_ramp": 800}}}
    with pytest.raises(ValueError) as e:
        pipeline.check(bad, notebook=None)
    assert str(e.value).splitlines()[1:] == [
        "  quick@plain-20-0, quick@plain-56-0, quick@resnet-20-0, quick@resnet-56-0: lr_ramp must be less than "
        "iterations, got lr_ramp 800 and iterations 720: shorten the ramp (0: none, the paper's) or lengthen the run"]


def test_a_tab_in_params_yaml_is_one_line_naming_the_file_and_place(tmp_path, capsys):
    """It was a 55-line PyYAML traceback that never named params.yaml."""
    text = (ROOT / "params.yaml").read_text().replace("\n  lr: 0.1", "\n\tlr: 0.1")
    line = text.splitlines().index("\tlr: 0.1") + 1
    (tmp_path / "params.yaml").write_text(text)
    want = (rf"^error: {re.escape(str(tmp_path / 'params.yaml'))}, line {line}, column 1: found character '\\t' "
            r"that cannot start any token: YAML indents with spaces, never tabs; replace the tab with spaces$")
    for command in (["check"], ["fetch"]):
        with pytest.raises(SystemExit, match=want):
            pipeline.main(["--params", str(tmp_path / "params.yaml"), *command])
    with pytest.raises(ValueError, match=want[len("^error: "):]):
        export.data_of(tmp_path / "params.yaml")
    with pytest.raises(SystemExit, match=want):
        grid.main(["--params", str(tmp_path / "params.yaml")])
    (tmp_path / "other.yaml").write_text("grid: [plain-20-0,\n")
    with pytest.raises(ValueError, match=r"other\.yaml, line 2, column 1: expected the node content, but found "
                                         r"'<stream end>' \(while parsing a flow node\)$"):
        pipeline.load_params(tmp_path / "other.yaml")


def test_a_failing_notebook_is_one_error_line_naming_the_executed_notebook(tmp_path, capsys):
    """papermill's PapermillExecutionError printed the kernel's whole traceback at the end of train.log."""
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("protocol = {}", metadata={"tags": ["parameters"]}),
               nbformat.v4.new_code_cell("raise ValueError('checkpoint.pt was made by another run')")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "train.ipynb")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--params", str(ROOT / "params.yaml"), "train", "--run", "resnet-20-0", "--out", str(out),
                       "--notebook", str(tmp_path / "train.ipynb")])
    assert str(e.value) == (f"error: ValueError: checkpoint.pt was made by another run (the full traceback: "
                            f"In [3] of the executed notebook {out / 'train.ipynb'})")
    assert "Traceback" not in capsys.readouterr().err
    executed = nbformat.read(out / "train.ipynb", as_version=4)
    assert any(o["output_type"] == "error" for c in executed.cells for o in c.get("outputs", []))


def test_each_profile_names_its_own_command():
    """Ctrl-C of `make quick` said "`make repro` again resumes them" (replicate/local.py)."""
    assert pipeline.profile_of("2015", "quick").make == "make quick" and pipeline.profile_of().make == "make repro"
    assert pipeline.profile_of("2016", "quick").make == "make quick PAPER=2016"


def test_check_command_writes_a_constant_stamp(tmp_path):
    """The train stages depend on the stamp: widening the grid must not change it."""
    stamps = []
    for more in ([], ["plain-20-1", "plain-20-2"]):
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["grid"] += more
        stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
        stages["stages"]["report"]["deps"] += [f"results/{run}/metrics.json" for run in more]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
        pipeline.main(["--params", str(tmp_path / "params.yaml"), "check", "--dvc-yaml", str(tmp_path / "dvc.yaml"),
                       "--stamp", str(tmp_path / "ok")])
        stamps.append((tmp_path / "ok").read_bytes())
    assert stamps[0] == stamps[1]


def test_train_stage_deps_cover_the_code_it_runs():
    """A change to any module the stage imports must rerun it: each is listed in its deps."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    code = "import sys, replicate.pipeline, replicate.train; print(*[m.__file__ for n, m in sys.modules.items() if n.startswith('replicate')])"
    files = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    used = {Path(f).resolve().relative_to(ROOT).as_posix() for f in files}
    assert used <= set(stage["deps"]), used - set(stage["deps"])
    assert {"notebooks/train.ipynb", "data/cifar-10-batches-py", "results/grid.checked"} <= set(stage["deps"])
    assert {"persist": True} == next(o for o in stage["outs"] if isinstance(o, dict))["results/${item}/checkpoint.pt"]
    quick = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["quick"]["do"]
    assert quick["deps"] == stage["deps"]


def test_data_pin_is_the_official_tarball():
    pin = yaml.safe_load((ROOT / "data.dvc").read_text())
    assert pin["frozen"] is True
    assert pin["deps"][0]["path"] == cifar.URL
    assert pin["outs"][0] == {"md5": cifar.MD5, "size": 170_498_071, "hash": "md5", "path": f"data/{cifar.TARBALL}"}
    # its stage md5 is current: DVC would otherwise see a changed stage and rerun the import
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        assert repo.stage.load_one(str(ROOT / "data.dvc")).compute_md5() == pin["md5"]


# --- fetch: `make repro`'s first step -----------------------------------------------------------


def dvc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def offline_repo(tmp_path):
    """A DVC repo whose data.dvc imports from a URL nobody answers (port 9 refuses at once)."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc("init", "-q", cwd=tmp_path).returncode == 0
    text = (ROOT / "data.dvc").read_text().replace(cifar.URL, "http://127.0.0.1:9/cifar-10-python.tar.gz")
    (tmp_path / "data.dvc").write_text(text)
    pipeline.restamp(tmp_path / "data.dvc")
    (tmp_path / "data").mkdir()
    return tmp_path


def test_fetch_offline_says_where_to_put_the_tarball(offline_repo):
    before = (offline_repo / "data.dvc").read_text()
    with pytest.raises(FileNotFoundError) as e:
        pipeline.fetch(cifar.MD5, offline_repo / "data.dvc")
    msg = str(e.value)
    assert str((offline_repo / "data" / cifar.TARBALL).resolve()) in msg
    assert cifar.MD5 in msg and "170498071 bytes" in msg and "make repro" in msg
    assert (offline_repo / "data.dvc").read_text() == before


def test_fetch_offline_names_the_cifar100_tarball_and_the_sequels_command(offline_repo):
    src = cifar.source("cifar100")
    text = (ROOT / src.pin).read_text().replace(src.url, "http://127.0.0.1:9/cifar-100-python.tar.gz")
    (offline_repo / src.pin).write_text(text)
    pipeline.restamp(offline_repo / src.pin)
    with pytest.raises(FileNotFoundError) as e:
        pipeline.fetch(src.md5, offline_repo / src.pin)
    assert (f"Put a copy of the CIFAR-100 python tarball at {(offline_repo / 'data' / src.tarball).resolve()} "
            f"(md5 {src.md5}") in str(e.value) and "then run `make repro PAPER=2016` again" in str(e.value)


def test_fetch_accepts_a_copy_by_hand_without_download(offline_repo, cifar_tarball):
    md5 = cifar.md5sum(cifar_tarball)
    pin = offline_repo / "data.dvc"
    pin.write_text(pin.read_text().replace(cifar.MD5, md5))
    pipeline.restamp(pin)
    assert "not in cache" in dvc("status", "data.dvc", cwd=offline_repo).stdout
    shutil.copy(cifar_tarball, offline_repo / "data" / cifar.TARBALL)
    before = pin.read_text()
    assert pipeline.fetch(md5, pin) == offline_repo / "data" / cifar.TARBALL
    # in the cache now, so the frozen import is up to date and `dvc repro` needs no network
    assert "not in cache" not in dvc("status", "data.dvc", cwd=offline_repo).stdout
    done = dvc("repro", "data.dvc", cwd=offline_repo)
    assert done.returncode == 0, done.stderr
    assert pin.read_text() == before


def test_fetch_refuses_a_copy_with_the_wrong_md5(offline_repo, cifar_tarball):
    shutil.copy(cifar_tarball, offline_repo / "data" / cifar.TARBALL)
    with pytest.raises(ValueError, match=f"has md5 {cifar.md5sum(cifar_tarball)}, expected {cifar.MD5} "
                                         r"\(data.md5 in params.yaml\)\. Either data.md5 was edited.*only then delete it"):
        pipeline.fetch(cifar.MD5, offline_repo / "data.dvc")


def pin(offline_repo, tarball) -> str:
    """Make data.dvc pin `tarball` (as import-data would), without the network."""
    md5, dvc_file = cifar.md5sum(tarball), offline_repo / "data.dvc"
    dvc_file.write_text(dvc_file.read_text().replace(cifar.MD5, md5))
    pipeline.restamp(dvc_file)
    return md5


def test_fetch_never_tells_to_delete_the_pinned_tarball_when_data_md5_is_mistyped(offline_repo, cifar_tarball):
    """A mistyped data.md5 made fetch call the tarball corrupt and say to delete it: offline, the only copy."""
    md5 = pin(offline_repo, cifar_tarball)
    shutil.copy(cifar_tarball, offline_repo / "data" / cifar.TARBALL)
    typo = md5[:-1] + ("0" if md5[-1] != "0" else "1")
    with pytest.raises(ValueError) as e:
        pipeline.fetch(typo, offline_repo / "data.dvc")
    msg = str(e.value)
    assert msg.endswith(f"has md5 {md5}, expected {typo} (data.md5 in params.yaml). The tarball is the one data.dvc "
                        f"pins, so data.md5 is wrong: set it back to {md5} in params.yaml (the official CIFAR-10 "
                        f"tarball's is replicate.data.MD5, {cifar.MD5}); keep the tarball.")
    assert "delete" not in msg.lower()
    (offline_repo / "data" / cifar.TARBALL).write_bytes(b"truncated")  # now the tarball is bad
    with pytest.raises(ValueError) as e:
        pipeline.fetch(typo, offline_repo / "data.dvc")
    assert f"put back the right one ({md5}, the md5 data.dvc pins; the official CIFAR-10 tarball's is " \
           f"replicate.data.MD5, {cifar.MD5}). Or data.md5 is right and the tarball is corrupt" in str(e.value)


def test_fetch_says_to_pin_a_copy_by_hand_that_data_dvc_does_not_pin(offline_repo, cifar_tarball):
    """Copied into data/ without import-data, with data.md5 set to its md5: fetch said "ready", then
    `dvc repro` failed with "dependency 'http://...' does not exist" (it tried to fetch the pinned one)."""
    shutil.copy(cifar_tarball, offline_repo / "data" / cifar.TARBALL)
    md5 = cifar.md5sum(cifar_tarball)
    with pytest.raises(ValueError) as e:
        pipeline.fetch(md5, offline_repo / "data.dvc")
    tarball = offline_repo / "data" / cifar.TARBALL
    assert str(e.value) == (
        f"{tarball} has the md5 data.md5 asks for ({md5}), but {offline_repo / 'data.dvc'} pins another tarball (md5 "
        f"{cifar.MD5}, from http://127.0.0.1:9/cifar-10-python.tar.gz), which `dvc repro` would try to fetch. Pin "
        f"this copy: move it out of data/ (`mv {tarball} ~/`), run `python -m replicate.pipeline import-data "
        f"~/{cifar.TARBALL}`, keep data.md5 {md5} in params.yaml, then run `make repro` (or `make quick`) again.")
    assert "not in cache" in dvc("status", "data.dvc", cwd=offline_repo).stdout  # nothing committed
    # what the message says to do works offline: then fetch is happy and `dvc repro` needs no network
    moved = offline_repo.parent / f"home-{offline_repo.name}" / cifar.TARBALL
    moved.parent.mkdir()
    shutil.move(tarball, moved)
    pipeline.import_data(str(moved), offline_repo / "data.dvc")
    assert pipeline.fetch(md5, offline_repo / "data.dvc") == tarball
    done = dvc("repro", "data.dvc", cwd=offline_repo)
    assert done.returncode == 0, done.stderr


def test_fetch_command_reads_the_md5_from_params(offline_repo, tmp_path_factory, small_dataset):
    tarball = make_tarball(tmp_path_factory.mktemp("other") / cifar.TARBALL, small_dataset)
    shutil.copy(tarball, offline_repo / "data" / cifar.TARBALL)
    (offline_repo / "params.yaml").write_text(yaml.safe_dump({"data": {"md5": "0" * 32}, "train": {},
                                                              "grid": ["resnet-20-0"], "quick": {},
                                                              "he2016": {"quick": {}}}))
    with pytest.raises(SystemExit, match=r"expected 0{32} \(data.md5 in params.yaml\)"):  # data.dvc beside params.yaml
        pipeline.main(["--params", str(offline_repo / "params.yaml"), "fetch"])


def test_report_captions_name_the_data_and_mark_the_quick_look(params):
    assert pipeline.caption(params) == f"Data: CIFAR-10 (md5 {cifar.MD5})."
    quick = pipeline.caption(params, "quick")
    cfg = pipeline.config(params, pipeline.runs(params, "quick")[0], "quick")
    assert quick.startswith(f"Quick look, not the paper's protocol: {cfg.iterations:,} iterations (the paper: 64,000), "
                            f"lr 0.1, reached by a linear ramp over the first {cfg.lr_ramp} iterations, divided by 10 "
                            f"at {cfg.milestones[0]:,}, {cfg.milestones[1]:,}; intermediate "
                            f"test errors on the first 1,000 test images, the final one on all.")
    sample = {**params, "data": {"name": "real CIFAR-10, a 10% sample", "md5": "6d587bacfc67cc3b055c8d2d23e6a9d8"}}
    assert pipeline.caption(sample, "quick").endswith(
        "Data: real CIFAR-10, a 10% sample (md5 6d587bacfc67cc3b055c8d2d23e6a9d8).")
