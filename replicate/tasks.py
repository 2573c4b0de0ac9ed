"""A grid's runs as processes: what each one runs (`Task`), starting it with its pins, and one
readable view of them all (`View`). The local grid (replicate/local.py) and the Slurm job array
(replicate/slurm.py) both start and watch their runs through this module; neither imports the other.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .pipeline import Run
from . import outputs


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
        pins = f" ({pins_text(task.env)})" if task.env else ""
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


def cost(run: str) -> int:
    """A run's relative cost: a step costs about its depth (the runs of a profile have the same
    iterations); a task that is not a paper run (a test's, a custom stage's) counts as 1, so the
    progress line never stops the grid."""
    try:
        return Run.parse(run).depth
    except ValueError:
        return 1


def outcome(task: Task, code: int | None) -> str:
    """What a finished run came to: diverged runs are results, not failures."""
    if code != 0:
        return f"exit {code}" if code is not None else "the Slurm job failed"
    try:
        m = outputs.read(task.log.parent)
    except ValueError:
        return ""
    if "diverged" not in m:
        return ""
    if m.get("diverged"):
        return f"diverged at iteration {m.get('diverged_at')} (recorded: a result, not a failure)"
    return f"train error {m.get('train_error'):.2f}%, test error {m.get('test_error'):.2f}%"


# --- the view ----------------------------------------------------------------------------------

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
        where = f" ({pins_text(task.env)})" if state == "running" and task.env else ""
        self.say(f"{state:<8} {run}{where}{': ' + detail if detail else ''}  log: {rel(task.log)}")

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


def pins_text(env: dict[str, str]) -> str:
    """A slot's pins as the view shows them (MKL's and Inductor's thread counts repeat OMP's)."""
    return " ".join(f"{k}={v}" for k, v in env.items() if k not in ("MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
