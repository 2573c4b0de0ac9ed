"""python -m replicate.export and hubconf.py: a finished grid as a model zoo whose files give the
manifest's test errors back, and torch.hub loading from a path or a URL checked by sha256."""

import functools
import hashlib
import http.server
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from replicate import data as cifar
from replicate import export, weights
from replicate import train as engine
from replicate.models import build
from replicate.outputs import read as read_outputs
from replicate.train import Config, train

from conftest import ROOT, train_until_first_checkpoint

TINY = dict(depth=8, iterations=6, milestones=[3], batch_size=16, log_every=3, eval_every=3, checkpoint_every=3,
            device="cpu", compile=False)
ENTRY_POINTS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                "plain20", "plain32", "plain44", "plain56", "plain110",
                "preact_resnet110", "preact_resnet164", "preact_resnet1001", "resnet164", "resnet1001"]  # 2016


@pytest.fixture(scope="module")
def grid(tmp_path_factory, small_dataset):
    """Two finished runs, one diverged, one killed after its first checkpoint, one whose
    metrics.json stops short of its config's iterations, and in a subfolder (another grid's, as
    results/quick is) a run that is not this grid's."""
    results = tmp_path_factory.mktemp("results")
    for arch in ("resnet", "plain"):
        train(Config(arch=arch, seed=0, **TINY), out_dir=results / f"{arch}-8-0", dataset=small_dataset, progress=False)
    real_loss = engine.F.cross_entropy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.F, "cross_entropy", lambda *a, **k: real_loss(*a, **k) * float("nan"))
        train(Config(arch="resnet", seed=1, **TINY), out_dir=results / "resnet-8-1", dataset=small_dataset, progress=False)
    train_until_first_checkpoint(Config(arch="resnet", seed=2, **TINY), results / "resnet-8-2", small_dataset)
    short = results / "resnet-8-3"
    shutil.copytree(results / "resnet-8-0", short)
    m = json.loads((short / "run.json").read_text())
    (short / "run.json").write_text(json.dumps({**m, "seed": 3, "iterations": 3}))
    shutil.copytree(results / "resnet-8-0", results / "quick" / "resnet-8-0")
    return results


