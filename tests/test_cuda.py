"""What only a real GPU can show; every test here skips without CUDA. scripts/gpu_check.py runs
them first (`pytest -m cuda tests/test_cuda.py`, with the device image's pytest: no plugins).

The CPU tests fake what CUDA reports (tests/test_device.py, test_resume.py, test_grid.py); these
check that the real thing agrees: training steps, an exact resume with `deterministic: true`,
torch.compile with and without CUDA graphs, the evaluation and Fig. 7's pass, and the grid's pins
as a worker sees them.
"""

import json
import sys

import pytest
import torch

from conftest import train_until_first_checkpoint
from replicate import data as cifar
from replicate import local
from replicate.device import fix_cublas_workspace
from replicate.models import build, record_responses
from replicate.tasks import Task, start
from replicate.train import Config, evaluate, make_engine, train, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

fix_cublas_workspace()  # before any cuBLAS handle exists in this process
RUN = dict(arch="resnet", depth=20, batch_size=128, log_every=50, eval_every=100, checkpoint_every=100,
           device="cuda", compile=False)


@pytest.fixture(scope="module")
def dataset():
    return cifar.synthetic(5_000, 1_000, seed=0)


def test_a_few_hundred_steps_learn_on_the_gpu(dataset):
    result = train(Config(**RUN, iterations=300, milestones=[200]), dataset=dataset, progress=False)
    m = result.metrics
    assert (m["device"], m["iterations"], m["diverged"]) == ("cuda", 300, False)
    capability = torch.cuda.get_device_capability()
    assert m["precision"] == ("bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32")
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    assert m["test_error"] < 50  # chance is 90%


@pytest.mark.parametrize("compile", [False, True])
def test_deterministic_resume_ends_with_identical_weights(dataset, tmp_path, steps, compile):
    """200 iterations in one go, against a run stopped at its checkpoint at 100, a new process's
    worth of state from it (loaded onto the CPU first), and the 100 steps left (counted: a
    restart from 0 would end with the same weights). Compiled too: a paper run compiles (64k
    iterations), and deterministic Inductor kernels must resume as exactly as cuDNN's."""
    cfg = Config(**dict(RUN, iterations=200, milestones=[150], checkpoint_every=100, deterministic=True,
                        compile=compile))
    whole = train(cfg, dataset=dataset, progress=False)
    assert whole.metrics["compiled"] is compile, whole.metrics["compile_error"]  # not a silent eager fallback
    whole = whole.model.state_dict()
    train_until_first_checkpoint(cfg, tmp_path, dataset)
    steps.clear()
    resumed = train(cfg, dataset=dataset, out_dir=tmp_path, progress=False).model.state_dict()
    assert len(steps) == 100
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [k for k in whole if not torch.equal(whole[k], resumed[k])]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_steps_train_like_eager_ones(dataset, cuda_graphs):
    """The same net, batches and start, eager and compiled (fp32 both): the same first loss, and
    losses that fall alike. Weights are not compared: 30 steps at lr 0.1 amplify the rounding of
    fused kernels."""
    cfg = dict(RUN, depth=8, iterations=30, milestones=[20], precision="fp32")
    runs = {}
    for compiled in (False, True):
        engine = make_engine(Config(**{**cfg, "compile": compiled, "cuda_graphs": cuda_graphs and compiled}), dataset)
        assert (engine.step_model is not engine.model) == compiled
        losses = []
        for it in range(30):
            x, y = engine.loader.batch(it)
            loss, _ = train_step(engine.step_model, engine.optimizer, x, y, engine.autocast)
            losses.append(loss.item())  # a CUDA graph's output is overwritten by its next replay
            engine.scheduler.step()
        runs[compiled] = losses
    eager, compiled = runs[False], runs[True]
    assert all(v == v and abs(v) < 1e3 for v in compiled)
    assert abs(compiled[0] - eager[0]) <= 1e-4 * eager[0]
    assert sum(compiled[-5:]) < sum(compiled[:5]) and abs(sum(compiled[-5:]) - sum(eager[-5:])) <= 0.2 * sum(eager[-5:])


def test_evaluation_and_fig7_responses_on_the_gpu_match_the_cpu(dataset):
    torch.manual_seed(0)
    model = build("resnet", 8)
    ds = cifar.split(dataset)
    x_cpu, y = cifar.normalize(ds.test_x, ds.mean), torch.as_tensor(ds.test_y)
    off = lambda: torch.autocast("cuda", enabled=False)  # noqa: E731
    with record_responses(model) as cpu_stds:
        cpu_error = evaluate(model, x_cpu, y, lambda: torch.autocast("cpu", enabled=False), torch.channels_last)
    gpu = model.cuda().to(memory_format=torch.channels_last)
    with record_responses(gpu) as gpu_stds:
        gpu_error = evaluate(gpu, x_cpu.cuda(), y.cuda(), off, torch.channels_last)
    assert abs(gpu_error - cpu_error) <= 0.5  # a few images at most flip between the two fp32 paths
    assert len(gpu_stds) == 7 and max(abs(a - b) / a for a, b in zip(cpu_stds, gpu_stds)) < 1e-3


def test_grid_pins_as_each_worker_sees_them(tmp_path):
    """Every slot's process sees exactly one GPU, the one its pin names."""
    gpus = local.visible_gpus()
    pins = local.slots("auto", 2 * len(gpus), gpus=gpus)
    script = ("import json, os, torch; p = torch.cuda.get_device_properties(0); "
              "print(json.dumps({'count': torch.cuda.device_count(), 'uuid': str(p.uuid), "
              "'pin': os.environ['CUDA_VISIBLE_DEVICES']}))")

    class Probe(Task):
        @property
        def argv(self):
            return [sys.executable, "-c", script]

    seen = []
    for i, env in enumerate(pins):
        task = Probe(f"probe-8-{i}", f"probe@{i}", tmp_path / f"probe{i}.log", env)
        assert start(task, tmp_path).wait() == 0, task.log.read_text()
        seen.append(json.loads(task.log.read_text().splitlines()[-1]))
    parent = {str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())}
    assert all(s["count"] == 1 for s in seen), seen
    by_pin = {}
    for s in seen:
        by_pin.setdefault(s["pin"], set()).add(s["uuid"])
    assert all(len(u) == 1 for u in by_pin.values()), by_pin  # one pin, one GPU
    assert len({next(iter(u)) for u in by_pin.values()}) == len(by_pin)  # different pins, different GPUs
    if len(gpus) == torch.cuda.device_count():  # plain indices: the worker's GPU is the parent's of that index
        assert {u for us in by_pin.values() for u in us} <= parent
