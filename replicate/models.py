"""The CIFAR-10 networks of He et al. 2015, section 4.2: plain and residual nets of depth 6n+2.

Plain and residual nets are the same class; the only difference is whether each block adds its
shortcut. That single switch is the experiment the paper runs.

`build` and `check_depth` also serve the sequel's nets (He et al. 2016: pre-activation and
bottleneck units, Tables 1-3), which live in replicate/preact.py and reuse this module's pieces.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .batchnorm import GroupBatchNorm2d

__all__ = [
    "CifarResNet",
    "BasicBlock",
    "PadShortcut",
    "norm_layer",
    "init_weights",
    "build",
    "check_depth",
    "plain20", "plain32", "plain44", "plain56", "plain110", "plain1202",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
    "response_layers",
    "record_responses",
    "load_by_order",
]

ARCHS = ("plain", "resnet")  # the 2015 nets; the 2016 ones are replicate/preact.py's ARCHS
SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A: identity shortcut that subsamples by 2 and zero-pads the new channels.

    Padding `planes // 4` channels on each side is the convention of the widely used PyTorch
    checkpoints (16 -> 32 -> 64 channels), so their weights load into this net unchanged.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv layers, each followed by BN; `residual=False` gives the plain-net block.

    Parameters are registered in forward order (conv1, bn1, conv2, bn2, then a projection, if
    any), so state dicts of other implementations line up with ours tensor by tensor.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool, shortcut: str,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_planes != planes):
            if shortcut == "A":
                self.shortcut = PadShortcut(planes)
            else:  # option B: 1x1 projection + BN, the paper's ImageNet alternative
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    norm_layer(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)  # the addition comes after the second BN, before ReLU
        return self.relu(out)


class CifarResNet(nn.Module):
    """Stem 3x3 conv, three stages of n blocks on 32/16/8-pixel maps with 16/32/64 filters,
    global average pooling, then a 10-way linear layer (He et al. 2015, section 4.2).

    `bn_batch_size` (None: the whole batch) gives every BN its training statistics over groups of
    that many images, as on the paper's two GPUs (64 each): replicate/batchnorm.py."""

    def __init__(self, arch: str, depth: int, shortcut: str = "A", num_classes: int = 10,
                 bn_batch_size: int | None = None):
        super().__init__()
        check_depth(arch, depth, shortcut)
        n = (depth - 2) // 6
        self.arch, self.depth, self.shortcut = arch, depth, shortcut
        norm = norm_layer(bn_batch_size)
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1, norm)
        self.layer2 = self._make_layer(32, n, 2, norm)
        self.layer3 = self._make_layer(64, n, 2, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, self.arch == "resnet", self.shortcut, norm))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = stages(self, x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def stages(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer1 to layer3, checkpointed where `model.checkpointing` is set (training with gradients)."""
    recompute = getattr(model, "checkpointing", False) and model.training and torch.is_grad_enabled()
    for stage in (model.layer1, model.layer2, model.layer3):
        x = checkpointed(stage, x) if recompute else stage(x)
    return x


def checkpointed(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`stage` in groups of about sqrt(units) units, each under torch.utils.checkpoint: only the
    groups' inputs are kept for backward, which runs each group's forward again (docs/memory.md).
    The rerun must not update BN's running statistics a second time (bn_recompute), and replays
    the forward's RNG state (dropout shortcuts), so loss and gradients are unchanged. Keeps 0.076
    of ResNet-1001's step memory and costs 1.67x a step (preactbottleneck-164 on our CPU, docs/speed.md)."""
    size = math.ceil(math.sqrt(len(stage)))
    for i in range(0, len(stage), size):
        group = stage[i:i + size]
        x = torch.utils.checkpoint.checkpoint(group, x, use_reentrant=False, preserve_rng_state=True,
                                              context_fn=partial(bn_recompute, group))
    return x


def bn_recompute(group: nn.Module) -> tuple:
    """checkpoint's (forward, recompute) contexts: the recompute leaves the group's BN running
    statistics (and num_batches_tracked) as the forward left them. BN must still get them during
    the recompute (torch checks that it saves as many tensors as the forward did), so they are
    put back afterwards, through .data: a plain copy_ would bump the version of tensors that the
    recomputed BNs saved for backward, which autograd refuses."""
    return nullcontext(), _statistics_kept([m for m in group.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])


@contextmanager
def _statistics_kept(bns: list[nn.Module]) -> Iterator[None]:
    kept = [[b.clone() for b in bn.buffers()] for bn in bns]
    try:
        yield
    finally:
        for bn, buffers in zip(bns, kept):
            for b, k in zip(bn.buffers(), buffers):
                b.data.copy_(k)


def norm_layer(bn_batch_size: int | None) -> Callable[[int], nn.Module]:
    """BN over the whole batch (None), or over each group of `bn_batch_size` images."""
    return partial(GroupBatchNorm2d, group_size=bn_batch_size) if bn_batch_size else nn.BatchNorm2d


def init_weights(model: nn.Module) -> None:
    """He init of every conv, BN as the identity; linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He et al. 2015 ("Delving deep"), std sqrt(2 / (k*k*out_channels)), as in
            # torchvision and fb.resnet.torch.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _sequel():
    """replicate/preact.py, imported on use: it builds on this module's pieces."""
    from . import preact
    return preact


def check_depth(arch: str, depth: int, shortcut: str | None = None) -> None:
    """Raise ValueError unless (arch, depth, shortcut) names one of the papers' CIFAR nets
    (shortcut None: the paper's for that net, 'A' for the 2015 ones)."""
    if arch not in ARCHS:
        sequel = _sequel()
        if arch not in sequel.ARCHS:
            raise ValueError(f"arch must be 'plain' or 'resnet' (He et al. 2015) or one of He et al. 2016's "
                             f"{', '.join(sequel.ARCHS)}, got {arch!r}")
        return sequel.check_depth(arch, depth, shortcut)
    shortcut = "A" if shortcut is None else shortcut
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...), got {depth!r}"
        )
    if shortcut not in SHORTCUTS:
        raise ValueError(
            f"shortcut must be 'A' (identity, zero-padded) or 'B' (1x1 projection), got {shortcut!r}"
        )


