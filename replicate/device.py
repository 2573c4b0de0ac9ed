"""Where a run trains, and the process-wide switches it sets there: the device, its precision (bf16,
fp16, TF32 or strict fp32), cuDNN's algorithm choice and determinism, and whether torch.compile pays.

Every branch on `device.type == "cuda"` lives here or says why it does not, and each has a CPU
test that fakes what CUDA would report (tests/test_device.py).

MPS (a Mac's `device: auto`): autocast has fp16 and bf16 there and GradScaler("mps") exists in this
torch, but no Mac has run this project, so where torch has had silent MPS bugs the CPU's way is
used: batches drawn by a CPU generator, nets in NCHW (`generator_device`, `channels_last`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)


def channels_last(device: torch.device) -> torch.memory_format:
    """channels_last (1.33x NCHW per step on our CPU, docs/speed.md; cuDNN's NHWC kernels), except on
    MPS: its convolutions have given silently wrong results on channels_last views (pytorch#180984,
    2026), and no Mac has checked ours, so MPS trains in NCHW."""
    return torch.contiguous_format if device.type == "mps" else torch.channels_last


def generator_device(device: torch.device) -> torch.device:
    """Where the loader draws its permutations, crops and flips: on the device, except on MPS, whose
    randperm has been silently non-uniform (pytorch#104170, 2023) and is unchecked here; there
    the CPU draws them (50k numbers an epoch) and they are copied over."""
    return torch.device("cpu") if device.type == "mps" else device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively, so that autocast pays.

    CUDA: compute capability 8.0 and up (Ampere, Hopper: bf16 tensor cores).
    `torch.cuda.is_bf16_supported()` is not asked: it also says yes where bf16 is emulated (V100,
    T4), and there autocast is slower than fp32. CPU: AVX512-BF16 or AMX, the ISAs oneDNN's bf16
    convolutions use; elsewhere it emulates bf16 and is slower than fp32 (2x faster on our
    AVX512-BF16 CPU: docs/speed.md).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so stay fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISIONS = ("auto", "bf16", "fp16", "tf32", "fp32")  # train.Config.precision
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the precisions that run under autocast


def autocast(device_type: str, precision: str) -> torch.autocast:
    """The autocast context of a run that computes in `precision` (resolved): on for bf16 and fp16, off
    otherwise (tf32 and fp32 are switches of the backends, set_backends)."""
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def fp16_tensor_cores(device: torch.device) -> bool:
    """CUDA from compute capability 7.0 (V100, T4, RTX 20xx): fp16 tensor cores, bf16 emulated."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def resolve_precision(device: torch.device, setting: str) -> tuple[str, str]:
    """What a run set to `setting` computes in on `device`, and a note where that is not what was asked.

    auto: bf16 where it is native, fp16 (with a gradient scaler) on GPUs with fp16 tensor cores but
    no native bf16, fp32 elsewhere. An explicit bf16 where bf16 is not native falls back to fp32
    with a note, not an error: emulated bf16 is slower than fp32 (docs/speed.md), and one
    params.yaml must run on every machine of a grid (a Slurm array may land on a V100 and an A100);
    run.json records what ran. tf32 exists on CUDA from Ampere (8.0) only; elsewhere it is fp32.
    fp16 runs as asked everywhere (CPU autocast has it; slow on most CPUs).
    """
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return choose_precision(setting, native_bf16(device), fp16_tensor_cores(device), ampere, device.type)


def choose_precision(setting: str, bf16: bool, fp16: bool, tf32: bool, where: str) -> tuple[str, str]:
    """resolve_precision's rule on what a device has (native bf16, fp16 tensor cores, TF32), so that
    the grid applies it to a GPU it only knows from nvidia-smi (local.gpu_fits), without CUDA."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting == "auto":
        return ("bf16" if bf16 else "fp16" if fp16 else "fp32"), ""
    if setting == "bf16" and not bf16:
        return "fp32", f"{where} has no native bf16 (emulated bf16 is slower than fp32): ran in fp32"
    if setting == "tf32" and not tf32:
        return "fp32", f"{where} has no TF32 (CUDA from compute capability 8.0): ran in fp32"
    return setting, ""


def set_backends(device: torch.device, *, tf32: bool, deterministic: bool) -> None:
    """The process-wide switches of one run (one run per process: a DVC stage, a Slurm task).

    Set explicitly every time, so that a notebook or a test running several runs in one process
    never inherits the last run's. `deterministic` makes a CUDA run repeat bit for bit, and so its
    resume exact: cuDNN's deterministic kernels, no benchmark (which picks algorithms by timing,
    differently in each process) and torch's deterministic algorithms. Without it, cuDNN benchmarks
    its kernels (fixed shapes: the fastest once). `tf32`, on CUDA only, lets convolutions and
    matmuls outside bf16 autocast use TF32; cuDNN does by default, so it is set either way and
    `precision` says which.
    """
    torch.use_deterministic_algorithms(deterministic)
    if device.type != "cuda":
        return
    if deterministic:
        fix_cublas_workspace()
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def fix_cublas_workspace() -> None:
    """cuBLAS is deterministic only with a fixed workspace, which it reads when its first handle is
    made (at a process's first matmul). A run sets it before then; a process that runs deterministic
    steps after others (scripts/gpu_check.py, tests/test_cuda.py) calls this at its start."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


# Fewest iterations for which torch.compile pays, per device type. CPU: the compile (20-47 s with an
# empty cache) is paid back after 1,700-2,600 steps on our 2-core CPU (docs/speed.md, "What the
# engine does"); 5,000 leaves a margin. CUDA: unmeasured (no GPU has been lent yet). A compile
# costs tens of seconds and saves a few ms per step of these small nets, so it cannot pay in the
# quick look's 720 iterations; 10,000 is a guess to be replaced by scripts/gpu_check.py's
# break-even. A paper-length run (64k) compiles on both.
COMPILE_MIN_ITERATIONS = {"cpu": 5_000, "cuda": 10_000}


def compile_pays(setting: bool | str, device: torch.device, iterations: int) -> bool:
    """Whether to torch.compile the training step: `setting` True or False decides; "auto"
    compiles runs of at least COMPILE_MIN_ITERATIONS[device type] iterations (never on MPS)."""
    if setting != "auto":
        return bool(setting)
    threshold = COMPILE_MIN_ITERATIONS.get(device.type)
    return threshold is not None and iterations >= threshold
