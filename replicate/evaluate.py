"""The test error of trained weights: `python -m replicate.evaluate PATH [PATH ...] --data DIR`.

PATH is a run folder (its model.pt, or checkpoint.pt while unfinished), a model.pt, a
checkpoint.pt, an export of `python -m replicate.export`, or a foreign checkpoint such as the
PyTorch port's `.th`. The net comes from the tensors (depth, shortcut, number of classes) and the
metadata (plain or residual, the sequel's arch and depth: run.json beside the weights, the
checkpoint's config, the export's own); the test set is the run's data set's (CIFAR-10 or
CIFAR-100 under --data; without metadata, the one with as many classes as the net); the input
normalisation is the run's (the per-pixel mean of its training images) unless `--normalize
imagenet`. Our runs are evaluated as train.py evaluated them (train.evaluate, eval mode, batches of
1000, channels_last, the run's bf16 or fp16 autocast or TF32 where this device has it). The error is
metrics.json's test_error exactly on the CPU that trained the run, at the same thread count, and on
CUDA with `deterministic: true`; on CUDA without it cuDNN's benchmark picks its algorithms anew in
each process, so a few images may flip.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as cifar
from . import weights as W
from .models import ARCHS
from .preact import ARCHS as SEQUEL_ARCHS
from .device import AUTOCAST, PRECISIONS, autocast, channels_last, pick_device, resolve_precision, set_backends
from .report import net_name
from .train import evaluate as error_of
from . import outputs

# % test error above which a net whose input normalisation is a guess (no metadata, or overridden)
# gets a hint to try the other one. Not near chance (90%): on the real 1017-image sample the port's
# ResNet-20/32/44/56 give 55/51/53/41% with our per-pixel mean instead of their ImageNet
# normalisation (8.4/7.2/6.6/7.3% with it), and the paper's ResNets are all under 10%.
SUSPECT = 25.0
NORMALIZE = ("mean", "imagenet")


@dataclass
class Source:
    """One PATH: the weights read from it, what is known of the run, and what to say about it."""

    path: str
    weights: W.Weights
    info: dict                   # arch, seed, val_size, precision, ... of the run; {} when unknown
    notes: list[str] = field(default_factory=list)


def numpy_globals() -> list:
    """The classes of numpy's RNG state that a training checkpoint pickles (plain arrays), allowed
    for weights_only loading so that no pickled code runs even for checkpoint.pt."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 moved it
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def locate(path: str) -> Source:
    """Read PATH, with the run.json and metrics.json of its run folder when there are some."""
    p, notes = Path(path), []
    if p.is_dir():
        if (p / "model.pt").is_file():
            p = p / "model.pt"
        elif (p / "checkpoint.pt").is_file():
            p = p / "checkpoint.pt"
        else:
            raise FileNotFoundError(f"{path} holds neither model.pt nor checkpoint.pt: pass a run folder of "
                                    "replicate.train or a weights file")
    w = W.read(p, numpy_globals())
    info = dict(w.meta)
    if w.kind == "state_dict" and any((p.parent / name).is_file() for name in (outputs.RUN, outputs.METRICS)):
        m = outputs.read(p.parent)
        info = {**m.get("config", {}), **{k: v for k, v in m.items() if k != "config"}}
        w.meta = info
    if w.kind == "checkpoint":
        done, total = info.get("iterations_done"), info.get("iterations")
        if done is not None and total is not None and done < total:
            notes.append(f"unfinished run: evaluated the weights of {p.name} at iteration {done:,} of {total:,}")
        # the test error the run measured with these very weights, if it did so on the whole test set
        last = (info.get("history") or [{}])[-1]
        whole = not info.get("eval_subset") or done == total
        if last.get("iteration") == done and whole and last.get("test_error") == last.get("test_error"):
            info["test_error"] = last.get("test_error")
    return Source(path, w, info, notes)


