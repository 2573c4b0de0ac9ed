"""Activation checkpointing (models.checkpointed, train's activation_checkpointing): the same loss,
gradients and BN running statistics as without it, bitwise on the CPU; "auto" on only where a run
would not fit; JOBS=auto counting it on the GPUs where it will be on."""

from pathlib import Path

import pytest
import torch
import yaml

from replicate import memory, models
from replicate import train as engine
from replicate.models import build
from replicate.train import Config


def one_step(arch: str, depth: int, checkpointing: bool, bn_batch_size: int | None = None):
    """Loss, gradients and state (running statistics, num_batches_tracked) after one fp32 step."""
    torch.manual_seed(0)
    model = build(arch, depth, checkpointing=checkpointing, bn_batch_size=bn_batch_size)
    model = model.to(memory_format=torch.channels_last).train()
    torch.manual_seed(1)  # the batch, and the dropout shortcuts' masks
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()


def assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


@pytest.mark.parametrize("arch, depth, bn_batch_size", [
    ("preactbottleneck", 20, None),  # 2 units a stage: one group of 2
    ("bottleneck", 29, 8),           # 3 units: groups of 2 and 1; BN over groups of 8 images
    ("resnet", 14, None),            # the 2015 net
    ("dropoutshortcut", 20, None),   # dropout: the recompute replays the forward's RNG
])
def test_checkpointing_gives_the_same_loss_gradients_and_bn_statistics_bitwise(arch, depth, bn_batch_size):
    """Bitwise: the recompute runs the same CPU kernels on the same inputs."""
    assert_same(one_step(arch, depth, False, bn_batch_size), one_step(arch, depth, True, bn_batch_size))
    # and it does checkpoint: the forward keeps only the groups' inputs (and the stem's and head's)
    assert memory.step(arch, depth, "fp32", 16, checkpointing=True)["saved"] < \
        memory.step(arch, depth, "fp32", 16)["saved"] / 2


def test_without_its_recompute_context_bn_would_count_each_batch_twice(monkeypatch):
    """What bn_recompute prevents: the recompute is a second BN forward in training mode."""
    plain = one_step("preactbottleneck", 20, False)
    monkeypatch.setattr(models, "bn_recompute", lambda group: (models.nullcontext(), models.nullcontext()))
    twice = one_step("preactbottleneck", 20, True)
    assert torch.equal(plain[0], twice[0])
    assert not torch.equal(plain[2]["layer1.0.bn2.running_mean"], twice[2]["layer1.0.bn2.running_mean"])
    assert twice[2]["layer1.0.bn2.num_batches_tracked"] == 2


def test_it_checkpoints_groups_of_about_sqrt_n_units_when_training_only(monkeypatch):
    groups, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: groups.append(len(fn)) or real(fn, *a, **k))
    model = build("preactbottleneck", 83, checkpointing=True)  # 9 units a stage: 3 groups of 3
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert groups == [3] * 9
    groups.clear()
    with torch.no_grad():
        model(x)  # no backward to recompute for
    model.eval()(x)  # evaluation
    assert groups == []


def test_the_option_is_trains_from_params_yaml_and_has_no_effect_on_results():
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    setting = params["train"]["activation_checkpointing"]
    assert Config().activation_checkpointing == setting == "auto"
    assert "activation_checkpointing" in engine.NO_EFFECT
    for value in (True, False, "auto"):
        assert Config(activation_checkpointing=value).activation_checkpointing == value
    with pytest.raises(ValueError, match=r"activation_checkpointing must be true, false or 'auto'.*got 'on'"):
        Config(activation_checkpointing="on")


def test_auto_is_on_where_one_run_would_not_fit_the_devices_memory():
    need = memory.run_gb("preactbottleneck", 1001, "fp32", 128)
    assert memory.checkpointing_on("auto", "preactbottleneck", 1001, "fp32", 128, need + 1) is False
    assert memory.checkpointing_on("auto", "preactbottleneck", 1001, "fp32", 128, need - 1) is True
    assert memory.checkpointing_on("auto", "preactbottleneck", 1001, "fp32", 128, None) is False  # unknown (MPS)
    assert memory.checkpointing_on(True, "resnet", 20, "fp32", 128, 1000.0) is True
    assert memory.checkpointing_on(False, "preactbottleneck", 1001, "fp32", 128, 1.0) is False
    # checkpointed, ResNet-1001 fits where it did not
    assert memory.run_gb("preactbottleneck", 1001, "fp32", 128, checkpointing=True) < need - 1


@pytest.mark.parametrize("device_gb, on", [(0.1, True), (1000.0, False)])
def test_train_builds_the_net_checkpointed_where_auto_says_so(small_dataset, monkeypatch, capsys, device_gb, on):
    monkeypatch.setattr(memory, "device_gb", lambda device: device_gb)  # a machine of that memory
    cfg = Config(arch="resnet", depth=8, iterations=2, milestones=[1], batch_size=8, log_every=1, eval_every=1,
                 device="cpu", compile=False)
    assert engine.make_engine(cfg, small_dataset).model.checkpointing is on
    assert ("activation_checkpointing auto: on" in capsys.readouterr().out) is on
    cfg.activation_checkpointing = False
    assert engine.make_engine(cfg, small_dataset).model.checkpointing is False