@pytest.fixture(scope="module")
def zoo(grid, tmp_path_factory, cifar_root):
    out = tmp_path_factory.mktemp("zoo")
    params = out.parent / "params.yaml"
    params.write_text("data:\n  md5: 0123456789abcdef0123456789abcdef\n  name: synthetic CIFAR-10\n")
    stdout = subprocess.run([sys.executable, "-m", "replicate.export", str(grid), str(out), "--params", str(params),
                             "--data", str(cifar_root)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert stdout.returncode == 0, stdout.stderr
    return out, stdout.stdout


def manifest(zoo):
    return json.loads((zoo[0] / "MANIFEST.json").read_text())


def metrics(folder):
    return read_outputs(folder)


def test_finished_runs_are_exported_and_the_others_listed_with_why(grid, zoo):
    man, (out, stdout) = manifest(zoo), zoo
    assert [r["run"] for r in man["runs"]] == ["plain-8-0", "resnet-8-0"]
    left = {x["run"]: x["reason"] for x in man["left_out"]}
    assert left["resnet-8-1"] == "diverged at iteration 1"  # the loss was NaN from the start
    assert left["resnet-8-2"].startswith("unfinished: checkpoint.pt but no metrics.json")
    assert left["resnet-8-3"] == "unfinished: iteration 3 of 6"
    assert not [r for r in [*man["runs"], *man["left_out"]] if r["run"].startswith("quick")]
    for run in left:
        assert f"left out {run}" in stdout
    assert sorted(p.name for p in out.glob("*.pt")) == sorted(r["file"] for r in man["runs"])
    for r in man["runs"]:
        m = metrics(grid / r["run"])
        assert re.fullmatch(rf"{r['arch']}-8-0-[0-9a-f]{{8}}\.pt", r["file"])
        assert r["sha256"] == weights.file_sha256(out / r["file"]) and r["file"][-11:-3] == r["sha256"][:8]
        assert (r["test_error"], r["train_error"], r["iterations"], r["params"]) == (
            m["test_error"], m["train_error"], 6, m["params"])
        assert (r["precision"], r["device"], r["torch"], r["commit"]) == (m["precision"], "cpu", m["torch"], m["commit"])
        assert (r["data_md5"], r["data_name"]) == ("0123456789abcdef0123456789abcdef", "synthetic CIFAR-10")
        assert (r["dataset"], r["num_classes"]) == ("cifar10", 10)  # what the runs say (older ones: CIFAR-10)


def test_exported_files_load_weights_only_with_weights_and_metadata(grid, zoo, small_dataset):
    for r in manifest(zoo)["runs"]:
        saved = torch.load(zoo[0] / r["file"], map_location="cpu", weights_only=True)
        model_pt = torch.load(grid / r["run"] / "model.pt", weights_only=True)
        assert saved["state_dict"].keys() == model_pt.keys()
        assert all(torch.equal(saved["state_dict"][k], v) for k, v in model_pt.items())
        meta = saved["meta"]
        assert (meta["arch"], meta["depth"], meta["shortcut"], meta["seed"], meta["bn_batch_size"]) == (
            r["arch"], 8, "A", 0, None)
        assert torch.equal(meta["mean"], torch.as_tensor(cifar.split(small_dataset, 0, 0).mean))


def test_evaluating_the_exported_files_gives_the_manifests_errors_exactly(zoo, cifar_root):
    out, man = zoo[0], manifest(zoo)
    paths = [str(out / r["file"]) for r in man["runs"]]
    done = subprocess.run([sys.executable, "-m", "replicate.evaluate", *paths, "--data", str(cifar_root), "--json",
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    for row, r in zip(rows, man["runs"]):
        # plain or residual from the export's own metadata: the tensors cannot tell
        assert (row["kind"], row["arch"], row["depth"], row["normalize"]) == ("export", r["arch"], 8, "mean")
        assert row["test_error"] == r["test_error"]
        assert row["notes"] == []


def test_the_model_card_has_the_table_the_paper_beside_it_and_how_to_load(zoo):
    card, man = (zoo[0] / "README.md").read_text(), manifest(zoo)
    assert "| net | data | seed | params | test error % (ours, final) | paper | file |" in card
    for r in man["runs"]:
        name = "ResNet-8" if r["arch"] == "resnet" else "plain-8"
        assert f"| {name} | CIFAR-10 | 0 | {r['params']:,} | {r['test_error']:.2f} | - | `{r['file']}` |" in card
    for run in ("resnet-8-1 (diverged", "resnet-8-2 (unfinished", "resnet-8-3 (unfinished"):
        assert run in card
    # no torch.hub entry point for depth 8: the card shows hubconf's loader
    assert f'load("plain", 8, "{man["runs"][0]["file"]}", sha256="{man["runs"][0]["sha256"]}")' in card
    assert "python -m replicate.evaluate *.pt --data" in card
    assert "synthetic CIFAR-10 (tarball md5 0123456789abcdef0123456789abcdef)" in card
    assert "6 iterations of SGD, batch 16" in card and "divided by 10 at iterations [3]" in card


def test_paper_numbers_are_labelled_and_only_for_its_resnets():
    entry = {"arch": "resnet", "depth": 56, "shortcut": "A", "seed": 0, "params": 853_018, "test_error": 7.0,
             "file": "resnet-56-0-abcdef12.pt", "sha256": "abcdef12" + "0" * 56, "precision": "bf16", "device": "cuda",
             "device_name": "H200", "torch": "2.5", "commit": "abc1234", "config": {"iterations": 64000}}
    plain = {**entry, "arch": "plain", "file": "plain-56-0-12345678.pt"}
    card = export.model_card({"runs": [entry, plain], "left_out": [],
                              "data": {"cifar10": {"name": "CIFAR-10", "md5": "c58f"}}})
    assert "| ResNet-56 | CIFAR-10 | 0 | 853,018 | 7.00 | 6.97 (2015 Table 6) | `resnet-56-0-abcdef12.pt` |" in card
    assert "| plain-56 | CIFAR-10 | 0 | 853,018 | 7.00 | - | `plain-56-0-12345678.pt` |" in card
    assert card.startswith("# Plain and residual nets on CIFAR-10 (He et al. 2015, section 4.2)")
    assert 'torch.hub.load("path/to/checkout", "resnet56", source="local",' in card
    assert f'weights="resnet-56-0-abcdef12.pt", sha256="{entry["sha256"]}")' in card


def test_the_hub_loader_gives_the_runs_weights_and_refuses_contradicting_ones(grid, zoo):
    r = next(r for r in manifest(zoo)["runs"] if r["arch"] == "resnet")
    path = zoo[0] / r["file"]
    model = weights.load("resnet", 8, path, sha256=r["sha256"])
    model_pt = torch.load(grid / r["run"] / "model.pt", weights_only=True)
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_pt.items())
    assert model.meta["mean"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"holds resnet-8, not plain-8"):
        weights.load("plain", 8, path)
    with pytest.raises(ValueError, match=r"holds resnet-8, not resnet-20: use replicate.weights.load\('resnet', 8, weights\)"):
        weights.load("resnet", 20, path)


def test_export_refuses_the_same_run_twice_and_other_data(grid, tmp_path, cifar_root):
    results = tmp_path / "results"
    shutil.copytree(grid / "resnet-8-0", results / "resnet-8-0")
    shutil.copytree(grid / "resnet-8-0", results / "renamed")
    with pytest.raises(SystemExit, match=r"^error: .*/renamed and .*/resnet-8-0 hold the same run"):
        export.main([str(results), str(tmp_path / "zoo"), "--data", str(cifar_root)])
    shutil.rmtree(results / "renamed")
    other = tmp_path / "other"
    cifar.write_cifar10(other, cifar.synthetic(300, 100, seed=1))
    with pytest.raises(SystemExit, match=r"^error: .*trained on 500 images .* gives 300 .*pass the run's data with --data"):
        export.main([str(results), str(tmp_path / "zoo"), "--data", str(other)])
    with pytest.raises(SystemExit, match=r"^error: no finished run below"):
        export.main([str(tmp_path / "other"), str(tmp_path / "zoo"), "--data", str(cifar_root)])


def test_exporting_again_leaves_only_the_new_manifests_files(grid, tmp_path, cifar_root):
    results = tmp_path / "results"
    for run in ("resnet-8-0", "plain-8-0"):
        shutil.copytree(grid / run, results / run)
    first = export.export(results, tmp_path / "zoo", cifar_root)
    shutil.rmtree(results / "plain-8-0")
    second = export.export(results, tmp_path / "zoo", cifar_root)
    assert len(first["runs"]) == 2 and [r["run"] for r in second["runs"]] == ["resnet-8-0"]
    assert sorted(p.name for p in (tmp_path / "zoo").glob("*.pt")) == [second["runs"][0]["file"]]


def test_evaluating_a_diverged_run_says_it_diverged(grid, cifar_root):
    from replicate import evaluate
    [row] = evaluate.main([str(grid / "resnet-8-1"), "--data", str(cifar_root), "--device", "cpu", "--json"])
    assert any("the run diverged at iteration 1" in n for n in row["notes"])


# --- hubconf.py --------------------------------------------------------------------------------

def hubconf():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_lists_every_net_of_the_paper_documented():
    hub = hubconf()
    assert hub.dependencies == ["torch"]
    listed = sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_"))
    assert listed == sorted(ENTRY_POINTS)
    assert all(getattr(hub, f).__doc__ for f in listed)
    model = torch.hub.load(str(ROOT), "resnet56", source="local")
    assert sum(p.numel() for p in model.parameters()) == 853_018


@pytest.fixture
def resnet20_files(tmp_path):
    """ResNet-20 weights (untrained) as an export and in the port's .th layout."""
    torch.manual_seed(0)
    model = build("resnet", 20)
    sd = model.state_dict()
    torch.save(weights.pack(sd, {"arch": "resnet", "depth": 20, "shortcut": "A"}), tmp_path / "resnet-20-0.pt")
    port = {"module." + k.replace("fc.", "linear."): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": port, "best_prec1": 91.2}, tmp_path / "resnet20-port.th")
    return sd, tmp_path / "resnet-20-0.pt", tmp_path / "resnet20-port.th"


def same(model, sd) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_hub_loads_local_weights_checked_by_sha256(resnet20_files):
    sd, ours, port = resnet20_files
    for path in (ours, port):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        model = torch.hub.load(str(ROOT), "resnet20", source="local", weights=str(path), sha256=digest)
        assert same(model, sd) and not model.training
    with pytest.raises(ValueError, match=r"resnet-20-0.pt has sha256 [0-9a-f]{64}, expected 00000000"):
        torch.hub.load(str(ROOT), "resnet20", source="local", weights=str(ours), sha256="0" * 64)
    with pytest.raises(ValueError, match=r"holds resnet-20, not plain-20"):
        torch.hub.load(str(ROOT), "plain20", source="local", weights=str(ours))
    with pytest.raises(ValueError, match=r"holds resnet-20, not resnet-32: use the entry point resnet20,"):
        torch.hub.load(str(ROOT), "resnet32", source="local", weights=str(ours))
    with pytest.raises(ValueError, match=r"holds a net of depth 20, not resnet-32"):
        torch.hub.load(str(ROOT), "resnet32", source="local", weights=str(port))


@pytest.fixture
def server(tmp_path):
    """An http.server on 127.0.0.1 serving tmp_path, in a thread."""
    handler = functools.partial(Quiet, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_hub_downloads_a_url_into_torch_home_checked_by_sha256(resnet20_files, server, tmp_path, monkeypatch):
    sd, ours, _ = resnet20_files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # get_dir() follows TORCH_HOME unless set_dir was called
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    with pytest.raises(ValueError, match=r"download of .*resnet-20-0.pt refused: invalid hash value"):
        torch.hub.load(str(ROOT), "resnet20", source="local", weights=f"{server}/resnet-20-0.pt", sha256="0" * 64,
                       progress=False)
    assert not list(cache.glob("*"))  # nothing half-checked is left in the cache
    digest = hashlib.sha256(ours.read_bytes()).hexdigest()
    model = torch.hub.load(str(ROOT), "resnet20", source="local", weights=f"{server}/resnet-20-0.pt", sha256=digest,
                           progress=False)
    assert same(model, sd)
    assert (cache / "resnet-20-0.pt").read_bytes() == ours.read_bytes()
