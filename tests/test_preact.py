"""The 2016 nets (replicate/preact.py): the paper's parameter counts, Table 2's orders as its
formulas read, the stem, shared activation and head of pre-activation nets, Table 1's variants,
the torch.hub entry points, and the 2015 nets left as they were."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from replicate import preact, weights
from replicate.batchnorm import GroupBatchNorm2d
from replicate.models import PadShortcut, build, check_depth, record_responses, response_layers
from replicate.packed import PackedResNet

ROOT = Path(__file__).resolve().parent.parent


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def n_params_without_bn(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm2d)
               for p in m.parameters(recurse=False))


# --- parameter counts ----------------------------------------------------------------------------

# PAPER2016.md's exact counts (the paper: 1.7M, 1.7M, 10.2M), and their CIFAR-100 versions.
PREACT = [("preact", 110, 10, 1_727_962), ("preactbottleneck", 164, 10, 1_703_258),
          ("preactbottleneck", 1001, 10, 10_327_706), ("preactbottleneck", 164, 100, 1_726_388),
          ("preactbottleneck", 1001, 100, 10_350_836)]


@pytest.mark.parametrize("arch, depth, classes, count", PREACT)
def test_pre_activation_nets_have_the_papers_parameter_counts(arch, depth, classes, count):
    assert n_params(build(arch, depth, num_classes=classes)) == count


def test_resnet1001_without_bn_is_the_papers_10_2m():
    for arch in ("preactbottleneck", "bottleneck"):  # the same convs and fc; only the BNs differ
        assert n_params_without_bn(build(arch, 1001)) == 10_178_490


# Original units: ResNet-110 is the 2015 net (PAPER2016.md's 1,727,962 with option A). The original
# bottleneck nets have 896 more than the pre-activation ones: BN on their three projections,
# 2 * (64 + 128 + 256) (the BNs of the stem and of the stage-starting units weigh the same).
ORIGINAL = [("resnet", 110, 10, 1_727_962), ("bottleneck", 164, 10, 1_703_258 + 896),
            ("bottleneck", 1001, 10, 10_327_706 + 896), ("bottleneck", 164, 100, 1_726_388 + 896),
            ("bottleneck", 1001, 100, 10_350_836 + 896)]


@pytest.mark.parametrize("arch, depth, classes, count", ORIGINAL)
def test_original_unit_nets_parameter_counts(arch, depth, classes, count):
    assert n_params(build(arch, depth, num_classes=classes)) == count


@pytest.mark.parametrize("row", preact.TABLE2)
def test_table2_orders_have_the_same_components(row):
    """ "All these units consist of the same components; only the orders are different": every
    order has the original net's count (full pre-activation: the same for 110, not for 164, whose
    projections have no BN)."""
    net110, net164 = preact.TABLE2[row]
    assert n_params(build(net110, 110)) == 1_727_962
    assert n_params(build(net164, 164)) == (1_703_258 if row == "full pre-activation" else 1_704_154)


# Table 1's variants on ResNet-110 (the spec gives no counts: these are worked out by hand).
# A gate is a 1x1 conv with bias, in -> out channels, on all 54 units: 18 * (16*16 + 16)
# + (16*32 + 32) + 17 * (32*32 + 32) + (32*64 + 64) + 17 * (64*64 + 64) = 96,224 more.
# A 1x1 conv shortcut is a conv and a BN: 18 * (16*16 + 32) + (16*32 + 64) + 17 * (32*32 + 64)
# + (32*64 + 128) + 17 * (64*64 + 128) = 98,240 more. Scaling and dropout add nothing.
TABLE1_COUNTS = {"original": 1_727_962, "constant scaling 0, 1": 1_727_962, "constant scaling 0.5, 1": 1_727_962,
                 "constant scaling 0.5, 0.5": 1_727_962, "exclusive gating b_g=0": 1_824_186,
                 "exclusive gating b_g=-5": 1_824_186, "exclusive gating b_g=-6": 1_824_186,
                 "exclusive gating b_g=-7": 1_824_186, "shortcut-only gating b_g=0": 1_824_186,
                 "shortcut-only gating b_g=-6": 1_824_186, "1x1 conv shortcut": 1_826_202,
                 "dropout shortcut": 1_727_962}


def test_table1_rows_are_nets_with_their_counts():
    assert set(preact.TABLE1) == set(TABLE1_COUNTS)
    for row, count in TABLE1_COUNTS.items():
        model = preact.table1(row)
        assert (model.depth, n_params(model)) == (110, count), row
        if row.endswith("gating b_g=-7"):
            assert all((m.gate.bias == -7).all() for m in model.modules() if isinstance(m, preact.GatedUnit))
    with pytest.raises(KeyError, match="Table 1 has no row 'gating'"):
        preact.table1("gating")


# --- names, depths, options ----------------------------------------------------------------------

def test_arch_names_are_run_names_arch_part():
    from replicate.pipeline import Run

    for arch in preact.ARCHS:
        assert Run.parse(f"{arch}-110-3") == Run(arch, 110, 3)
    assert not set(preact.ARCHS) & {"plain", "resnet"}


@pytest.mark.parametrize("arch, depth, match", [
    ("preact", 111, r"preact has basic units .*: depth must be 6n\+2"),
    ("preactbottleneck", 170, r"bottleneck units .*: depth must be 9n\+2 .*164, 1001"),
    ("bottleneck", 8, r"9n\+2 with n >= 1"),
    ("preactonelayer", 6, r"3n\+2"),
    ("preact", 110.0, r"6n\+2"),
    ("preresnet", 110, r"arch must be 'plain' or 'resnet' .* preact, bnafter"),
])
def test_a_depth_the_unit_cannot_have_is_a_clear_error(arch, depth, match):
    with pytest.raises(ValueError, match=match):
        check_depth(arch, depth)
    with pytest.raises(ValueError, match=match):
        build(arch, depth)


def test_packing_refuses_the_2016_nets():
    with pytest.raises(ValueError, match="packing covers the 2015 nets"):
        PackedResNet("preact", 20, 2)


def test_shortcuts_and_options_are_checked():
    with pytest.raises(ValueError, match="bottleneck units, whose shape changes go through 1x1 projections"):
        build("preactbottleneck", 164, shortcut="A")
    assert build("preactbottleneck", 164, shortcut="B").shortcut == "B"
    with pytest.raises(TypeError, match=r"preact takes no option stride_in"):
        build("preact", 110, stride_in="conv2")
    with pytest.raises(TypeError, match=r"resnet takes no option gate_bias"):
        build("resnet", 110, gate_bias=-6.0)
    with pytest.raises(ValueError, match="stride_in must be 'conv1'"):
        build("bottleneck", 164, stride_in="3x3")
    with pytest.raises(ValueError, match=r"dropout must be a probability"):
        build("dropoutshortcut", 20, dropout=1.0)


def test_bottleneck_stride_sits_on_the_first_1x1_conv_or_on_the_3x3():
    for stride_in, strides in (("conv1", (2, 1, 1)), ("conv2", (1, 2, 1))):
        unit = build("preactbottleneck", 20, stride_in=stride_in).layer2[0]
        assert tuple(c.stride[0] for c in (unit.conv1, unit.conv2, unit.conv3)) == strides
        assert unit.shortcut[0].stride == (2, 2) and len(unit.shortcut) == 1  # a projection, no BN


def test_bn_batch_size_gives_group_batchnorm_everywhere():
    model = build("preactbottleneck", 20, bn_batch_size=64)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, GroupBatchNorm2d) and m.group_size == 64 for m in bns)


# --- the units: Table 2's formulas ---------------------------------------------------------------

def randomised(module: nn.Module) -> nn.Module:
    """Eval mode with BN statistics and affine parameters away from the identity, so that a BN in
    the wrong place shows."""
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5), m.running_var.uniform_(0.5, 2)
            nn.init.normal_(m.weight, 1, 0.3), nn.init.normal_(m.bias, 0, 0.3)
    return module.eval()


relu = F.relu


# x' in the paper's notation, with the unit's own layers (a basic unit inside a stage).
TABLE2_BASIC = {
    "original": lambda u, x: relu(x + u.bn2(u.conv2(relu(u.bn1(u.conv1(x)))))),
    "bnafter": lambda u, x: relu(u.bn2(x + u.conv2(relu(u.bn1(u.conv1(x)))))),
    "relubefore": lambda u, x: x + relu(u.bn2(u.conv2(relu(u.bn1(u.conv1(x)))))),
    "relupreact": lambda u, x: x + u.bn2(u.conv2(relu(u.bn1(u.conv1(relu(x)))))),
    "preact": lambda u, x: x + u.conv2(relu(u.bn2(u.conv1(relu(u.bn1(x)))))),
}


@pytest.mark.parametrize("order", preact.ORDERS)
def test_basic_units_follow_table2(order):
    arch = "resnet" if order == "original" else order
    model = randomised(build(arch, 20))
    x = torch.randn(2, 16, 32, 32)
    unit = model.layer1[1]
    with torch.no_grad():
        assert torch.allclose(unit(x.clone()), TABLE2_BASIC[order](unit, x), atol=1e-6)


TABLE2_BOTTLENECK = {
    "original": lambda u, x: relu(x + u.bn3(u.conv3(relu(u.bn2(u.conv2(relu(u.bn1(u.conv1(x))))))))),
    "bnafter": lambda u, x: relu(u.bn3(x + u.conv3(relu(u.bn2(u.conv2(relu(u.bn1(u.conv1(x))))))))),
    "relubefore": lambda u, x: x + relu(u.bn3(u.conv3(relu(u.bn2(u.conv2(relu(u.bn1(u.conv1(x))))))))),
    "relupreact": lambda u, x: x + u.bn3(u.conv3(relu(u.bn2(u.conv2(relu(u.bn1(u.conv1(relu(x))))))))),
    "preact": lambda u, x: x + u.conv3(relu(u.bn3(u.conv2(relu(u.bn2(u.conv1(relu(u.bn1(x))))))))),
}


@pytest.mark.parametrize("order", preact.ORDERS)
def test_bottleneck_units_follow_table2(order):
    model = randomised(build("bottleneck" if order == "original" else order + "bottleneck", 20))
    unit = model.layer2[1]
    assert (unit.conv1.in_channels, unit.conv1.out_channels, unit.conv2.kernel_size, unit.conv3.out_channels) \
        == (128, 32, (3, 3), 128)  # C -> C/4 -> C/4 -> C
    x = torch.randn(2, 128, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unit(x.clone()), TABLE2_BOTTLENECK[order](unit, x), atol=1e-5)


def test_stage_start_activates_once_before_the_split():
    """Pre-activation: where a stage starts, the shortcut (option A or a projection) gets act(x)."""
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        unit = randomised(build("preact", 20)).layer2[0]
        a = relu(unit.bn1(x))
        assert torch.allclose(unit(x), PadShortcut(32)(a) + unit.conv2(relu(unit.bn2(unit.conv1(a)))), atol=1e-6)
        unit = randomised(build("preact", 20, shortcut="B")).layer2[0]
        a = relu(unit.bn1(x))
        assert torch.allclose(unit(x), unit.shortcut(a) + unit.conv2(relu(unit.bn2(unit.conv1(a)))), atol=1e-6)
        unit = randomised(build("preactbottleneck", 20)).layer1[0]  # 16 -> 64: the net's first unit
        a = relu(unit.bn1(x))
        residual = unit.conv3(relu(unit.bn3(unit.conv2(relu(unit.bn2(unit.conv1(a)))))))
        assert torch.allclose(unit(x), unit.shortcut(a) + residual, atol=1e-6)


def test_pre_activation_stem_is_conv1_alone_and_head_adds_bn_relu():
    """conv1, then the first unit's BN ("the activation right after conv1"), ..., the extra BN
    after the last unit, fc: in forward order, as the official code registers them."""
    model = build("preactbottleneck", 164)
    keys = [k for k in model.state_dict() if k.endswith("weight")]
    assert keys[:3] == ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight"]
    assert keys[-4:] == ["layer3.17.bn3.weight", "layer3.17.conv3.weight", "bn.weight", "fc.weight"]
    assert model.layer1[0].bn1.num_features == 16 and model.bn.num_features == 256
    assert not hasattr(model, "bn1")
    assert [u.shares for u in model.layer2][:2] == [True, False]
    original = build("bottleneck", 164)
    assert original.bn1.num_features == 16 and not hasattr(original, "bn")
    assert [type(m).__name__ for m in original.layer1[0].shortcut] == ["Conv2d", "BatchNorm2d"]


def test_resnet1001_forward():
    """In training mode: an untrained net's BN statistics (mean 0, variance 1) let the identity path
    grow unit after unit in eval mode (about 1.3 times a unit), to inf and NaN before the last one."""
    model = build("preactbottleneck", 1001)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# --- Table 1's variants --------------------------------------------------------------------------

def twins(arch: str, **options):
    """ResNet-20 (2015) and a Table 1 variant holding its weights, in eval mode."""
    resnet = randomised(build("resnet", 20))
    variant = build(arch, 20, **options)
    missing, unexpected = variant.load_state_dict(resnet.state_dict(), strict=False)
    assert not unexpected and all(".gate." in k for k in missing)
    return resnet, variant.eval()


@pytest.mark.parametrize("arch, options, scale", [
    ("scaling05x05", dict(shortcut_scale=1.0, branch_scale=1.0), 1.0),       # the original unit
    ("shortcutgating0", dict(gate_bias=-1e4), 1.0),                      # g = 0: the original unit
    ("dropoutshortcut", dict(dropout=0.0), 1.0),
    ("dropoutshortcut", dict(dropout=0.5), 0.5),                        # evaluation: scaled by 1 - p
])
def test_variants_reduce_to_the_original_unit(arch, options, scale):
    resnet, variant = twins(arch, **options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if scale == 1.0:
            assert torch.allclose(variant(x), resnet(x), atol=1e-5)
        else:
            unit, ref = variant.layer2[1], resnet.layer2[1]
            h = torch.randn(2, 32, 16, 16)
            assert torch.allclose(unit(h), relu(scale * h + ref.bn2(ref.conv2(relu(ref.bn1(ref.conv1(h)))))),
                                  atol=1e-6)


def test_gates_are_1x1_convs_of_the_unit_input_biased_to_b_g():
    model = build("exclusivegatingneg6", 20)
    gate = model.layer2[0].gate
    assert (gate.in_channels, gate.out_channels, gate.kernel_size, gate.stride) == (16, 32, (1, 1), (2, 2))
    assert (gate.bias == -6.0).all()
    assert build("exclusivegatingneg6", 20, gate_per_channel=False).layer2[1].gate.out_channels == 1
    assert build("shortcutgating0", 20).layer1[0].gate.bias.eq(0).all()  # Fig. 3's b_g = 0
    unit = randomised(model).layer1[1]
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        g = torch.sigmoid(unit.gate(x))
        f = unit.bn2(unit.conv2(relu(unit.bn1(unit.conv1(x)))))
        assert torch.allclose(unit(x), relu((1 - g) * x + g * f), atol=1e-6)


def test_variants_at_shape_change_or_not():
    every, others = build("convshortcut", 20), build("convshortcut", 20, at_shape_change=False)
    assert isinstance(every.layer2[0].shortcut[0], nn.Conv2d) and isinstance(every.layer2[1].shortcut[0], nn.Conv2d)
    assert isinstance(others.layer2[0].shortcut, PadShortcut) and isinstance(others.layer2[1].shortcut[0], nn.Conv2d)
    assert type(build("exclusivegating0", 20, at_shape_change=False).layer3[0]) is preact.ResidualUnit


def test_dropout_shortcut_keeps_or_drops_unscaled_in_training():
    drop = preact.ShortcutDropout(0.5).train()
    x = torch.rand(10_000) + 1
    y = drop(x)
    assert set(torch.unique(y / x).tolist()) == {0.0, 1.0} and 0.45 < (y > 0).float().mean() < 0.55
    assert torch.equal(drop.eval()(x), 0.5 * x)
    inverted = preact.ShortcutDropout(0.5, rescale=True).train()
    assert set(torch.unique(inverted(x) / x).tolist()) == {0.0, 2.0}
    assert torch.equal(inverted.eval()(x), x)


# --- Fig. 7 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, layer", [("preact", nn.Conv2d), ("bnafter", nn.Conv2d), ("relubefore", nn.BatchNorm2d),
                                         ("preactbottleneck", nn.Conv2d), ("bottleneck", nn.BatchNorm2d)])
def test_record_responses_records_each_units_residual_function(arch, layer):
    torch.manual_seed(0)
    model = build(arch, 20).eval()
    layers = response_layers(model)
    assert len(layers) == len([*model.layer1, *model.layer2, *model.layer3])
    assert all(type(m) is layer for m in layers)
    assert layers[-1] is model.layer3[-1].convs_and_bns()[-1][0 if layer is nn.Conv2d else 1]
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone())) for m in layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    with torch.no_grad(), record_responses(model) as stds:
        model(x)
    assert stds == pytest.approx([o.double().std(unbiased=False).item() for o in outputs], rel=1e-6)


# --- torch.hub -----------------------------------------------------------------------------------

HUB = {"preact_resnet110": 1_727_962, "preact_resnet164": 1_703_258, "preact_resnet1001": 10_327_706,
       "resnet164": 1_704_154, "resnet1001": 10_328_602}
HUB_100 = {"preact_resnet110": 1_727_962 + 90 * 65, "preact_resnet164": 1_726_388,
           "preact_resnet1001": 10_350_836, "resnet164": 1_727_284, "resnet1001": 10_351_732}


@pytest.mark.parametrize("name", HUB)
def test_hub_entry_points_give_the_nets(name):
    """Run with -s to see the counts."""
    counts = {}
    for classes, expected in ((10, HUB), (100, HUB_100)):
        model = torch.hub.load(str(ROOT), name, source="local", num_classes=classes)
        counts[classes] = n_params(model)
        assert counts[classes] == expected[name] and model.fc.out_features == classes and model.training
    print(f"\ntorch.hub.load({str(ROOT)!r}, {name!r}, source='local'): {counts[10]:,} parameters "
          f"(num_classes=100: {counts[100]:,})")


def test_hub_loads_2016_weights_and_refuses_another_nets(tmp_path):
    torch.manual_seed(0)
    source = build("preact", 110)
    path = tmp_path / "preact-110-0.pt"
    torch.save(weights.pack(source.state_dict(), {"arch": "preact", "depth": 110}), path)
    model = torch.hub.load(str(ROOT), "preact_resnet110", source="local", weights=str(path))
    assert not model.training and all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save(source.state_dict(), tmp_path / "model.pt")  # no metadata: the tensors must fit
    with pytest.raises(ValueError, match="does not fit bottleneck-164"):
        torch.hub.load(str(ROOT), "resnet164", source="local", weights=str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="holds preact-110, not preactbottleneck-164"):
        torch.hub.load(str(ROOT), "preact_resnet164", source="local", weights=str(path))
