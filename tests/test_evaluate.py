"""python -m replicate.evaluate: the net found from the weights, the run's normalisation and
precision (so that metrics.json's test error comes back exactly), foreign checkpoints, bad input."""

import copy
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from replicate import data as cifar

from replicate import evaluate, weights
from replicate.models import build
from replicate.outputs import read as read_outputs
from replicate.train import Config, train

from conftest import ROOT, train_until_first_checkpoint

TINY = dict(arch="resnet", depth=8, iterations=6, milestones=[3], batch_size=16, log_every=3, eval_every=3,
            checkpoint_every=3, device="cpu", compile=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_dataset):
    """A finished run holding out 50 images (so its mean is not all 500 images'), and the same run
    killed after its checkpoint at iteration 3: a folder with checkpoint.pt alone."""
    root = tmp_path_factory.mktemp("runs")
    train(Config(**TINY, val_size=50, seed=1), out_dir=root / "done", dataset=small_dataset, progress=False)
    train_until_first_checkpoint(Config(**TINY, val_size=50, seed=1), root / "killed", small_dataset)
    return root


def metrics(run):
    return read_outputs(run)


def foreign(state_dict: dict) -> dict:
    """The PyTorch port's layout: keys prefixed `module.`, `linear` for `fc`, no num_batches_tracked."""
    return {"state_dict": {"module." + k.replace("fc.", "linear."): v for k, v in state_dict.items()
                           if not k.endswith("num_batches_tracked")}, "best_prec1": 91.2}


NEAR_TIE = 1e-5


def plain_fp32(model, images: torch.Tensor, labels, batch: int = 50) -> tuple[float, float]:
    """The oracle, independent of train.evaluate: a copy of the net in fp32, eval mode, contiguous
    memory, no autocast, `batch` images at a time, its wrong predictions counted one by one. Returns
    the error (%) and the smallest gap between an image's two highest logits: channels_last and
    batches of 1,000 move a logit by about 1e-6 here, so a gap above NEAR_TIE cannot flip."""
    net = copy.deepcopy(model).float().to(memory_format=torch.contiguous_format).eval()
    labels = torch.as_tensor(labels)
    wrong, gap = 0, math.inf
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            logits = net(images[i:i + batch].float().contiguous())
            top2 = logits.topk(2, dim=1).values
            gap = min(gap, (top2[:, 0] - top2[:, 1]).min().item())
            for predicted, label in zip(logits.argmax(1).tolist(), labels[i:i + batch].tolist()):
                wrong += predicted != label
    return 100.0 * wrong / len(labels), gap


def fp32_error(model, images, labels) -> float:
    """What evaluate must give for weights without metadata: fp32 (the plain loop's error)."""
    error, gap = plain_fp32(model, images, labels)
    assert gap > NEAR_TIE, f"a near-tie ({gap:.1e}) that rounding could flip: pick other weights"
    return error


def test_train_evaluate_matches_a_plain_fp32_loop_over_a_test_set_of_several_batches(small_dataset):
    """train's final test error (fp32, CPU) on 2,345 test images, two batches of 1,000 and one of 345,
    is exactly the error of a plain loop over them, normalised by hand as the paper does."""
    data = cifar.synthetic(500, 2_345, seed=4)
    result = train(Config(**{**TINY, "iterations": 12, "milestones": [9], "precision": "fp32"}), dataset=data,
                   progress=False)
    assert result.metrics["precision"] == "fp32" and result.metrics["test_images"] == 2_345
    mean = (data.train_x.astype(np.float64).mean(axis=0) / 255.0).astype(np.float32)  # the training images' pixels
    images = (torch.from_numpy(data.test_x).float() / 255.0) - torch.from_numpy(mean)
    error, gap = plain_fp32(result.model, images, data.test_y)
    assert gap > NEAR_TIE, f"a near-tie ({gap:.1e}) that rounding could flip: pick another seed"
    assert 0 < error < 90  # a net that is right on some images and wrong on others, in every batch
    assert result.metrics["test_error"] == error


