"""How much GPU memory one run holds, for JOBS=auto's worker slots per GPU (replicate/local.py) and
for train.py's activation_checkpointing: auto.

A run holds a CUDA context, CIFAR-10 as uint8 (data.CifarLoader), the weights with their gradients
and momentum, and the activations saved for backward, which grow with depth and batch and halve in
bf16/fp16. The activations were measured on the CPU (what one training step saves for backward,
summed by torch.autograd.graph.saved_tensors_hooks) and kept here as constants; recompute them with

    python -m replicate.memory          # prints ACTIVATIONS, CHECKPOINTED and the checks (docs/memory.md)

Every unit of a kind saves the same tensors whatever the depth, so a net's activations are exactly
base + n * per_unit, n units a stage (depth 6n+2 for basic units, 9n+2 for bottlenecks): two depths
give the line, the others check it, and ResNet-1202 and ResNet-1001 are read off it. fp16 saves what
bf16 saves (2 bytes an element, the same autocast lists).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from .device import autocast

# Bytes saved for backward by one training step at batch 128, as base + n * per_unit (n units a
# stage), by unit kind and element size; each line from FIT's net at two depths (the original unit:
# its base is larger than pre-activation's, the per-unit bytes the same). `python -m replicate.memory`
# on an Intel Xeon, torch 2.14, CPU autocast.
BATCH = 128
ACTIVATIONS = {
    "basic": {"fp32": (18_389_252, 58_723_840), "bf16": (9_153_892, 29_557_248)},
    "bottleneck": {"fp32": (77_214_980, 176_171_520), "bf16": (38_682_212, 88_273_920)},
}
FIT = {"basic": ("resnet", (20, 32)), "bottleneck": ("bottleneck", (11, 20))}
# With activation checkpointing, the peak a step adds over its process (peak_rss), as a fraction of
# the peak without: ResNet-1001 (bottleneck; pre-activation's is 0.074), fp32, from the slopes over
# batches 4 and 8 (main()). Deep nets only: with groups of sqrt(n) units, shallower nets save less.
CHECKPOINTED = 0.076
# A CUDA context with cuDNN and cuBLAS loaded: 0.3-0.5 GB by GPU and driver. An assumption, not
# measured here (no GPU has run this project).
CUDA_CONTEXT_GB = 0.5
# Backward's transient gradients, cuDNN workspaces and the caching allocator's rounding come on top
# of what is saved: an assumed 50% over the activations, until a GPU measures max_memory_reserved.
HEADROOM = 1.5
TRAIN_IMAGES, TEST_IMAGES, PAD = 50_000, 10_000, 4


def element_bytes(precision: str) -> str:
    """The ACTIVATIONS row of a resolved precision: 16-bit autocast or 32-bit (tf32 stores fp32)."""
    return "bf16" if precision in ("bf16", "fp16") else "fp32"


def units(arch: str, depth: int) -> tuple[str, int]:
    """(ACTIVATIONS kind, n) of `arch`-`depth`. A one-layer unit (3n+2) counts as half a basic one."""
    from .preact import ARCHS

    unit = ARCHS[arch].unit if arch in ARCHS else "basic"  # plain, resnet: the 2015 basic blocks
    return ("bottleneck", (depth - 2) // 9) if unit == "bottleneck" else ("basic", (depth - 2) // 6)


def activation_bytes(arch: str, depth: int, precision: str, batch: int = BATCH, checkpointing: bool = False) -> float:
    kind, n = units(arch, depth)
    base, per_unit = ACTIVATIONS[kind][element_bytes(precision)]
    return (base + n * per_unit) * batch / BATCH * (CHECKPOINTED if checkpointing else 1)


def run_gb(arch: str, depth: int, precision: str, batch: int = BATCH, checkpointing: bool = False) -> float:
    """GB (2**30 bytes) one CUDA run of `arch`-`depth` holds: context, data, weights, activations."""
    data = 3 * (TRAIN_IMAGES * (32 + 2 * PAD) ** 2 + TEST_IMAGES * 32 ** 2)  # uint8
    state = 3 * 4 * params(arch, depth)  # fp32 weights, gradients, momentum
    saved = activation_bytes(arch, depth, precision, batch, checkpointing)
    return CUDA_CONTEXT_GB + (data + state + HEADROOM * saved) / 2**30


def checkpointing_on(setting: bool | str, arch: str, depth: int, precision: str, batch: int,
                     memory_gb: float | None) -> bool:
    """train.py's activation_checkpointing: True, False, or "auto": on where one run of the net
    would not fit `memory_gb` (the GPU's, or the machine's RAM on a CPU; None, unknown: off)."""
    if setting != "auto":
        return bool(setting)
    return memory_gb is not None and run_gb(arch, depth, precision, batch) > memory_gb


def device_gb(device: torch.device) -> float | None:
    """Total memory of `device` in GB: the GPU's, the machine's RAM on a CPU, None elsewhere (MPS)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().total / 2**30
    return None


