"""BatchNorm over groups of 64 images, as on the paper's two GPUs: exactly separate BN calls per
group in training, each GPU's running statistics kept as their mean, evaluation unchanged."""

import copy

import pytest
import torch
from torch import nn

from replicate.batchnorm import GroupBatchNorm2d
from replicate.models import build
from replicate.train import Config


def twins(group_size=64, channels=16):
    torch.manual_seed(0)
    bn = GroupBatchNorm2d(channels, group_size=group_size).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    gpus = [nn.BatchNorm2d(channels).double() for _ in range(128 // group_size)]
    for g in gpus:
        g.load_state_dict(bn.state_dict())
    return bn, gpus


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_each_group_is_normalised_with_its_own_statistics_as_separate_bn_calls(memory_format):
    bn, gpus = twins()
    x = (torch.randn(128, 16, 8, 8, dtype=torch.float64) * 3 + 1).contiguous(memory_format=memory_format)
    x[64:] += 5  # the two groups differ: one BN over all 128 would not give this
    for _ in range(3):  # three steps: the running statistics follow each GPU's, averaged
        out = bn(x)
        expected = torch.cat([g(part) for g, part in zip(gpus, x.split(64))])
        assert torch.allclose(out, expected, atol=1e-12)
    assert out.is_contiguous(memory_format=memory_format)
    assert torch.allclose(bn.running_mean, (gpus[0].running_mean + gpus[1].running_mean) / 2, atol=1e-12)
    assert torch.allclose(bn.running_var, (gpus[0].running_var + gpus[1].running_var) / 2, atol=1e-12)
    assert int(bn.num_batches_tracked) == int(gpus[0].num_batches_tracked) == 3
    whole = nn.BatchNorm2d(16).double()
    whole.load_state_dict(twins()[0].state_dict())
    assert not torch.allclose(whole(x), out)  # negative control: BN over the whole batch differs


def test_gradients_are_those_of_separate_bn_calls():
    bn, gpus = twins()
    x = torch.randn(128, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(128, 16, 4, 4, dtype=torch.float64)
    (bn(x) * w).sum().backward()
    (torch.cat([g(p) for g, p in zip(gpus, x2.split(64))]) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-12)
    assert torch.allclose(bn.weight.grad, gpus[0].weight.grad + gpus[1].weight.grad, atol=1e-12)


def test_evaluation_is_plain_bn_with_the_running_statistics():
    bn, _ = twins()
    plain = nn.BatchNorm2d(16).double()
    plain.load_state_dict(bn.state_dict())  # the same parameters and buffers: interchangeable state dicts
    bn.eval(), plain.eval()
    x = torch.randn(10, 16, 4, 4, dtype=torch.float64)  # any batch size in evaluation
    assert torch.equal(bn(x), plain(x))


def test_under_bf16_autocast_statistics_stay_fp32():
    bn = GroupBatchNorm2d(16, group_size=4)
    x = torch.randn(8, 16, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x)
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32


def test_the_nets_and_the_config_take_bn_batch_size():
    torch.manual_seed(0)
    grouped = build("resnet", 8, bn_batch_size=64)
    torch.manual_seed(0)
    plain = build("resnet", 8)
    assert sum(isinstance(m, GroupBatchNorm2d) for m in grouped.modules()) == 7
    assert grouped.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(grouped.state_dict().values(), plain.state_dict().values()))  # same init
    assert Config(bn_batch_size=64).bn_batch_size == 64 and Config().bn_batch_size is None
    for bad in (48, 1, 256):
        with pytest.raises(ValueError, match="bn_batch_size must be null .* a divisor of batch_size 128"):
            Config(bn_batch_size=bad)
    with pytest.raises(ValueError, match="does not split into groups of 64"):
        copy.deepcopy(grouped.bn1)(torch.randn(96, 16, 4, 4))
