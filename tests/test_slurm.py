"""replicate.slurm against a real Slurm, brought up by `make test-slurm` (scripts/slurm_cluster.sh
up DIR, then SLURM_CONF set); these tests fail without it, and `make test` leaves them out.

1. Three tiny resumable tasks as one job array, our command in place of `dvc repro`: one is
   preempted once (SIGUSR2, as Slurm sends before a time limit) and must be requeued and resume
   from its checkpoint, one exits 3 and must be reported failed.
2. `make repro EXECUTOR=slurm` end to end on a small grid in a copy of the project, one train
   stage preempted once: dvc.lock complete, `dvc status` clean, the report built.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import psutil
import pytest
import yaml
from conftest import make_tarball
from test_repro import ENV, copy_project, set_params

from replicate import data as cifar
from replicate import pipeline, slurm
from replicate.tasks import Task, View
from replicate.outputs import read as read_outputs

pytestmark = pytest.mark.slurm

STEPS = {"quick-0": 6, "preempted-0": 24, "failing-0": 2}  # half-second steps each
CODES = {"quick-0": 0, "preempted-0": 0, "failing-0": 3}
PREEMPT_AT = 4  # the preempted task is signalled once its checkpoint reaches this step

# The task's command: counts steps, checkpointing each atomically, and resumes from the checkpoint;
# `starts` records the step each run of it began at.
COMMAND = textwrap.dedent("""
    import os, sys, time
    out, steps, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpt = os.path.join(out, "checkpoint")
    step = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    with open(os.path.join(out, "starts"), "a") as f:
        f.write(f"{step}\\n")
    while step < steps:
        time.sleep(0.5)
        step += 1
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(ckpt + ".tmp", ckpt)
    open(os.path.join(out, "done"), "w").write(str(step))
    print(f"done at step {step}")
    sys.exit(code)
""")


@dataclass
class CommandTask(Task):
    """A tasks.Task whose command is ours, not its DVC stage's."""

    command: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return self.command


class RecordingView(View):
    """The grid's view, keeping every set() for the test to read."""

    def __init__(self, tasks):
        super().__init__(tasks, every=10)
        self.events: list[tuple[str, str, str]] = []

    def set(self, run: str, state: str, detail: str = "") -> None:
        self.events.append((run, state, detail))
        super().set(run, state, detail)


@pytest.fixture
def by_value():
    """CommandTask is unknown on the node: send it there by value, not by name."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def cluster():
    if not os.environ.get("SLURM_CONF"):
        pytest.fail("no Slurm: run `make test-slurm`, or scripts/slurm_cluster.sh up DIR and export SLURM_CONF")
    subprocess.run(["sinfo"], check=True, timeout=30, capture_output=True)  # fails clearly if it is down


def signal_tree(proc: psutil.Process, signum=signal.SIGUSR2) -> None:
    """What Slurm does before a time limit or a preemption: the signal to every process of the task."""
    for p in [proc, *proc.children(recursive=True)]:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def preempt_once(folder: Path, task_id: int, checkpoint: Path, sent: list, stop: threading.Event):
    """Once `checkpoint` reaches PREEMPT_AT, SIGUSR2 the submitit process of array task `task_id`."""
    while not stop.wait(0.2):
        if not checkpoint.exists() or int(checkpoint.read_text() or 0) < PREEMPT_AT:
            continue
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            try:
                if (cmdline[1:4] == ["-u", "-m", "submitit.core._submit"] and str(folder) in cmdline[4]
                        and proc.environ().get("SLURM_ARRAY_TASK_ID") == str(task_id)):
                    sent.append((proc.pid, int(checkpoint.read_text())))
                    signal_tree(proc)
                    return
            except (psutil.Error, IndexError):
                continue



def sacct_settled(args: list[str], timeout: float = 60.0) -> list[str]:
    """`sacct -n -X -D -P ARGS` once no job it lists is still RUNNING or PENDING: its accounting
    lags the job's end by seconds on a loaded machine (seen: RUNNING for a finished task)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = subprocess.run(["sacct", "-n", "-X", "-D", "-P", *args], capture_output=True, text=True,
                               check=True).stdout.split()
        if time.monotonic() > deadline or not any(line.endswith(("RUNNING", "PENDING")) for line in lines):
            return lines
        time.sleep(1)

