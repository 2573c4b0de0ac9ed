"""The training engine: the paper's schedule and warm-up, outputs, divergence and bad input."""

import dataclasses
import json
import math
import re

import pandas as pd
import pytest
import torch

from replicate import checkpoint
from replicate import train as engine
from replicate.outputs import read as read_outputs
from replicate.train import Config, train

TINY = dict(arch="resnet", depth=8, batch_size=32, log_every=10, eval_every=20, checkpoint_every=20,
            device="cpu")


def tiny(**kw) -> Config:
    return Config(**{**TINY, "iterations": 40, "milestones": [20, 30], **kw})


def test_schedule_divides_by_ten_at_each_milestone(small_dataset):
    result = train(tiny(), dataset=small_dataset, progress=False)
    h = result.history
    assert h.iteration.tolist() == [10, 20, 30, 40]
    # row i holds the lr used by its last iteration: iterations 1..20 at 0.1, 21..30 at 0.01, then 0.001
    assert h.lr.tolist() == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_lr_ramp_rises_linearly_to_lr_then_follows_the_schedule(small_dataset):
    """The quick look's ramp: iteration i (from 1) trains at lr * i / lr_ramp until lr_ramp; log_every=1
    records every iteration's lr."""
    result = train(tiny(lr_ramp=4, iterations=8, milestones=[6], log_every=1), dataset=small_dataset, progress=False)
    assert result.history.lr.tolist() == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_warm_up_is_on_for_depth_110_and_up_by_default():
    assert Config(depth=110).warmup and Config(depth=1202).warmup
    assert not Config(depth=56).warmup
    assert not Config(depth=110, warmup=False).warmup


def test_warm_up_runs_at_lr_001_then_returns_to_01(small_dataset):
    # warmup_until=95: the first interval's training error (~90% at start) is already below it
    result = train(tiny(warmup=True, warmup_until=95.0), dataset=small_dataset, progress=False)
    assert result.history.lr.tolist() == pytest.approx([0.01, 0.1, 0.01, 0.001])
    assert result.metrics["warmup_ended_at"] == 10


def test_warm_up_lasts_while_training_error_stays_high(small_dataset):
    result = train(tiny(warmup=True, warmup_until=0.0), dataset=small_dataset, progress=False)
    assert result.history.lr.tolist() == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert result.metrics["warmup_ended_at"] is None


def test_outputs_and_the_reported_test_error_is_the_final_iterations(tmp_path, cifar_root):
    result = train(tiny(iterations=60, milestones=[40]), cifar_root, tmp_path, progress=False)
    m = read_outputs(tmp_path)
    for key in ("arch", "depth", "params", "seed", "iterations", "train_error", "test_error", "diverged",
                "seconds", "device", "torch"):
        assert key in m
    assert (m["arch"], m["depth"], m["params"], m["iterations"], m["diverged"]) == ("resnet", 8, 75_290, 60, False)
    h = pd.read_csv(tmp_path / "history.csv")
    assert list(h.columns) == ["iteration", "lr", "train_loss", "train_error", "test_error"]
    evaluated = h.dropna(subset=["test_error"])
    assert evaluated.iteration.tolist() == [20, 40, 60]
    assert m["test_error"] == evaluated.test_error.iloc[-1]
    assert m["train_error"] == h.train_error.iloc[-1]
    # the final weights give the final test error
    model = engine.build("resnet", 8)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(model.fc.weight, result.model.fc.weight.cpu())
    responses = pd.read_csv(tmp_path / "responses.csv")
    assert responses.layer.tolist() == list(range(1, 8)) and (responses["std"] > 0).all()


def test_the_reported_errors_are_the_final_evaluations_not_the_best(tmp_path, small_dataset, monkeypatch):
    """metrics' test and validation errors are the last evaluation's, though an earlier one was lower."""
    errors = iter([30.0, 35.0, 10.0, 15.0, 20.0, 25.0])  # (test, val) at iterations 10, 20 and 30
    real = engine.evaluate  # still run: the final pass records Fig. 7's responses
    monkeypatch.setattr(engine, "evaluate", lambda *args: (real(*args), next(errors))[1])
    result = train(tiny(iterations=30, eval_every=10, val_size=100), dataset=small_dataset, out_dir=tmp_path,
                   progress=False)
    evaluated = result.history.dropna(subset=["test_error"])
    assert evaluated.iteration.tolist() == [10, 20, 30]
    assert evaluated.test_error.tolist() == [30.0, 10.0, 20.0] and evaluated.val_error.tolist() == [35.0, 15.0, 25.0]
    assert (result.metrics["test_error"], result.metrics["val_error"]) == (20.0, 25.0)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["test_error"], m["val_error"]) == (20.0, 25.0)


