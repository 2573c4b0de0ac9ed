"""Trained weights: reading every format the project meets, telling the net from the tensors, and
loading them into `models.build`. Used by `python -m replicate.evaluate` and by hubconf.py.

Imports only torch and replicate.models (and the standard library), so a torch.hub user needs
nothing else. Every file is read with `torch.load(weights_only=True)`: no pickled code runs.

Formats, recognised by their content (not their name):
- "export": `python -m replicate.export`'s files, {"format": FORMAT, "state_dict", "meta"};
- "checkpoint": replicate.train's checkpoint.pt, {"config", "model", ...};
- "state_dict": a bare state dict with our key names (a run's model.pt): no metadata;
- "foreign": anything else holding tensors in forward order, such as the widely used PyTorch
  port's `.th` ({"state_dict" with keys prefixed `module.`, `linear` for `fc`, "best_prec1"}).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import ARCHS, build, load_by_order

FORMAT = "replicate-weights/1"
# How the port's checkpoints were trained: [0, 1] inputs normalised per channel like ImageNet's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("export", "checkpoint", "state_dict", "foreign")
# hubconf.py's entry points, by the (arch, depth) they build: the 2015 paper's nets and the sequel's
# Table 3 ones (any other net loads through `load(arch, depth, weights)`).
HUB_ENTRY_POINTS = {
    **{(arch, d): f"{arch}{d}" for arch in ARCHS for d in (20, 32, 44, 56, 110)}, ("resnet", 1202): "resnet1202",
    ("preact", 110): "preact_resnet110", ("preactbottleneck", 164): "preact_resnet164",
    ("preactbottleneck", 1001): "preact_resnet1001", ("bottleneck", 164): "resnet164",
    ("bottleneck", 1001): "resnet1001",
}


@dataclass
class Weights:
    """The tensors of one file, in which format they came and what the file says about them.

    `meta` holds what the file records (arch, depth, shortcut, seed, val_size, bn_batch_size,
    precision, mean, ...): an export's metadata, a checkpoint's config, nothing otherwise."""

    path: str
    kind: str
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)


def read(path: str | Path, safe_globals: list | tuple = ()) -> Weights:
    """Load `path` on the CPU with weights_only=True and recognise its format.

    `safe_globals` allowlists more classes for the unpickler (a training checkpoint holds numpy
    RNG states: replicate.evaluate passes numpy's array classes)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}: pass a run folder, a model.pt, a checkpoint.pt, an exported .pt or a .th")
    try:
        if safe_globals:  # process-wide (the safe_globals() context manager needs torch >= 2.5)
            torch.serialization.add_safe_globals(list(safe_globals))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a zip or pickle: torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = str(e)
        refused = [line.strip().split(" was not")[0] for line in text.splitlines() if "Unsupported global" in line]
        if refused:  # a real pickle, but of classes beyond tensors and containers
            raise ValueError(
                f"{path} holds Python objects that weights_only loading refuses ({refused[0]}): it is not a weights "
                "file this project reads. If you trust it, load it yourself and torch.save its state_dict alone, "
                "then pass that file"
            ) from None
        # garbage reaches the unpickler as an 'Unsupported operand'; torch's own first line says little
        cause = "not a torch.save file" if "Weights only load failed" in text else (
            text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(e).__name__)
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({cause}; truncated or damaged if it was one): pass a model.pt, "
            "a checkpoint.pt, an exported .pt or a .th saved by torch.save"
        ) from None
    return parse(obj, path)