def test_job_array_with_preemption_and_failure(tmp_path, by_value, cluster):
    script = tmp_path / "count.py"
    script.write_text(COMMAND)
    tasks = []
    for run in STEPS:
        (tmp_path / run).mkdir()
        argv = [sys.executable, str(script), str(tmp_path / run), str(STEPS[run]), str(CODES[run])]
        tasks.append(CommandTask(run=run, stage=f"train@{run}", log=tmp_path / run / "train.log",
                                 env={"OMP_NUM_THREADS": "1"}, command=argv))
    folder = tmp_path / "slurm"
    options = {"partition": None, "timeout_min": 15, "gpus_per_task": 0, "cpus_per_task": 1,
               "mem_gb": None, "array_parallelism": 3, "signal_delay_s": 60, "max_requeues": 2,
               "additional": {}, "folder": folder / "%j"}
    view, codes, sent, stop = RecordingView(tasks), {}, [], threading.Event()
    target = tasks.index(next(t for t in tasks if t.run == "preempted-0"))
    preempter = threading.Thread(target=preempt_once, daemon=True,
                                 args=(folder, target, tmp_path / "preempted-0" / "checkpoint", sent, stop))
    runner = threading.Thread(target=lambda: codes.update(slurm.run(tasks, tmp_path, options, view)),
                              daemon=True)
    start = time.time()
    preempter.start()
    runner.start()
    runner.join(timeout=300)
    stop.set()
    job_ids = sorted({detail.split()[1].rstrip(",") for _, _, detail in view.events})
    print(f"slurm job ids: {job_ids}; took {time.time() - start:.0f}s; preempted (pid, step): {sent}")
    if runner.is_alive():
        subprocess.run(["scancel", job_ids[0].split("_")[0]], check=False)
        pytest.fail(f"the job array did not finish in 300 s; states: {view.events}")

    assert codes == CODES
    assert {run: state for run, state, _ in view.events if state in ("done", "failed")} == {
        "quick-0": "done", "preempted-0": "done", "failing-0": "failed"}
    for run in STEPS:
        assert (tmp_path / run / "done").read_text() == str(STEPS[run])
        assert "done at step" in (tmp_path / run / "train.log").read_text()

    # The preempted task: signalled once, requeued by Slurm once, run twice, resumed mid-way.
    assert len(sent) == 1
    starts = [int(s) for s in (tmp_path / "preempted-0" / "starts").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0
    assert PREEMPT_AT <= starts[1] < STEPS["preempted-0"], f"resumed at {starts[1]}, not from the checkpoint"
    for run in ("quick-0", "failing-0"):
        assert (tmp_path / run / "starts").read_text().split() == ["0"]
    job = next(j for j in job_ids if j.endswith(f"_{target}"))
    states = sacct_settled(["-o", "State", "-j", job])
    print(f"sacct states of {job}: {states}")
    assert states == ["REQUEUED", "COMPLETED"]


# --- make repro EXECUTOR=slurm, end to end ------------------------------------------------------

SLURM_ARGS = "gpus_per_task=0 cpus_per_task=1 mem_gb=null timeout_min=10 array_parallelism=2 signal_delay_s=30"
GRID = ["plain-8-0", "resnet-8-0", "resnet-20-0"]
PREEMPTED = "resnet-20-0"


def preempt_stage(project: Path, run: str, sent: list, stop: threading.Event) -> None:
    """Once `run` has its first checkpoint, SIGUSR2 its array task: the submitit process whose
    child is that stage's `dvc repro`, and everything under it."""
    checkpoint = project / "results" / run / "checkpoint.pt"
    while not stop.wait(0.05):
        if not checkpoint.exists():
            continue
        for proc in psutil.process_iter(["cmdline"]):
            if f"train@{run}" in (proc.info["cmdline"] or []) and "repro" in proc.info["cmdline"]:
                try:
                    task = proc.parent()
                    sent.append((task.pid, " ".join(task.cmdline()[-3:])))
                    signal_tree(task)
                except psutil.Error:
                    continue
                return


def test_make_repro_on_slurm_with_a_preempted_stage(tmp_path, cluster):
    tarball = make_tarball(tmp_path / "tarball" / cifar.TARBALL, cifar.synthetic(320, 80, seed=5))
    project = copy_project(tmp_path / "project")
    pipeline.import_data(str(tarball), project / "data.dvc")
    # Long enough at batch 16 that the preemption lands mid-run (checkpoints every 10 iterations).
    set_params(project, cifar.md5sum(tarball), GRID, iterations=400, milestones=[200, 300], log_every=10,
               eval_every=200, checkpoint_every=10)
    venv = Path(sys.prefix)
    sent, stop = [], threading.Event()
    preempter = threading.Thread(target=preempt_stage, args=(project, PREEMPTED, sent, stop), daemon=True)
    preempter.start()
    start = time.time()
    try:
        done = subprocess.run(["make", "-o", f"{venv}/.installed", f"VENV={venv}", "repro", "EXECUTOR=slurm",
                               f"SLURM_ARGS={SLURM_ARGS}"], cwd=project, env=ENV, capture_output=True, text=True,
                              timeout=600)
    finally:
        stop.set()
    array = next((line.split()[4] for line in done.stdout.splitlines() if line.startswith("slurm: submitted job array")),
                 None)
    print(f"make repro EXECUTOR=slurm: {time.time() - start:.0f} s, job array {array}, preempted {sent}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert array is not None and len(sent) == 1, (array, sent)
    assert f"{len(GRID)} runs of `make repro`: 0 up to date, {len(GRID)} to train (as one Slurm job array)" in done.stdout

    # Slurm: the preempted task was requeued once, then completed; the others completed at once.
    states = sacct_settled(["-o", "JobID,State", "-j", array])
    print(f"sacct -D of array {array}: {states}")
    task = GRID.index(PREEMPTED)
    assert [s.split("|")[1] for s in states if s.startswith(f"{array}_{task}|")] == ["REQUEUED", "COMPLETED"]
    for i, run in enumerate(GRID):
        if run != PREEMPTED:
            assert [s.split("|")[1] for s in states if s.startswith(f"{array}_{i}|")] == ["COMPLETED"], states

    # The requeued stage resumed from its checkpoint, mid-run.
    log = (project / "results" / PREEMPTED / "train.log").read_text()
    resumed = [int(line.split(" at iteration ")[1].split()[0].replace(",", ""))
               for line in log.splitlines() if line.startswith("resuming from ")]
    assert len(resumed) == 1 and 0 < resumed[0] < 400, resumed
    assert log.count("=== ") == 2  # both attempts' output kept

    # DVC: every stage in dvc.lock, nothing left to do for the report (make quick never ran), the report built.
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {f"train@{r}" for r in GRID} | {"prepare", "check", "report"} <= set(lock)
    assert "Data and pipelines are up to date." in subprocess.run(
        [sys.executable, "-m", "dvc", "status", "report"], cwd=project, capture_output=True, text=True).stdout
    for run in GRID:
        metrics = read_outputs(project / "results" / run)
        assert metrics["iterations"] == 400 and not metrics["diverged"]
        assert metrics["threads"] == 1  # cpus_per_task: torch would otherwise take every core of the node
    table = (project / "reports" / "table6.md").read_text()
    assert all(net in table for net in ("plain-8", "ResNet-8", "ResNet-20"))
