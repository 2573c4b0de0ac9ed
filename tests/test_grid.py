"""The grid without DVC: the worker slots and their pins (GPUs faked), the progress view, and local
runs side by side with failures (tests/test_repro.py runs the real grid end to end)."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch

from replicate import grid, local, slurm
from replicate.tasks import Task, View, outcome, progress, run_task


@pytest.fixture(autouse=True)
def no_nvidia_smi(monkeypatch):
    """No test asks this machine's nvidia-smi: the GPUs' memory is faked where a test needs it."""
    monkeypatch.setattr(local, "nvidia_smi", lambda *args: "")


def test_auto_on_cuda_is_slots_per_gpu_round_robin():
    pins = local.slots("auto", n_runs=14, gpus=["0", "1"], cores=16, memory_gb=100)
    assert len(pins) == local.SLOTS_PER_GPU * 2
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == ["0", "1"] * local.SLOTS_PER_GPU
    assert all(p["OMP_NUM_THREADS"] == p["TORCHINDUCTOR_COMPILE_THREADS"] == str(16 // len(pins)) for p in pins)


def test_slots_go_to_the_users_own_gpus_as_written(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 (a shared server, an salloc) the runs went to GPUs 0 and 1,
    someone else's; UUIDs and MIG instances became "0"."""
    monkeypatch.setattr(local, "cuda_available", lambda: True)
    for visible, want in [("2,3", ["2", "3"]),
                          ("GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b,GPU-0a1b2c3d-0000-1111-2222-333344445555",
                           ["GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b", "GPU-0a1b2c3d-0000-1111-2222-333344445555"]),
                          ("MIG-c7384736-a75d-5afc-978f-d2f1294409fd, MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d",
                           ["MIG-c7384736-a75d-5afc-978f-d2f1294409fd", "MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d"]),
                          ("1,-1,0", ["1"]),  # CUDA ignores everything from an invalid entry on
                          ("", [])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert local.visible_gpus() == want, visible
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    pins = local.slots("auto", 14, cores=16, memory_gb=100)
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == ["2", "3"] * local.SLOTS_PER_GPU
    monkeypatch.setattr(local, "cuda_available", lambda: False)
    assert local.visible_gpus() == [] and all("CUDA_VISIBLE_DEVICES" not in p for p in local.slots("auto", 2))


SMI = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b)
  MIG 3g.20gb     Device  0: (UUID: MIG-c7384736-a75d-5afc-978f-d2f1294409fd)
  MIG 3g.20gb     Device  1: (UUID: MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0a1b2c3d-0000-1111-2222-333344445555)
