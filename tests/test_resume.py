"""Exact resume: a CPU run killed with SIGKILL mid-way and started again ends bit-identical to
an uninterrupted run (real subprocesses, as a user's would be); and what resume does when the
checkpoint came from a GPU or a truncated file (tests/test_provenance.py: when something changed)."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

ITERATIONS = 300


def command(data_root, out_dir):
    return [sys.executable, "-m", "replicate.train", "--data", str(data_root), "--out", str(out_dir),
            "--arch", "resnet", "--depth", "8", "--iterations", str(ITERATIONS), "--milestones", "150,250", "--lr-ramp", "30",
            "--batch-size", "32", "--log-every", "10", "--eval-every", "50", "--checkpoint-every", "20",
            "--device", "cpu"]


def run(data_root, out_dir):
    subprocess.run(command(data_root, out_dir), check=True, capture_output=True, timeout=300)


def checkpointed_iteration(path) -> int:
    return torch.load(path, weights_only=False)["state"]["iteration"]


def kill_mid_way(data_root, out_dir) -> int:
    """Start a run, SIGKILL it once it has checkpointed at least once; return that iteration."""
    proc = subprocess.Popen(command(data_root, out_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out_dir / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # land the kill between checkpoints, mid-interval
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out_dir / "metrics.json").exists()
    return checkpointed_iteration(ckpt)


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, cifar_root):
    run(cifar_root, tmp_path / "whole")

    resumed = tmp_path / "resumed"
    killed_at = kill_mid_way(cifar_root, resumed)
    assert 0 < killed_at < ITERATIONS
    run(cifar_root, resumed)

    whole_w = torch.load(tmp_path / "whole" / "model.pt")
    resumed_w = torch.load(resumed / "model.pt")
    assert whole_w.keys() == resumed_w.keys()
    for key in whole_w:
        assert torch.equal(whole_w[key], resumed_w[key]), key

    a, b = (read_outputs(d) for d in (tmp_path / "whole", resumed))
    for timing in ("seconds",):
        a.pop(timing), b.pop(timing)
    assert a == b
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "history.csv"), pd.read_csv(resumed / "history.csv"))
    assert not [p.name for p in resumed.iterdir() if ".tmp" in p.name]  # no half-written checkpoints left


# --- resume in-process: what a GPU would see, faked on the CPU ------------------------------------

from replicate import checkpoint  # noqa: E402
from replicate.outputs import read as read_outputs
from replicate.train import Config, train  # noqa: E402

TINY = dict(arch="resnet", depth=8, iterations=20, milestones=[10], batch_size=32, log_every=10, eval_every=10,
            checkpoint_every=10, device="cpu", compile=False)


def test_resume_loads_the_checkpoint_onto_the_cpu_whatever_the_device(tmp_path, small_dataset, monkeypatch):
    """On CUDA, torch.load(map_location=<the GPU>) put the saved RNG states on the GPU, and
    torch.set_rng_state takes only a CPU ByteTensor: every resume failed. Here any map_location but
    the CPU's sends the tensors to the meta device, as a GPU would take them off the CPU."""
    train(Config(**{**TINY, "iterations": 10}), dataset=small_dataset, out_dir=tmp_path, progress=False)
    real_load, seen = torch.load, []

    def load_like_a_gpu(path, map_location=None, **kwargs):
        seen.append(map_location)
        if map_location == "cpu" and isinstance(map_location, str):
            return real_load(path, map_location="cpu", **kwargs)
        return real_load(path, map_location="meta", **kwargs)
    monkeypatch.setattr(checkpoint.torch, "load", load_like_a_gpu)
    resumed = train(Config(**TINY), dataset=small_dataset, out_dir=tmp_path, progress=False)
    assert seen == ["cpu"] and resumed.metrics["iterations"] == 20


def test_set_rng_states_gives_each_visible_gpu_its_state_from_the_cpu(monkeypatch):
    """A checkpoint saved on a node with 2 visible GPUs resumes in a worker that sees 1."""
    calls = []
    states = checkpoint.rng_states()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.device.type, device)))
    states["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    checkpoint.set_rng_states(states)
    assert calls == [("cpu", 0)]


def test_a_truncated_checkpoint_names_the_file_and_the_fix(tmp_path, small_dataset):
    train(Config(**{**TINY, "iterations": 10}), dataset=small_dataset, out_dir=tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # a full disk, a bad copy
    with pytest.raises(ValueError) as e:
        train(Config(**TINY), dataset=small_dataset, out_dir=tmp_path, progress=False)
    assert str(ckpt) in str(e.value) and "not a readable checkpoint" in str(e.value)
    assert "Delete it to restart this run from iteration 0" in str(e.value)
    assert "PytorchStreamReader" not in str(e.value).split("(")[0]
