"""A compiled step that fails to build (no C compiler, no Python.h, a backend error) loses no run:
the run goes on eagerly from that same step and ends with an eager run's weights, saying so once
and recording it in run.json."""

import json

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from conftest import train_until_first_checkpoint
from replicate import train as engine

CFG = dict(arch="resnet", depth=8, iterations=6, milestones=[4], batch_size=16, log_every=2, eval_every=2,
           checkpoint_every=3, device="cpu", precision="fp32")


def no_compiler(gm, example_inputs):
    raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")


def graph(gm, example_inputs):
    return gm


# Where a compile fails: Inductor's forward (torch raises BackendCompilerFailed at the first call,
# before the forward runs), or a lazily compiled backward, after the forward has updated BN.
BACKENDS = {"forward": no_compiler, "backward": aot_autograd(fw_compiler=graph, bw_compiler=no_compiler)}


@pytest.fixture
def failing_compile(monkeypatch, request):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real(model, backend=BACKENDS[request.param]))
    yield request.param
    torch._dynamo.reset()


@pytest.mark.parametrize("failing_compile", list(BACKENDS), indirect=True)
def test_a_failed_compile_goes_on_eagerly_to_an_eager_runs_weights(failing_compile, small_dataset, tmp_path, capsys):
    eager = engine.train(engine.Config(**CFG, compile=False), dataset=small_dataset, progress=False)
    torch._dynamo.reset()
    fell_back = engine.train(engine.Config(**CFG, compile=True), dataset=small_dataset, out_dir=tmp_path,
                             progress=False)
    out = capsys.readouterr().out
    assert out.count("torch.compile failed (") == 1 and "training in eager mode" in out
    m = fell_back.metrics
    assert m["compiled"] is False and "No working C++ compiler" in m["compile_error"]
    assert "BackendCompilerFailed" in m["compile_error"] or failing_compile == "backward"
    assert eager.metrics["compiled"] is False and eager.metrics["compile_error"] is None
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["compiled"] is False and run["compile_error"] == m["compile_error"]
    a, b = eager.model.state_dict(), fell_back.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert fell_back.history.train_loss.tolist() == eager.history.train_loss.tolist()


@pytest.mark.parametrize("failing_compile", ["backward"], indirect=True)
def test_a_resume_whose_compile_fails_again_still_ends_exact(failing_compile, small_dataset, tmp_path):
    cfg = engine.Config(**CFG, compile=True)
    whole = engine.train(cfg, dataset=small_dataset, progress=False).model.state_dict()
    torch._dynamo.reset()
    train_until_first_checkpoint(cfg, tmp_path, small_dataset)
    torch._dynamo.reset()
    resumed = engine.train(cfg, dataset=small_dataset, out_dir=tmp_path, progress=False)
    assert resumed.metrics["compile_error"]
    state = resumed.model.state_dict()
    assert all(torch.equal(whole[k], state[k]) for k in whole)