"""


def test_without_cuda_visible_devices_every_mig_instance_is_a_gpu(monkeypatch):
    """A process sees one MIG instance only, so torch's device count would put every slot on one
    slice: nvidia-smi -L lists them all."""
    monkeypatch.setattr(local, "cuda_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = local.visible_gpus(smi=SMI)
    assert gpus == ["MIG-c7384736-a75d-5afc-978f-d2f1294409fd", "MIG-a28ad590-3fda-56dd-84fc-0a0b96edc58d", "1"]
    pins = local.slots("auto", 14, gpus=gpus, cores=12, memory_gb=100)
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == gpus * 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local.visible_gpus(smi="") == ["0", "1"]  # no nvidia-smi: torch's count


def test_cuda_slots_are_capped_by_the_cores_that_launch_their_kernels():
    """8 GPUs on 16 cores: 4 per GPU was 32 processes, 2 per core, each with a 32-process compile pool."""
    pins = local.slots("auto", 64, gpus=[str(i) for i in range(8)], cores=16, memory_gb=500)
    assert len(pins) == 16
    assert [p["CUDA_VISIBLE_DEVICES"] for p in pins] == [str(i) for i in range(8)] * 2  # even over the GPUs
    assert all(p["OMP_NUM_THREADS"] == p["TORCHINDUCTOR_COMPILE_THREADS"] == "1" for p in pins)
    assert len(local.slots("auto", 64, gpus=[str(i) for i in range(8)], cores=4, memory_gb=500)) == 8  # one per GPU at least
    assert len(local.slots(24, 64, gpus=["0"], cores=4, memory_gb=500)) == 24  # JOBS=24 is the user's call


def test_auto_on_cpu_splits_the_cores_within_memory():
    assert [p["OMP_NUM_THREADS"] for p in local.slots("auto", 14, gpus=[], cores=2, memory_gb=20)] == ["1", "1"]
    pins = local.slots("auto", 14, gpus=[], cores=16, memory_gb=20)  # memory allows 6 workers
    assert len(pins) == 6 and all(p["OMP_NUM_THREADS"] == "2" for p in pins)
    assert all("CUDA_VISIBLE_DEVICES" not in p for p in pins)
    assert len(local.slots("auto", 14, gpus=[], cores=2, memory_gb=1)) == 1  # never none


def test_explicit_jobs_are_capped_by_the_runs_and_checked():
    assert len(local.slots(3, 14, gpus=[], cores=2, memory_gb=64)) == 3
    assert len(local.slots("8", 2, gpus=["0"], cores=2, memory_gb=64)) == 2
    assert [p["OMP_NUM_THREADS"] for p in local.slots(1, 5, gpus=[], cores=4, memory_gb=64)] == ["4"]
    # the last run left keeps the threads it had among others: exact resume needs the same count
    assert [p["OMP_NUM_THREADS"] for p in local.slots(2, 1, gpus=[], cores=2, memory_gb=64)] == ["1"]
    assert [p["OMP_NUM_THREADS"] for p in local.slots("auto", 1, gpus=[], cores=2, memory_gb=64)] == ["1"]
    with pytest.raises(ValueError, match="JOBS must be a positive number or auto"):
        local.slots(0, 4, gpus=[], cores=2, memory_gb=64)


def test_progress_reads_the_last_training_bar_of_a_log(tmp_path):
    log = tmp_path / "train.log"
    assert progress(log) is None
    log.write_text("=== header\n")
    assert progress(log) is None
    log.write_bytes(b"resnet-56:  10%|#  | 100/1000 [00:10<01:30]\rresnet-56:  41%|####  | 410/1000 [00:41<00:59, 9.9it/s]")
    assert progress(log) == pytest.approx(0.41)


def make_tasks(tmp_path, scripts: dict[str, str]) -> list[Task]:
    """Tasks whose command is a small Python script instead of `dvc repro` (Task.argv overridden)."""
    class ScriptTask(Task):
        @property
        def argv(self):
            return [sys.executable, "-c", scripts[self.run]]

    return [ScriptTask(run, f"train@{run}", tmp_path / run / "train.log") for run in scripts]


# A task's script: records its pins, appends "start RUN" to the shared EVENTS file, waits until
# every event in WAIT_FOR has been appended (60 s at most: a run that never comes ends the wait,
# and the order then shows it), appends "end RUN", and exits with CODE. The order of the events is
# what the tasks saw happen, whatever the machine's speed.
RECORD = """import json, os, sys, time
from pathlib import Path
events, run = Path({events!r}), {run!r}
def event(what):
    with open(events, "a") as f:
        f.write(what + " " + run + "\\n")
print(json.dumps({{"omp": os.environ.get("OMP_NUM_THREADS"), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}}), flush=True)
event("start")
deadline = time.monotonic() + 60
while not set({wait_for!r}) <= set(events.read_text().splitlines()) and time.monotonic() < deadline:
    time.sleep(0.02)