def parse(obj, path: str = "<object>") -> Weights:
    """Recognise a loaded object's format (see the module docstring) and take out its tensors."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return Weights(path, "export", _tensors(obj.get("state_dict"), path), dict(obj.get("meta") or {}))
    if isinstance(obj, dict) and {"config", "model"} <= set(obj) and isinstance(obj["config"], dict):
        meta = dict(obj["config"])
        state = obj.get("state") or {}
        meta.update(iterations_done=state.get("iteration"), device=obj.get("device_type"), history=state.get("history"))
        return Weights(path, "checkpoint", _tensors(obj["model"], path), meta)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return Weights(path, "foreign", _tensors(obj["state_dict"], path))
    sd = _tensors(obj, path)
    ours = all(k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "bn", "fc") for k in sd)
    return Weights(path, "state_dict" if ours else "foreign", sd)


def _tensors(obj, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, DataParallel's `module.` prefix removed."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(
            f"{path} holds no state dict of tensors ({what}): pass a file saved from a trained net (model.pt, "
            "checkpoint.pt, an export of python -m replicate.export, or a .th holding a state_dict)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def infer(w: Weights) -> tuple[int, str]:
    """Depth and shortcut from the tensors alone: depth is the number of 3x3 conv layers plus the
    final linear layer (6n+2), and option B shows as the two 1x1 projection convs."""
    convs = [v for k, v in w.state_dict.items() if v.dim() == 4]
    n3 = sum(1 for v in convs if tuple(v.shape[-2:]) == (3, 3))
    n1 = sum(1 for v in convs if tuple(v.shape[-2:]) == (1, 1))
    depth = n3 + 1
    if depth < 8 or (depth - 2) % 6 or n1 not in (0, 2) or len(convs) != n3 + n1:
        raise ValueError(
            f"{w.path} fits no CIFAR net of the paper: its {n3} 3x3 and {n1} 1x1 conv layers give no depth 6n+2 "
            "with shortcut A (no 1x1 convs) or B (two): it was saved from another architecture"
        )
    return depth, "B" if n1 else "A"


def classes(w: Weights) -> int:
    """The number of classes: the out_features of the final linear layer (`fc`, the port's `linear`)."""
    linear = [v for k, v in w.state_dict.items() if k in ("fc.weight", "linear.weight")] or [
        v for v in w.state_dict.values() if v.dim() == 2]
    if not linear:
        raise ValueError(f"{w.path} has no linear layer (a 2-D tensor): it was saved from another architecture")
    return int(linear[-1].shape[0])


def architecture(w: Weights) -> dict:
    """What the file tells about its net: depth and shortcut from the tensors, arch from the
    metadata, or 'resnet' where projection shortcuts exist (plain nets have none); None if unknown;
    num_classes from the last layer. The sequel's nets (replicate/preact.py) need the metadata's
    arch and depth: `to_model` checks them against the tensors. Metadata that contradicts the
    tensors is an error (a damaged or mislabelled file)."""
    arch, num_classes = w.meta.get("arch"), classes(w)
    if w.meta.get("num_classes", num_classes) != num_classes:
        raise ValueError(f"{w.path} says {w.meta['num_classes']} classes but its last layer has {num_classes}: "
                         "the file is mislabelled or damaged; export or save it again")
    if arch is not None and arch not in ARCHS:  # a 2016 net: its tensors are checked as they load
        if "depth" not in w.meta:
            raise ValueError(f"{w.path} says arch {arch} but not its depth, which a 2016 net's tensors do "
                             "not give here: export or save it again with its depth")
        return {"arch": arch, "depth": int(w.meta["depth"]), "shortcut": w.meta.get("shortcut"),
                "num_classes": num_classes}
    depth, shortcut = infer(w)
    if "depth" in w.meta and int(w.meta["depth"]) != depth:
        raise ValueError(f"{w.path} says depth {w.meta['depth']} but its tensors are of depth {depth}: "
                         "the file is mislabelled or damaged; export or save it again")
    if arch == "plain":
        if shortcut == "B":
            raise ValueError(f"{w.path} says plain but holds projection shortcuts (1x1 convs), which only "
                             "residual nets have: the file is mislabelled or damaged")
        shortcut = w.meta.get("shortcut", "A")  # a plain net has no shortcut tensors: keep its config's
    elif w.meta.get("shortcut", shortcut) != shortcut:
        raise ValueError(f"{w.path} says shortcut {w.meta['shortcut']} but its tensors have shortcut {shortcut} "
                         "(B: 1x1 projection convs): the file is mislabelled or damaged")
    elif arch is None and shortcut == "B":
        arch = "resnet"
    return {"arch": arch, "depth": depth, "shortcut": shortcut, "num_classes": num_classes}


def to_model(w: Weights, arch: str, depth: int, shortcut: str | None, bn_batch_size: int | None = None,
             num_classes: int | None = None, **options) -> torch.nn.Module:
    """`build(arch, depth, shortcut, num_classes, **options)` holding the tensors of `w` (num_classes
    None: the tensors'): by name when the keys are ours, else by order (the port's layout). Any
    mismatch names the file."""
    model = build(arch, depth, shortcut=shortcut, bn_batch_size=bn_batch_size,
                  num_classes=num_classes or classes(w), **options)
    try:
        if set(w.state_dict) == set(model.state_dict()):
            model.load_state_dict(w.state_dict)
        else:
            load_by_order(model, w.state_dict)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{w.path} does not fit {arch}-{depth} (shortcut {shortcut}): "
                         f"{str(e).strip().splitlines()[0]}") from None
    return model