def test_training_learns(small_dataset):
    result = train(tiny(iterations=100, milestones=[80]), dataset=small_dataset, progress=False)
    assert result.history.train_loss.iloc[-1] < result.history.train_loss.iloc[0]
    assert result.metrics["test_error"] < 50  # chance is 90%


def test_validation_split_is_reported(small_dataset):
    result = train(tiny(val_size=100, iterations=20), dataset=small_dataset, progress=False)
    assert "val_error" in result.history.columns and result.metrics["val_error"] is not None


@pytest.fixture
def nan_after(monkeypatch):
    """Make the loss non-finite from a given (1-based) iteration on."""
    def install(iteration):
        real, calls = engine.F.cross_entropy, {"n": 0}

        def poisoned(*args, **kwargs):
            calls["n"] += 1
            loss = real(*args, **kwargs)
            return loss * float("nan") if calls["n"] >= iteration else loss
        monkeypatch.setattr(engine.F, "cross_entropy", poisoned)
    return install


def test_divergence_is_recorded_not_raised_and_the_grid_goes_on(tmp_path, small_dataset, nan_after):
    nan_after(25)
    result = train(tiny(), dataset=small_dataset, out_dir=tmp_path / "a", progress=False)
    m = read_outputs(tmp_path / "a")
    assert m["diverged"] is True and m["diverged_at"] == 25
    assert m["test_error"] is None and m["train_error"] is None
    assert result.history.iteration.iloc[-1] == 30  # stopped at the first check after it
    assert math.isnan(result.history.train_loss.iloc[-1])
    # running it again does not retrain or fail: the record stands
    again = train(tiny(), dataset=small_dataset, out_dir=tmp_path / "a", progress=False)
    assert again.metrics["diverged_at"] == 25


def test_checkpoint_of_another_architecture_is_refused_and_of_other_settings_set_aside(tmp_path, small_dataset):
    """Another net's checkpoint is another run's work; one of this net made with other settings is
    stale: each is moved aside and the run trains from scratch (tests/test_provenance.py)."""
    train(tiny(iterations=20), dataset=small_dataset, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint of run resnet-8-0, not of plain-14-0"):
        train(tiny(arch="plain", depth=14, iterations=20), dataset=small_dataset, out_dir=tmp_path, progress=False)
    for change in ({"lr": 0.05}, {"log_every": 5}, {"lr_ramp": 5}, {"bn_batch_size": 16}):
        result = train(tiny(iterations=20, **change), dataset=small_dataset, out_dir=tmp_path, progress=False)
        assert result.metrics["config"][next(iter(change))] == next(iter(change.values()))
    assert len(list(tmp_path.glob("stale-checkpoint-*.pt"))) == 4


@pytest.mark.parametrize("values, match", [
    (dict(depth=21), "6n\\+2"),
    (dict(arch="densenet"), "arch must be"),
    (dict(iterations=0), "iterations must be a positive integer"),
    (dict(milestones=[48_000, 32_000]), "milestones must be increasing"),
    (dict(lr_ramp=-1), "lr_ramp must be 0"),
    (dict(learning_rate=0.1), "unknown training parameter.*learning_rate"),
    (dict(iterations=720, milestones=[360], lr_ramp=800),
     "lr_ramp must be less than iterations, got lr_ramp 800 and iterations 720"),
])
def test_bad_config_is_rejected_before_training(values, match):
    with pytest.raises(ValueError, match=match):
        Config.from_dict(values)


def test_an_unknown_parameter_is_named_with_the_closest_known_one_not_the_whole_list():
    with pytest.raises(ValueError) as e:
        Config.from_dict({"iteration": 720})
    assert str(e.value) == "unknown training parameter 'iteration'; did you mean 'iterations'?"


def test_missing_data_root_is_reported_by_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(tiny(), tmp_path / "no-data", progress=False)


def test_save_atomic_never_leaves_half_a_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"iteration": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"iteration": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"iteration": 1}