print("resnet: 100%|#####| 10/10 [00:01<00:00]")
event("end")
sys.exit({code})
"""


def test_local_runs_go_side_by_side_with_their_pins_and_a_failure_stops_nothing(tmp_path):
    """2 slots, 4 runs: the two deepest start first, together; the failing one's slot takes the
    next runs while the other deep one still runs."""
    events = tmp_path / "events"
    events.touch()

    def script(run, code=0, wait_for=()):
        return RECORD.format(events=str(events), run=run, wait_for=list(wait_for), code=code)
    # resnet-56-0 runs until resnet-20-0 has started and plain-56-0 has ended: only a second slot,
    # and one the failure freed, can start it meanwhile.
    scripts = {"resnet-56-0": script("resnet-56-0", wait_for=["start resnet-20-0", "end plain-56-0"]),
               "plain-56-0": script("plain-56-0", code=3, wait_for=["start resnet-56-0"]),
               "resnet-20-0": script("resnet-20-0"), "plain-20-0": script("plain-20-0")}
    tasks = make_tasks(tmp_path, scripts)
    pins = [{"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"}, {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "1"}]
    out = io.StringIO()
    view = View(tasks, every=0, stream=out)
    codes = local.run_local(tasks, tmp_path, view, pins, poll=0.05)
    assert codes == {"resnet-56-0": 0, "plain-56-0": 3, "resnet-20-0": 0, "plain-20-0": 0}
    records = {t.run: json.loads(next(line for line in t.log.read_text().splitlines() if line.startswith('{"omp"')))
               for t in tasks}
    order = events.read_text().splitlines()
    assert sorted(order) == sorted(f"{e} {r}" for e in ("start", "end") for r in scripts), order
    at = {e: order.index(e) for e in order}
    # the two deepest first, on both GPUs at once; the failed run's slot takes the next ones
    assert {order[0], order[1]} == {"start resnet-56-0", "start plain-56-0"}, order
    assert {records[r]["gpu"] for r in ("resnet-56-0", "plain-56-0")} == {"0", "1"}
    assert at["start resnet-20-0"] < at["end resnet-56-0"], f"a failure stopped the queue: {order}"
    assert at["end plain-56-0"] < at["start resnet-20-0"] < at["end resnet-20-0"] < at["start plain-20-0"], order
    assert all(r["omp"] == "1" for r in records.values())
    text = out.getvalue()
    assert "failed   plain-56-0: exit 3" in text and "done     resnet-56-0" in text
    assert "4/4 done" not in text and "1 failed" in text
    header = tasks[0].log.read_text().splitlines()[1]
    assert header.startswith("=== ") and "CUDA_VISIBLE_DEVICES=" in header


def test_ctrl_c_names_the_command_of_the_profile_being_run(tmp_path):
    """Ctrl-C of `make quick` said "`make repro` again resumes them"."""
    tasks = make_tasks(tmp_path, {"plain-20-0": "import time; time.sleep(60)"})
    out = io.StringIO()
    view = View(tasks, every=0, stream=out)

    def ctrl_c():
        raise KeyboardInterrupt
    view.tick = ctrl_c
    with pytest.raises(KeyboardInterrupt):
        local.run_local(tasks, tmp_path, view, [{}], poll=0.05, again="make quick")
    assert "interrupted: stopping 1 running run(s); `make quick` again resumes them" in out.getvalue()


@pytest.mark.parametrize("profile, command", [("quick", "make quick"), ("paper", "make repro")])
def test_the_grid_passes_its_profiles_command_to_the_local_runs(monkeypatch, profile, command):
    seen = {}

    def run_local(tasks, root, view, pins, again=None):
        seen["again"] = again
        return {t.run: 0 for t in tasks}
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(grid, "dvc", lambda *args, root, capture=False: subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(grid, "pending", lambda stages, root: stages[:1])
    monkeypatch.setattr(local, "run_local", run_local)
    grid.main(["--profile", profile, "--jobs", "1"])
    assert seen == {"again": command}


def test_a_rerun_appends_to_the_log_of_the_attempt_before(tmp_path):
    task = make_tasks(tmp_path, {"plain-20-0": "print('attempt')"})[0]
    assert run_task(task, tmp_path) == 0
    assert run_task(task, tmp_path) == 0
    lines = task.log.read_text().splitlines()
    assert lines.count("attempt") == 2 and sum(line.startswith("=== ") for line in lines) == 2


def test_view_gives_an_eta_from_the_work_done(tmp_path):
    tasks = make_tasks(tmp_path, {"plain-56-0": "", "plain-20-0": ""})
    view = View(tasks, already_done=1, every=0, stream=io.StringIO())
    view.start -= 100  # 100 s ago
    view.set("plain-56-0", "running")
    assert view.eta(100) is None  # nothing measured yet
    tasks[0].log.parent.mkdir()
    tasks[0].log.write_text("plain-56: 50%| | 500/1000 [")
    # 28 of 76 units of work in 100 s: 48 left take 171 s
    assert view.eta(100) == pytest.approx(48 / (28 / 100))
    assert view.status().startswith("1/3 done, 1 running (plain-56-0 50%), 1 queued, 0 failed, elapsed 0:01:40, ETA 0:02:51")


def test_the_view_of_tasks_that_are_not_paper_runs_still_ticks(tmp_path):
    # the Slurm test's tasks are named quick-0, failing-0: the progress line must not raise
    tasks = make_tasks(tmp_path, {"quick-0": "", "failing-0": ""})
    out = io.StringIO()
    view = View(tasks, every=0, stream=out)
    view.start -= 100
    view.set("quick-0", "running")
    tasks[0].log.parent.mkdir()
    tasks[0].log.write_text("quick: 50%| | 5/10 [")
    view.tick()
    assert view.eta(100) == pytest.approx(1.5 / (0.5 / 100))  # each counts 1
    assert "0/2 done, 1 running (quick-0 50%)" in out.getvalue()


def test_outcome_says_a_diverged_run_is_a_result(tmp_path):
    task = make_tasks(tmp_path, {"plain-110-0": ""})[0]
    task.log.parent.mkdir()
    (task.log.parent / "metrics.json").write_text(json.dumps({"diverged": True, "diverged_at": 1234}))
    assert outcome(task, 0) == "diverged at iteration 1234 (recorded: a result, not a failure)"
    assert outcome(task, 1) == "exit 1"
    (task.log.parent / "metrics.json").write_text(json.dumps({"diverged": False, "train_error": 1.5, "test_error": 7.25}))
    assert outcome(task, 0) == "train error 1.50%, test error 7.25%"


def test_slurm_overrides_parse_as_yaml():
    params = {"slurm": {"partition": None, "timeout_min": 240}}
    assert grid.slurm_options(params, ["partition=gpu", "timeout_min=60", "additional={qos: high}"]) == {
        "partition": "gpu", "timeout_min": 60, "additional": {"qos": "high"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        grid.slurm_options(params, ["partition"])


def test_bad_jobs_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit, match="JOBS must be a positive number or auto, got 'many'"):
        grid.main(["--jobs", "many"])
    with pytest.raises(SystemExit, match="JOBS must be a positive number or auto, got '0'"):
        grid.main(["--jobs", "0"])


def test_a_run_ignores_slurms_usr2_warning(tmp_path):
    """Slurm sends USR2 to every process of a task before it preempts it; only submitit acts on it.
    The run itself must not die of it (USR2's default action kills a process)."""
    script = "import os, signal; os.kill(os.getpid(), signal.SIGUSR2); print('survived')"
    task = make_tasks(tmp_path, {"plain-20-0": script})[0]
    assert run_task(task, tmp_path) == 0
    assert "survived" in task.log.read_text()


def test_stages_report_their_exit_codes_through_submitit(tmp_path):
    """slurm.Stage in submitit's local executor (no Slurm): 0 is a result, a failing command's exit
    code comes back as the run's code, as run() reads it from a Slurm job."""
    tasks = make_tasks(tmp_path, {"plain-20-0": "print('ok')", "plain-56-0": "import sys; sys.exit(3)"})
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    executor.update_parameters(timeout_min=5)
    jobs = [executor.submit(slurm.Stage(task, tmp_path)) for task in tasks]
    assert [slurm._exit_code(job) for job in jobs] == [0, 3]
    assert "ok" in tasks[0].log.read_text()


def test_unknown_slurm_option_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown slurm option\(s\) \['timeout'\]; known: .*timeout_min"):
        slurm.executor(tmp_path, {"timeout": 5})


# nvidia-smi of three machines: -L, then --query-gpu=index,uuid,memory.total,compute_cap (nounits)
MIG_5GB = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b)\n"
           + "".join(f"  MIG 1g.5gb     Device  {i}: (UUID: MIG-{i}0000000-a75d-5afc-978f-d2f1294409fd)\n" for i in range(7)),
           "0, GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b, 40960, 8.0\n")
