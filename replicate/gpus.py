"""Whether torch can use this machine's GPUs, asked before anything trains, so that a torch build
the driver is too old for, or one without kernels for the GPU, stops with the fix instead of
training for days on the CPU (torch.cuda.is_available() is then False, and `auto` picks the CPU).

`check_gpus_usable` is called by every entry point that trains: the grid (make repro, make quick),
a train stage (python -m replicate.pipeline train) and python -m replicate.train. Without
`nvidia-smi` on the PATH (a CPU machine) it does nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass

import torch

TORCH_INDEX = "https://download.pytorch.org/whl"
# The oldest Linux driver each CUDA major version of torch's wheels runs on: they bundle the CUDA
# runtime and rely on CUDA's minor version compatibility (docs.nvidia.com/deploy/cuda-compatibility:
# 12.x needs >= 525.60.13, 13.x needs >= 580).
DRIVER_FOR_CUDA = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580,)}
# The CUDA builds of torch and the architectures (sm_XY as XY) each has kernels for, x86_64; torch
# keeps this table itself (torch.cuda.PYTORCH_RELEASES_CODE_CC, 2.14); this copy of 2.14's is the
# fallback for versions without it. cu126 is the last with sm_70 (V100): CUDA 13 drops Volta.
RELEASES = {"12.6": {50, 60, 70, 75, 80, 86, 90}, "13.0": {75, 80, 86, 90, 100, 120}}


class GpusUnusable(ValueError):
    """GPUs are there and torch cannot use them (a ValueError: entry points print it as `error:`)."""


@dataclass
class Gpu:
    index: int
    name: str
    capability: tuple[int, int] | None  # None where nvidia-smi does not say (drivers before 510)
    driver: str


def nvidia_smi(*args: str) -> str:
    """nvidia-smi's output (`-L` by default); "" where it is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", *(args or ["-L"])], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def listed_gpus() -> list[Gpu]:
    """The GPUs `nvidia-smi` lists, [] without it (a CPU machine: no process is started)."""
    if shutil.which("nvidia-smi") is None:
        return []
    gpus = []
    for line in nvidia_smi("--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader").splitlines():
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) == 3 and parts[0]:
            cap = parts[1].split(".")
            capability = (int(cap[0]), int(cap[1])) if len(cap) == 2 and all(c.isdigit() for c in cap) else None
            gpus.append(Gpu(len(gpus), parts[0], capability, parts[2]))
    return gpus


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _runs_on(code: int, capability: tuple[int, int]) -> bool:
    """Kernels built for sm_<code> run on GPUs of the same major version and a minor at least as high."""
    return capability[0] == code // 10 and capability[1] >= code % 10


def _built_for() -> list[int]:
    """The sm_XY torch has kernels for (torch.cuda.get_arch_list() is [] where CUDA is unusable)."""
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)() or ""
    return sorted({int(a.split("_")[1].rstrip("af")) for a in flags.split() if a.startswith("sm_")})


def _releases() -> dict[str, set[int]]:
    table = getattr(torch.cuda, "PYTORCH_RELEASES_CODE_CC", None)
    if not table:
        return RELEASES
    arch = "aarch64" if platform.machine().lower() == "aarch64" else "x86_64"
    return {cuda: set(by_arch.get(arch, ())) for cuda, by_arch in table.items()}


def matching_build(driver: tuple[int, ...], capabilities: list[tuple[int, int]]) -> str | None:
    """The newest CUDA build of torch the driver runs and that has kernels for every GPU, or None."""
    fits = [cuda for cuda, codes in _releases().items()
            if driver >= DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]), (10**6,))
            and all(any(_runs_on(c, cap) for c in codes) for cap in capabilities)]
    return max(fits, key=_version, default=None)


def fix(driver: tuple[int, ...], capabilities: list[tuple[int, int]]) -> str:
    cuda = matching_build(driver, capabilities)
    if cuda is None:
        oldest = min(DRIVER_FOR_CUDA[int(c.split(".")[0])] for c in _releases() if int(c.split(".")[0]) in DRIVER_FOR_CUDA)
        return (f"No CUDA build of torch {torch.__version__.split('+')[0]} runs with driver {_dotted(driver)} on "
                f"these GPUs: update the NVIDIA driver (>= {_dotted(oldest)}), or see https://pytorch.org/get-started/previous-versions/")
    tag = "cu" + cuda.replace(".", "")
    need = DRIVER_FOR_CUDA[int(cuda.split(".")[0])]
    return (f"Install a torch built for CUDA {cuda} (driver >= {_dotted(need)}), in this project's .venv:\n"
            f"  make install TORCH_INDEX={TORCH_INDEX}/{tag}")


