"""BatchNorm over groups of images, as on the paper's two GPUs.

He et al. trained "with a mini-batch size of 128 on two GPUs": each GPU's BN saw 64 images, so a
batch was normalised as two groups, each with its own batch statistics. `GroupBatchNorm2d` does
that on one device: in training, each group of `group_size` images is normalised with its own
mean and variance. Each GPU's BN would update its own running statistics from its own group;
keeping their mean (what a synchronised evaluation would use) needs one buffer only, because the
update is linear: the mean of the groups' running statistics is updated with the mean of the
groups' statistics. Evaluation uses the running statistics, as plain BN does.

Its parameters and buffers are BatchNorm2d's, so its state dicts are interchangeable with plain
BN's (tests/test_batchnorm.py checks the equivalence with separate BN calls per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from each group of `group_size` images
    (None: the whole batch, plain BatchNorm2d)."""

    def __init__(self, num_features: int, group_size: int | None = None, **kwargs):
        super().__init__(num_features, **kwargs)
        if group_size is not None and group_size < 2:
            raise ValueError(f"group_size must be at least 2 images (or None), got {group_size!r}")
        self.group_size = group_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        if not self.training or g is None or x.shape[0] <= g:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"a batch of {n} images does not split into groups of {g} "
                             "(bn_batch_size must divide batch_size)")
        groups = n // g
        # The groups side by side as channels, (g, G*C, H, W): one call of torch's own BN kernel
        # normalises each (group, channel) with its own statistics: on our CPU a fraction of the extra
        # step time of hand-written mean/var/normalise (docs/speed.md, "BatchNorm over 64 images").
        side = x.unflatten(0, (groups, g)).transpose(0, 1).reshape(g, groups * c, h, w)
        tracking = self.track_running_stats
        mean, var = (self.running_mean.repeat(groups), self.running_var.repeat(groups)) if tracking else (None, None)
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        out = F.batch_norm(side, mean, var, weight, bias, True, self._momentum() if tracking else 0.0, self.eps)
        if tracking:
            with torch.no_grad():  # each group's BN made one update; keep their mean (linear)
                self.running_mean.copy_(mean.view(groups, c).mean(0))
                self.running_var.copy_(var.view(groups, c).mean(0))
        out = out.reshape(g, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _momentum(self) -> float:
        """BatchNorm2d's rule: momentum, or the cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