def architecture(src: Source, arch: str | None, depth: int | None, shortcut: str | None) -> tuple[str, int, str, int]:
    """The net to build and its number of classes: options first, then what the tensors and
    metadata say. A foreign checkpoint has no metadata: it is taken as residual, and the output says
    so. A 2016 net without metadata needs --arch and --depth (its tensors are checked as they load)."""
    if arch in SEQUEL_ARCHS and "arch" not in src.weights.meta:
        if depth is None:
            raise ValueError(f"{src.weights.path}: --arch {arch} is a 2016 net, whose depth the tensors do not give "
                             "here: pass --depth too")
        return arch, depth, shortcut, W.classes(src.weights)
    found = W.architecture(src.weights)
    if arch is None:
        arch = found["arch"]
    if arch is None and src.weights.kind == "foreign":
        arch = "resnet"
        src.notes.append("foreign checkpoint without metadata: taken as resnet (pass --arch plain if it is a plain net)")
    if arch is None:
        raise ValueError(f"{src.weights.path} is a bare state dict without run.json beside it: plain and residual "
                         "nets have the same tensors, so pass --arch plain or --arch resnet")
    return arch, depth or found["depth"], shortcut or found["shortcut"], found["num_classes"]


def dataset_of(src: Source, num_classes: int) -> str:
    """The data set to test on: the run's (older runs say none: CIFAR-10), else the one with as many
    classes as the net has outputs. A run whose data set has another number of classes is refused."""
    said = src.info.get("dataset")
    if said is None:
        return next((k for k, s in cifar.DATASETS.items() if s.classes == num_classes), cifar.DEFAULT)
    if cifar.source(said).classes != num_classes:
        raise ValueError(f"{src.weights.path} says it ran on {cifar.source(said).name} ({cifar.source(said).classes} "
                         f"classes) but its last layer has {num_classes} outputs: the file is mislabelled or damaged")
    return said


def inputs(src: Source, normalize: str, data: cifar.CifarData, means: dict, device: torch.device) -> torch.Tensor:
    """The normalised test images: the run's per-pixel mean (stored in an export, else from DIR's
    training images split as the run split them), or ImageNet's per-channel normalisation."""
    if normalize == "imagenet":
        return W.imagenet_normalize(data.test_x, device)
    mean = src.info.get("mean")
    if mean is None:
        mean = training_mean(data, src.info.get("val_size"), src.info.get("seed"), means)
    return cifar.normalize(data.test_x, mean, device)


def training_mean(data: cifar.CifarData, val_size: int | None, seed: int | None, cache: dict) -> np.ndarray:
    """The per-pixel mean a run subtracted: that of its training images, `val_size` of them held
    out as chosen by `seed` (data.split). Cached: over 50k images it takes a while."""
    val_size = int(val_size or 0)
    key = (val_size, int(seed or 0) if val_size else 0)  # the seed only picks the held-out images
    if key not in cache:
        cache[key] = cifar.split(data, *key).mean
    return cache[key]


def run_precision(src: Source, device: torch.device) -> str:
    """What the run computed in: run.json's and an export's `precision` say it; a checkpoint's config
    holds only the setting (`precision`, or the bf16/tf32 switches of older runs), which train.py
    resolves on its device, as here. Foreign weights: fp32."""
    info = src.info
    if src.weights.kind != "checkpoint":
        return info.get("precision") if info.get("precision") in AUTOCAST or info.get("precision") == "tf32" else "fp32"
    setting = info.get("precision")
    if setting not in PRECISIONS:  # before `precision`: bf16 (where native), else TF32 if asked, else fp32
        setting = "bf16" if info.get("bf16") else "tf32" if info.get("tf32") else "fp32"
    return resolve_precision(device, setting)[0]