T4 = ("GPU 0: Tesla T4 (UUID: GPU-0a1b2c3d-0000-1111-2222-333344445555)\n",
      "0, GPU-0a1b2c3d-0000-1111-2222-333344445555, 15360, 7.5\n")
H100 = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-9e8d7c6b-0000-1111-2222-333344445555)\n",
        "0, GPU-9e8d7c6b-0000-1111-2222-333344445555, 81559, 9.0\n")


def fake_machine(monkeypatch, smi):
    monkeypatch.setattr(local, "cuda_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local, "nvidia_smi", lambda *args: smi[1] if args and "--query-gpu" in args[0] else smi[0])


@pytest.mark.parametrize("smi, cores, deepest, want, why", [
    # a MIG 1g.5gb slice (4.75 GiB) holds 3 ResNet-110s in bf16, where SLOTS_PER_GPU put 4
    (MIG_5GB, 32, local.Deepest(110), 21, "3 per GPU: 4.8 GB holds 3 runs of ResNet-110 at batch 128 in bf16 (1.5 GB each)"),
    (MIG_5GB, 16, local.Deepest(110), 16, "2-3 per GPU: 4.8 GB holds 3 runs of ResNet-110 at batch 128 in bf16 "
                                          "(1.5 GB each), 16 cores feed 16"),
    (MIG_5GB, 32, local.Deepest(1202, checkpointing=False), 7,
     "1 per GPU: 4.8 GB is less than one run of ResNet-1202 at batch 128 in bf16 (9.2 GB each): 1 tries"),  # does not fit: 1 tries
    # a T4: fp16 under auto (7.5), fp32 when asked
    (T4, 8, local.Deepest(110), 8, "8 per GPU: 15.0 GB holds 9 runs of ResNet-110 at batch 128 in fp16 (1.5 GB each), "
                                   "8 cores feed 8"),
    (T4, 16, local.Deepest(110, "fp32"), 6, "6 per GPU: 15.0 GB holds 6 runs of ResNet-110 at batch 128 in fp32 (2.3 GB each)"),
    (T4, 16, local.Deepest(110, "bf16"), 6, "in fp32"),  # no native bf16 on a T4: the run will be fp32
    # an H100 80GB: the cores decide for ResNet-110, the memory for ResNet-1202
    (H100, 16, local.Deepest(110), 16, "16 per GPU: 79.6 GB holds 52 runs of ResNet-110 at batch 128 in bf16 "
                                       "(1.5 GB each), 16 cores feed 16"),
    (H100, 16, local.Deepest(1202), 8, "8 per GPU: 79.6 GB holds 8 runs of ResNet-1202 at batch 128 in bf16 (9.2 GB each)"),
    # where one run would not fit, activation_checkpointing auto will be on in it, and is counted so
    (MIG_5GB, 32, local.Deepest(1202), 14, "2 per GPU: 4.8 GB holds 2 runs of ResNet-1202 at batch 128 in bf16, checkpointed (1.6 GB each)"),
])
def test_auto_gives_each_gpu_as_many_runs_as_its_memory_holds(monkeypatch, smi, cores, deepest, want, why):
    fake_machine(monkeypatch, smi)
    gpus = local.visible_gpus()
    pins, said = local.plan("auto", 64, cores=cores, memory_gb=100, deepest=deepest)
    assert len(pins) == want and why in said
    seen = [p["CUDA_VISIBLE_DEVICES"] for p in pins]
    assert seen[:len(gpus)] == gpus[:want] and max(map(seen.count, gpus)) - min(map(seen.count, gpus)) <= 1


A100_40GB = ("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b)\n",
             "0, GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b, 40960, 8.0\n")
A10_24GB = ("GPU 0: NVIDIA A10 (UUID: GPU-1a2b3c4d-0000-1111-2222-333344445555)\n",
            "0, GPU-1a2b3c4d-0000-1111-2222-333344445555, 23028, 8.6\n")


@pytest.mark.parametrize("smi, gib, precision, checkpointed", [
    (A100_40GB, 40.0, "bf16", False), (A100_40GB, 40.0, "fp32", False), (H100, 79.6, "bf16", False),
    (A10_24GB, 22.5, "fp32", True),  # ResNet-1001 in fp32 does not fit 24 GB: checkpointed
])
def test_auto_counts_resnet_1001s_bottleneck_memory(monkeypatch, smi, gib, precision, checkpointed):
    """ResNet-1001 is 9n+2 bottlenecks, not 6n+2 basic blocks: its own line (memory.ACTIVATIONS)."""
    from replicate import memory

    fake_machine(monkeypatch, smi)
    each = memory.run_gb("preactbottleneck", 1001, precision, 128, checkpointing=checkpointed)
    assert memory.run_gb("preactbottleneck", 1001, precision, 128) > gib if checkpointed else each < gib
    pins, said = local.plan("auto", 64, cores=16, memory_gb=100,
                            deepest=local.Deepest(1001, precision, arch="preactbottleneck"))
    assert len(pins) == int(gib // each) > 0
    assert said == (f"{int(gib // each)} per GPU: {gib:.1f} GB holds {int(gib // each)} runs of ResNet-1001 "
                    f"(preactbottleneck) at batch 128 in {precision}{', checkpointed' if checkpointed else ''} "
                    f"({each:.1f} GB each)")


def grid_without_dvc(monkeypatch, smi, cores: int) -> None:
    """grid.main on a faked GPU machine, in the checkout, with no DVC process and no training."""
    fake_machine(monkeypatch, smi)
    monkeypatch.setattr(local, "cpu_count", lambda: cores)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(grid, "dvc", lambda *args, root, capture=False: subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(grid, "pending", lambda stages, root: stages)
    monkeypatch.setattr(local, "run_local", lambda tasks, root, view, pins, again=None: {t.run: 0 for t in tasks})
    monkeypatch.setattr(grid, "preflight", lambda *args: None)  # tests/test_gpus.py tests it


def test_the_2016_grid_counts_its_resnet_1001s(monkeypatch, capsys):
    """Its largest run is ResNet-1001 (not the deepest basic-block net): 2 per 40 GB GPU in bf16."""
    grid_without_dvc(monkeypatch, A100_40GB, cores=16)
    grid.main(["--paper", "2016"])
    assert "because 2 per GPU: 40.0 GB holds 2 runs of ResNet-1001 (bottleneck) at batch 128 in bf16" in capsys.readouterr().out


def test_the_grids_start_line_says_why_it_chose_k(monkeypatch, capsys):
    """The deepest run of the profile decides (quick: ResNet-56), in the precision its GPU will run."""
    grid_without_dvc(monkeypatch, T4, cores=4)
    grid.main(["--profile", "quick"])
    out = capsys.readouterr().out
    assert "4 to train (4 at a time: OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0; " in out
    assert ("; because 4 per GPU: 15.0 GB holds 13 runs of ResNet-56 at batch 128 in fp16 (1.1 GB each), 4 cores feed 4)"
            in out)


def test_gpu_memory_reads_mig_profiles_and_full_gpus_and_says_unknown_otherwise():
    info = local.gpu_memory(["MIG-00000000-a75d-5afc-978f-d2f1294409fd", "0", "GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3b",
                             "MIG-GPU-5c89852c/1/0"], *MIG_5GB)
    assert list(info.values()) == [local.GpuInfo(4.75, (8, 0)), local.GpuInfo(40.0, (8, 0)),
                                   local.GpuInfo(40.0, (8, 0)), local.GpuInfo(None)]
    assert local.gpu_memory(["0"], "GPU 0: Tesla V100 (UUID: GPU-x)", "0, GPU-x, 16384") == {"0": local.GpuInfo(16.0)}
