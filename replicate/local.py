"""The local grid: k worker slots on this machine, each pinned to its GPU or its share of the
cores, running the grid's tasks side by side (`make repro JOBS=...`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from .device import choose_precision
from .gpus import nvidia_smi
from .tasks import Task, View, cost, outcome, start

# Local slots per GPU for JOBS=auto where its memory is unknown (no nvidia-smi): a guess. Where it
# is known, as many runs as its memory holds (memory.run_gb: measured activations, assumed context).
SLOTS_PER_GPU = 4
# CPU cores each CUDA worker needs: its Python thread launches the kernels of a small net, and a
# launch-bound process that shares a core with another runs at half speed.
CORES_PER_CUDA_WORKER = 1
# Torch threads per CPU worker for JOBS=auto: 2 workers of 1 thread beat 1 of 2 threads on our
# 2-core CPU (docs/speed.md, "The grid on a CPU").
THREADS_PER_CPU_WORKER = 1
GB_PER_WORKER = 3  # a worker holds the padded training set (1 GB in float32), the net and a kernel


def slots(jobs: str | int, n_runs: int, gpus: list[str] | None = None, cores: int | None = None,
          memory_gb: float | None = None, deepest: Deepest | None = None,
          gpu_info: dict[str, GpuInfo] | None = None) -> list[dict[str, str]]:
    """The environment of each worker slot; their number is how many runs train at once (plan)."""
    return plan(jobs, n_runs, gpus, cores, memory_gb, deepest, gpu_info)[0]


@dataclass
class Deepest:
    """The grid's run that holds the most memory, which decides how many runs share a GPU."""

    depth: int
    precision: str = "auto"  # the setting; resolved per GPU as train.py would (device.resolve_precision)
    batch: int = 128
    arch: str = "resnet"
    checkpointing: bool | str = "auto"  # train's activation_checkpointing; resolved per GPU as train.py would

    def name(self) -> str:
        plain_or_resnet = self.arch in ("resnet", "plain")  # the same memory: named as before
        return f"ResNet-{self.depth}" + ("" if plain_or_resnet else f" ({self.arch})")


@dataclass
class GpuInfo:
    """A CUDA_VISIBLE_DEVICES entry's memory (GiB) and compute capability (None: unknown)."""

    gib: float | None
    capability: tuple[int, int] | None = None