def check_gpus_usable(device: str = "auto") -> None:
    """Raise GpusUnusable, naming the driver, torch's CUDA, each GPU and the fix, where nvidia-smi lists
    GPUs that torch cannot use and the run would otherwise train on the CPU or fail at its first
    kernel. `device: cpu` (or CUDA_VISIBLE_DEVICES hiding every GPU) runs, with one line saying so."""
    gpus = listed_gpus()
    if not gpus or device not in ("auto", "cuda") and not device.startswith("cuda:"):
        if gpus and device == "cpu":
            print(f"note: device is cpu: the {len(gpus)} GPU(s) nvidia-smi lists ({gpus[0].name}) are left idle",
                  flush=True)
        return
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and (not hidden.strip() or hidden.strip().startswith("-")):
        print(f"note: CUDA_VISIBLE_DEVICES={hidden!r} hides the {len(gpus)} GPU(s) nvidia-smi lists: training on the CPU",
              flush=True)
        return
    driver = _version(gpus[0].driver)
    cuda = torch.version.cuda
    built = _built_for()
    listing = "\n".join(f"  GPU {g.index}: {g.name}, compute capability "
                        f"{'%d.%d' % g.capability if g.capability else 'unknown'}, driver {g.driver}" for g in gpus)
    capabilities = [g.capability for g in gpus if g.capability]
    if cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif not torch.cuda.is_available():
        need = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))
        if need and driver < need:
            problem = (f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver >= "
                       f"{_dotted(need)}; this machine's driver is {gpus[0].driver}")
        else:
            problem = (f"torch {torch.__version__} (CUDA {cuda}) finds no usable GPU with driver {gpus[0].driver} "
                       f"(torch.cuda.is_available() is False); `python -c 'import torch; torch.cuda.init()'` says why")
    else:
        lacking = [g for g in gpus if g.capability and not any(_runs_on(c, g.capability) for c in built)]
        if not lacking:
            return
        problem = (f"torch {torch.__version__} (CUDA {cuda}) has kernels for "
                   f"{' '.join(f'sm_{c}' for c in built)} only, not for compute capability "
                   f"{'%d.%d' % lacking[0].capability} ({lacking[0].name}): its first kernel would fail")
    raise GpusUnusable(f"nvidia-smi lists {len(gpus)} GPU(s) that torch cannot use: {problem}.\n{listing}\n"
                       f"{fix(driver, capabilities)}\n"
                       f"(Or train on the CPU on purpose: device: cpu in params.yaml, --device cpu; days for the grid.)")


# The device of the preflight's step: the GPU of the first slot. Tests set "cpu" to run it here.
PREFLIGHT_DEVICE = "cuda"
PREFLIGHT_TIMEOUT_S = 600  # CUDA's start and one step take seconds; a hang must not stop the grid for good


def preflight(config: dict, pin: dict[str, str], device: str | None = None) -> dict:
    """Start CUDA and take one eager training step of `config` (the grid's deepest net, at its
    batch and precision) in a subprocess pinned like the first slot, so that what would fail in
    every worker an hour later fails now, and the grid's own process never initialises CUDA.
    Returns what the step took (peak_gib: torch.cuda.max_memory_allocated); raises GpusUnusable."""
    device = device or PREFLIGHT_DEVICE
    argv = [sys.executable, "-m", "replicate.gpus", "--preflight", json.dumps({**config, "device": device})]
    net = f"{config['arch']}-{config['depth']} at batch {config['batch_size']}"
    where = " ".join(f"{k}={v}" for k, v in pin.items() if k == "CUDA_VISIBLE_DEVICES") or "this machine"
    try:
        done = subprocess.run(argv, env={**os.environ, **pin}, capture_output=True, text=True,
                              timeout=PREFLIGHT_TIMEOUT_S)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, f"timed out after {e.timeout:.0f} s"
    if code != 0:
        lines = [line for line in str(output).strip().splitlines() if line.strip()] or ["no output"]
        tail = "\n".join(f"  {line}" for line in lines[-8:])
        raise GpusUnusable(f"the preflight on the first slot ({where}) failed: starting CUDA and one eager training "
                           f"step of {net} ({device}):\n{tail}\nNo run was started: every worker would fail the same "
                           f"way. Fix the cause (above), then run the same command again.")
    found = json.loads(output.strip().splitlines()[-1])
    return {**found, "where": where, "net": net}


def _preflight_step(config: dict) -> dict:
    """The preflight's child: CUDA's start, the engine on a batch of generated images, one step."""
    import resource
    import time

    from . import data as cifar
    from .train import Config, make_engine, train_step

    start = time.perf_counter()
    cfg = Config.from_dict({**config, "compile": False, "val_size": 0})
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.init()
    engine = make_engine(cfg, cifar.synthetic(2 * cfg.batch_size, 10, seed=0))
    x, y = engine.loader.batch(0)
    loss = train_step(engine.model, engine.optimizer, x, y, engine.autocast, engine.scaler)[0].item()  # waits for the GPU
    if device.type == "cuda":
        peak, what = torch.cuda.max_memory_allocated(device), "GPU memory (torch.cuda.max_memory_allocated)"
    else:  # the tests' stand-in: the process's peak resident memory (ru_maxrss, KiB on Linux)
        peak, what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process memory (ru_maxrss)"
    return {"seconds": round(time.perf_counter() - start, 2), "peak_gib": round(peak / 2**30, 3), "peak_of": what,
            "precision": engine.precision, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "loss": loss}


def main(argv: list[str] | None = None) -> None:
    """python -m replicate.gpus [DEVICE]: the check alone; --preflight CONFIG_JSON: the preflight's child."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--preflight"]:
        try:
            print(json.dumps(_preflight_step(json.loads(argv[1]))))
        except Exception as e:  # noqa: BLE001 - whatever fails is the answer, one line for the grid to show
            sys.exit(f"{type(e).__name__}: {str(e).strip()}")
        return
    try:
        check_gpus_usable(argv[0] if argv else "auto")
    except GpusUnusable as e:
        sys.exit(f"error: {e}")
    print("ok")


if __name__ == "__main__":
    main()
