"""The networks: the paper's parameter counts, option A/B shortcuts, layout, init, Fig. 7 hooks."""

import hashlib

import pytest
import torch
from torch import nn

from replicate import models
from replicate.models import build, load_by_order, record_responses, response_layers

# Exact counts with option A (Table 6 rounds them to 0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", PARAMS)
def test_parameter_counts_match_the_paper_and_plain_equals_resnet(depth):
    assert n_params(build("plain", depth)) == PARAMS[depth]
    assert n_params(build("resnet", depth)) == PARAMS[depth]


def test_option_b_adds_projections():
    assert n_params(build("resnet", 20, shortcut="B")) == 272_474


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="vgg", depth=20), "arch must be 'plain' or 'resnet'"),
    (dict(arch="resnet", depth=21), "6n\\+2"),
    (dict(arch="resnet", depth=2), "6n\\+2"),
    (dict(arch="resnet", depth=20.0), "6n\\+2"),
    (dict(arch="resnet", depth=20, shortcut="C"), "shortcut must be 'A'"),
])
def test_bad_arguments_raise_value_error_stating_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_builders_are_the_general_class():
    for name in ("plain20", "plain56", "resnet20", "resnet110"):
        model = getattr(models, name)()
        assert (model.arch, model.depth) == (name.rstrip("0123456789"), int(name.lstrip("plainresnet")))


@pytest.mark.parametrize("arch", ["plain", "resnet"])
def test_forward_gives_ten_logits(arch):
    assert build(arch, 20)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_subsamples_and_zero_pads_planes_over_four_each_side():
    x = torch.randn(2, 16, 32, 32)
    y = models.PadShortcut(32)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_plain_and_resnet_differ_only_by_the_shortcut():
    resnet, plain = build("resnet", 20), build("plain", 20)
    plain.load_state_dict(resnet.state_dict())  # same tensors, same names
    resnet.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(resnet(x), plain(x))
    for block in plain.layer1:
        block.residual = True
    for block in [*plain.layer2, *plain.layer3]:
        block.residual, block.shortcut = True, models.PadShortcut(block.conv1.out_channels) \
            if block.conv1.stride == (2, 2) else nn.Identity()
    assert torch.allclose(resnet(x), plain(x))


def test_parameters_are_registered_in_forward_order():
    model = build("resnet", 8)
    kinds = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    assert kinds == ["Conv2d", "BatchNorm2d"] + ["Conv2d", "BatchNorm2d"] * 6 + ["Linear"]
    names = [k for k in model.state_dict() if k.endswith("weight")]
    assert names[:6] == ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                         "layer1.0.conv2.weight", "layer1.0.bn2.weight"]
    assert names[-1] == "fc.weight"


def test_he_init_no_conv_bias_no_dropout_bn_after_every_conv():
    torch.manual_seed(0)
    model = build("plain", 56)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert len(convs) == len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 55
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    w = model.layer3[1].conv1.weight  # 64x64x3x3: He std = sqrt(2 / (9 * 64))
    assert w.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.03)


def test_record_responses_gives_each_3x3_layer_std_in_network_order():
    torch.manual_seed(0)
    model = build("resnet", 14).eval()
    x = torch.randn(8, 3, 32, 32)
    outputs = []
    handles = [bn.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
               for bn in response_layers(model)]
    model(x)
    for h in handles:
        h.remove()
    with record_responses(model) as stds:
        model(x[:5])
        model(x[5:])  # accumulated over batches
    assert len(stds) == 14 - 1  # every weighted layer but the final linear one
    expected = [o.double().std(unbiased=False).item() for o in outputs]
    assert stds == pytest.approx(expected, rel=1e-6)
    assert not model.layer1[0].bn1._forward_hooks  # hooks are removed


def test_recording_makes_no_tensor_from_host_data_per_batch(monkeypatch):
    """On a GPU each torch.tensor(numel, device=...) in the hook was a host-to-device copy and a
    sync, once per BN layer per batch (about 550 for ResNet-56's pass over the test set)."""
    from replicate import models

    model, made, real = build("resnet", 8).eval(), [], torch.tensor
    monkeypatch.setattr(models.torch, "tensor", lambda *a, **k: made.append(k.get("device")) or real(*a, **k))
    with torch.no_grad(), record_responses(model) as stds:
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    assert made == [] and len(stds) == 7


