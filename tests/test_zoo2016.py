"""A finished 2016 grid as a model zoo: the sequel's nets and CIFAR-100 runs exported with their
data set, evaluated on its test set to their metrics.json errors, and loaded by hubconf.py's loader."""

import re

import pytest
import torch

from replicate import data as cifar
from replicate import evaluate, export, weights
from replicate.models import build
from replicate.outputs import read as read_outputs
from replicate.train import Config, train

from conftest import ROOT

TINY = dict(seed=0, iterations=6, milestones=[3], batch_size=16, log_every=3, eval_every=3, checkpoint_every=3,
            device="cpu", compile=False)
# run folder -> (arch, depth, shortcut, data set), as the 2016 grid names them
RUNS = {"preactbottleneck-11-0": ("preactbottleneck", 11, None, "cifar10"),
        "preactbottleneck-11-0-cifar100": ("preactbottleneck", 11, None, "cifar100"),
        "preact-8-0": ("preact", 8, "B", "cifar10")}
FILES = {"preactbottleneck-11-0": r"preactbottleneck-11-0", "preactbottleneck-11-0-cifar100":
         r"preactbottleneck-11-0-cifar100", "preact-8-0": r"preact-8-B-0"}
MD5 = {"cifar10": "0123456789abcdef0123456789abcdef", "cifar100": "fedcba9876543210fedcba9876543210"}


@pytest.fixture(scope="module")
def both(tmp_path_factory, small_dataset, small_cifar100):
    """A data root holding the small CIFAR-10 (100 test images) and CIFAR-100 (200)."""
    root = tmp_path_factory.mktemp("data")
    cifar.write(root, small_dataset, "cifar10")
    cifar.write(root, small_cifar100, "cifar100")
    return root


@pytest.fixture(scope="module")
def grid(tmp_path_factory, small_dataset, small_cifar100):
    results = tmp_path_factory.mktemp("results2016")
    data = {"cifar10": small_dataset, "cifar100": small_cifar100}
    for run, (arch, depth, shortcut, dataset) in RUNS.items():
        cfg = Config(arch=arch, depth=depth, shortcut=shortcut, dataset=dataset, **TINY)
        train(cfg, out_dir=results / run, dataset=data[dataset], progress=False)
    return results


@pytest.fixture(scope="module")
def zoo(grid, both, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo2016")
    params = out.parent / "params2016.yaml"
    params.write_text(f"data:\n  md5: {MD5['cifar10']}\n  name: small CIFAR-10\n"
                      f"  cifar100:\n    md5: {MD5['cifar100']}\n    name: small CIFAR-100\n")
    manifest = export.export(grid, out, both, params)
    return out, manifest


def test_the_data_set_is_in_the_file_names_metadata_and_manifest(grid, zoo, small_dataset, small_cifar100):
    out, manifest = zoo
    assert sorted(r["run"] for r in manifest["runs"]) == sorted(RUNS)
    assert manifest["data"] == {"cifar10": {"name": "small CIFAR-10", "md5": MD5["cifar10"]},
                                "cifar100": {"name": "small CIFAR-100", "md5": MD5["cifar100"]}}
    data = {"cifar10": small_dataset, "cifar100": small_cifar100}
    for r in manifest["runs"]:
        arch, depth, _, dataset = RUNS[r["run"]]
        assert re.fullmatch(rf"{FILES[r['run']]}-[0-9a-f]{{8}}\.pt", r["file"]), r["file"]
        name = "small CIFAR-100" if dataset == "cifar100" else "small CIFAR-10"
        assert (r["arch"], r["depth"], r["dataset"], r["num_classes"], r["data_name"], r["data_md5"]) == (
            arch, depth, dataset, cifar.source(dataset).classes, name, MD5[dataset])
        assert r["test_error"] == read_outputs(grid / r["run"])["test_error"]
        meta = torch.load(out / r["file"], weights_only=True)["meta"]
        assert (meta["dataset"], meta["num_classes"], meta["shortcut"], r["shortcut"]) == (
            dataset, r["num_classes"], "B", "B")  # bottlenecks always project; preact-8 was asked to
        # the mean of the run's own training images, not the other data set's
        assert torch.equal(meta["mean"], torch.as_tensor(cifar.split(data[dataset], 0, 0).mean))


def test_the_exports_and_run_folders_evaluate_to_the_runs_errors_on_their_test_sets(grid, zoo, both):
    out, manifest = zoo
    paths = [str(out / r["file"]) for r in manifest["runs"]] + [str(grid / r["run"]) for r in manifest["runs"]]
    rows = evaluate.main([*paths, "--data", str(both), "--device", "cpu", "--json"])
    for row, r in zip(rows, manifest["runs"] * 2):
        assert (row["arch"], row["depth"], row["dataset"]) == (r["arch"], r["depth"], r["dataset"])
        assert row["test_images"] == len(cifar.load(both, r["dataset"]).test_y)  # 100 or 200: its own test set
        assert row["test_error"] == r["test_error"] and row["notes"] == []


def test_a_2016_net_needs_its_arch_and_depth_without_metadata(grid, both, tmp_path):
    model_pt = tmp_path / "model.pt"  # no run.json beside it
    model_pt.write_bytes((grid / "preactbottleneck-11-0-cifar100" / "model.pt").read_bytes())
    with pytest.raises(SystemExit, match=r"--arch preactbottleneck is a 2016 net.*pass --depth too"):
        evaluate.main([str(model_pt), "--data", str(both), "--arch", "preactbottleneck"])
    [row] = evaluate.main([str(model_pt), "--data", str(both), "--device", "cpu", "--json",
                           "--arch", "preactbottleneck", "--depth", "11"])
    # the data set from the net's 100 outputs; the mean from CIFAR-100's training images
    assert (row["dataset"], row["test_images"]) == ("cifar100", 200)
    assert row["test_error"] == read_outputs(grid / "preactbottleneck-11-0-cifar100")["test_error"]


def test_the_loader_takes_the_classes_from_the_weights_and_refuses_other_nets(grid, zoo):
    out, manifest = zoo
    r = next(r for r in manifest["runs"] if r["dataset"] == "cifar100")
    model = weights.load("preactbottleneck", 11, out / r["file"], sha256=r["sha256"])
    saved = torch.load(grid / r["run"] / "model.pt", weights_only=True)
    assert not model.training and model.fc.out_features == 100 and model.meta["dataset"] == "cifar100"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert weights.load("preactbottleneck", 11, out / r["file"], num_classes=100).fc.out_features == 100
    with pytest.raises(ValueError, match=r"holds a net of 100 classes, not num_classes=10: drop num_classes="):
        weights.load("preactbottleneck", 11, out / r["file"], num_classes=10)
    with pytest.raises(ValueError, match=r"holds preactbottleneck-11, not bottleneck-11"):
        weights.load("bottleneck", 11, out / r["file"])
    with pytest.raises(ValueError, match=r"holds preactbottleneck-11, not preactbottleneck-164: use "
                                         r"replicate.weights.load\('preactbottleneck', 11, weights\)"):
        torch.hub.load(str(ROOT), "preact_resnet164", source="local", weights=str(out / r["file"]))


def test_the_hub_entry_point_loads_a_cifar100_export(tmp_path):
    torch.manual_seed(0)
    net = build("preactbottleneck", 164, num_classes=100)
    path = tmp_path / "preactbottleneck-164-0-cifar100.pt"
    torch.save(weights.pack(net.state_dict(), {"arch": "preactbottleneck", "depth": 164, "shortcut": "B",
                                               "dataset": "cifar100", "num_classes": 100}), path)
    model = torch.hub.load(str(ROOT), "preact_resnet164", source="local", weights=str(path))
    assert model.fc.out_features == 100 and all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"holds preactbottleneck-164, not bottleneck-164: use the entry point "
                                         r"preact_resnet164"):
        torch.hub.load(str(ROOT), "resnet164", source="local", weights=str(path))


