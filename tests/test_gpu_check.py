"""scripts/gpu_check.py's CPU dry run, as `make test` runs it: every part of the GPU check runs on
small nets, without DVC, papermill, jupyter, submitit or torchvision importable (the GPU machine's
image has none of them), and writes both files."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_IMAGE = ("dvc", "papermill", "jupyter", "jupyterlab", "jupyter_client", "jupyter_core", "nbformat",
                           "nbclient", "nbval", "ipykernel", "submitit", "torchvision")
BLOCKER = f"""import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)", name=name)

sys.meta_path.insert(0, Absent())
"""

pytestmark = pytest.mark.slow


def test_the_cpu_dry_run_reaches_every_part_without_the_pipelines_packages(tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'block'}{os.pathsep}{ROOT}"}
    probe = subprocess.run([sys.executable, "-c", "import papermill"], env=env, capture_output=True, text=True)
    assert "not on the GPU image" in probe.stderr  # the block works, in this process and its children
    start = time.monotonic()
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--budget-s", "60",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    print(f"\ngpu_check.py --device cpu --budget-s 60: {time.monotonic() - start:.1f} s of wall time")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    parts = results["parts"]
    assert list(parts) == ["environment", "cuda tests", "step times", "resume", "processes", "packed", "prediction"]
    assert all(p["status"] == "ok" for p in parts.values()), {n: p["status"] for n, p in parts.items()}
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
