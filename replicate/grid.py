"""Trains a profile's runs side by side: k local worker slots, or one Slurm job array.

Each run is its own `dvc --wait-for-lock repro -s <stage>@<run>`. DVC releases its repo lock while
a stage's command runs and re-takes it only to write that stage's entry in dvc.lock, so several
such processes share one workspace safely. `--wait-for-lock` (DVC >= 3.61) waits for a busy lock
instead of failing after 3 s, and `-s` keeps each process from reproducing the upstream stages.
The order is: the upstream stages (`prepare`, `check`), the runs that are not up to date, then
`dvc repro <report>`, which finds every run up to date. Nothing here edits dvc.lock.

    python -m replicate.grid --jobs auto              # make repro
    python -m replicate.grid --profile quick          # make quick
    python -m replicate.grid --executor slurm --slurm partition=gpu timeout_min=120
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from . import pipeline

# Local slots per GPU for JOBS=auto. A documented guess, not a measurement (no GPU has been lent
# to this project yet): ResNet-20..110 at batch 128 leave most of a large GPU idle.
SLOTS_PER_GPU = 4
# Torch threads per CPU worker for JOBS=auto: on our 2-core CPU, 2 workers of 1 thread ran the tiny
# 14-run grid 1.45x faster than 1 worker of 2 threads, long runs 1.0-1.3x (docs/speed.md, "The grid on a CPU").
THREADS_PER_CPU_WORKER = 1
GB_PER_WORKER = 3  # a worker holds the padded training set (1 GB in float32), the net and a kernel


@dataclass
class Task:
    """One run to train: the DVC stage that trains it, where its output goes, and its slot's pins."""

    run: str
    stage: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "-s", self.stage]


