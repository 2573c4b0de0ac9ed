"""Exact resume: a CPU run killed with SIGKILL mid-way and started again ends bit-identical to
an uninterrupted run. Both runs are real subprocesses, as a user's would be."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
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

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", resumed))
    for timing in ("seconds",):
        a.pop(timing), b.pop(timing)
    assert a == b
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / "history.csv"), pd.read_csv(resumed / "history.csv"))
    assert not [p.name for p in resumed.iterdir() if ".tmp" in p.name]  # no half-written checkpoints left
