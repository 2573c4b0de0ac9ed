"""Reference replication of the CIFAR-10 experiments of He et al. 2015 (arXiv:1512.03385) and of
its sequel, He et al. 2016 (arXiv:1603.05027).

Modules: `models` (plain and residual nets), `preact` (the sequel's nets), `data` (CIFAR-10 on the
device), `train` (the papers' protocol), `papers` (each paper's grid, report and quick look).
Import them by name, e.g. `from replicate.train import Config, train`.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

try:  # every DVC stage is `python -m replicate...`: a `python` without torch must say why at once
    import torch  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    raise SystemExit(
        f"error: torch is not installed for {sys.executable}: run DVC from the project's environment "
        "(`source .venv/bin/activate`, made by `make install`), then `dvc repro` again; `dvc checkout` "
        "brings back the outputs a failed stage removed.") from None

__version__ = "0.1.0"


def code_commit() -> str | None:
    """The git commit of this package's code, "+modified" when its files differ from it; None
    outside a git checkout. Only the code counts: pinning another tarball (data.dvc, params.yaml)
    changes the data, which the reports name by its md5, not the code."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        if head.returncode != 0:
            return None
        changed = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--",
                                  str(here), str(here.parent / "notebooks")], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+modified" if changed.stdout.strip() else "")


# The code a training run executes: the train stages' code dependencies in dvc.yaml (stage `check`
# keeps the two lists equal). A checkpoint made by other code is not resumed (replicate/checkpoint.py).
TRAINING_CODE = ("replicate/__init__.py", "replicate/batchnorm.py", "replicate/checkpoint.py", "replicate/data.py",
                 "replicate/device.py", "replicate/models.py", "replicate/outputs.py", "replicate/preact.py",
                 "replicate/train.py", "replicate/pipeline.py",
                 "notebooks/train.ipynb")


def code_fingerprint() -> str:
    """sha256 (16 hex digits) of the training code's files, as DVC sees them: any edit changes it,
    committed or not. The notebook counts where it exists (not in an installed package)."""
    root, digest = Path(__file__).resolve().parent.parent, hashlib.sha256()
    for name in TRAINING_CODE:
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