def pack(state_dict: dict[str, torch.Tensor], meta: dict) -> dict:
    """The export format: what `torch.save` writes and `read` recognises."""
    return {"format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": meta}


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch(weights: str | Path, sha256_hex: str | None = None, progress: bool = True) -> Path:
    """A local path for `weights` (a file, or an http(s) URL downloaded into torch.hub's cache,
    `torch.hub.get_dir()/checkpoints/`), checked against `sha256_hex` (the whole digest or a
    prefix of at least 8) when one is given."""
    expected = sha256_hex.lower() if sha256_hex else None
    if expected is not None and (len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected)):
        raise ValueError(f"sha256={sha256_hex!r} is not a sha256: give its 64 hex digits (or at least the first 8)")
    url = str(weights)
    if urllib.parse.urlparse(url).scheme in ("http", "https"):
        name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pt"
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if not path.is_file() or (expected and not file_sha256(path).startswith(expected)):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=progress)
            except RuntimeError as e:  # torch's 'invalid hash value (expected "...", got "...")'
                raise ValueError(f"download of {url} refused: {e}. The file changed or the URL is wrong: "
                                 "check the URL and sha256=") from None
            except OSError as e:
                raise ConnectionError(f"could not download {url} ({e}): check the URL, or download it and pass "
                                      "the file's path as weights=") from None
        return path
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(weights)!r} is neither a file nor an http(s) URL")
    if expected:
        got = file_sha256(path)
        if not got.startswith(expected):
            raise ValueError(f"{path} has sha256 {got}, expected {expected}: it is not the file meant "
                             "(damaged, or another one); fetch it again or fix sha256=")
    return path


def load(arch: str, depth: int, weights: str | Path | None = None, *, sha256: str | None = None,
         progress: bool = True, num_classes: int | None = None, **kwargs) -> torch.nn.Module:
    """torch.hub's entry points: `build(arch, depth, num_classes, **kwargs)`, with `weights` (a path
    or URL, checked by `sha256`) loaded and the model put in eval mode. `num_classes` None: 10
    without weights, the weights' with them (100 for CIFAR-100). Refuses weights whose tensors or
    metadata are of another depth, arch, shortcut or number of classes. `model.meta` keeps the
    file's metadata: the per-pixel `mean` its inputs need (images in [0, 1] minus the mean), and the
    `dataset`, for our exports."""
    if weights is None:
        model = build(arch, depth, num_classes=num_classes or 10, **kwargs)
        model.meta = {}
        return model
    w = read(fetch(weights, sha256, progress))
    if arch in ARCHS or "arch" in w.meta:
        found = architecture(w)
    else:  # a 2016 net's bare state dict: the entry point names it, and its tensors are checked as they load
        found = {"arch": arch, "depth": depth, "shortcut": kwargs.get("shortcut"), "num_classes": classes(w)}
    if found["depth"] != depth or found["arch"] not in (None, arch):
        have = f"{found['arch']}-{found['depth']}" if found["arch"] else f"a net of depth {found['depth']}"
        net = (found["arch"] or arch, found["depth"])
        use = (f"the entry point {HUB_ENTRY_POINTS[net]}" if net in HUB_ENTRY_POINTS else
               f"replicate.weights.load({net[0]!r}, {net[1]}, weights)")
        raise ValueError(f"{weights} holds {have}, not {arch}-{depth}: use {use}, or other weights")
    if num_classes not in (None, found["num_classes"]):
        raise ValueError(f"{weights} holds a net of {found['num_classes']} classes, not num_classes={num_classes}: "
                         "drop num_classes=, the weights choose it")
    unknown = sorted(set(kwargs) - {"shortcut", "bn_batch_size"}) if arch in ARCHS else []
    if unknown:
        raise TypeError(f"unexpected argument(s) {unknown} with weights=: the weights fix the rest of the net")
    shortcut = kwargs.pop("shortcut", found["shortcut"])
    if arch != "plain" and found["shortcut"] is not None and shortcut != found["shortcut"]:
        raise ValueError(f"{weights} has shortcut {found['shortcut']} but shortcut={shortcut!r} was asked for: "
                         "drop shortcut=, the weights choose it")
    bn_batch_size = kwargs.pop("bn_batch_size", w.meta.get("bn_batch_size"))
    model = to_model(w, arch, depth, shortcut, bn_batch_size, found["num_classes"], **kwargs)
    model.meta = w.meta
    return model.eval()


def imagenet_normalize(images: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> [0, 1] normalised per channel with ImageNet's mean and std: the
    input the port's checkpoints were trained on (ours subtract the per-pixel mean instead)."""
    x = torch.as_tensor(images, device=device).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return x.sub_(mean).div_(std)
