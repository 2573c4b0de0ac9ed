"""replicate.packed: k nets as one grouped program train exactly as k separate nets."""

import pytest
import torch
import torch.nn.functional as F

from replicate.models import build
from replicate.packed import PackedResNet, packed_loss


@pytest.mark.parametrize("arch", ["resnet", "plain"])
def test_a_packed_step_is_k_separate_steps(arch):
    nets = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        nets.append(build(arch, 14).double())
    packed = PackedResNet.from_nets(nets).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 3, 32, 32, generator=g, dtype=torch.float64)  # (B, k, 3, H, W): each net its own images
    y = torch.randint(0, 10, (8, 3), generator=g)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    logits = packed(x.flatten(1, 2))
    packed_loss(logits, y).backward()
    torch.optim.SGD(packed.parameters(), **sgd).step()
    for j, net in enumerate(nets):  # the same step, net by net
        out = net(x[:, j])
        assert torch.allclose(logits[:, j], out, atol=1e-10), j
        F.cross_entropy(out, y[:, j]).backward()
        torch.optim.SGD(net.parameters(), **sgd).step()
    after = PackedResNet.from_nets(nets).double().state_dict()
    for key, value in packed.state_dict().items():
        assert torch.allclose(value, after[key], atol=1e-10), key  # weights and BN running statistics


def test_negative_control_one_net_with_anothers_images_differs():
    nets = [build("resnet", 8).double() for _ in range(2)]
    packed = PackedResNet.from_nets(nets).double()
    x = torch.randn(4, 2, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(packed(x.flatten(1, 2))[:, 0], nets[0](x[:, 1]))


def test_a_packed_net_built_alone_has_a_linear_layers_init():
    """gpu_check's packed timing builds PackedResNet directly: its fc was torch.empty, garbage
    (NaN under deterministic mode), not nn.Linear's uniform(+-1/sqrt(64)) and zero-mean bias."""
    torch.manual_seed(0)
    packed = PackedResNet("resnet", 8, 3)
    bound = 1 / 64 ** 0.5
    for t in (packed.fc_weight, packed.fc_bias):
        assert torch.isfinite(t).all() and t.abs().max() <= bound and t.std() > bound / 4
    assert not torch.equal(packed.fc_weight[0], packed.fc_weight[1])  # each net its own draw
    logits = packed(torch.randn(4, 9, 32, 32))
    assert torch.isfinite(packed_loss(logits, torch.zeros(4, 3, dtype=torch.long)))