def test_cli_trains_from_params_file(tmp_path, cifar_root, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  iterations: 20\n  milestones: [10]\n  batch_size: 32\n  log_every: 10\n"
                      "  eval_every: 10\n  checkpoint_every: 10\n  device: cpu\n")
    engine.main(["--params", str(params), "--data", str(cifar_root), "--out", str(tmp_path / "run"),
                 "--arch", "plain", "--depth", "8"])
    m = read_outputs(tmp_path / "run")
    assert (m["arch"], m["depth"], m["iterations"], m["config"]["milestones"]) == ("plain", 8, 20, [10])


def test_cli_null_sets_none_over_the_params_file(tmp_path, cifar_root):
    """`--shortcut null` was dropped as "not given", so a bottleneck net got params' option A and failed."""
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  shortcut: A\n  iterations: 4\n  milestones: [2]\n  batch_size: 16\n  log_every: 2\n"
                      "  eval_every: 2\n  checkpoint_every: 2\n  device: cpu\n  compile: false\n")
    engine.main(["--params", str(params), "--data", str(cifar_root), "--out", str(tmp_path / "run"),
                 "--arch", "preactbottleneck", "--depth", "11", "--shortcut", "null", "--activation-checkpointing", "true",
                 "--warmup", "null"])
    m = read_outputs(tmp_path / "run")
    assert m["config"]["shortcut"] is None and m["shortcut"] == "B"
    assert m["config"]["activation_checkpointing"] is True and m["config"]["warmup"] is False  # null: by depth, < 110


def test_cli_names_a_tab_in_the_params_file_without_a_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  iterations: 20\n\tlr: 0.1\n")
    want = rf"^error: {re.escape(str(params))}, line 3, column 1: .*YAML indents with spaces, never tabs"
    with pytest.raises(SystemExit, match=want):
        engine.main(["--params", str(params)])


def test_bf16_steps_keep_weights_and_bn_statistics_in_fp32(small_dataset, monkeypatch):
    """Under CPU autocast the convolutions run in bf16, but the weights, the BN running statistics
    and the loss stay fp32; the run records its precision."""
    from replicate import device as dev

    monkeypatch.setattr(dev, "native_bf16", lambda device: True)
    cfg = Config(arch="resnet", depth=8, iterations=4, milestones=[2], batch_size=16, log_every=2, eval_every=2,
                 device="cpu", compile=False)
    e = engine.make_engine(cfg, small_dataset)
    assert e.precision == "bf16" and not e.scaler.is_enabled()
    x, y = e.loader.batch(0)
    loss, _ = engine.train_step(e.step_model, e.optimizer, x, y, e.autocast, e.scaler)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in e.model.parameters())
    bn = e.model.layer1[0].bn1
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))  # updated by the step
    with e.autocast():
        assert e.model.conv1(x).dtype == torch.bfloat16
    monkeypatch.setattr(dev, "native_bf16", lambda device: False)
    assert engine.make_engine(cfg, small_dataset).precision == "fp32"  # emulated bf16: fp32
    result = train(Config(**{**dataclasses.asdict(cfg), "precision": "bf16"}), dataset=small_dataset, progress=False)
    assert result.metrics["precision"] == "fp32"  # asked for, not native: fp32, and the run says so


def test_fp16_runs_under_autocast_with_a_gradient_scaler(small_dataset):
    cfg = Config(arch="resnet", depth=8, iterations=2, milestones=[1], batch_size=8, log_every=1, eval_every=1,
                 device="cpu", compile=False, precision="fp16")
    e = engine.make_engine(cfg, small_dataset)
    assert e.precision == "fp16" and e.scaler.is_enabled()
    x, _ = e.loader.batch(0)
    with e.autocast():
        assert e.model.conv1(x).dtype == torch.float16


def test_the_old_bf16_and_tf32_switches_name_their_replacement():
    with pytest.raises(ValueError, match=r"bf16 and tf32 are now one setting, precision .*`precision: auto`"):
        Config.from_dict({"bf16": True, "tf32": False})
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, tf32, fp32, got 'half'"):
        Config(precision="half")