"""Exact resume: a CPU run killed with SIGKILL mid-way and started again ends bit-identical to
an uninterrupted run (real subprocesses, as a user's would be), having taken only the steps left
after its checkpoint; in-process, the same with a checkpoint in the middle of a log interval; and
what resume does when the checkpoint came from a GPU or a truncated file (tests/test_provenance.py:
when something changed)."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import train_until_first_checkpoint

ITERATIONS = 300
CHECKPOINT_EVERY = 20
HOLD_AFTER = 25  # the killed run stops here: mid-interval (log_every 10), after its checkpoint at 20


def arguments(data_root, out_dir) -> list[str]:
    return ["--data", str(data_root), "--out", str(out_dir),
            "--arch", "resnet", "--depth", "8", "--iterations", str(ITERATIONS), "--milestones", "150,250", "--lr-ramp", "30",
            "--batch-size", "32", "--log-every", "10", "--eval-every", "50", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--device", "cpu"]


def command(data_root, out_dir):
    return [sys.executable, "-m", "replicate.train", *arguments(data_root, out_dir)]


# replicate.train's command line with its SGD steps counted, the count written to STEPS at exit;
# with HOLD > 0 the process stops for good after its HOLD-th step, having touched HELD: the test
# kills it then, at a known iteration, however fast the machine is.
COUNTED = """import sys, time
from pathlib import Path
import replicate.train as t
steps, hold, held, real, taken = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), t.train_step, []
def counted(*args, **kwargs):
    out = real(*args, **kwargs)
    taken.append(1)
    if len(taken) == hold:
        held.touch()
        while True:
            time.sleep(1)
    return out
t.train_step = counted
t.main(sys.argv[4:])
steps.write_text(str(len(taken)))
"""


def counted_command(data_root, out_dir, steps, hold=0, held=os.devnull):
    return [sys.executable, "-c", COUNTED, str(steps), str(hold), str(held), *arguments(data_root, out_dir)]


def run(data_root, out_dir):
    subprocess.run(command(data_root, out_dir), check=True, capture_output=True, timeout=300)


def run_counted(data_root, out_dir) -> int:
    """Run to the end; the number of SGD steps the process took."""
    steps = out_dir.parent / f"{out_dir.name}.steps"
    subprocess.run(counted_command(data_root, out_dir, steps), check=True, capture_output=True, timeout=300)
    return int(steps.read_text())


def checkpointed_iteration(path) -> int:
    return torch.load(path, weights_only=False)["state"]["iteration"]


def kill_mid_way(data_root, out_dir) -> int:
    """Start a run, SIGKILL it once it has stopped after step HOLD_AFTER; return the checkpoint's iteration."""
    held = out_dir.parent / f"{out_dir.name}.held"
    proc = subprocess.Popen(counted_command(data_root, out_dir, os.devnull, HOLD_AFTER, held),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not held.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {HOLD_AFTER}"
        assert time.monotonic() < deadline, f"no step {HOLD_AFTER} after 240 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out_dir / "metrics.json").exists()
    return checkpointed_iteration(out_dir / "checkpoint.pt")


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, cifar_root):
    """SIGKILL at iteration 25, mid-interval; the rerun takes the 280 steps after the checkpoint at
    20 (300 would be a restart, which ends identical too) and ends as the uninterrupted run."""
    run(cifar_root, tmp_path / "whole")

    resumed = tmp_path / "resumed"
    killed_at = kill_mid_way(cifar_root, resumed)
    assert killed_at == CHECKPOINT_EVERY
    assert run_counted(cifar_root, resumed) == ITERATIONS - killed_at, "the rerun did not resume from the checkpoint"

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


