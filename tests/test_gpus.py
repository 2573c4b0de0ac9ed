"""replicate.gpus on a CPU, with a stand-in `nvidia-smi` on the PATH and torch's CUDA faked: a torch
build the driver is too old for, or one without kernels for the GPU, stops every entry point with
the driver, the CUDA version, the GPU and the fix, instead of training on the CPU for days."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replicate import gpus, grid, local, pipeline
from replicate import train as engine

ARCHS_CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"
ARCHS_CU126 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90"
H100 = "NVIDIA H100 80GB HBM3, 9.0, {driver}"
V100 = "Tesla V100-SXM2-32GB, 7.0, {driver}"


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """machine(smi_lines, available, archs, cuda): a fake `nvidia-smi` first on the PATH, and torch's
    CUDA as a build for `cuda` with kernels for `archs` would report it."""
    def make(lines: list[str] | None, available: bool = True, archs: str = ARCHS_CU130, cuda: str = "13.0"):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        if lines is not None:
            smi = bin_dir / "nvidia-smi"
            smi.write_text(f"#!{sys.executable}\nprint({chr(10).join(lines)!r})\n")
            smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}" if lines is not None
                           else str(bin_dir))  # an empty folder: no nvidia-smi
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch, "__version__", f"2.14.1+cu{cuda.replace('.', '')}" if cuda else "2.14.1+cpu")
        monkeypatch.setattr(torch._C, "_cuda_getArchFlags", lambda: archs, raising=False)
    return make


def test_driver_550_with_the_cu130_build_names_everything_and_the_fix(machine):
    machine([H100.format(driver="550.54.15")], available=False)
    with pytest.raises(gpus.GpusUnusable) as e:
        gpus.check_gpus_usable("auto")
    text = str(e.value)
    print(f"\nerror: {text}")
    assert "built for CUDA 13.0, which needs NVIDIA driver >= 580; this machine's driver is 550.54.15" in text
    assert "GPU 0: NVIDIA H100 80GB HBM3, compute capability 9.0, driver 550.54.15" in text
    assert "make install TORCH_INDEX=https://download.pytorch.org/whl/cu126" in text.splitlines()[-2]


def test_a_v100_with_a_build_from_sm_75_names_its_kernels_and_the_cu126_build(machine):
    machine([V100.format(driver="580.82.07")] * 2, available=True)
    with pytest.raises(gpus.GpusUnusable) as e:
        gpus.check_gpus_usable("cuda")
    text = str(e.value)
    assert "nvidia-smi lists 2 GPU(s)" in text and "has kernels for sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 only" in text
    assert "compute capability 7.0 (Tesla V100-SXM2-32GB)" in text
    assert "CUDA 12.6" in text and "make install TORCH_INDEX=https://download.pytorch.org/whl/cu126" in text
    machine([V100.format(driver="550.54.15")], available=True, archs=ARCHS_CU126, cuda="12.6")
    gpus.check_gpus_usable("auto")  # the cu126 build: fine


def test_a_working_h100_passes_silently(machine, capsys):
    machine([H100.format(driver="580.82.07")] * 8, available=True)
    gpus.check_gpus_usable("auto")
    gpus.check_gpus_usable("cuda:0")
    assert capsys.readouterr().out == ""


def test_without_nvidia_smi_it_does_nothing(machine, monkeypatch, capsys):
    machine(None, available=False, cuda=None)

    def no_process(*args, **kwargs):
        raise AssertionError("a CPU machine must not start a process")
    monkeypatch.setattr(subprocess, "run", no_process)
    gpus.check_gpus_usable("auto")
    assert capsys.readouterr().out == ""


def test_device_cpu_with_gpus_runs_and_says_they_are_idle(machine, capsys, cifar_root, tmp_path):
    machine([H100.format(driver="550.54.15")] * 2, available=False)
    gpus.check_gpus_usable("cpu")
    assert capsys.readouterr().out == "note: device is cpu: the 2 GPU(s) nvidia-smi lists (NVIDIA H100 80GB HBM3) are left idle\n"
    engine.main(["--data", str(cifar_root), "--device", "cpu", "--depth", "8", "--iterations", "2",
                 "--milestones", "1", "--batch-size", "16", "--log-every", "1", "--eval-every", "1", "--compile", "false"])
    out = capsys.readouterr().out
    assert out.count("left idle") == 1 and '"iterations": 2' in out and '"device": "cpu"' in out


def test_older_drivers_get_the_newest_build_that_fits():
    assert gpus.matching_build((580, 82), [(9, 0)]).startswith("13.")
    assert gpus.matching_build((570, 124), [(9, 0)]) == "12.6"
    assert gpus.matching_build((535, 0), [(8, 0)]) == "12.6"
    assert gpus.matching_build((590, 0), [(7, 0)]) == "12.6"  # V100: CUDA 13 has no sm_70
    assert gpus.matching_build((470, 0), [(8, 0)]) is None
    assert "update the NVIDIA driver (>= 525.60.13)" in gpus.fix((470, 0), [(8, 0)])


def test_every_entry_point_that_trains_stops_first(machine, monkeypatch, tmp_path, cifar_root):
    machine([H100.format(driver="550.54.15")], available=False)
    with pytest.raises(SystemExit, match="driver is 550.54.15"):
        engine.main(["--data", str(cifar_root), "--depth", "8", "--iterations", "2"])
    monkeypatch.setattr(pipeline, "execute_notebook", lambda *a, **k: pytest.fail("the notebook ran"))
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit, match="driver is 550.54.15"):
        pipeline.main(["--params", str(root / "params.yaml"), "train", "--run", "resnet-20-0", "--out", str(tmp_path / "r")])
    monkeypatch.chdir(root)
    monkeypatch.setattr(grid, "dvc", lambda *a, **k: pytest.fail("a DVC command ran"))
    with pytest.raises(SystemExit, match="(?s)driver is 550.54.15.*make install TORCH_INDEX="):
        grid.main(["--jobs", "1"])
    assert local.visible_gpus() == []  # what used to send the grid to the CPU without a word


PIN = {"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2"}


@pytest.fixture
def grid_on_a_gpu(monkeypatch):
    """grid.main up to its workers, with one GPU slot: no DVC, and run_local records that it ran."""
    started = []
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(grid, "dvc", lambda *args, root, capture=False: subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(grid, "pending", lambda stages, root: stages)
    monkeypatch.setattr(local, "plan", lambda jobs, n_runs, **kwargs: ([PIN], "one GPU slot (the test's)"))
    monkeypatch.setattr(local, "run_local", lambda tasks, root, view, pins, again=None:
                        started.append(pins) or {t.run: 0 for t in tasks})
    return started


def test_the_grid_preflight_runs_the_deepest_step_and_prints_its_memory(grid_on_a_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpus, "PREFLIGHT_DEVICE", "cpu")  # the GPU path, its step on this CPU
    grid.main(["--profile", "quick", "--jobs", "1"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("grid: preflight"))
    assert "on CUDA_VISIBLE_DEVICES=0" in line and re.search(r"one eager step of (plain|resnet)-56 at batch 128", line)
    assert re.search(r"peak process memory \(ru_maxrss\) \d+\.\d\d GiB", line), line
    assert grid_on_a_gpu == [[PIN]]  # then the workers started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA cannot start")
def test_a_failed_preflight_stops_the_grid_before_any_worker(grid_on_a_gpu):
    """What every worker would meet an hour later (here CUDA cannot start: no driver) stops the grid now."""
    with pytest.raises(SystemExit) as e:
        grid.main(["--profile", "quick", "--jobs", "1"])
    text = str(e.value)
    assert re.match(r"error: the preflight on the first slot \(CUDA_VISIBLE_DEVICES=0\) failed: starting CUDA "
                    r"and one eager training step of (plain|resnet)-56 at batch 128 \(cuda\):", text), text
    print(f"\n{text}")
    assert "RuntimeError" in text and "No run was started" in text and "Traceback" not in text
    assert grid_on_a_gpu == []


def test_a_cpu_grid_has_no_preflight(grid_on_a_gpu, monkeypatch):
    monkeypatch.setattr(local, "plan", lambda jobs, n_runs, **kwargs: ([{"OMP_NUM_THREADS": "1"}], "a CPU slot"))
    monkeypatch.setattr(gpus, "preflight", lambda *a, **k: pytest.fail("a preflight on a CPU machine"))
    grid.main(["--profile", "quick", "--jobs", "1"])
    assert grid_on_a_gpu == [[{"OMP_NUM_THREADS": "1"}]]