def build(arch: str, depth: int, *, shortcut: str | None = None, num_classes: int = 10,
          bn_batch_size: int | None = None, checkpointing: bool = False, **options) -> nn.Module:
    """The paper's CIFAR-10 net: `arch` 'plain' or 'resnet', `depth` 6n+2, `shortcut` 'A' (None) or 'B';
    `bn_batch_size` 64 normalises each group of 64 training images apart, as the paper's two GPUs did;
    `checkpointing` recomputes activations in backward instead of keeping them (`checkpointed`).
    The sequel's archs (replicate/preact.py, docs/sequel.md) take their `options` as keywords."""
    if arch not in ARCHS:
        check_depth(arch, depth, shortcut)
        model = _sequel().CifarResNet2016(arch, depth, shortcut, num_classes, bn_batch_size, **options)
    elif options:
        raise TypeError(f"{arch} takes no option {', '.join(options)}: only the 2016 nets have options")
    else:
        model = CifarResNet(arch, depth, "A" if shortcut is None else shortcut, num_classes, bn_batch_size)
    model.checkpointing = checkpointing
    return model


def plain20(**kw) -> CifarResNet:
    """Plain-20 (Fig. 1, 6; 0.27M parameters)."""
    return build("plain", 20, **kw)


def plain32(**kw) -> CifarResNet:
    """Plain-32 (Fig. 6; 0.46M parameters)."""
    return build("plain", 32, **kw)


def plain44(**kw) -> CifarResNet:
    """Plain-44 (Fig. 6; 0.66M parameters)."""
    return build("plain", 44, **kw)


def plain56(**kw) -> CifarResNet:
    """Plain-56 (Fig. 1, 6; 0.85M parameters)."""
    return build("plain", 56, **kw)


def plain110(**kw) -> CifarResNet:
    """Plain-110 (error > 60% in the paper; 1.7M parameters)."""
    return build("plain", 110, **kw)


