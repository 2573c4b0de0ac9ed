"""scripts/gpu_check.py's CPU dry run, as `make test` runs it: every part of the GPU check runs on
small nets with only what the GPU machine's image has importable (no DVC, papermill, jupyter,
submitit or torchvision there), and writes both files."""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the GPU image has (Python 3.12): these and what they require, nothing else.
ON_THE_GPU_IMAGE = ("torch", "numpy", "pandas", "matplotlib", "seaborn", "pyyaml", "tqdm", "psutil", "pytest")
ABSENT_ON_THE_GPU_IMAGE = ("dvc", "papermill", "jupyter", "nbformat", "nbclient", "ipykernel", "submitit", "torchvision")


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def absent_modules() -> list[str]:
    """Every top-level module installed here whose distribution the GPU image lacks: the ones not
    required, directly or not, by ON_THE_GPU_IMAGE (this project itself aside)."""
    dists = {_name(d.metadata["Name"]): d for d in md.distributions()}
    keep, todo = {"replicate"}, [_name(n) for n in ON_THE_GPU_IMAGE]
    while todo:
        name = todo.pop()
        if name in keep or name not in dists:
            continue
        keep.add(name)
        todo += [_name(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in dists[name].requires or [] if "extra ==" not in r]
    return sorted(m for m, ds in md.packages_distributions().items()
                  if m.isidentifier() and not any(_name(d) in keep for d in ds))


BLOCKER = """import importlib.machinery
import sys

ABSENT = frozenset({absent!r})


class Absent:
    \"\"\"A module of ABSENT has a spec without origin (importlib.util.find_spec, which torch._dynamo
    asks of optional modules, then skips it), and importing it fails as a missing module does.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (not on the GPU image)", name=spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, Absent())
"""


pytestmark = pytest.mark.slow


def test_the_cpu_dry_run_reaches_every_part_without_the_pipelines_packages(tmp_path):
    (tmp_path / "block").mkdir()
    absent = absent_modules()
    assert set(ABSENT_ON_THE_GPU_IMAGE) <= set(absent), set(ABSENT_ON_THE_GPU_IMAGE) - set(absent)
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER.format(absent=absent))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'block'}{os.pathsep}{ROOT}"}
    for name in ("papermill", "dvc", "torchvision", "IPython"):
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert "not on the GPU image" in probe.stderr, name  # the block works, in this process and its children
    start = time.monotonic()
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--budget-s", "60",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    print(f"\ngpu_check.py --device cpu --budget-s 60: {time.monotonic() - start:.1f} s of wall time")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    parts = results["parts"]
    assert list(parts) == ["environment", "cuda tests", "step times", "resume", "processes", "packed", "prediction"]
    assert all(p["status"] == "ok" for p in parts.values()), "; ".join(f"{n}: {p['status']}" for n, p in parts.items())
    assert "skipped" in parts["cuda tests"]["summary"] and parts["cuda tests"]["exit_code"] == 0
    rows = parts["step times"]["rows"]
    assert rows[0]["variant"] == "eager bf16" and rows[0]["ms_per_iteration"] > 0
    assert not any("CUDA graphs" in r["variant"] for r in rows)  # CUDA only
    timed = {r["variant"]: r for r in rows if "ms_per_iteration" in r}
    assert timed["eager bf16, BN over 16 images"]["bn_batch_size"] == 16  # half the dry run's batch of 32
    assert parts["resume"]["killed"] and parts["resume"]["resumed"] and parts["resume"]["identical_weights"]
    assert parts["processes"]["rows"][0]["aggregate_images_per_s"] > 0
    assert parts["packed"]["rows"][0]["images_per_s"] > 0
    prediction = parts["prediction"]
    assert prediction["one_run_s"] > 0 and "64,000 x" in prediction["one_run_how"]
    assert prediction["grid_one_gpu_s"] > 0 and "the sequential time /" in prediction["grid_one_gpu_how"]
    md = (tmp_path / "out" / "gpu-check.md").read_text()
    for heading in ("## cuda tests", "## Step times", "## Killed with SIGKILL and resumed", "## k processes",
                    "## k nets packed", "## Predicted"):
        assert heading in md, heading
