"""replicate.memory: the measured activations it keeps as constants still match a fresh
measurement, and a run's memory adds up as documented."""

import pytest

from replicate import memory


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16 saves what bf16 saves (slow on a CPU)
@pytest.mark.parametrize("arch, depth", [("resnet", 8), ("resnet", 14), ("bottleneck", 11), ("preactbottleneck", 20),
                                         ("preact", 14)])
def test_the_activation_constants_match_a_fresh_measurement(arch, depth, precision):
    """At batch 32 (a quarter of the constants' 128, cheap on a CPU) and small depths: within 5%
    (the weights' bf16 copies that autocast saves do not scale with the batch); less than the line
    for pre-activation bottlenecks (the line is the original unit's, whose stem saves more)."""
    measured = memory.measure(depth, precision, batch=32, arch=arch)
    line = memory.activation_bytes(arch, depth, precision, batch=32)
    assert measured == pytest.approx(line, rel=0.05) if arch != "preactbottleneck" else line * 0.75 < measured <= line


def test_activations_are_linear_in_the_batch():
    """What lets ResNet-1001 at batch 128 be read off small batches."""
    m4, m8, m12 = (memory.measure(20, "fp32", batch=b, arch="preactbottleneck") for b in (4, 8, 12))
    assert m12 - m8 == m8 - m4 and m4 > 0


def test_units_and_depths_by_unit_kind():
    assert memory.units("resnet", 110) == ("basic", 18) == memory.units("preact", 110)
    assert memory.units("bottleneck", 1001) == ("bottleneck", 111) == memory.units("preactbottleneck", 1001)
    assert memory.units("onelayer", 110) == ("basic", 18)  # 36 one-layer units: 18 basic ones' worth
    # a bottleneck unit of a stage saves 3x a basic one (4x the channels out, a quarter inside)
    assert memory.ACTIVATIONS["bottleneck"]["fp32"][1] == pytest.approx(3 * memory.ACTIVATIONS["basic"]["fp32"][1], rel=0.01)


def test_a_run_is_context_data_state_and_activations_with_headroom():
    gb = 2**30
    data = 3 * (50_000 * 40 * 40 + 10_000 * 32 * 32)  # uint8, the training set padded
    assert memory.params("resnet", 110) == 1_727_962 and memory.params("resnet", 20) == 269_722
    assert memory.params("preactbottleneck", 1001) == pytest.approx(10.2e6, rel=0.02)  # the paper's 10.2M
    for precision, saved in (("fp32", 1.002), ("bf16", 0.504), ("fp16", 0.504), ("tf32", 1.002)):
        assert memory.activation_bytes("resnet", 110, precision) / gb == pytest.approx(saved, abs=0.001)
        assert memory.run_gb("resnet", 110, precision) == pytest.approx(
            memory.CUDA_CONTEXT_GB + (data + 12 * memory.params("resnet", 110)) / gb + memory.HEADROOM * saved, abs=0.002)
    assert memory.activation_bytes("resnet", 110, "fp32", batch=64) == memory.activation_bytes("resnet", 110, "fp32") / 2
    full = memory.activation_bytes("bottleneck", 1001, "fp32")
    assert memory.activation_bytes("bottleneck", 1001, "fp32", checkpointing=True) == full * memory.CHECKPOINTED


def test_a_fresh_process_reports_its_own_peak(monkeypatch):
    """peak: the step's resident memory in a child of its own, at least what it saved for backward."""
    got = memory.peak("preactbottleneck", 20, "fp32", 8)
    assert got["saved"] == memory.measure(20, "fp32", batch=8, arch="preactbottleneck")
    assert got["peak_added"] >= got["saved"]
