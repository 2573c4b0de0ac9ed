"""A checkpoint is resumed only by what made it: the same run, every result-affecting setting, the
same data and the same code. Anything else starts the run over, with the stale checkpoint moved
aside and the new run.json saying what made the new numbers; another run's checkpoint is refused.
And a run's metrics.json holds its metrics only, what made it being in run.json."""

import dataclasses
import errno
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import replicate
from replicate import checkpoint
from replicate import data as cifar
from replicate import train as engine
from replicate.outputs import METRIC_KEYS
from replicate.outputs import read as read_outputs
from replicate.train import NO_EFFECT, Config, train

TINY = dict(arch="resnet", depth=8, iterations=12, milestones=[8], batch_size=32, log_every=4, eval_every=4,
            checkpoint_every=4, device="cpu", compile=False)


def run(cfg: dict, out, dataset, **kwargs):
    return train(Config(**cfg), dataset=dataset, out_dir=out, progress=False, **kwargs)


def weights(out) -> dict:
    return torch.load(out / "model.pt")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_dataset):
    """A finished tiny run, and the weights a run of each changed setting ends with from scratch."""
    out = tmp_path_factory.mktemp("finished")
    run(TINY, out, small_dataset)
    return out


def test_an_unchanged_finished_run_resumes_its_final_checkpoint(tmp_path, finished, small_dataset, steps, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    run(TINY, out, small_dataset)
    assert steps == [] and "resuming from" in capsys.readouterr().out
    assert same_weights(weights(out), weights(finished))
    assert not list(out.glob("stale-*"))


@pytest.mark.parametrize("change", [
    {"iterations": 8, "milestones": [4]},  # the iterations 40 -> 35
    {"lr": 0.05},                          # a protocol key, as docs/quick-look.md suggests for bn_batch_size
    {"eval_every": 8},                     # no new test error may be kept from the old run's history
    {"precision": "fp32"},                # run.json said fp32 for weights trained in bf16
    {"shortcut": "B"},                     # train.shortcut is the grid's protocol, not the run's name
])
def test_a_changed_setting_retrains_from_scratch_and_moves_the_old_checkpoint_aside(
        tmp_path, finished, small_dataset, steps, capsys, change):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    cfg = {**TINY, **change}
    result = run(cfg, out, small_dataset)
    assert len(steps) == cfg["iterations"]  # every step trained again, none resumed
    said = capsys.readouterr().out
    key = next(iter(change))
    assert "moved aside to stale-checkpoint-" in said and f"{key} " in said and "training from iteration 0" in said
    aside = list(out.glob("stale-checkpoint-*.pt"))
    assert len(aside) == 1 and f"changed-{key}" in aside[0].name
    assert torch.load(aside[0], weights_only=False)["state"]["iteration"] == TINY["iterations"]  # kept, not deleted
    run(cfg, fresh, small_dataset)
    assert same_weights(weights(out), weights(fresh))  # exactly the new setting's run
    made = json.loads((out / "run.json").read_text())["made_by"]
    assert all(made["config"][k] == v for k, v in change.items())
    assert result.metrics["iterations"] == cfg["iterations"] == json.loads((out / "run.json").read_text())["iterations"]


def test_other_data_retrains(tmp_path, finished, small_dataset, steps, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    other = dataclasses.replace(small_dataset, test_x=small_dataset.test_x[:60], test_y=small_dataset.test_y[:60])
    run(TINY, out, other)
    assert len(steps) == TINY["iterations"] and "(data)" in capsys.readouterr().out
    ran = read_outputs(out)
    assert ran["test_images"] == 60 and ran["made_by"]["data"] == cifar.fingerprint(other)
    assert ran["made_by"]["data"] != read_outputs(finished)["made_by"]["data"]


def test_other_training_code_retrains(tmp_path, finished, small_dataset, monkeypatch, steps, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    monkeypatch.setattr(engine, "code_fingerprint", lambda: "a fix in models.py")
    run(TINY, out, small_dataset)
    assert len(steps) == TINY["iterations"] and "(code)" in capsys.readouterr().out
    assert read_outputs(out)["made_by"]["code"] == "a fix in models.py"


def test_a_checkpoint_from_another_device_type_retrains(tmp_path, finished, small_dataset, steps, capsys):
    out = tmp_path / "run"
    out.mkdir()
    saved = torch.load(finished / "checkpoint.pt", weights_only=False)
    saved["made_by"]["device_type"] = "cuda"
    torch.save(saved, out / "checkpoint.pt")
    run(TINY, out, small_dataset)
    assert len(steps) == TINY["iterations"] and "device cuda -> cpu" in capsys.readouterr().out


def test_a_checkpoint_that_records_nothing_of_what_made_it_retrains(tmp_path, finished, small_dataset, steps):
    out = tmp_path / "run"
    out.mkdir()
    saved = torch.load(finished / "checkpoint.pt", weights_only=False)
    del saved["made_by"]  # from before this change
    torch.save(saved, out / "checkpoint.pt")
    run(TINY, out, small_dataset)
    assert len(steps) == TINY["iterations"] and len(list(out.glob("stale-checkpoint-*-changed-provenance.pt"))) == 1


def test_checkpoint_every_changes_nothing_and_resumes(tmp_path, finished, small_dataset, steps):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    run({**TINY, "checkpoint_every": 3}, out, small_dataset)
    assert steps == [] and not list(out.glob("stale-*"))


def test_another_runs_checkpoint_is_refused_in_one_line(tmp_path, finished, small_dataset, cifar_root):
    """Another seed or net: its folder holds another run's finished work; nothing is moved or overwritten."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    with pytest.raises(ValueError, match=r"is the checkpoint of run resnet-8-0, not of resnet-8-1: give this run"):
        run({**TINY, "seed": 1}, out, small_dataset)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
    by_hand = subprocess.run([sys.executable, "-m", "replicate.train", "--data", str(cifar_root), "--out", str(out),
                              "--arch", "plain", "--depth", "8", "--device", "cpu"], capture_output=True, text=True)
    assert by_hand.returncode == 1 and "Traceback" not in by_hand.stderr
    assert by_hand.stderr.strip().splitlines() == [
        f"error: {out / 'checkpoint.pt'} is the checkpoint of run resnet-8-0, not of plain-8-0: give this run its own "
        "folder (--out), or delete that checkpoint"]


def test_a_model_saved_as_checkpoint_is_refused(tmp_path, finished, small_dataset):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished / "model.pt").read_bytes())
    with pytest.raises(ValueError, match="is not a training checkpoint of replicate.train"):
        run(TINY, out, small_dataset)


def test_the_reasons_name_each_difference():
    made = checkpoint.made_by({"arch": "resnet", "depth": 8, "seed": 0, "lr": 0.1, "iterations": 12}, "d1", "c1", "cpu")
    saved = {"made_by": checkpoint.made_by({**made["config"], "lr": 0.2, "gone": 1}, "d0", "c1", "cuda")}
    assert checkpoint.changes(saved, made) == ["lr 0.2 -> 0.1", "gone 1 -> gone", "data", "device cuda -> cpu"]
    assert checkpoint.changes({"made_by": made}, made) == []


def test_a_failed_checkpoint_write_leaves_no_temporary_file_and_says_what_is_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"a": 1}, path)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        checkpoint.save_atomic({"a": 2}, path)
    assert str(e.value).endswith(f"could not write {path} (No space left on device); the previous checkpoint.pt is "
                                 f"intact. Free space in {tmp_path}, then run again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}


# --- metrics.json holds metrics; run.json what made them ----------------------------------------

def test_metrics_json_holds_the_metrics_only_and_run_json_the_rest(finished, small_dataset):
    metrics = json.loads((finished / "metrics.json").read_text())
    ran = json.loads((finished / "run.json").read_text())
    assert set(metrics) == set(METRIC_KEYS) - {"val_error"}  # no validation split in TINY
    assert not set(metrics) & set(ran)
    assert {"arch", "depth", "shortcut", "seed", "config", "made_by", "commit", "torch", "device",
            "iterations"} <= set(ran)
    assert ran["made_by"] == checkpoint.made_by(
        {k: v for k, v in ran["config"].items() if k not in NO_EFFECT}, cifar.fingerprint(small_dataset),
        replicate.code_fingerprint(), "cpu")
    assert read_outputs(finished) == {**ran, **metrics}


def test_a_run_of_older_code_with_everything_in_metrics_json_is_still_read(tmp_path, finished):
    (tmp_path / "metrics.json").write_text(json.dumps(read_outputs(finished)))
    assert read_outputs(tmp_path) == read_outputs(finished)


def test_a_damaged_outputs_file_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ValueError, match=r"run.json is not valid JSON .*delete the run folder's metrics.json and "):
        read_outputs(tmp_path)


def test_the_fingerprints_see_any_change():
    data = cifar.synthetic(20, 10, seed=0)
    flipped = dataclasses.replace(data, test_y=np.roll(data.test_y, 1))
    assert cifar.fingerprint(data) == cifar.fingerprint(cifar.synthetic(20, 10, seed=0)) != cifar.fingerprint(flipped)
    assert len(replicate.code_fingerprint()) == 16