def params(arch: str, depth: int) -> int:
    """Weights of `arch`-`depth`, counted on the meta device (no memory): 0.27M for resnet-20."""
    from .models import build

    with torch.device("meta"):
        return sum(p.numel() for p in build(arch, depth).parameters())


def measure(depth: int, precision: str = "fp32", batch: int = BATCH, arch: str = "resnet") -> int:
    """Bytes one training step of `arch`-`depth` at `batch` saves for backward on the CPU: each
    storage once (a ReLU's output saved by it and by the next conv counts once), weights excluded."""
    return step(arch, depth, precision, batch)["saved"]


def step(arch: str, depth: int, precision: str, batch: int, checkpointing: bool = False, backward: bool = False) -> dict:
    """One training step's saved bytes (the forward's, as `measure`) and, with `backward`, the peak
    resident memory it added to this process (peak_rss after, less before; meaningful in a fresh
    process only: `peak`)."""
    from .models import build

    torch.manual_seed(0)
    model = build(arch, depth, checkpointing=checkpointing).to(memory_format=torch.channels_last).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    before = peak_rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast("cpu", precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
    if backward:
        loss.backward()
    del loss
    return {"saved": sum(seen.values()), "peak_added": peak_rss() - before}


def peak_rss() -> int:
    """This process's peak resident bytes: Linux's VmHWM, which starts afresh at exec; ru_maxrss
    elsewhere, which on Linux keeps the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def step_seconds(arch: str, depth: int, batch: int, checkpointing: bool, steps: int = 5) -> float:
    """Median seconds of an fp32 SGD step (forward, backward, update) after one untimed step: what
    checkpointing costs (docs/memory.md)."""
    import statistics
    import time
    from contextlib import nullcontext

    from .models import build
    from .train import train_step

    torch.manual_seed(0)
    model = build(arch, depth, checkpointing=checkpointing).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    took = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(model, optimizer, x, y, nullcontext)  # fp32: no autocast
        took.append(time.perf_counter() - start)
    return statistics.median(took[1:])


def peak(arch: str, depth: int, precision: str, batch: int, checkpointing: bool = False) -> dict:
    """`step` with backward in a fresh process, so that its peak (peak_rss) is this step's alone."""
    argv = [sys.executable, "-m", "replicate.memory", "--step", arch, str(depth), precision, str(batch)]
    # A fixed mmap threshold gives every tensor over 64 KiB back to the system when freed; glibc's
    # default one rises as tensors are freed, and the heap they then come from never shrinks back.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(argv + (["--checkpointing"] if checkpointing else []), capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(kind: str, precision: str) -> tuple[int, int]:
    """(base, per_unit) of ACTIVATIONS[kind] from FIT's two depths, at batch 128."""
    arch, depths = FIT[kind]
    (d0, m0), (d1, m1) = [(d, measure(d, precision, arch=arch)) for d in depths]
    n0, n1 = units(arch, d0)[1], units(arch, d1)[1]
    per_unit = (m1 - m0) // (n1 - n0)
    return m0 - n0 * per_unit, per_unit


def main() -> None:
    """Measure ACTIVATIONS afresh and check the lines on deeper nets; then ResNet-1001 one step at
    batches 4 and 8 in a fresh process each, with and without checkpointing, scaled to batch 128."""
    global ACTIVATIONS, CHECKPOINTED
    found = {kind: {p: fit(kind, p) for p in ("fp32", "bf16")} for kind in FIT}
    print(f"ACTIVATIONS = {found!r}  # batch {BATCH}")
    ACTIVATIONS = found
    gb = 2**30
    print("\nnet                  precision  saved GB (measured)  saved GB (line)  run GB on CUDA")
    for arch, depth in [("resnet", 56), ("resnet", 110), ("resnet", 1202), ("preact", 110), ("bottleneck", 29),
                        ("preactbottleneck", 56), ("bottleneck", 164), ("preactbottleneck", 164)]:
        for p in ("fp32", "bf16"):
            measured = f"{measure(depth, p, arch=arch) / gb:.3f}" if depth < 1000 and not (p == "bf16" and depth > 110) else "-"
            print(f"{arch + '-' + str(depth):20} {p:9}  {measured:>19}  {activation_bytes(arch, depth, p) / gb:15.3f}"
                  f"  {run_gb(arch, depth, p):14.2f}")
    print("\nResNet-1001, fp32, one step in a fresh process: saved (forward) and peak added (VmHWM), GB")
    slopes = {}
    for arch in ("bottleneck", "preactbottleneck"):
        for ck in (False, True):
            got = {b: peak(arch, 1001, "fp32", b, ck) for b in (4, 8)}
            for b, g in got.items():
                print(f"  {arch}-1001 batch {b} checkpointing {ck!s:5}: saved {g['saved'] / gb:6.3f}  "
                      f"peak added {g['peak_added'] / gb:6.3f}")
            slopes[arch, ck] = (got[8]["peak_added"] - got[4]["peak_added"]) / 4
            print(f"    per image {slopes[arch, ck] / 2**20:.1f} MiB: batch 128 by that line "
                  f"{(got[4]['peak_added'] + 124 * slopes[arch, ck]) / gb:.2f} GB peak added"
                  + ("" if ck else f", saved {(got[4]['saved'] + 124 * (got[8]['saved'] - got[4]['saved']) / 4) / gb:.2f} GB"
                                   f" (the line: {activation_bytes(arch, 1001, 'fp32') / gb:.2f})"))
        print(f"  CHECKPOINTED = {slopes[arch, True] / slopes[arch, False]:.3f}  # {arch}")
    CHECKPOINTED = round(max(slopes[a, True] / slopes[a, False] for a in ("bottleneck", "preactbottleneck")), 3)
    print("\nResNet-1001 at batch 128, run GB on CUDA (run_gb)")
    for arch in ("bottleneck", "preactbottleneck"):
        for p in ("fp32", "bf16"):
            print(f"  {arch}-1001 {p}: {run_gb(arch, 1001, p):6.2f}   checkpointed: {run_gb(arch, 1001, p, checkpointing=True):6.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m replicate.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", nargs=4, metavar=("ARCH", "DEPTH", "PRECISION", "BATCH"),
                    help="(internal: `peak`) one step in this process, printed as JSON")
    ap.add_argument("--time", nargs=3, metavar=("ARCH", "DEPTH", "BATCH"),
                    help="print the median seconds of an fp32 training step (--checkpointing: with it)")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    if args.time:
        a, d, b = args.time
        print(f"{a}-{d} batch {b} checkpointing {args.checkpointing}: {step_seconds(a, int(d), int(b), args.checkpointing):.3f} s a step")
    elif args.step:
        a, d, p, b = args.step
        print(json.dumps(step(a, int(d), p, int(b), args.checkpointing, backward=True)))
    else:
        main()
