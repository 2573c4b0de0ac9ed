"""How much GPU memory one run holds, for JOBS=auto's worker slots per GPU (replicate/local.py).

A run holds a CUDA context, CIFAR-10 as uint8 (data.CifarLoader), the weights with their gradients
and momentum, and the activations saved for backward, which grow with depth and batch and halve in
bf16/fp16. The activations were measured on the CPU (what one training step saves for backward,
summed by torch.autograd.graph.saved_tensors_hooks) and kept here as constants; recompute them with

    python -m replicate.memory          # prints ACTIVATIONS and the measured depths

Every ResNet block of a stage saves the same tensors, so a net's activations are exactly
base + n * per_block (depth = 6n + 2): two depths give the line, the others check it, and
ResNet-1202 is read off it. fp16 saves what bf16 saves (2 bytes an element, the same autocast lists).
"""

from __future__ import annotations

import sys

import torch

from .device import autocast

# Bytes saved for backward by one training step at batch 128, as base + n * per_block (depth 6n+2),
# by the precision's element size. `python -m replicate.memory` on an Intel Xeon, torch 2.14, CPU autocast.
BATCH = 128
ACTIVATIONS = {"fp32": (18_389_252, 58_723_840), "bf16": (9_153_892, 29_557_248)}
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


def activation_bytes(depth: int, precision: str, batch: int = BATCH) -> float:
    base, per_block = ACTIVATIONS[element_bytes(precision)]
    return (base + (depth - 2) // 6 * per_block) * batch / BATCH


def run_gb(depth: int, precision: str, batch: int = BATCH) -> float:
    """GB (2**30 bytes) one CUDA run of ResNet-`depth` holds: context, data, weights, activations."""
    data = 3 * (TRAIN_IMAGES * (32 + 2 * PAD) ** 2 + TEST_IMAGES * 32 ** 2)  # uint8
    state = 3 * 4 * params(depth)  # fp32 weights, gradients, momentum
    return CUDA_CONTEXT_GB + (data + state + HEADROOM * activation_bytes(depth, precision, batch)) / 2**30


def params(depth: int) -> int:
    """Weights of ResNet-`depth`, counted on the meta device (no memory): 0.27M at 20, 19.4M at 1202."""
    from .models import build

    with torch.device("meta"):
        return sum(p.numel() for p in build("resnet", depth).parameters())


def measure(depth: int, precision: str = "fp32", batch: int = BATCH, arch: str = "resnet") -> int:
    """Bytes one training step of `arch`-`depth` at `batch` saves for backward on the CPU: each
    storage once (a ReLU's output saved by it and by the next conv counts once), weights excluded."""
    from .models import build

    torch.manual_seed(0)
    model = build(arch, depth).to(memory_format=torch.channels_last).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast("cpu", precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


def fit(precision: str, depths: tuple[int, int] = (20, 32)) -> tuple[int, int]:
    """(base, per_block) of ACTIVATIONS from two measured depths."""
    (d0, m0), (d1, m1) = [(d, measure(d, precision)) for d in depths]
    per_block = (m1 - m0) // ((d1 - d0) // 6)
    return m0 - (d0 - 2) // 6 * per_block, per_block


def main() -> None:
    """Measure ACTIVATIONS afresh, check the line at depths 56 and 110, and print the table."""
    found = {p: fit(p) for p in ("fp32", "bf16")}
    print(f"ACTIVATIONS = {found!r}  # batch {BATCH}")
    print("depth  precision  saved GB (measured)  saved GB (line)  run GB on CUDA")
    for depth in (20, 32, 44, 56, 110, 1202):
        for p in ("fp32", "bf16"):
            base, per = found[p]
            line = (base + (depth - 2) // 6 * per) / 2**30
            measured = f"{measure(depth, p) / 2**30:.3f}" if depth in (56, 110) else "-"
            print(f"{depth:5}  {p:9}  {measured:>19}  {line:15.3f}  {run_gb(depth, p):14.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
