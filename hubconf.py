"""torch.hub entry points for the paper's CIFAR-10 nets (He et al. 2015, section 4.2), and the
sequel's ResNet-110, -164 and -1001 (He et al. 2016, Table 3: pre-activation and original units;
`num_classes=100` builds one for CIFAR-100; with weights, the weights' classes are taken).

    model = torch.hub.load("path/to/checkout", "resnet56", source="local",
                           weights="resnet-56-0-1a2b3c4d.pt", sha256="1a2b3c4d...")

Without `weights` a net comes freshly initialised. `weights` is a file or an http(s) URL
(downloaded into torch.hub.get_dir()/checkpoints/), checked by `sha256` where given: an export of
`python -m replicate.export` (its per-pixel input mean is `model.meta["mean"]`) or the PyTorch
port's `.th` (loaded by order). Weights of another depth, arch, shortcut or number of classes are
refused; loaded weights come in eval mode. Any other net of the papers (a 2016 grid's Table 1 and 2
variants, other depths) loads with `replicate.weights.load(arch, depth, weights)`. Everything is in replicate/weights.py (it needs torch alone).
"""

from replicate.weights import load as _load

dependencies = ["torch"]


def resnet20(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-20 for CIFAR-10 (0.27M parameters; Table 6: 8.75% test error). weights=, sha256=."""
    return _load("resnet", 20, weights, sha256=sha256, progress=progress, **kwargs)


def resnet32(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-32 for CIFAR-10 (0.46M parameters; Table 6: 7.51%). weights=, sha256=."""
    return _load("resnet", 32, weights, sha256=sha256, progress=progress, **kwargs)


def resnet44(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-44 for CIFAR-10 (0.66M parameters; Table 6: 7.17%). weights=, sha256=."""
    return _load("resnet", 44, weights, sha256=sha256, progress=progress, **kwargs)


def resnet56(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-56 for CIFAR-10 (0.85M parameters; Table 6: 6.97%). weights=, sha256=."""
    return _load("resnet", 56, weights, sha256=sha256, progress=progress, **kwargs)


def resnet110(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-110 for CIFAR-10 (1.7M parameters; Table 6: 6.43%, 6.61±0.16 over 5 runs). weights=, sha256=."""
    return _load("resnet", 110, weights, sha256=sha256, progress=progress, **kwargs)


def resnet1202(weights=None, sha256=None, progress=True, **kwargs):
    """ResNet-1202 for CIFAR-10 (19.4M parameters; Table 6: 7.93%). weights=, sha256=."""
    return _load("resnet", 1202, weights, sha256=sha256, progress=progress, **kwargs)


def plain20(weights=None, sha256=None, progress=True, **kwargs):
    """Plain-20 for CIFAR-10, no shortcuts (0.27M parameters; Fig. 6). weights=, sha256=."""
    return _load("plain", 20, weights, sha256=sha256, progress=progress, **kwargs)


def plain32(weights=None, sha256=None, progress=True, **kwargs):
    """Plain-32 for CIFAR-10, no shortcuts (0.46M parameters; Fig. 6). weights=, sha256=."""
    return _load("plain", 32, weights, sha256=sha256, progress=progress, **kwargs)


def plain44(weights=None, sha256=None, progress=True, **kwargs):
    """Plain-44 for CIFAR-10, no shortcuts (0.66M parameters; Fig. 6). weights=, sha256=."""
    return _load("plain", 44, weights, sha256=sha256, progress=progress, **kwargs)


def plain56(weights=None, sha256=None, progress=True, **kwargs):
    """Plain-56 for CIFAR-10, no shortcuts (0.85M parameters; Fig. 1 and 6). weights=, sha256=."""
    return _load("plain", 56, weights, sha256=sha256, progress=progress, **kwargs)


def plain110(weights=None, sha256=None, progress=True, **kwargs):
    """Plain-110 for CIFAR-10, no shortcuts (1.7M parameters; over 60% error in the paper). weights=, sha256=."""
    return _load("plain", 110, weights, sha256=sha256, progress=progress, **kwargs)


def preact_resnet110(weights=None, sha256=None, progress=True, num_classes=None, **kwargs):
    """Pre-activation ResNet-110, basic units (He et al. 2016, Table 3: 1.7M parameters, 6.37%). weights=, sha256=."""
    return _load("preact", 110, weights, sha256=sha256, progress=progress, num_classes=num_classes, **kwargs)


def preact_resnet164(weights=None, sha256=None, progress=True, num_classes=None, **kwargs):
    """Pre-activation ResNet-164, bottleneck units (2016, Table 3: 1.7M parameters, 5.46%; CIFAR-100 24.33%)."""
    return _load("preactbottleneck", 164, weights, sha256=sha256, progress=progress, num_classes=num_classes,
                 **kwargs)


def preact_resnet1001(weights=None, sha256=None, progress=True, num_classes=None, **kwargs):
    """Pre-activation ResNet-1001, bottleneck units (2016, Table 3: 10.2M parameters, 4.92%; CIFAR-100 22.71%)."""
    return _load("preactbottleneck", 1001, weights, sha256=sha256, progress=progress, num_classes=num_classes,
                 **kwargs)


def resnet164(weights=None, sha256=None, progress=True, num_classes=None, **kwargs):
    """ResNet-164 of original bottleneck units (2016, Table 3: 5.93%; CIFAR-100 25.16%). weights=, sha256=."""
    return _load("bottleneck", 164, weights, sha256=sha256, progress=progress, num_classes=num_classes, **kwargs)


def resnet1001(weights=None, sha256=None, progress=True, num_classes=None, **kwargs):
    """ResNet-1001 of original bottleneck units (2016, Table 3: 7.61%; CIFAR-100 27.82%). weights=, sha256=."""
    return _load("bottleneck", 1001, weights, sha256=sha256, progress=progress, num_classes=num_classes, **kwargs)
