"""Checkpoints: written atomically, read back onto the CPU, and resumed only by the same run.

Resume is bitwise exact on a CPU at the same thread count, and on CUDA with `deterministic: true`
(replicate/device.py). Elsewhere a resumed run continues the same experiment, but not bit for bit:
cuDNN's benchmark picks its algorithms by timing, afresh in each process. A checkpoint made on
another device type is refused.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over the target:
    a kill at any moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def check_same_run(saved: dict, ours: dict, protocol: tuple[str, ...], defaults: dict, path: Path) -> None:
    """A checkpoint may only continue the same experiment on the same device type; say exactly
    what differs. `saved` is the checkpoint; `ours` the run's config with its `device_type`."""
    config = saved["config"]
    if (config["arch"], config["depth"], config["shortcut"]) != (ours["arch"], ours["depth"], ours["shortcut"]):
        raise ValueError(
            f"{path} is a checkpoint of {config['arch']}-{config['depth']} (shortcut {config['shortcut']}) "
            f"but this run is {ours['arch']}-{ours['depth']} (shortcut {ours['shortcut']}): use another out_dir "
            "or delete the checkpoint"
        )
    # A field newer than the checkpoint had its default when it was saved.
    config = {k: config.get(k, defaults.get(k)) for k in protocol}
    diff = {k: (config[k], ours[k]) for k in protocol if config[k] != ours[k]}
    if diff:
        raise ValueError(
            f"{path} was trained with other settings {{name: (checkpoint, now)}} = {diff}: "
            "delete the checkpoint to start over, or use another out_dir"
        )
    made_on = saved.get("device_type", ours["device_type"])  # checkpoints before the field: as now
    if made_on != ours["device_type"]:
        raise ValueError(
            f"{path} was made on {made_on.upper()} but this run is on {ours['device_type'].upper()}: a run "
            f"continues only on the device type it started on (the numerics differ). Run it on "
            f"{made_on} (`device: {made_on}`), or delete the checkpoint to restart it here."
        )