def evaluate_source(src: Source, data, device: torch.device, *, arch: str | None = None,
                    depth: int | None = None, shortcut: str | None = None, normalize: str | None = None,
                    means: dict | None = None) -> dict:
    """The test error of one PATH on its data set's test set (`data(dataset)` gives the CifarData of
    "cifar10" or "cifar100"), with what was evaluated and how."""
    info, means = src.info, {} if means is None else means
    arch, depth, shortcut, num_classes = architecture(src, arch, depth, shortcut)
    dataset = dataset_of(src, num_classes)
    data, means = data(dataset), means.setdefault(dataset, {})
    model = W.to_model(src.weights, arch, depth, shortcut, info.get("bn_batch_size"), num_classes)
    memory_format = channels_last(device)  # as train.py's nets: the same kernels, the same numbers
    model = model.to(device, memory_format=memory_format)
    normalize = normalize or "mean"
    x, y = inputs(src, normalize, data, means, device), torch.as_tensor(data.test_y, device=device)
    ran = run_precision(src, device)
    here, note = resolve_precision(device, ran)
    if note:
        src.notes.append(f"the run computed in {ran} but {note}, so the error may differ slightly from the run's")
    set_backends(device, tf32=here == "tf32", deterministic=bool(info.get("deterministic")))
    error = error_of(model, x, y, lambda: autocast(device.type, here), memory_format)
    recorded = info.get("test_error")
    if recorded is not None and info.get("device") not in (None, device.type):
        src.notes.append(f"trained on {info['device']}, evaluated on {device.type}: the error may differ slightly "
                         "from the run's")
    if error >= SUSPECT and ("arch" not in info or normalize != "mean"):  # the normalisation is a guess
        other = "mean" if normalize == "imagenet" else "imagenet"
        src.notes.append(f"test error {error:.2f}% is far above a trained net's (chance: 90%): it may have been "
                         f"trained on inputs normalised otherwise, try --normalize {other}")
    if info.get("diverged"):
        src.notes.append(f"the run diverged at iteration {info.get('diverged_at')}: these weights are not a trained net")
    return {
        "path": src.path, "file": src.weights.path, "kind": src.weights.kind,
        "arch": arch, "depth": depth, "shortcut": shortcut, "dataset": dataset, "normalize": normalize,
        "precision": here, "device": device.type,
        "params": sum(p.numel() for p in model.parameters()),
        "test_error": error, "test_images": len(y), "recorded_test_error": recorded,
        "seed": info.get("seed"), "notes": src.notes,
    }


def device_of(name: str) -> torch.device:
    """--device as a torch.device that exists here."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} names no device: use cuda, mps, cpu or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu or auto")
    return device


def table(rows: list[dict]) -> str:
    """The results as aligned text, each row's notes under the table."""
    head = ["path", "net", "data", "params", "normalize", "precision", "test error %", "recorded %"]
    body = [[r["path"], net_name(r["arch"], r["depth"], r["shortcut"]), cifar.source(r["dataset"]).name,
             f"{r['params']:,}", r["normalize"],
             r["precision"], f"{r['test_error']:.2f}",
             "-" if r["recorded_test_error"] is None else f"{r['recorded_test_error']:.2f}"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in (3, 6, 7) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head)] + [fmt(b) for b in body]
    lines += [f"note: {r['path']}: {n}" for r in rows for n in r["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the test error of each PATH as a table (or JSON with --json); returns the rows."""
    p = argparse.ArgumentParser(prog="python -m replicate.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="Example: python -m replicate.evaluate results/resnet-56-0 --data data")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run folder, model.pt, checkpoint.pt, exported .pt, or a foreign checkpoint (.th)")
    p.add_argument("--data", default="data", metavar="DIR",
                   help="folder holding cifar-10-batches-py/ (and cifar-100-python/ for CIFAR-100 nets; default: data)")
    p.add_argument("--arch", choices=(*ARCHS, *SEQUEL_ARCHS),
                   help="override: plain or residual (weights cannot tell), or a 2016 net's arch (with --depth)")
    p.add_argument("--depth", type=int, help="override the depth read from the tensors")
    p.add_argument("--shortcut", choices=("A", "B"), help="override the shortcut option read from the tensors")
    p.add_argument("--normalize", choices=NORMALIZE,
                   help="inputs: 'mean' subtracts the run's per-pixel training mean (ours, the paper's; default), "
                        "'imagenet' normalises per channel as the PyTorch port's checkpoints were trained")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: the fastest there is)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    args = p.parse_args(argv)
    try:
        sources = [locate(path) for path in args.paths]  # bad files fail before the data is read
        data = functools.cache(functools.partial(cifar.load, args.data))  # each data set read once, if needed
        device, means = device_of(args.device), {}
        rows = [evaluate_source(s, data, device, arch=args.arch, depth=args.depth, shortcut=args.shortcut,
                                normalize=args.normalize, means=means) for s in sources]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    return rows


if __name__ == "__main__":
    main()