def plain1202(**kw) -> CifarResNet:
    """Plain-1202 (not in the paper; 19.4M parameters)."""
    return build("plain", 1202, **kw)


def resnet20(**kw) -> CifarResNet:
    """ResNet-20 (Table 6: 0.27M parameters, 8.75% test error)."""
    return build("resnet", 20, **kw)


def resnet32(**kw) -> CifarResNet:
    """ResNet-32 (Table 6: 0.46M parameters, 7.51% test error)."""
    return build("resnet", 32, **kw)


def resnet44(**kw) -> CifarResNet:
    """ResNet-44 (Table 6: 0.66M parameters, 7.17% test error)."""
    return build("resnet", 44, **kw)


def resnet56(**kw) -> CifarResNet:
    """ResNet-56 (Table 6: 0.85M parameters, 6.97% test error)."""
    return build("resnet", 56, **kw)


def resnet110(**kw) -> CifarResNet:
    """ResNet-110 (Table 6: 1.7M parameters, 6.43% best, 6.61±0.16 over 5 runs)."""
    return build("resnet", 110, **kw)


def resnet1202(**kw) -> CifarResNet:
    """ResNet-1202 (Table 6: 19.4M parameters, 7.93% test error)."""
    return build("resnet", 1202, **kw)


def response_layers(model: nn.Module) -> list[nn.Module]:
    """The BN after every 3x3 conv, in network order: the 'responses' of the paper's Fig. 7.
    A 2016 net names its own (each residual branch's last layer: CifarResNet2016.response_layers)."""
    if not isinstance(model, CifarResNet):
        return model.response_layers()
    bns = [model.bn1]
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            bns += [block.bn1, block.bn2]
    return bns


@contextmanager
def record_responses(model: CifarResNet) -> Iterator[list[float]]:
    """Hook every 3x3 layer's output (after BN, before ReLU or addition): `response_layers`.

    Yields a list that, on exit, holds each layer's standard deviation over all values seen
    while the context was open (all images, channels and positions), in network order.
    Sums stay on the device and counts on the host, so recording costs no host-device copy or sync
    per batch (a count made into a device tensor cost one copy per layer per batch, about 550 for
    ResNet-56's pass). Each batch's sums are float32 (torch sums pairwise), their running totals
    float64; converting every response to float64 instead took ResNet-56's pass over 10k test
    images from 31 s to 60 s (1 CPU thread).
    """
    layers = response_layers(model)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    counts = [0] * len(layers)  # on the host: numel() is known there, so no tensor is made from it

    def hook(i):
        def fn(_module, _inputs, out):
            v = out.detach().float()  # bf16 under autocast: square it in float32
            s = torch.stack([v.sum().double(), (v * v).sum().double()])
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] += v.numel()
        return fn

    handles = [bn.register_forward_hook(hook(i)) for i, bn in enumerate(layers)]
    stds: list[float] = []
    try:
        yield stds
    finally:
        for h in handles:
            h.remove()
    for s, n in zip(sums, counts):
        if s is None:
            raise RuntimeError("record_responses saw no forward pass: run the model inside the context")
        total, sq = s.tolist()
        mean = total / n
        stds.append(max(sq / n - mean * mean, 0.0) ** 0.5)


def load_by_order(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a state dict whose keys differ from ours but whose tensors come in forward order.

    This is the layout of the widely used PyTorch CIFAR ResNet checkpoints (keys prefixed
    `module.`, `linear` for `fc`); BN's `num_batches_tracked` is ignored on both sides.
    """
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    theirs = [(k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise ValueError(
            f"checkpoint has {len(theirs)} tensors but {type(model).__name__} expects {len(ours)}: "
            "it was saved from a different architecture or depth"
        )
    mapped = {}
    target = model.state_dict()
    for key, (their_key, tensor) in zip(ours, theirs):
        if target[key].shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {their_key} has shape {tuple(tensor.shape)} but {key} needs "
                f"{tuple(target[key].shape)}: the checkpoint is for a different architecture"
            )
        mapped[key] = tensor
    model.load_state_dict(mapped, strict=False)
    return model
