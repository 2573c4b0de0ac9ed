"""The CIFAR networks of He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027).

The sequel keeps the 2015 net (replicate/models.py) and changes what happens around the addition:
where BN and ReLU sit in a residual unit (Table 2; full pre-activation leaves the path from unit to
unit a pure identity), what multiplies the shortcut (Table 1), and bottleneck units for 164 and 1001
layers (Table 3). One unit class covers them all: a basic (3x3, 3x3), bottleneck (1x1, 3x3, 1x1) or
one-layer (3x3) branch whose BN and ReLU are placed by `order`; Table 1's variants change only the
shortcut or what is added. docs/sequel.md lists the arch names, their options, and the choices made
where the paper leaves a detail open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import PadShortcut, build, init_weights, norm_layer, stages

__all__ = [
    "ARCHS", "TABLE1", "TABLE2",
    "CifarResNet2016", "ResidualUnit", "ScaledUnit", "GatedUnit", "ShortcutDropout",
    "check_depth", "table1",
]

KERNELS = {"basic": (3, 3), "bottleneck": (1, 3, 1), "onelayer": (3,)}
ORDERS = ("original", "bnafter", "relubefore", "relupreact", "preact")  # Table 2, top to bottom


@dataclass(frozen=True)
class Arch:
    """What an arch name stands for: the unit, where its BN and ReLU go, a Table 1 variant, and
    the keyword options `build` takes for it, with their defaults."""

    unit: str                    # a key of KERNELS
    order: str = "original"      # one of ORDERS
    variant: str | None = None   # Table 1's: scaling, exclusivegating, shortcutgating, convshortcut, dropoutshortcut
    options: dict = field(default_factory=dict)


_BOTTLENECK = {"stride_in": "conv1"}  # the official code's: the stride on the first 1x1 conv
_TABLE1 = {"at_shape_change": True}   # the variant also on the two units that change the shape

def _variant(name: str, **options) -> Arch:
    return Arch("basic", variant=name, options={**options, **_TABLE1})


# Every run of the sequel is an arch name, so Table 1's rows are archs of their own, named by their
# values (neg6: b_g = -6; 05x05: 0.5 on the shortcut, 0.5 on F); `build` still takes each option.
ARCHS: dict[str, Arch] = {
    # Table 2 and 3 on basic units (ResNet-110; "resnet", the original unit, is the 2015 net)
    "preact": Arch("basic", "preact"),
    "bnafter": Arch("basic", "bnafter"),
    "relubefore": Arch("basic", "relubefore"),
    "relupreact": Arch("basic", "relupreact"),
    # on bottleneck units (ResNet-164, ResNet-1001)
    "bottleneck": Arch("bottleneck", options=_BOTTLENECK),
    "preactbottleneck": Arch("bottleneck", "preact", options=_BOTTLENECK),
    "bnafterbottleneck": Arch("bottleneck", "bnafter", options=_BOTTLENECK),
    "relubeforebottleneck": Arch("bottleneck", "relubefore", options=_BOTTLENECK),
    "relupreactbottleneck": Arch("bottleneck", "relupreact", options=_BOTTLENECK),
    # Table 3's "ResNet-110, 1-layer skip": one 3x3 conv per unit
    "onelayer": Arch("onelayer"),
    "preactonelayer": Arch("onelayer", "preact"),
    # Table 1: shortcut variants of the original basic unit (ResNet-110), a row each
    "scaling0x1": _variant("scaling", shortcut_scale=0.0, branch_scale=1.0),  # a plain net
    "scaling05x1": _variant("scaling", shortcut_scale=0.5, branch_scale=1.0),
    "scaling05x05": _variant("scaling", shortcut_scale=0.5, branch_scale=0.5),  # frozen gating; Fig. 3
    **{f"exclusivegating{'neg' if b else ''}{b}": _variant("exclusivegating", gate_bias=-float(b), gate_per_channel=True)
       for b in (0, 5, 6, 7)},  # the row "0 to -5": its ends; -6 in Fig. 3
    **{f"shortcutgating{'neg' if b else ''}{b}": _variant("shortcutgating", gate_bias=-float(b), gate_per_channel=True)
       for b in (0, 6)},  # 0 in Fig. 3
    "convshortcut": _variant("convshortcut"),
    "dropoutshortcut": _variant("dropoutshortcut", dropout=0.5, dropout_rescale=False),
}

# Table 1 (ResNet-110, CIFAR-10), row -> arch: `table1(row)` or `build(arch, 110)`.
TABLE1: dict[str, str] = {
    "original": "resnet",
    "constant scaling 0, 1": "scaling0x1",
    "constant scaling 0.5, 1": "scaling05x1",
    "constant scaling 0.5, 0.5": "scaling05x05",
    "exclusive gating b_g=0": "exclusivegating0",
    "exclusive gating b_g=-5": "exclusivegatingneg5",
    "exclusive gating b_g=-6": "exclusivegatingneg6",
    "exclusive gating b_g=-7": "exclusivegatingneg7",
    "shortcut-only gating b_g=0": "shortcutgating0",
    "shortcut-only gating b_g=-6": "shortcutgatingneg6",
    "1x1 conv shortcut": "convshortcut",
    "dropout shortcut": "dropoutshortcut",
}

# Table 2, row -> (arch of its ResNet-110, arch of its ResNet-164).
TABLE2: dict[str, tuple[str, str]] = {
    "original": ("resnet", "bottleneck"),
    "BN after addition": ("bnafter", "bnafterbottleneck"),
    "ReLU before addition": ("relubefore", "relubeforebottleneck"),
    "ReLU-only pre-activation": ("relupreact", "relupreactbottleneck"),
    "full pre-activation": ("preact", "preactbottleneck"),
}


def projection(in_planes: int, planes: int, stride: int, norm: Callable[[int], nn.Module] | None) -> nn.Module:
    """A 1x1 conv shortcut; with BN (`norm`) as the 2015 option B, without it in pre-activation nets."""
    conv = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
    return nn.Sequential(conv, norm(planes)) if norm else nn.Sequential(conv)


class ShortcutDropout(nn.Module):
    """Table 1's dropout shortcut. Unscaled, it keeps each value with probability 1 - p in training and
    multiplies by 1 - p in evaluation: the shortcut "statistically" scaled by 0.5 the paper speaks of.
    `rescale=True` is inverted dropout (torch's), of expected scale 1."""

    def __init__(self, p: float, rescale: bool = False):
        super().__init__()
        self.p, self.rescale = p, rescale

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(x, self.p, self.training)
        return out if self.rescale else out * (1 - self.p)


class ResidualUnit(nn.Module):
    """x' = shortcut(x) + F(x), F's convs, BNs and ReLUs in the `order` of Table 2 (basic unit shown;
    a bottleneck has a third conv, a one-layer unit W1 only):

        original    x' = ReLU(x + BN(W2 ReLU(BN(W1 x))))
        bnafter     x' = ReLU(BN(x + W2 ReLU(BN(W1 x))))
        relubefore  x' = x + ReLU(BN(W2 ReLU(BN(W1 x))))
        relupreact  x' = x + BN(W2 ReLU(BN(W1 ReLU(x))))
        preact      x' = x + W2 ReLU(BN(W1 ReLU(BN(x))))

    Where a stage starts (`shares`), a pre-activation order activates x once, before the split, and
    the shortcut gets the activated x (the official code's "both_preact"; in the net's first unit, the
    activation right after conv1). Layers are registered in forward order, with torchvision's names.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, kernels: tuple[int, ...], order: str,
                 shortcut: nn.Module, norm: Callable[[int], nn.Module], shares: bool = False, stride_at: int = 0):
        super().__init__()
        self.order, self.shares, self.layers = order, shares, len(kernels)
        width = planes // 4 if len(kernels) == 3 else planes  # bottleneck: C -> C/4 -> C/4 -> C
        channels = [in_planes] + [width] * (len(kernels) - 1) + [planes]
        for i, k in enumerate(kernels):
            conv = nn.Conv2d(channels[i], channels[i + 1], k, stride=stride if i == stride_at else 1,
                             padding=k // 2, bias=False)
            if order == "preact":  # BN normalises the conv's input
                setattr(self, f"bn{i + 1}", norm(channels[i]))
                setattr(self, f"conv{i + 1}", conv)
            else:
                setattr(self, f"conv{i + 1}", conv)
                setattr(self, f"bn{i + 1}", norm(channels[i + 1]))
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = shortcut

    def convs_and_bns(self) -> list[tuple[nn.Conv2d, nn.Module]]:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self.layers + 1)]

    def residual(self, a: torch.Tensor) -> torch.Tensor:
        """F, from the unit's input (pre-activated where the order has a pre-activation)."""
        pairs = self.convs_and_bns()
        if self.order == "preact":
            out = pairs[0][0](a)  # bn1 and its ReLU made `a`
            for conv, bn in pairs[1:]:
                out = conv(self.relu(bn(out)))
            return out
        for conv, bn in pairs[:-1]:
            a = self.relu(bn(conv(a)))
        conv, bn = pairs[-1]
        if self.order == "bnafter":  # its last BN comes after the addition
            return conv(a)
        out = bn(conv(a))
        return self.relu(out) if self.order == "relubefore" else out

    def merge(self, shortcut: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The addition; Table 1's variants weigh its two terms."""
        return shortcut + residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "preact":
            a = self.relu(self.bn1(x))
        elif self.order == "relupreact":
            a = F.relu(x)  # not in place: x may be the shortcut
        else:
            a = x
        out = self.merge(self.shortcut(a if self.shares else x), self.residual(a), x)
        if self.order == "original":
            return self.relu(out)
        if self.order == "bnafter":
            return self.relu(self.convs_and_bns()[-1][1](out))
        return out

    def response_layer(self) -> nn.Module:
        """F's last layer, as it is added: its last BN, or its last conv where no BN follows it."""
        conv, bn = self.convs_and_bns()[-1]
        return conv if self.order in ("preact", "bnafter") else bn


class ScaledUnit(ResidualUnit):
    """Table 1's constant scaling: x' = ReLU(λ shortcut(x) + μ F(x))."""

    def __init__(self, *args, shortcut_scale: float, branch_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.shortcut_scale, self.branch_scale = shortcut_scale, branch_scale

    def extra_repr(self) -> str:
        return f"shortcut_scale={self.shortcut_scale}, branch_scale={self.branch_scale}"

    def merge(self, shortcut: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_scale * shortcut + self.branch_scale * residual


class GatedUnit(ResidualUnit):
    """Table 1's gating, g(x) = sigmoid(W_g x + b_g) with W_g a 1x1 conv of the unit's input and its
    bias initialised to b_g: exclusive x' = ReLU((1 - g) shortcut(x) + g F(x)), shortcut-only
    x' = ReLU((1 - g) shortcut(x) + F(x)). One gate per channel and position (`per_channel`), or one
    per position."""

    def __init__(self, in_planes: int, planes: int, stride: int, *args, gate_bias: float, exclusive: bool,
                 per_channel: bool = True, **kwargs):
        super().__init__(in_planes, planes, stride, *args, **kwargs)
        self.exclusive = exclusive
        self.gate = nn.Conv2d(in_planes, planes if per_channel else 1, 1, stride=stride, bias=True)
        nn.init.constant_(self.gate.bias, gate_bias)  # the net's He init redraws the weight only

    def merge(self, shortcut: torch.Tensor, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(x))
        return (1 - g) * shortcut + (g * residual if self.exclusive else residual)


class CifarResNet2016(nn.Module):
    """A 3x3 conv stem, three stages of n units on 32/16/8-pixel maps (16/32/64 channels; 64/128/256
    out of bottlenecks), global average pooling, a linear layer. A pre-activation net ('preact'
    order) has conv1 alone as its stem, the first unit's BN-ReLU being "the activation right after
    conv1", and an extra BN-ReLU after the last unit (the paper's Appendix). The other orders keep the
    2015 stem (conv, BN, ReLU); ReLU-only pre-activation adds a ReLU after the last unit.

    Depth counts the weighted layers on the main path, 3 * (layers per unit) * n + 2 (110: basic,
    n = 18; 164, 1001: bottleneck, n = 18, 111); gates and 1x1 shortcuts are not counted, as the
    2015 option B projections were not."""

    def __init__(self, arch: str, depth: int, shortcut: str | None = None, num_classes: int = 10,
                 bn_batch_size: int | None = None, **options):
        super().__init__()
        check_depth(arch, depth, shortcut)
        spec = ARCHS[arch]
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise TypeError(f"{arch} takes no option {', '.join(unknown)}"
                            + (f" (its options: {', '.join(spec.options)})" if spec.options else ""))
        self.arch, self.depth, self.order, self.variant = arch, depth, spec.order, spec.variant
        self.shortcut = shortcut or ("B" if spec.unit == "bottleneck" else "A")
        self.options = {**spec.options, **options}
        check_options(self.options)
        self.kernels = KERNELS[spec.unit]
        n = (depth - 2) // (3 * len(self.kernels))
        widths = (64, 128, 256) if spec.unit == "bottleneck" else (16, 32, 64)
        preact = self.order == "preact"
        norm = norm_layer(bn_batch_size)
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        if not preact:
            self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n, 1, norm)
        self.layer2 = self._make_layer(widths[1], n, 2, norm)
        self.layer3 = self._make_layer(widths[2], n, 2, norm)
        if preact:
            self.bn = norm(widths[2])  # the extra activation after the last unit's addition
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
        layers = []
        for i, s in enumerate([stride] + [1] * (blocks - 1)):
            layers.append(self._unit(self.in_planes, planes, s, norm, shares=i == 0))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def _unit(self, in_planes: int, planes: int, stride: int, norm, shares: bool) -> ResidualUnit:
        o = self.options
        varied = self.variant is not None and (o["at_shape_change"] or (stride == 1 and in_planes == planes))
        args = (in_planes, planes, stride, self.kernels, self.order,
                self._shortcut(in_planes, planes, stride, norm, varied), norm, shares,
                1 if o.get("stride_in") == "conv2" else 0)
        if varied and self.variant == "scaling":
            return ScaledUnit(*args, shortcut_scale=o["shortcut_scale"], branch_scale=o["branch_scale"])
        if varied and self.variant in ("exclusivegating", "shortcutgating"):
            return GatedUnit(*args, gate_bias=o["gate_bias"], exclusive=self.variant == "exclusivegating",
                             per_channel=o["gate_per_channel"])
        return ResidualUnit(*args)

    def _shortcut(self, in_planes: int, planes: int, stride: int, norm, varied: bool) -> nn.Module:
        if varied and self.variant == "convshortcut":
            return projection(in_planes, planes, stride, norm)
        if stride == 1 and in_planes == planes:
            identity = nn.Identity()
        elif self.shortcut == "A":
            identity = PadShortcut(planes)
        else:  # no BN on a pre-activation net's projection: the official code's
            identity = projection(in_planes, planes, stride, None if self.order == "preact" else norm)
        if varied and self.variant == "dropoutshortcut":
            dropout = ShortcutDropout(self.options["dropout"], self.options["dropout_rescale"])
            return dropout if isinstance(identity, nn.Identity) else nn.Sequential(identity, dropout)
        return identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.order != "preact":
            x = self.relu(self.bn1(x))
        x = stages(self, x)
        if self.order == "preact":
            x = self.relu(self.bn(x))
        elif self.order == "relupreact":
            x = self.relu(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def response_layers(self) -> list[nn.Module]:
        """Fig. 7 for these nets: each unit's residual function F as it is added (after its last BN
        where one follows the last conv, before any ReLU), one per unit in network order. The 2015
        nets record every 3x3 layer instead (models.response_layers)."""
        return [unit.response_layer() for layer in (self.layer1, self.layer2, self.layer3) for unit in layer]


def check_depth(arch: str, depth: int, shortcut: str | None = None) -> None:
    """Raise ValueError unless `arch` is one of ARCHS, `depth` fits its unit, and `shortcut` its
    shape changes: 'A' (zero-padded identity) or 'B' (1x1 projection) on basic and one-layer units,
    projections only on bottlenecks; None is 'A' or 'B' as the paper has it."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    unit = ARCHS[arch].unit
    k = 3 * len(KERNELS[unit])
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < k + 2 or (depth - 2) % k:
        examples = {"basic": "20, 56, 110", "bottleneck": "164, 1001", "onelayer": "56, 110"}[unit]
        raise ValueError(f"{arch} has {unit} units ({k // 3} weighted layer(s) each, in 3 stages): depth must be "
                         f"{k}n+2 with n >= 1 ({examples}, ...), got {depth!r}")
    if unit == "bottleneck" and shortcut not in (None, "B"):
        raise ValueError(f"{arch} has bottleneck units, whose shape changes go through 1x1 projections: "
                         f"shortcut must be 'B' (or None, its own: null in params.yaml, --shortcut null), got {shortcut!r}")
    if shortcut not in (None, "A", "B"):
        raise ValueError(f"shortcut must be 'A' (identity, zero-padded) or 'B' (1x1 projection), got {shortcut!r}")


def check_options(options: dict) -> None:
    """Raise ValueError for an option value that names no net."""
    if options.get("stride_in", "conv1") not in ("conv1", "conv2"):
        raise ValueError(f"stride_in must be 'conv1' (the first 1x1 conv, the official code's) or 'conv2' "
                         f"(the 3x3), got {options['stride_in']!r}")
    if not 0 <= options.get("dropout", 0) < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {options['dropout']!r}")


def table1(row: str, depth: int = 110, **kwargs) -> nn.Module:
    """A row of Table 1 as a net, e.g. table1("exclusive gating b_g=-6")."""
    if row not in TABLE1:
        raise KeyError(f"Table 1 has no row {row!r}; its rows: {', '.join(TABLE1)}")
    return build(TABLE1[row], depth, **kwargs)
