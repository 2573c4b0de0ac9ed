"""Checkpoints: written atomically, read back onto the CPU, and resumed only by what made them.

A checkpoint records what made it (`made_by`: every config value that can change a result, the
data's and the training code's fingerprints, the device type). A run resumes it only when all of
these are unchanged; otherwise the run starts over and the stale checkpoint is moved aside, never
deleted, so that a rerun after a change can never report the old numbers under the new labels.

Resume is bitwise exact on a CPU at the same thread count, and on CUDA with `deterministic: true`
(replicate/device.py). Elsewhere a resumed run continues the same experiment, but not bit for bit:
cuDNN's benchmark picks its algorithms by timing, afresh in each process.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT, suffix


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over the target:
    a kill at any moment leaves either the old checkpoint or the new one, never half of one. A
    failed write (a full disk) removes its temporary file and says what is intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or isinstance(e.__context__, OSError):  # torch wraps ENOSPC in a RuntimeError
            cause = e if isinstance(e, OSError) else e.__context__
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise OSError(cause.errno, f"could not write {path} ({cause.strerror or cause}); {kept}. Free space "
                          f"in {path.parent}, then run again") from None
        raise


def load(path: Path) -> dict:
    """A checkpoint, every tensor on the CPU.

    Never onto the training device: torch.set_rng_state takes only a CPU ByteTensor (a checkpoint
    mapped to CUDA failed there with "RNG state must be a torch.ByteTensor"), and load_state_dict
    copies weights and optimizer state to wherever the model is. A file that does not load (a full
    disk, a bad copy) is named, with what to do.
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)  # numpy's and Python's RNG states
    except Exception as e:  # truncated zip archives, pickles, ...: torch raises several kinds
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it is truncated or corrupt (a full disk, a bad copy). Delete it to restart this run from "
            "iteration 0; no other run is affected."
        ) from None
    if not isinstance(saved, dict) or not {"config", "model", "optimizer", "scheduler", "rng", "state"} <= set(saved):
        raise ValueError(f"{path} is not a training checkpoint of replicate.train: delete it to restart this run")
    return saved


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what rng_states saved. CUDA states go to the devices this process sees, as many as
    there are of both (a grid worker sees one GPU whatever the node has)."""
    torch.set_rng_state(states["torch"].cpu())
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        for i, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), i)


def made_by(config: dict, data: str, code: str, device_type: str) -> dict:
    """What made a run, as its checkpoint and run.json record it: the config values that can change
    a result, the data's and the code's fingerprints, and the device type (the numerics differ)."""
    return {"config": config, "data": data, "code": code, "device_type": device_type}


IDENTITY = ("arch", "depth", "seed", "dataset")  # the run itself: its folder's name
UNSAID = {"dataset": DEFAULT}  # what a checkpoint made before a key existed had


def changes(saved: dict, ours: dict) -> list[str]:
    """Why `saved` (a checkpoint) cannot continue the run that `ours` (made_by) describes: one
    short phrase per difference; [] when it is this very run, unchanged."""
    theirs = saved.get("made_by")
    if theirs is None:
        return ["provenance unknown (made before checkpoints recorded their data and code)"]
    config = theirs["config"]
    found = [f"{k} {config.get(k)!r} -> {v!r}" for k, v in ours["config"].items() if config.get(k) != v]
    found += [f"{k} {config[k]!r} -> gone" for k in config if k not in ours["config"]]
    found += [what for what in ("data", "code") if theirs[what] != ours[what]]
    if theirs["device_type"] != ours["device_type"]:
        found.append(f"device {theirs['device_type']} -> {ours['device_type']}")
    return found


def check_identity(saved: dict, ours: dict, path: Path) -> None:
    """A checkpoint of another run (another net or seed) is another run's work: refuse to touch it."""
    config = saved["config"]

    def key(c: dict) -> list:
        return [c.get(k, UNSAID.get(k)) for k in IDENTITY]

    def name(c: dict) -> str:  # as pipeline.Run names it: a CIFAR-10 run's name has no data set
        arch, depth, seed, dataset = key(c)
        return f"{arch}-{depth}-{seed}{suffix(dataset)}"

    if key(config) != key(ours["config"]):
        theirs, now = (name(c) for c in (config, ours["config"]))
        raise ValueError(f"{path} is the checkpoint of run {theirs}, not of {now}: give this run its own folder "
                         f"(--out), or delete that checkpoint")


def move_aside(path: Path, reasons: list[str]) -> Path:
    """Rename a stale checkpoint so that it says when and why it was set aside; never delete it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    why = "+".join(sorted({r.split(" ", 1)[0] for r in reasons}))[:60]
    aside = path.with_name(f"stale-{path.stem}-{stamp}-changed-{why}{path.suffix}")
    os.replace(path, aside)
    return aside
