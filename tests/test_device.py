"""replicate.device on a CPU, with CUDA faked where a branch depends on it: bf16 only where it is
native, fp16 on V100/T4, the precision a run records, MPS's fallbacks, the process-wide switches (TF32, cuDNN, determinism), and
where torch.compile pays."""

import os

import pytest
import torch

from replicate import device as dev
from replicate import train

CUDA = torch.device("cuda")


@pytest.fixture
def restore_backends():
    """set_backends changes process-wide flags: give the next test the ones it found."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0])
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[1:5]
    if saved[5] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[5]


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_bf16_only_on_ampere_and_later(monkeypatch, capability, native):
    """V100 (7.0) and T4 (7.5) emulate bf16, yet torch.cuda.is_bf16_supported() says yes there:
    the capability decides, not that call."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dev.native_bf16(CUDA) is native


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                                           ("fpu sse2 avx2 avx512f", False)])
def test_cpu_bf16_only_where_it_is_native(monkeypatch, flags, native):
    """bf16 autocast pays only on CPUs with AVX512-BF16 or AMX; elsewhere oneDNN emulates it and it
    is slower than fp32, so those runs stay fp32."""
    real_read = dev.Path.read_text
    monkeypatch.setattr(dev.Path, "read_text",
                        lambda self, *a, **k: f"flags\t\t: {flags}\n" if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    assert dev.native_bf16(torch.device("cpu")) is native
    assert dev.native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("capability, auto", [((6, 0), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                               ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_where_native_fp16_on_fp16_tensor_cores_fp32_elsewhere(monkeypatch, capability, auto):
    """P100 (6.0): fp32; V100 (7.0), T4 (7.5): fp16 with a scaler; A100 (8.0), H100 (9.0): bf16.
    An explicit bf16 or tf32 where the GPU lacks it runs in fp32 and says so; fp16 runs as asked."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dev.resolve_precision(CUDA, "auto") == (auto, "")
    assert dev.resolve_precision(CUDA, "fp16") == ("fp16", "")
    assert dev.resolve_precision(CUDA, "fp32") == ("fp32", "")
    ampere = capability >= (8, 0)
    for setting in ("bf16", "tf32"):
        ran, note = dev.resolve_precision(CUDA, setting)
        assert (ran, bool(note)) == ((setting, False) if ampere else ("fp32", True))
        assert ampere or f"no {'native bf16' if setting == 'bf16' else 'TF32'}" in note


def test_precision_on_the_cpu_and_mps(monkeypatch):
    """No TF32 off CUDA; bf16 where the CPU has it natively; auto never picks fp16 off CUDA (MPS: fp32)."""
    cpu, mps = torch.device("cpu"), torch.device("mps")
    monkeypatch.setattr(dev, "native_bf16", lambda device: device.type == "cpu")
    assert dev.resolve_precision(cpu, "auto") == ("bf16", "")
    assert dev.resolve_precision(cpu, "tf32")[0] == "fp32"
    assert dev.resolve_precision(cpu, "fp16") == ("fp16", "")  # CPU autocast has float16: the tests use it
    assert dev.resolve_precision(mps, "auto") == ("fp32", "")
    assert dev.resolve_precision(mps, "bf16")[0] == "fp32"
    monkeypatch.setattr(dev, "native_bf16", lambda device: False)
    assert dev.resolve_precision(cpu, "auto") == ("fp32", "")
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, tf32, fp32, got 'half'"):
        dev.resolve_precision(cpu, "half")


def test_mps_trains_in_nchw_and_draws_its_batches_on_the_cpu():
    """The two MPS branches that no Mac has checked (device.py says why) fall back to the CPU's ways."""
    mps = torch.device("mps")
    assert dev.channels_last(mps) == torch.contiguous_format and dev.generator_device(mps) == torch.device("cpu")
    for d in (torch.device("cpu"), CUDA):
        assert dev.channels_last(d) == torch.channels_last and dev.generator_device(d) == d


def test_cuda_switches_follow_the_config(restore_backends):
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: TF32 unless told otherwise
    dev.set_backends(CUDA, tf32=False, deterministic=False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    dev.set_backends(CUDA, tf32=True, deterministic=True)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace


def test_every_run_sets_the_switches_so_none_inherits_the_last_ones(restore_backends, small_dataset):
    cfg = dict(arch="resnet", depth=8, iterations=2, milestones=[1], batch_size=16, log_every=1, eval_every=1,
               device="cpu", compile=False)
    train.make_engine(train.Config(**cfg, deterministic=True), small_dataset)
    assert torch.are_deterministic_algorithms_enabled()
    assert train.make_engine(train.Config(**cfg), small_dataset).precision in ("bf16", "fp32")
    assert not torch.are_deterministic_algorithms_enabled()
    assert train.train(train.Config(**cfg, precision="tf32"), dataset=small_dataset,
                       progress=False).metrics["precision"] == "fp32"


def test_compile_only_where_it_pays():
    cpu, mps = torch.device("cpu"), torch.device("mps")
    for device in (cpu, CUDA):
        long_run = dev.COMPILE_MIN_ITERATIONS[device.type]
        assert not dev.compile_pays("auto", device, long_run - 1)
        assert dev.compile_pays("auto", device, long_run)
        assert dev.compile_pays("auto", device, 64_000)  # a paper-length run
    assert not dev.compile_pays("auto", CUDA, 720)  # the quick look's runs: the compile costs more than it saves
    assert not dev.compile_pays("auto", mps, 64_000)
    assert dev.compile_pays(True, cpu, 1) and not dev.compile_pays(False, CUDA, 64_000)
    assert train.Config().compile == "auto"
    with pytest.raises(ValueError, match="compile"):
        train.Config(compile="sometimes")