def plan(jobs: str | int, n_runs: int, gpus: list[str] | None = None, cores: int | None = None,
         memory_gb: float | None = None, deepest: Deepest | None = None,
         gpu_info: dict[str, GpuInfo] | None = None) -> tuple[list[dict[str, str]], str]:
    """The environment of each worker slot, and why JOBS=auto chose their number.

    `gpus` are CUDA_VISIBLE_DEVICES entries (visible_gpus()): indices, GPU UUIDs or MIG instances.
    CUDA: JOBS=auto gives each GPU or MIG instance as many slots as its memory holds runs like
    `deepest` (memory.run_gb; SLOTS_PER_GPU where its memory is unknown), fewer where the cores
    cannot feed them (CORES_PER_CUDA_WORKER each, at least one per GPU); slots go round-robin
    over the GPUs, each seeing its GPU only.
    CPU: auto is one worker per THREADS_PER_CPU_WORKER cores, at most one per GB_PER_WORKER GB of
    memory. Every worker gets its share of the cores as torch threads (OMP_NUM_THREADS) and as
    Inductor's compile pool (up to 32 processes each otherwise), which also keeps OpenMP threads of
    different workers from spin-waiting on each other's cores. The share comes from JOBS, not from
    how many runs are left: a CPU run resumed by a rerun with fewer runs to go must keep its thread
    count, or it does not end bitwise identical to an uninterrupted one.
    """
    gpus = visible_gpus() if gpus is None else gpus
    cores = cpu_count() if cores is None else cores
    memory_gb = available_gb() if memory_gb is None else memory_gb
    k, why = parse_jobs(jobs), f"JOBS={jobs}"
    entries = list(gpus)
    if k is None and gpus:
        info = gpu_memory(gpus) if gpu_info is None else gpu_info
        fits, holds = gpu_fits(gpus, info, deepest or Deepest(110))
        entries = [g for r in range(max(fits)) for g, n in zip(gpus, fits) if n > r]  # round-robin
        feed = max(len(gpus), cores // CORES_PER_CUDA_WORKER)
        entries = entries[:feed]
        k = len(entries)
        said: dict[str, list[int]] = {}
        for g, text in zip(gpus, holds):
            said.setdefault(text, []).append(entries.count(g))
        why = "; ".join(f"{min(c)}{'' if min(c) == max(c) else f'-{max(c)}'} per GPU: {text}" for text, c in said.items())
        if feed < sum(fits):
            why += f", {cores} cores feed {feed}"
    elif k is None:
        k = min(cores // THREADS_PER_CPU_WORKER, int(memory_gb // GB_PER_WORKER))
        why = f"{cores} cores, {memory_gb:.0f} GB free, {GB_PER_WORKER} GB a worker"
    k = max(1, k)
    if gpus and len(entries) != k:
        entries = [gpus[i % len(gpus)] for i in range(k)]
    threads = str(max(1, cores // k))
    pins = []
    for i in range(min(k, n_runs)):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TORCHINDUCTOR_COMPILE_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = entries[i]
        pins.append(env)
    return pins, why


def gpu_fits(gpus: list[str], info: dict[str, GpuInfo], deepest: Deepest) -> tuple[list[int], list[str]]:
    """How many runs like `deepest` each GPU's memory holds, and why, in words."""
    from . import memory

    fits, holds, d = [], [], deepest
    for g in gpus:
        gi = info.get(g, GpuInfo(None))
        precision = gpu_precision(d.precision, gi.capability)
        recompute = memory.checkpointing_on(d.checkpointing, d.arch, d.depth, precision, d.batch, gi.gib)
        each = memory.run_gb(d.arch, d.depth, precision, d.batch, recompute)
        n = SLOTS_PER_GPU if gi.gib is None else max(1, int(gi.gib // each))
        net = (f"{d.name()} at batch {d.batch} in {precision}{', checkpointed' if recompute else ''} "
               f"({each:.1f} GB each)")
        fits.append(n)
        holds.append(f"memory unknown (no nvidia-smi), {n} assumed for {net}" if gi.gib is None else
                     f"{gi.gib:.1f} GB holds {n} runs of {net}" if gi.gib >= each else
                     f"{gi.gib:.1f} GB is less than one run of {net}: 1 tries, and may run out of memory")
    return fits, holds


def gpu_precision(setting: str, capability: tuple[int, int] | None) -> str:
    """What a run set to `setting` computes in on a GPU of `capability` (device.resolve_precision's
    rule, without starting CUDA in this process); an unknown capability counts as fp32, the largest."""
    if capability is None:
        return "fp32"
    ampere = capability >= (8, 0)
    return choose_precision(setting, ampere, capability >= (7, 0), ampere, "cuda")[0]


def gpu_memory(gpus: list[str], listing: str | None = None, query: str | None = None) -> dict[str, GpuInfo]:
    """Each entry's memory and capability from nvidia-smi, without starting CUDA here (a context
    in this process would hold memory on a GPU for the whole grid). A MIG instance's memory comes
    from its profile name in `nvidia-smi -L` (1g.5gb: 5 GB nominal, 4.75 GiB usable, so 0.95 GiB a
    nominal GB; MIG exists from Ampere on), a GPU's from `--query-gpu=memory.total` (MiB)."""
    listing = nvidia_smi() if listing is None else listing
    if query is None:  # compute_cap needs a driver from 2021 on (510): without it, the memory alone
        query = (nvidia_smi("--query-gpu=index,uuid,memory.total,compute_cap", "--format=csv,noheader,nounits")
                 or nvidia_smi("--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"))
    found: dict[str, GpuInfo] = {}
    for line in listing.splitlines():
        if m := re.search(r"MIG (\d+)g\.(\d+)gb.*\(UUID: (MIG-[^)\s]+)\)", line):
            found[m[3]] = GpuInfo(0.95 * int(m[2]), (8, 0))
    for line in query.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[2].isdigit():
            cap = tuple(int(v) for v in parts[3].split(".")) if len(parts) > 3 and re.fullmatch(r"\d+\.\d+", parts[3]) else None
            found[parts[0]] = found[parts[1]] = GpuInfo(int(parts[2]) / 1024, cap)
    return {g: found.get(g, GpuInfo(None)) for g in gpus}


def parse_jobs(jobs: str | int) -> int | None:
    """JOBS as a count of slots, or None for auto; anything else is refused."""
    if jobs == "auto":
        return None
    try:
        k = int(jobs)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise ValueError(f"JOBS must be a positive number or auto, got {jobs!r}")
    return k


def visible_gpus(env: dict[str, str] | None = None, smi: str | None = None) -> list[str]:
    """The GPUs this process may give out, each as a CUDA_VISIBLE_DEVICES entry; [] without CUDA.

    The user's own CUDA_VISIBLE_DEVICES wins (a shared server, an `salloc`): its entries are kept
    as written, indices, GPU-UUIDs or MIG-UUIDs alike, up to the first one CUDA would stop at (an
    empty or negative entry). Without it, every GPU `nvidia-smi -L` lists (`smi`: its output), a
    GPU split into MIG instances counting as its instances: a CUDA process sees one MIG instance
    only, so torch.cuda.device_count() would count one where there are several.
    """
    env = os.environ if env is None else env
    if not cuda_available():
        return []
    if "CUDA_VISIBLE_DEVICES" in env:
        entries = []
        for entry in (e.strip() for e in env["CUDA_VISIBLE_DEVICES"].split(",")):
            if not entry or entry.startswith("-"):
                break
            entries.append(entry)
        return entries
    listed = _smi_gpus(nvidia_smi() if smi is None else smi)
    if listed:
        return listed
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _smi_gpus(text: str) -> list[str]:
    """GPU indices from `nvidia-smi -L`, each GPU with MIG instances replaced by their UUIDs."""
    gpus: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if m := re.match(r"\s*GPU (\d+):", line):
            gpus.append((m[1], []))
        elif (m := re.search(r"\(UUID: (MIG-[^)\s]+)\)", line)) and gpus:
            gpus[-1][1].append(m[1])
    return [entry for index, migs in gpus for entry in (migs or [index])]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_gb() -> float:
    return psutil.virtual_memory().available / 2**30


def run_local(tasks: list[Task], root: Path, view: View, pins: list[dict[str, str]],
              poll: float = 1.0, again: str = "make repro") -> dict[str, int | None]:
    """Run the tasks in order, one per slot of `pins` at a time, each with its slot's pins; a failed
    run does not stop the others.

    Ctrl-C or SIGTERM stops every run it started, kernels included; checkpoints on disk are the
    truth, so running `again` (the profile's command: make repro, make quick) resumes them.
    """
    free = list(range(len(pins)))
    # The deepest first: the short runs then fill the slots the long ones leave (4 quick runs on 2
    # slots: 56, 56 | 20, 20 ends when 56 + 20 are done, 20, 56 | 20, 56 after 56 + 56).
    queue = sorted(tasks, key=lambda t: -cost(t.run))
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    codes: dict[str, int | None] = {}
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while queue and free:
                slot, task = free.pop(0), queue.pop(0)
                task.env = pins[slot]
                running[task.run] = (start(task, root), slot)
                view.set(task.run, "running")
            for run, (proc, slot) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    del running[run]
                    free.append(slot)
                    codes[run] = code
                    view.set(run, "done" if code == 0 else "failed", outcome(view.tasks[run], code))
            view.tick()
            time.sleep(poll)
    except KeyboardInterrupt:
        view.say(f"interrupted: stopping {len(running)} running run(s); `{again}` again resumes them")
        for proc, _ in running.values():
            stop_tree(proc.pid)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM a process and its descendants (the notebook's kernel runs in its own session, so a
    terminal's Ctrl-C does not reach it), then SIGKILL what is left after `grace` seconds."""
    try:
        parent = psutil.Process(pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
