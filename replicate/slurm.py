"""The train stages as one Slurm job array, through submitit (`make repro EXECUTOR=slurm`).

Each array task runs one stage's command on a node (tasks.run_task). When Slurm preempts a task,
or its time limit nears, it sends USR2 `signal_delay_s` early; submitit then asks Stage.checkpoint
for what to run next and requeues the task, which runs the same command again: DVC and the trainer
resume from the run's checkpoint.pt (a persisted DVC output, written atomically every
`checkpoint_every` iterations). Nothing is saved on the signal: Slurm SIGTERMs every process of
the task next, so the checkpoint on disk is the truth.

The repository must be on a filesystem the nodes share; on NFS, DVC's locks need
`dvc config core.hardlink_lock true`.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import submitit

from .tasks import Task, View, run_task

# Keys of params.yaml's `slurm` section -> submitit's AutoExecutor parameters. A key left out or
# null (and gpus_per_task 0) is left to Slurm's defaults, but submitit's time limit is 5 minutes.
PARAMETERS = {
    "partition": "slurm_partition",
    "timeout_min": "timeout_min",
    "gpus_per_task": "slurm_gpus_per_task",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "array_parallelism": "slurm_array_parallelism",
    "signal_delay_s": "slurm_signal_delay_s",
    "additional": "slurm_additional_parameters",
}
OPTIONS = {*PARAMETERS, "max_requeues", "folder"}
POLL_S = 5  # between two `sacct` calls, one for the whole array
FAILED = "exited with code"  # Stage's error message; run() reads the code back from it


class Stage(submitit.helpers.Checkpointable):
    """One array task: a stage's command, run again from the start each time Slurm requeues it."""

    def __init__(self, task: Task, root: Path) -> None:
        self.task, self.root = task, root

    def __call__(self) -> int:
        code = run_task(self.task, self.root)
        if code != 0:  # raise, so that Slurm and submitit show the task as failed
            raise RuntimeError(f"{self.task.stage} {FAILED} {code}")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue as is: the stage's state is the run's checkpoint.pt, kept by the trainer."""
        return submitit.helpers.DelayedSubmission(self)


def executor(root: Path, options: dict) -> submitit.AutoExecutor:
    """A Slurm executor set from `options` (see PARAMETERS, plus max_requeues and folder)."""
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown slurm option(s) {sorted(unknown)}; known: {sorted(OPTIONS)}")
    folder = options.get("folder") or Path(root) / "results" / ".slurm" / "%j"
    requeues = options.get("max_requeues")
    kwargs = {} if requeues is None else {"slurm_max_num_timeout": requeues}  # timeouts; preemptions are free
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", **kwargs)
    parameters = {PARAMETERS[k]: v for k, v in options.items() if k in PARAMETERS and v not in (None, {})}
    if not parameters.get("slurm_gpus_per_task"):
        parameters.pop("slurm_gpus_per_task", None)  # `--gpus-per-task=0` fails where there are no GPUs
    ex.update_parameters(name="replicate", **parameters)
    return ex


def run(tasks: list[Task], root: Path, options: dict, view: View) -> dict[str, int | None]:
    """Run `tasks` as one job array; wait for all; {task.run: exit code, None if Slurm gave none}.

    The job array's id is printed, and each task's Slurm job id is the detail of its view.set().
    Ctrl-C cancels the array.
    """
    if not tasks:
        return {}
    threads = options.get("cpus_per_task")
    for task in tasks:  # torch (and Inductor's compile pool) would take every core of the node
        task.env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")
                    } if threads else {}
    ex = executor(root, options)
    with ex.batch():
        jobs = [ex.submit(Stage(task, Path(root))) for task in tasks]
    array = jobs[0].job_id.split("_")[0]
    print(f"slurm: submitted job array {array} ({len(jobs)} tasks)", flush=True)
    try:
        return _wait(tasks, jobs, view)
    except KeyboardInterrupt:
        subprocess.run(["scancel", array], check=False)
        print(f"slurm: cancelled job array {array}", flush=True)
        raise


def _wait(tasks: list[Task], jobs: list[submitit.Job], view: View) -> dict[str, int | None]:
    """Poll the array until every task is over, telling `view` of each change of state."""
    codes: dict[str, int | None] = {}
    shown: dict[str, str] = {}
    while len(codes) < len(tasks):
        jobs[0].watcher.update()  # one sacct call; job.done() and the states below read its cache
        for task, job in zip(tasks, jobs):
            if task.run in codes:
                continue
            if job.done():
                codes[task.run] = code = _exit_code(job)
                why = f"exit code {code}" if code is not None else f"no exit code, see {job.paths.stderr}"
                view.set(task.run, "done" if code == 0 else "failed", f"slurm {job.job_id}, {why}")
                continue
            state = job.watcher.get_state(job.job_id, mode="cache")  # PENDING, RUNNING, REQUEUED...
            if shown.get(task.run) != state:
                shown[task.run] = state
                running = state in ("RUNNING", "COMPLETING")
                what = "submitted" if state == "UNKNOWN" else state.lower()  # not yet in sacct
                view.set(task.run, "running" if running else "queued", f"slurm {job.job_id} {what}")
        view.tick()
        if len(codes) < len(tasks):
            time.sleep(POLL_S)
    return codes


def _exit_code(job: submitit.Job) -> int | None:
    """The stage's exit code; None if the task ended without one (cancelled, out of requeues...)."""
    error = job.exception()
    if error is None:
        return job.result()
    if not isinstance(error, submitit.core.utils.FailedJobError):  # ended by Slurm, not by Stage
        return None
    found = re.search(rf"{FAILED} (-?\d+)", str(error))
    return int(found.group(1)) if found else None