def test_cifar100_runs_need_its_folder_and_the_error_says_which_runs(grid, tmp_path, small_dataset):
    only10 = tmp_path / "data"
    cifar.write(only10, small_dataset, "cifar10")
    with pytest.raises(SystemExit, match=r"^error: preactbottleneck-11-0-cifar100 ran on CIFAR-100, needed for their "
                                         r"input mean: no CIFAR-100 at .*cifar-100-python.*--dataset cifar100"):
        export.main([str(grid), str(tmp_path / "zoo"), "--data", str(only10)])


def test_the_card_lists_the_data_sets_the_papers_numbers_and_how_to_load_cifar100(zoo):
    out, manifest = zoo
    card = (out / "README.md").read_text()
    assert card.startswith("# Residual nets on CIFAR-10 and CIFAR-100 (He et al. 2015 and its 2016 sequel)")
    for r in manifest["runs"]:
        data = cifar.source(r["dataset"]).name
        assert f"| {r['arch']}-{r['depth']} | {data} | 0 | {r['params']:,} | {r['test_error']:.2f} | - | `{r['file']}` |" in card
    assert 'from replicate.weights import load\nmodel = load("preact", 8,' in card  # no entry point at these depths
    assert "preact_resnet164" in card and "the weights set `num_classes=100`" in card
    assert "small CIFAR-10 (tarball md5 0123" in card and "small CIFAR-100 (tarball md5 fedc" in card
    assert "data/ holds cifar-10-batches-py/ and cifar-100-python/" in card
    entry = {"arch": "preactbottleneck", "depth": 164, "shortcut": "B", "dataset": "cifar100", "seed": 0,
             "params": 1_726_388, "test_error": 24.0, "file": "preactbottleneck-164-0-cifar100-abcdef12.pt",
             "sha256": "abcdef12" + "0" * 56, "precision": "bf16", "device": "cuda", "device_name": "H200",
             "torch": "2.5", "commit": "abc1234", "config": {"iterations": 64000, "warmup_iterations": 400}}
    card = export.model_card({"runs": [entry], "left_out": [], "data": {"cifar100": {"name": "CIFAR-100", "md5": "eb90"}}})
    assert "| preactbottleneck-164 | CIFAR-100 | 0 | 1,726,388 | 24.00 | 24.33 (2016 Table 3) |" in card
    assert 'torch.hub.load("path/to/checkout", "preact_resnet164", source="local",' in card
    assert "until iteration 400" in card


def test_stem_marks_projections_only_where_identity_is_the_default():
    assert export.stem({"arch": "bottleneck", "depth": 164, "shortcut": "B", "seed": 1}) == "bottleneck-164-1"
    assert export.stem({"arch": "preact", "depth": 110, "shortcut": "B", "seed": 1, "dataset": "cifar100"}) == \
        "preact-110-B-1-cifar100"
    assert export.stem({"arch": "resnet", "depth": 56, "shortcut": "A", "seed": 2, "config": {}}) == "resnet-56-2"
    assert export.HUB_ENTRY_POINTS[("bottleneck", 1001)] == "resnet1001"