def test_json_output_reproduces_metrics_test_error_exactly(runs, cifar_root):
    """A subprocess, as a user runs it: stdout is JSON alone, and the run folder and its model.pt
    give metrics.json's test error to the last digit."""
    m = metrics(runs / "done")
    out = subprocess.run([sys.executable, "-m", "replicate.evaluate", str(runs / "done"), str(runs / "done" / "model.pt"),
                          "--data", str(cifar_root), "--json", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 2
    for row in rows:
        assert (row["arch"], row["depth"], row["shortcut"], row["normalize"]) == ("resnet", 8, "A", "mean")
        assert row["test_error"] == m["test_error"] == row["recorded_test_error"]
        assert (row["test_images"], row["params"], row["precision"]) == (100, 75_290, m["precision"])


def test_the_runs_own_mean_is_subtracted(runs, small_dataset):
    """val_size 50 and seed 1 hold out 50 images: the mean of the other 450, not of all 500."""
    src = evaluate.locate(str(runs / "done"))
    means = {}
    x = evaluate.inputs(src, "mean", small_dataset, means, torch.device("cpu"))
    expected = cifar.normalize(small_dataset.test_x, cifar.split(small_dataset, 50, 1).mean)
    assert torch.equal(x, expected)
    assert not torch.equal(x, cifar.normalize(small_dataset.test_x, cifar.split(small_dataset, 0, 0).mean))


def test_an_unfinished_run_is_evaluated_from_its_checkpoint_and_says_so(runs, cifar_root, capsys):
    assert not (runs / "killed" / "model.pt").exists()
    [row] = evaluate.main([str(runs / "killed"), "--data", str(cifar_root), "--device", "cpu"])
    assert row["kind"] == "checkpoint"
    assert any("unfinished run" in n and "iteration 3 of 6" in n for n in row["notes"])
    # the run measured the test error at iteration 3 with the very weights it then saved
    assert row["recorded_test_error"] is not None and row["test_error"] == row["recorded_test_error"]
    out = capsys.readouterr().out
    assert "ResNet-8" in out and "unfinished run" in out


def test_a_foreign_checkpoint_loads_by_order_as_resnet_and_says_so(runs, tmp_path, small_dataset, cifar_root):
    sd = torch.load(runs / "done" / "model.pt", weights_only=True)
    torch.save(foreign(sd), tmp_path / "resnet8-port.th")
    [row] = evaluate.main([str(tmp_path / "resnet8-port.th"), "--data", str(cifar_root), "--device", "cpu", "--json"])
    assert (row["kind"], row["arch"], row["depth"], row["shortcut"]) == ("foreign", "resnet", 8, "A")
    assert any("taken as resnet" in n for n in row["notes"])
    model = build("resnet", 8)
    model.load_state_dict(sd)
    # no metadata: fp32, and the per-pixel mean of all of DIR's training images
    mean = cifar.split(small_dataset, 0, 0).mean
    assert row["precision"] == "fp32"
    assert row["test_error"] == fp32_error(model, cifar.normalize(small_dataset.test_x, mean), small_dataset.test_y)


def test_imagenet_normalisation_is_per_channel_mean_and_std(runs, tmp_path, small_dataset, cifar_root):
    sd = torch.load(runs / "done" / "model.pt", weights_only=True)
    torch.save(foreign(sd), tmp_path / "port.th")
    [row] = evaluate.main([str(tmp_path / "port.th"), "--data", str(cifar_root), "--device", "cpu",
                           "--normalize", "imagenet", "--json"])
    x = torch.as_tensor(small_dataset.test_x).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    model = build("resnet", 8)
    model.load_state_dict(sd)
    assert row["normalize"] == "imagenet"
    assert row["test_error"] == fp32_error(model, x, small_dataset.test_y)


def test_a_far_too_high_error_suggests_the_other_normalisation(tmp_path, cifar_root):
    torch.manual_seed(0)
    torch.save(foreign(build("resnet", 8).state_dict()), tmp_path / "untrained.th")  # predicts ~one class: ~90%
    [row] = evaluate.main([str(tmp_path / "untrained.th"), "--data", str(cifar_root), "--device", "cpu", "--json"])
    assert row["test_error"] >= evaluate.SUSPECT
    assert any("try --normalize imagenet" in n for n in row["notes"])
    [row] = evaluate.main([str(tmp_path / "untrained.th"), "--data", str(cifar_root), "--device", "cpu", "--json",
                           "--normalize", "imagenet"])
    assert any("try --normalize mean" in n for n in row["notes"])


@pytest.mark.parametrize("depth,shortcut", [(8, "A"), (14, "A"), (20, "B"), (32, "B")])
def test_depth_and_shortcut_come_from_the_tensors(depth, shortcut):
    w = weights.parse(foreign(build("resnet", depth, shortcut=shortcut).state_dict()), "x.th")
    found = weights.architecture(w)
    # projection shortcuts exist only in residual nets, so option B tells the arch too
    assert found == {"arch": "resnet" if shortcut == "B" else None, "depth": depth, "shortcut": shortcut, "num_classes": 10}


def test_a_bare_state_dict_needs_arch_and_then_loads(runs, tmp_path, cifar_root):
    shutil.copy(runs / "done" / "model.pt", tmp_path / "model.pt")  # no metrics.json beside it
    with pytest.raises(SystemExit, match=r"error: .*model.pt is a bare state dict.*pass --arch plain or --arch resnet"):
        evaluate.main([str(tmp_path / "model.pt"), "--data", str(cifar_root), "--device", "cpu"])
    [row] = evaluate.main([str(tmp_path / "model.pt"), "--data", str(cifar_root), "--device", "cpu", "--arch", "resnet",
                           "--json"])
    assert (row["arch"], row["depth"], row["kind"]) == ("resnet", 8, "state_dict")


def test_bad_input_is_one_line_naming_the_file_and_the_fix(tmp_path, runs, cifar_root):
    (tmp_path / "notes.txt").write_text("not weights\n")
    out = subprocess.run([sys.executable, "-m", "replicate.evaluate", str(tmp_path / "notes.txt"), "--data", str(cifar_root)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "notes.txt is not a PyTorch checkpoint" in out.stderr and "Traceback" not in out.stderr

    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "empty.pt")
    torch.save(torch.nn.Linear(4, 2).state_dict(), tmp_path / "linear.pt")
    cases = {
        str(tmp_path / "empty.pt"): r"empty.pt holds no state dict of tensors",
        str(tmp_path / "linear.pt"): r"linear.pt fits no CIFAR net of the paper: its 0 3x3 and 0 1x1 conv layers",
        str(tmp_path / "missing.pt"): r"no file .*missing.pt",
        str(tmp_path): r"holds neither model.pt nor checkpoint.pt",
    }
    for path, message in cases.items():
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            evaluate.main([path, "--data", str(cifar_root)])
    with pytest.raises(SystemExit, match=r"^error: no CIFAR-10 at .*nothing.*cifar-10-batches-py"):
        evaluate.main([str(runs / "done"), "--data", str(tmp_path / "nothing")])


def test_depth_and_arch_contradicting_the_tensors_are_refused(runs, tmp_path, cifar_root):
    run = tmp_path / "run"
    shutil.copytree(runs / "done", run)
    m = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**m, "depth": 20}))
    with pytest.raises(SystemExit, match=r"error: .*model.pt says depth 20 but its tensors are of depth 8"):
        evaluate.main([str(run), "--data", str(cifar_root)])


def test_the_precision_a_run_computed_in_comes_from_run_json_or_the_checkpoints_setting_old_ones_too(monkeypatch):
    """run.json and exports record what ran; a checkpoint's config only the setting, resolved here as
    train.py would; checkpoints from before `precision` hold the bf16 and tf32 switches."""
    from replicate import device as dev
    from replicate.evaluate import Source, run_precision

    monkeypatch.setattr(dev, "native_bf16", lambda device: True)
    cpu = torch.device("cpu")

    def ran(kind, **info):
        return run_precision(Source("p", weights.Weights(path="p", kind=kind, state_dict={}, meta=info), info), cpu)
    assert ran("state_dict", precision="fp16") == "fp16"
    assert ran("export", precision="bf16") == "bf16"
    assert ran("foreign") == "fp32"
    assert ran("checkpoint", precision="auto") == "bf16"
    assert ran("checkpoint", bf16=True, tf32=False) == "bf16"  # an older run's switches
    assert ran("checkpoint", bf16=False, tf32=True) == "fp32"  # TF32 is CUDA's
    monkeypatch.setattr(dev, "native_bf16", lambda device: False)
    assert ran("checkpoint", precision="auto") == "fp32"