@pytest.mark.parametrize("log_every, checkpoint_every", [(10, 10), (4, 6)], ids=["at-a-log-row", "mid-interval"])
def test_a_resumed_run_takes_only_the_steps_after_its_checkpoint_and_ends_identical(
        tmp_path, small_dataset, steps, log_every, checkpoint_every):
    """Killed right after its first checkpoint (at a log row, or mid-interval: 6 with log_every 4,
    whose partial interval the checkpoint carries), then resumed: the steps after the checkpoint
    only, and the weights, metrics and every row of history.csv of an uninterrupted run."""
    cfg = Config(**{**TINY, "iterations": 20, "milestones": [12], "log_every": log_every,
                    "eval_every": 2 * log_every, "checkpoint_every": checkpoint_every})
    train_until_first_checkpoint(cfg, tmp_path / "resumed", small_dataset)
    assert checkpointed_iteration(tmp_path / "resumed" / "checkpoint.pt") == checkpoint_every
    steps.clear()
    resumed = train(cfg, dataset=small_dataset, out_dir=tmp_path / "resumed", progress=False)
    assert len(steps) == cfg.iterations - checkpoint_every, "the run did not resume from its checkpoint"
    whole = train(cfg, dataset=small_dataset, out_dir=tmp_path / "whole", progress=False)

    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (tmp_path / "resumed" / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert len(whole.history) == cfg.iterations // log_every
    assert {k: v for k, v in resumed.metrics.items() if k != "seconds"} == \
        {k: v for k, v in whole.metrics.items() if k != "seconds"}


def test_resume_loads_the_checkpoint_onto_the_cpu_whatever_the_device(tmp_path, small_dataset, monkeypatch, steps):
    """On CUDA, torch.load(map_location=<the GPU>) put the saved RNG states on the GPU, and
    torch.set_rng_state takes only a CPU ByteTensor: every resume failed. Here any map_location but
    the CPU's sends the tensors to the meta device, as a GPU would take them off the CPU."""
    train_until_first_checkpoint(Config(**TINY), tmp_path, small_dataset)
    real_load, seen = torch.load, []

    def load_like_a_gpu(path, map_location=None, **kwargs):
        seen.append(map_location)
        if map_location == "cpu" and isinstance(map_location, str):
            return real_load(path, map_location="cpu", **kwargs)
        return real_load(path, map_location="meta", **kwargs)
    monkeypatch.setattr(checkpoint.torch, "load", load_like_a_gpu)
    steps.clear()
    resumed = train(Config(**TINY), dataset=small_dataset, out_dir=tmp_path, progress=False)
    assert seen == ["cpu"] and resumed.metrics["iterations"] == 20
    assert len(steps) == 10  # resumed at 10, not restarted


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


def test_an_fp16_run_resumes_its_gradient_scaler_and_ends_identical(tmp_path, small_dataset, steps):
    """fp16 (V100, T4) trains with a gradient scaler whose state (the loss scale, the count of steps
    since it last changed) is part of the checkpoint. On the CPU, whose autocast has float16 (slow
    here: a few steps of batch 8 only): killed after its first checkpoint and resumed, the run takes
    only the steps after it and ends with the weights, metrics and scaler of an uninterrupted run."""
    cfg = Config(**{**TINY, "iterations": 6, "milestones": [4], "batch_size": 8, "log_every": 3, "eval_every": 3,
                    "checkpoint_every": 3, "precision": "fp16"})
    train_until_first_checkpoint(cfg, tmp_path / "resumed", small_dataset)
    saved = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert saved["scaler"]["_growth_tracker"] == 3 and saved["scaler"]["scale"] > 1
    steps.clear()
    resumed = train(cfg, dataset=small_dataset, out_dir=tmp_path / "resumed", progress=False)
    assert len(steps) == 3, "the run did not resume from its checkpoint"
    whole = train(cfg, dataset=small_dataset, out_dir=tmp_path / "whole", progress=False)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed.metrics["precision"] == whole.metrics["precision"] == "fp16"
    assert {k: v for k, v in resumed.metrics.items() if k != "seconds"} == \
        {k: v for k, v in whole.metrics.items() if k != "seconds"}
    ends = [checkpoint.load(tmp_path / run / "checkpoint.pt")["scaler"] for run in ("resumed", "whole")]
    assert ends[0] == ends[1] and ends[0]["_growth_tracker"] == 6  # 3 if the resume had dropped it
