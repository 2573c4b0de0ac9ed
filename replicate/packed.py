"""k nets of one architecture trained as one program, for packing a grid onto one GPU.

Each layer of the k nets becomes one grouped convolution (groups=k): net j owns channels
[j*C, (j+1)*C) of every layer and sees its own images as input channels [3j, 3j+3). BatchNorm is
per channel, hence per net, over each net's own batch; the loss is the sum of the k nets' losses,
so each net's gradient is its own. One packed SGD step is therefore k separate steps of k separate
nets (tests/test_packed.py checks it to float precision), in one set of kernel launches instead of
k. scripts/gpu_check.py measures whether that beats k processes on one GPU; the grid does not use
it yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import ARCHS, CifarResNet, check_depth


class PackedBlock(nn.Module):
    """k BasicBlocks side by side (option A shortcuts, the paper's CIFAR nets)."""

    def __init__(self, k: int, in_planes: int, planes: int, stride: int, residual: bool):
        super().__init__()
        self.k, self.residual, self.pad = k, residual, planes // 4
        self.conv1 = nn.Conv2d(k * in_planes, k * planes, 3, stride=stride, padding=1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * planes)
        self.conv2 = nn.Conv2d(k * planes, k * planes, 3, stride=1, padding=1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * planes)
        self.subsample = stride != 1 or in_planes != planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subsample:
            return x
        per_net = x[:, :, ::2, ::2].unflatten(1, (self.k, -1))          # (B, k, C, H/2, W/2)
        return F.pad(per_net, (0, 0, 0, 0, self.pad, self.pad)).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class PackedResNet(nn.Module):
    """k CIFAR nets of one arch and depth: input (B, 3k, 32, 32), logits (B, k, 10)."""

    def __init__(self, arch: str, depth: int, k: int, num_classes: int = 10):
        super().__init__()
        check_depth(arch, depth, "A")
        if arch not in ARCHS:  # check_depth also knows the 2016 nets (replicate/preact.py)
            raise ValueError(f"packing covers the 2015 nets ('plain', 'resnet'), not {arch!r}")
        n, self.k = (depth - 2) // 6, k
        self.conv1 = nn.Conv2d(3 * k, 16 * k, 3, padding=1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(16 * k)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(PackedBlock(k, in_planes, planes, s, arch == "resnet"))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        # Initialised as each net's nn.Linear(64, num_classes) is (scripts/gpu_check.py trains a
        # packed net built here, not by from_nets; torch.empty there was NaN under deterministic mode).
        self.fc_weight = nn.Parameter(torch.empty(k, num_classes, 64))
        self.fc_bias = nn.Parameter(torch.empty(k, num_classes))
        for j in range(k):
            fc = nn.Linear(64, num_classes)
            with torch.no_grad():
                self.fc_weight[j].copy_(fc.weight)
                self.fc_bias[j].copy_(fc.bias)

    @classmethod
    def from_nets(cls, nets: list[CifarResNet]) -> "PackedResNet":
        """The packed twin of `nets` (same arch and depth, option A): their weights and BN state."""
        first = nets[0]
        packed = cls(first.arch, first.depth, len(nets))
        ours = [dict(net.named_parameters()) | dict(net.named_buffers()) for net in nets]
        state = packed.state_dict()
        for key in state:
            if key in ("fc_weight", "fc_bias"):
                state[key] = torch.stack([o[f"fc.{key[3:]}"] for o in ours])
            elif key.endswith("num_batches_tracked"):
                state[key] = ours[0][key]
            else:
                state[key] = torch.cat([o[key] for o in ours])
        packed.load_state_dict(state)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = x.mean((2, 3)).unflatten(1, (self.k, 64))                # (B, k, 64)
        return torch.einsum("bkc,koc->bko", pooled, self.fc_weight) + self.fc_bias


def packed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of the k nets' cross-entropy losses; logits (B, k, 10), labels (B, k)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / logits.shape[0]
