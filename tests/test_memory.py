"""replicate.memory: the measured activations it keeps as constants still match a fresh
measurement, and a run's memory adds up as documented."""

import pytest

from replicate import memory


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16 saves what bf16 saves (slow on a CPU)
@pytest.mark.parametrize("depth", [8, 14])
def test_the_activation_constants_match_a_fresh_measurement(depth, precision):
    """At batch 32 (a quarter of the constants' 128, cheap on a CPU) and small depths: within 5%
    (the weights' bf16 copies that autocast saves do not scale with the batch)."""
    measured = memory.measure(depth, precision, batch=32)
    assert measured == pytest.approx(memory.activation_bytes(depth, precision, batch=32), rel=0.05)


def test_a_run_is_context_data_state_and_activations_with_headroom():
    gb = 2**30
    data = 3 * (50_000 * 40 * 40 + 10_000 * 32 * 32)  # uint8, the training set padded
    assert memory.params(110) == 1_727_962 and memory.params(20) == 269_722
    for precision, saved in (("fp32", 1.002), ("bf16", 0.504), ("fp16", 0.504), ("tf32", 1.002)):
        assert memory.activation_bytes(110, precision) / gb == pytest.approx(saved, abs=0.001)
        assert memory.run_gb(110, precision) == pytest.approx(
            memory.CUDA_CONTEXT_GB + (data + 12 * memory.params(110)) / gb + memory.HEADROOM * saved, abs=0.002)
    assert memory.activation_bytes(110, "fp32", batch=64) == memory.activation_bytes(110, "fp32") / 2