def test_record_responses_without_a_forward_pass_is_an_error():
    with pytest.raises(RuntimeError, match="no forward pass"):
        with record_responses(build("resnet", 8)):
            pass


def published_layout(model: nn.Module) -> dict:
    """Our state dict renamed the way the popular PyTorch port saves it."""
    return {"module." + k.replace("fc.", "linear."): v.clone() for k, v in model.state_dict().items()}


def test_load_by_order_loads_the_published_checkpoint_layout():
    torch.manual_seed(1)
    source = build("resnet", 20)
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):  # make running stats non-trivial
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    target = load_by_order(build("resnet", 20), published_layout(source))
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(source.eval()(x), target.eval()(x))


def test_load_by_order_rejects_another_architecture_by_name():
    with pytest.raises(ValueError, match="different architecture or depth"):
        load_by_order(build("resnet", 20), published_layout(build("resnet", 32)))
    with pytest.raises(ValueError, match="different architecture"):
        load_by_order(build("resnet", 20), published_layout(build("resnet", 20, num_classes=100)))


# sha256 (first 16 hex digits) of every initial tensor, names and bytes in state-dict order, of each
# 2015 net built after torch.manual_seed(0), and the next draw of the RNG: computed from the code
# before the 2016 nets came (commit 9508d80). A change to the classes, the order of registration or
# of initialisation shows here. Plain nets have no shortcut tensors: A and B are the same net.
INITIAL_WEIGHTS = {
    ("plain", 20, "A"): ("ddf1ff18afc6998c", 0.7549993991851807),
    ("plain", 32, "A"): ("806e2fbea538314e", 0.7104988694190979),
    ("plain", 44, "A"): ("d19803c68cb4c20b", 0.1141018271446228),
    ("plain", 56, "A"): ("ad6141c91fb3c661", 0.2676377296447754),
    ("plain", 110, "A"): ("32399eb195b1ce76", 0.8304648399353027),
    ("plain", 1202, "A"): ("0c9eded71293cd07", 0.8998039960861206),
    ("plain", 20, "B"): ("ddf1ff18afc6998c", 0.7549993991851807),
    ("resnet", 20, "A"): ("ddf1ff18afc6998c", 0.7549993991851807),
    ("resnet", 32, "A"): ("806e2fbea538314e", 0.7104988694190979),
    ("resnet", 44, "A"): ("d19803c68cb4c20b", 0.1141018271446228),
    ("resnet", 56, "A"): ("ad6141c91fb3c661", 0.2676377296447754),
    ("resnet", 110, "A"): ("32399eb195b1ce76", 0.8304648399353027),
    ("resnet", 1202, "A"): ("0c9eded71293cd07", 0.8998039960861206),
    ("resnet", 20, "B"): ("8ffd1d5d25cadde7", 0.9832592010498047),
    ("resnet", 32, "B"): ("255a1d11551074c6", 0.5600237846374512),
    ("resnet", 44, "B"): ("05a833392256d0ab", 0.9406148195266724),
    ("resnet", 56, "B"): ("c0cd85145616b184", 0.22517943382263184),
    ("resnet", 110, "B"): ("25ee79237a1f1355", 0.2811242341995239),
    ("resnet", 1202, "B"): ("3367bcbb8ddad107", 0.6073118448257446),
}


def initial_checksum(arch: str, depth: int, shortcut: str, **kwargs) -> tuple[str, float]:
    torch.manual_seed(0)
    model = build(arch, depth, shortcut=shortcut, **kwargs)
    digest = hashlib.sha256()
    for k, v in model.state_dict().items():
        digest.update(k.encode())
        digest.update(v.contiguous().numpy().tobytes())
    assert type(model) is models.CifarResNet
    assert {type(b) for layer in (model.layer1, model.layer2, model.layer3) for b in layer} == {models.BasicBlock}
    return digest.hexdigest()[:16], torch.rand(1).item()


@pytest.mark.parametrize("arch, depth, shortcut", INITIAL_WEIGHTS)
def test_2015_nets_initialise_bitwise_as_before(arch, depth, shortcut):
    assert initial_checksum(arch, depth, shortcut) == INITIAL_WEIGHTS[arch, depth, shortcut]
    # the BN of the paper's two GPUs (bn_batch_size) draws nothing more
    assert initial_checksum(arch, depth, shortcut, bn_batch_size=64) == INITIAL_WEIGHTS[arch, depth, shortcut]