def start(task: Task, cwd: Path) -> subprocess.Popen:
    """Start the task's command with its pins, its whole output appended to its log (a rerun adds
    to the log of the interrupted attempt: nothing is lost).

    The command ignores SIGUSR2: Slurm sends that warning to every process of a task before it
    preempts it, and USR2's default action would kill DVC mid-write. Only submitit acts on it
    (replicate/slurm.py); the SIGTERM that follows ends the command, its checkpoint on disk intact.
    """
    task.log.parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "a") as log:
        pins = f" ({_pins(task.env)})" if task.env else ""
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}{pins}: "
                  f"{' '.join(['python', *task.argv[1:]])}\n")
        log.flush()
        return subprocess.Popen(task.argv, cwd=cwd, env={**os.environ, **task.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_ignore_usr2)


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited through exec by DVC, papermill, kernel


def run_task(task: Task, cwd: Path) -> int:
    """Run the task to its end (what a Slurm array task does on its node); its exit code."""
    return start(task, cwd).wait()


# --- slots -----------------------------------------------------------------------------------

def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slots(jobs: str | int, n_runs: int, gpus: int | None = None, cores: int | None = None,
          memory_gb: float | None = None) -> list[dict[str, str]]:
    """The environment of each worker slot; their number is how many runs train at once.

    CUDA: JOBS=auto is SLOTS_PER_GPU per GPU, and slot i sees GPU i mod GPUs only. CPU: auto is
    one worker per THREADS_PER_CPU_WORKER cores, at most one per GB_PER_WORKER GB of memory. Every
    worker gets its share of the cores as torch threads (OMP_NUM_THREADS), which also keeps
    OpenMP threads of different workers from spin-waiting on each other's cores. The share comes
    from JOBS, not from how many runs are left: a CPU run resumed by a rerun with fewer runs to go
    must keep its thread count, or it does not end bitwise identical to an uninterrupted one.
    """
    gpus = cuda_gpus() if gpus is None else gpus
    cores = cpu_count() if cores is None else cores
    memory_gb = available_gb() if memory_gb is None else memory_gb
    k = parse_jobs(jobs)
    if k is None:
        k = SLOTS_PER_GPU * gpus if gpus else min(cores // THREADS_PER_CPU_WORKER, int(memory_gb // GB_PER_WORKER))
    k = max(1, k)
    threads = str(max(1, cores // k))
    k = min(k, n_runs)
    pins = []
    for i in range(k):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        pins.append(env)
    return pins


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


def cuda_gpus() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available_gb() -> float:
    return psutil.virtual_memory().available / 2**30


# --- progress ----------------------------------------------------------------------------------

TQDM = re.compile(rb"(\d+)/(\d+) \[")  # tqdm's "410/1000 [00:10<00:15, ...]"


def progress(log: Path) -> float | None:
    """The fraction of its iterations a run has done, read from the training bar in its log."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            found = TQDM.findall(f.read())
    except OSError:
        return None
    if not found:
        return None
    done, total = map(int, found[-1])
    return done / total if total else None


class View:
    """One readable view of the whole grid: a line per event (started, done, failed), and a status
    line (done, running with progress, failed, elapsed, ETA) every `every` seconds. Each run's
    full output is in its log file, never on this terminal."""

    def __init__(self, tasks: list[Task], already_done: int = 0, every: float = 30.0, stream=None):
        self.tasks = {t.run: t for t in tasks}
        self.state = {t.run: "queued" for t in tasks}
        self.detail: dict[str, str] = {}
        self.already_done, self.every, self.stream = already_done, every, stream or sys.stdout
        self.start = self.last = time.monotonic()
        self.first_progress: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(f"[grid {_clock(time.monotonic() - self.start)}] {text}", file=self.stream, flush=True)

    def set(self, run: str, state: str, detail: str = "") -> None:
        if self.state.get(run) == state and self.detail.get(run, "") == detail:
            return
        self.state[run], self.detail[run] = state, detail
        task = self.tasks[run]
        if state == "running":  # a resumed run starts where its log's last bar left it
            self.first_progress[run] = progress(task.log) or 0.0
        where = f" ({_pins(task.env)})" if state == "running" and task.env else ""
        self.say(f"{state:<8} {run}{where}{': ' + detail if detail else ''}  log: {_rel(task.log)}")

    def fraction(self, run: str) -> float:
        state = self.state[run]
        if state in ("done", "failed"):
            return 1.0
        f = progress(self.tasks[run].log) if state == "running" else None
        return f or 0.0

    def status(self) -> str:
        counts = {s: sum(v == s for v in self.state.values()) for s in ("done", "running", "failed", "queued")}
        elapsed = time.monotonic() - self.start
        running = [f"{r} {100 * self.fraction(r):.0f}%" for r, s in self.state.items() if s == "running"]
        line = (f"{counts['done'] + self.already_done}/{len(self.state) + self.already_done} done, "
                f"{counts['running']} running{' (' + ', '.join(running) + ')' if running else ''}, "
                f"{counts['queued']} queued, {counts['failed']} failed, elapsed {_clock(elapsed)}")
        eta = self.eta(elapsed)
        return line + (f", ETA {_clock(eta)}" if eta is not None else "")

    def eta(self, elapsed: float) -> float | None:
        """Work is iterations x depth (a step costs about its depth); the rate is what this
        invocation has done so far, not counting what resumed runs had done before."""
        weights = {r: cost(r) for r in self.state}
        fractions = {r: self.fraction(r) for r in self.state}
        done = sum(w * (fractions[r] - self.first_progress.get(r, 0.0)) for r, w in weights.items())
        left = sum(w * (1 - fractions[r]) for r, w in weights.items())
        if done <= 0 or elapsed < 10:
            return None
        return left / (done / elapsed)

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self.say(self.status())


def _pins(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items() if k != "MKL_NUM_THREADS")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


# --- running ----------------------------------------------------------------------------------

def cost(run: str) -> int:
    """A run's relative cost: a step costs about its depth (the runs of a profile have the same
    iterations)."""
    return int(run.split("-")[1])


def run_local(tasks: list[Task], root: Path, view: View, pins: list[dict[str, str]],
              poll: float = 1.0) -> dict[str, int | None]:
    """Run the tasks in order, one per slot of `pins` at a time, each with its slot's pins; a failed
    run does not stop the others.

    Ctrl-C or SIGTERM stops every run it started, kernels included; checkpoints on disk are the
    truth, so the next `make repro` resumes them.
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
        view.say(f"interrupted: stopping {len(running)} running run(s); `make repro` again resumes them")
        for proc, _ in running.values():
            _stop_tree(proc.pid)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_tree(pid: int, grace: float = 10.0) -> None:
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


def outcome(task: Task, code: int | None) -> str:
    """What a finished run came to: diverged runs are results, not failures."""
    if code != 0:
        return f"exit {code}" if code is not None else "the Slurm job failed"
    metrics = task.log.parent / "metrics.json"
    try:
        m = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return ""
    if m.get("diverged"):
        return f"diverged at iteration {m.get('diverged_at')} (recorded: a result, not a failure)"
    return f"train error {m.get('train_error'):.2f}%, test error {m.get('test_error'):.2f}%"


def dvc(*args: str, root: Path, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, text=True,
                          capture_output=capture, stdin=subprocess.DEVNULL)


def pending(stages: list[str], root: Path) -> list[str]:
    """The stages that are not up to date (never run, changed, or interrupted)."""
    done = dvc("status", "--json", *stages, root=root, capture=True)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc status` failed:\n{done.stderr}")
    changed = set(json.loads(done.stdout or "{}"))
    return [s for s in stages if s in changed]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m replicate.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=pipeline.PARAMS)
    p.add_argument("--profile", choices=sorted(pipeline.PROFILES), default="paper")
    p.add_argument("--jobs", default="auto", help="runs trained at once, or auto (default)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of params.yaml's slurm section, e.g. partition=gpu timeout_min=120")
    p.add_argument("--every", type=float, default=30.0, help="seconds between status lines")
    args = p.parse_args(argv)
    root = Path.cwd()
    profile = pipeline.PROFILES[args.profile]
    try:
        params = pipeline.load_params(args.params)
        pipeline.check(params, pipeline.NOTEBOOK, pipeline.DVC_YAML)
        names = [r.name for r in pipeline.runs(params, args.profile)]
        parse_jobs(args.jobs)  # before any DVC command runs
        options = slurm_options(params, args.slurm) if args.executor == "slurm" else {}
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    print("grid: the upstream stages (dvc repro prepare check)", flush=True)
    if dvc("repro", "prepare", "check", root=root).returncode != 0:
        sys.exit("error: the upstream stages failed (above); no run was started")
    stages = [f"{profile.stage}@{n}" for n in names]
    todo = pending(stages, root)
    pins = slots(args.jobs, len(todo)) if args.executor == "local" and todo else []
    tasks = [Task(s.split("@", 1)[1], s, root / profile.results / s.split("@", 1)[1] / "train.log") for s in todo]
    view = View(tasks, already_done=len(stages) - len(todo), every=args.every)
    where = ("as one Slurm job array" if args.executor == "slurm" else
             f"{len(pins)} at a time: " + "; ".join(_pins(env) for env in pins))
    view.say(f"{len(stages)} runs of profile {args.profile}: {len(stages) - len(todo)} up to date, "
             f"{len(todo)} to train" + (f" ({where})" if todo else ""))
    try:
        if args.executor == "slurm" and tasks:
            from . import slurm

            codes = slurm.run(tasks, root, options, view)
        else:
            codes = run_local(tasks, root, view, pins)
    except KeyboardInterrupt:
        sys.exit(130)
    failed = [t for t in tasks if codes.get(t.run) != 0]
    view.say(view.status())
    if failed:
        for t in failed:
            print(f"  FAILED {t.run}: {outcome(t, codes.get(t.run))}; its log: {_rel(t.log)}", file=sys.stderr)
        sys.exit(f"error: {len(failed)} of {len(stages)} runs failed, so the report ({profile.report_stage}) "
                 f"was not built. Fix the cause (see the logs) and run the same command again: finished "
                 f"runs are not trained again, interrupted ones resume from their checkpoints.")
    print(f"grid: every run is done; the report (dvc repro {profile.report_stage})", flush=True)
    if dvc("repro", profile.report_stage, root=root).returncode != 0:
        sys.exit(f"error: the report stage {profile.report_stage} failed (above)")
    print(f"grid: report in {profile.reports}/ (table6.md, fig1.png, fig6.png, fig7.png, verdicts.md)")


def slurm_options(params: dict, overrides: list[str]) -> dict:
    """params.yaml's slurm section with KEY=VALUE overrides (values parsed as YAML: 120, null, gpu)."""
    options = dict(params.get("slurm") or {})
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"SLURM_ARGS takes KEY=VALUE items, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


if __name__ == "__main__":
    main()
