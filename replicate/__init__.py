"""Reference replication of the CIFAR-10 experiments of He et al. 2015 (arXiv:1512.03385).

Modules: `models` (plain and residual nets), `data` (CIFAR-10 on the device), `train` (the
paper's protocol). Import them by name, e.g. `from replicate.train import Config, train`.
"""

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
