"""Every notebook in notebooks/ executes under nbval, with small parameters on generated data.

papermill injects the parameters (--prepare-only: nothing runs), then `pytest --nbval-lax` runs
the prepared copy in a temporary folder, as its own pytest session. Executed notebooks under
results/ are never collected: only notebooks/*.ipynb are."""

import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from replicate import data as cifar
from replicate import pipeline
from replicate.outputs import read as read_outputs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Per-notebook small parameters, made in the test's temporary folder. Paths are absolute: nbval
# runs a notebook in its own folder.
TINY_RUN = dict(arch="resnet", depth=8, seed=1)
TINY_PROTOCOL = dict(iterations=12, milestones=[6, 9], lr=0.05, batch_size=16, log_every=3, eval_every=6,
                     checkpoint_every=6, device="cpu", compile=False, warmup=True, warmup_until=100.5,
                     lr_ramp=2)  # warm-up ends at the first check
TINY_TRAIN = {**TINY_RUN, **TINY_PROTOCOL}


def train_parameters(tmp: Path) -> dict:
    cifar.write_cifar10(tmp / "cifar", cifar.synthetic(160, 40, seed=3))
    return {**TINY_RUN, "protocol": TINY_PROTOCOL, "data_root": str(tmp / "cifar"), "out_dir": str(tmp / "run")}


def report_parameters(tmp: Path) -> dict:
    return {"results_dir": str(ROOT / "tests" / "fixtures" / "runs"), "out_dir": str(tmp / "report")}


PARAMETERS = {"train.ipynb": train_parameters, "report.ipynb": report_parameters}


def test_notebooks_are_found():
    assert "train.ipynb" in [nb.name for nb in NOTEBOOKS]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[nb.name for nb in NOTEBOOKS])
def test_notebook_runs_under_nbval(notebook, tmp_path):
    if notebook.name not in PARAMETERS:
        pytest.fail(f"no small parameters for {notebook.name}: add them to PARAMETERS in {__file__}")
    parameters = PARAMETERS[notebook.name](tmp_path)
    assert set(parameters) <= set(papermill.inspect_notebook(str(notebook))), "unknown parameter"
    prepared = tmp_path / "nb" / notebook.name
    prepared.parent.mkdir()
    papermill.execute_notebook(str(notebook), str(prepared), parameters=parameters, prepare_only=True,
                               progress_bar=False)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(prepared.parent), str(prepared)],
        cwd=prepared.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    if notebook.name == "train.ipynb":
        check_train_outputs(Path(parameters["out_dir"]))


def check_train_outputs(out: Path) -> None:
    """The run the notebook made is the one its parameters describe, and it left every output."""
    for name in ("metrics.json", "history.csv", "responses.csv", "model.pt", "checkpoint.pt"):
        assert (out / name).is_file(), name
    metrics = read_outputs(out)
    # every parameter reached the Config: a name the notebook forgot to pass would keep its default
    assert {k: metrics["config"][k] for k in TINY_TRAIN} == TINY_TRAIN
    assert (metrics["iterations"], metrics["diverged"], metrics["device"]) == (12, False, "cpu")
    assert metrics["warmup_ended_at"] == 3
    for key in ("arch", "depth", "params", "seed", "train_error", "test_error", "seconds"):
        assert metrics[key] is not None, key


def test_diverged_run_ends_its_stage_with_metrics_that_say_so(tmp_path):
    """The stage's entry point on a run whose loss blows up: it exits normally, so `dvc repro`
    goes on with the grid, and metrics.json says what happened."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TINY_PROTOCOL, lr=1e6, warmup=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cifar.write_cifar10(tmp_path / "cifar", cifar.synthetic(160, 40, seed=3))
    pipeline.main(["--params", str(tmp_path / "params.yaml"), "train", "--run", "plain-8-0", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "cifar")])
    metrics = read_outputs(tmp_path / "run")
    assert metrics["diverged"] is True and metrics["diverged_at"] <= 12
    assert metrics["test_error"] is None and metrics["train_error"] is None
    executed = nbformat.read(tmp_path / "run" / "train.ipynb", as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o["output_type"] == "error"]


def test_papermill_kernel_is_this_environment(tmp_path):
    """Kernel `python3` must be the interpreter that has `replicate` installed."""
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys, replicate\nprint(sys.prefix)")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "which.ipynb")
    out = papermill.execute_notebook(str(tmp_path / "which.ipynb"), str(tmp_path / "out.ipynb"),
                                     progress_bar=False)
    assert out.cells[0].outputs[0]["text"].strip() == sys.prefix  # the venv, not the base python
