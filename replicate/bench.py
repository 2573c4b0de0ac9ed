"""Speed benchmark: the project's training engine against a reference-style trainer, side by side.

    python -m replicate.bench                       # ResNet-20 and ResNet-56, writes reports/bench.json
    python -m replicate.bench --concurrent 4        # also K engine processes sharing one device

Both trainers train the same net (same builder, same initial weights, batch 128, SGD with the
paper's hyperparameters) on the same images and device in one run: each is built and warmed up
(W iterations), then N timed iterations follow in blocks taken in turn (engine, reference,
engine, ...), so a change of the machine's load hits both alike. Images/s counts the N timed
iterations only, so DataLoader worker start-up and compile time are left out of it; each
trainer's start-up (set-up plus its first iteration) is reported beside it. Data: real CIFAR-10
if `--data` holds cifar-10-batches-py/, otherwise generated data of the same shape (50k/10k),
since speed does not depend on the pixel values.

The reference-style trainer is deliberately the ordinary way of writing it (a Dataset of PIL
images, torchvision transforms, a shuffling DataLoader with workers, fp32, default memory format,
`loss.item()` every step). The engine is `replicate.train`'s: the data on the device, batched
crop/flip, channels_last, bf16 autocast and fused SGD on CUDA, torch.compile where it pays.
See docs/speed.md for what each trick measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import data as cifar
from . import train
from .device import device_name, pick_device, set_backends
from .models import build


def sync(device: torch.device) -> None:
    """Wait for queued device work, so the clock reads finished work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def load_data(root: str | Path, n_train: int = 50_000, n_test: int = 10_000,
              seed: int = 0) -> tuple[cifar.CifarData, str]:
    """Real CIFAR-10 from `root/cifar-10-batches-py` if it is there, else generated data of that
    shape. Returns the data and a line saying which."""
    if (Path(root) / cifar.FOLDER).is_dir():
        return cifar.load_cifar10(root), f"CIFAR-10 from {Path(root) / cifar.FOLDER}"
    return (cifar.synthetic(n_train, n_test, seed),
            f"synthetic, {n_train} train / {n_test} test images (no CIFAR-10 at {root})")


def hardware(device: torch.device) -> dict:
    """What a speed number depends on. The load average shows how busy the machine was."""
    info = {"device": device.type, "device_name": device_name(device),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": _torchvision_version()}
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def _torchvision_version() -> str | None:
    try:  # only the reference-style trainer needs it (scripts/gpu_check.py runs where it is absent)
        import torchvision
    except ImportError:
        return None
    return torchvision.__version__


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        return None


# --- 1. the project's engine --------------------------------------------------------------------

class Engine:
    """`replicate.train`'s engine, built by the same `train.make_engine`, and its loop minus
    evaluation and checkpoints (which a long run does rarely)."""

    def __init__(self, data: cifar.CifarData, arch: str, depth: int, device: torch.device, *, batch_size: int = 128,
                 seed: int = 0, run_length: int = 55, compile: bool | str = "auto", cuda_graphs: bool = False,
                 log_every: int = 100, **config):
        self.cfg = train.Config(arch=arch, depth=depth, batch_size=batch_size, seed=seed, iterations=run_length,
                                log_every=log_every, device=str(device), compile=compile, cuda_graphs=cuda_graphs,
                                **config)
        self.engine = train.make_engine(self.cfg, data)
        self.interval = torch.zeros(2, log_every, device=self.engine.device)
        self.engine.model.train()

    def run(self, first: int, last: int) -> None:
        e, log_every = self.engine, self.cfg.log_every
        for it in range(first, last):
            x, y = e.loader.batch(it)
            k = it % log_every
            self.interval[0, k], self.interval[1, k] = train.train_step(e.step_model, e.optimizer, x, y, e.autocast, e.scaler)
            if k == log_every - 1:
                self.interval.cpu()  # the engine's only sync: one per log interval
            e.scheduler.step()

    def info(self) -> dict:
        compiled = self.engine.step_model is not self.engine.model
        return {"compiled": compiled, "cuda_graphs": compiled and self.engine.device.type == "cuda" and self.cfg.cuda_graphs}


# --- 2. a reference-style trainer, written the ordinary way ---------------------------------------

class PILCifar(Dataset):
    """CIFAR-10 served the way torchvision's `CIFAR10` dataset serves it: an (N, 32, 32, 3) uint8
    array, one PIL image per item, passed through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.targets = [int(v) for v in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, 3, H, W) images in [0, 1] units: the usual Normalize
    constants (reference trainers hard-code them; computed here so any data works)."""
    mean, std = [], []
    for c in range(images.shape[1]):
        v = images[:, c].astype(np.float64) / 255.0
        mean.append(float(v.mean()))
        std.append(float(v.std()))
    return mean, std


def reference_transform(mean: list[float], std: list[float]):
    """The usual CIFAR training transform: pad-crop and flip on PIL images, then ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


class Reference:
    """The usual PyTorch CIFAR trainer: PIL images, per-image torchvision transforms in DataLoader
    workers, fp32, default memory format, plain SGD, `loss.item()` every iteration."""

    def __init__(self, data: cifar.CifarData, arch: str, depth: int, device: torch.device, *, batch_size: int = 128,
                 seed: int = 0, workers: int = 2, stats: tuple[list[float], list[float]] | None = None):
        transform = reference_transform(*(stats or channel_stats(data.train_x)))
        self.loader = DataLoader(PILCifar(data.train_x, data.train_y, transform), batch_size=batch_size,
                                 shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
                                 drop_last=True, persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        self.device, self.workers = device, workers
        self.model = build(arch, depth).to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[32_000, 48_000], gamma=0.1)
        self.model.train()
        self.batches = iter(self.loader)
        self.running_loss = 0.0

    def run(self, first: int, last: int) -> None:
        for _ in range(first, last):
            try:
                images, targets = next(self.batches)
            except StopIteration:  # next epoch: a new shuffle, the same (persistent) workers
                self.batches = iter(self.loader)
                images, targets = next(self.batches)
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            loss = self.criterion(self.model(images), targets)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.running_loss += loss.item()  # the usual running average: a host-device sync per step

    def close(self) -> None:
        del self.batches, self.loader  # stops the persistent workers

    def info(self) -> dict:
        return {"workers": self.workers}


# --- timing -----------------------------------------------------------------------------------------

def blocks_of(iterations: int, blocks: int) -> list[int]:
    """Split `iterations` into `blocks` nearly equal consecutive blocks."""
    blocks = max(1, min(blocks, iterations))
    return [iterations // blocks + (i < iterations % blocks) for i in range(blocks)]


def start_up(make, device: torch.device, warmup: int) -> tuple[object, dict]:
    """Build a trainer (`make()`) and run its warm-up; time the set-up, the first iteration (worker
    start-up, compilation, cuDNN autotuning) and the rest of the warm-up."""
    clock = [time.perf_counter()]
    trainer = make()
    sync(device)
    clock.append(time.perf_counter())
    for first, last in ((0, 1), (1, warmup)):
        trainer.run(first, last)
        sync(device)
        clock.append(time.perf_counter())
    start, setup, first, warm = clock
    return trainer, {"setup_s": round(setup - start, 3), "first_iteration_s": round(first - setup, 3),
                     "startup_s": round(first - start, 3), "warmup_s": round(warm - setup, 3)}


def timed_blocks(trainers: list, device: torch.device, warmup: int, iterations: int, blocks: int,
                 batch_size: int) -> list[dict]:
    """Time the trainers over the same timed iterations, split into blocks taken in turn
    (A B A B ...), so a change in the machine's load during the run hits all of them alike."""
    seconds = [[] for _ in trainers]
    it = warmup
    for size in blocks_of(iterations, blocks):
        for times, trainer in zip(seconds, trainers):
            sync(device)
            t = time.perf_counter()
            trainer.run(it, it + size)
            sync(device)
            times.append((size, time.perf_counter() - t))
        it += size
    results = []
    for times in seconds:
        steady = sum(s for _, s in times)
        # The fastest block is the least disturbed one (timeit's advice): on a shared machine it
        # is the steadier figure; images_per_s over all blocks is the plain one.
        results.append({"images_per_s": round(iterations * batch_size / steady, 2),
                        "best_block_images_per_s": round(max(n * batch_size / s for n, s in times), 2),
                        "ms_per_iteration": round(1000 * steady / iterations, 2), "steady_s": round(steady, 3),
                        "block_images_per_s": [round(n * batch_size / s, 2) for n, s in times]})
    return results


def compare(data: cifar.CifarData, arch: str, depth: int, device: torch.device, *, batch_size: int, warmup: int,
            iterations: int, blocks: int, seed: int, workers: int, compile: bool | str, cuda_graphs: bool) -> dict:
    """The engine and the reference-style trainer on one net: start-up each, then interleaved timing."""
    stats = channel_stats(data.train_x)  # constants in the usual trainer: not timed
    engine, engine_start = start_up(lambda: Engine(
        data, arch, depth, device, batch_size=batch_size, seed=seed, run_length=warmup + iterations,
        compile=compile, cuda_graphs=cuda_graphs), device, warmup)
    reference, reference_start = start_up(lambda: Reference(
        data, arch, depth, device, batch_size=batch_size, seed=seed, workers=workers, stats=stats), device, warmup)
    try:
        timed = timed_blocks([engine, reference], device, warmup, iterations, blocks, batch_size)
    finally:
        reference.close()
    e, r = ({**start, **t, **trainer.info()} for start, t, trainer in
            ((engine_start, timed[0], engine), (reference_start, timed[1], reference)))
    return {"net": f"{arch}-{depth}", "engine": e, "reference": r,
            "ratio": round(e["images_per_s"] / r["images_per_s"], 3),
            "ratio_best_block": round(e["best_block_images_per_s"] / r["best_block_images_per_s"], 3),
            "load_average": load_average()}


# --- 3. several engine processes on one device ----------------------------------------------------

def _concurrent_worker(rank: int, threads: int, barrier, results, data_args: dict, kwargs: dict) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        data, _ = load_data(**data_args)
        device = pick_device(kwargs.pop("device"))
        warmup, iterations, batch_size = kwargs.pop("warmup"), kwargs.pop("iterations"), kwargs["batch_size"]
        engine, start = start_up(lambda: Engine(data, device=device, run_length=warmup + iterations, **kwargs),
                                 device, warmup)
        barrier.wait()  # all processes are warm: time them together
        wall_start = time.time()
        [timed] = timed_blocks([engine], device, warmup, iterations, 1, batch_size)
        results.put((rank, {**start, **timed, "wall_start": wall_start, "wall_end": time.time()}))
    except Exception as e:  # report it instead of leaving the others waiting at the barrier
        barrier.abort()
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def bench_concurrent(k: int, data_args: dict, arch: str, depth: int, device: torch.device, *, warmup: int,
                     iterations: int, batch_size: int, timeout: float | None = None, **kwargs) -> dict:
    """K engine processes training one net each on the same device at the same time, as K grid
    entries would. They warm up, wait for each other, then time N iterations together; the
    aggregate is all their images over the span from the first start to the last finish. Each
    gets its share of the cores as torch threads, as a grid slot does. After `timeout` seconds
    the processes are stopped and it fails."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, results = ctx.Barrier(k), ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // k)
    deadline = None if timeout is None else time.monotonic() + timeout
    job = dict(kwargs, arch=arch, depth=depth, device=str(device), warmup=warmup, iterations=iterations,
               batch_size=batch_size)
    procs = [ctx.Process(target=_concurrent_worker, args=(r, threads, barrier, results, data_args, dict(job)))
             for r in range(k)]
    for p in procs:
        p.start()
    runs: dict[int, dict] = {}
    while len(runs) < k:
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{k} concurrent engine processes did not finish within {timeout:.0f} s")
        try:
            rank, result = results.get(timeout=5)
            runs[rank] = result
        except Empty:
            if any(p.exitcode not in (None, 0) for p in procs):  # died without a word: free the others
                barrier.abort()
                if all(p.exitcode is not None for p in procs) and results.empty():
                    break
    for p in procs:
        p.join()
    errors = [runs.get(r, {"error": f"process {r} exited with code {procs[r].exitcode}"}) for r in range(k)]
    errors = [e["error"] for e in errors if "error" in e]
    if errors:
        raise RuntimeError(f"concurrent engine processes failed: {errors}")
    runs = [runs[r] for r in range(k)]
    span = max(r["wall_end"] for r in runs) - min(r["wall_start"] for r in runs)
    return {"processes": k, "threads_per_process": threads,
            "aggregate_images_per_s": round(k * iterations * batch_size / span, 2),
            "per_process_images_per_s": [r["images_per_s"] for r in runs]}


# --- 4. each trick alone ---------------------------------------------------------------------------

class StepVariant:
    """The training step on one fixed batch with some of the engine's tricks: what each one buys."""

    def __init__(self, arch: str, depth: int, device: torch.device, *, batch_size: int, seed: int,
                 channels_last: bool, bf16: bool, fused: bool | None, compile: bool, cuda_graphs: bool = False,
                 bn_batch_size: int | None = None):
        set_backends(device, tf32=False, deterministic=False)  # as the engine: cuDNN benchmarks its kernels
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(seed)
        self.model = build(arch, depth, bn_batch_size=bn_batch_size).to(device, memory_format=fmt)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
        self.step_model = (torch.compile(self.model, mode="reduce-overhead" if cuda_graphs else None)
                           if compile else self.model)
        self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.model.train()

    def run(self, first: int, last: int) -> None:
        for _ in range(first, last):
            train.train_step(self.step_model, self.optimizer, self.x, self.y, self.autocast)


class DataOnly:
    """Only the data path: the engine's CifarLoader.batch, or one DataLoader batch of the
    reference-style pipeline made in this process (num_workers=0: its CPU cost per batch)."""

    def __init__(self, data: cifar.CifarData, device: torch.device, engine: bool, *, batch_size: int, seed: int):
        if engine:
            ds = cifar.split(data, 0, seed)
            self.loader = cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, batch_size, seed, device,
                                            torch.channels_last)
            self.next = self.loader.batch
        else:
            transform = reference_transform(*channel_stats(data.train_x))
            loader = DataLoader(PILCifar(data.train_x, data.train_y, transform), batch_size=batch_size,
                                shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
            batches = iter(loader)

            def next_batch(_):
                nonlocal batches
                try:
                    x, y = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, y = next(batches)
                return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            self.next = next_batch

    def run(self, first: int, last: int) -> None:
        for it in range(first, last):
            self.next(it)


def bench_tricks(data: cifar.CifarData, arch: str, depth: int, device: torch.device, *, batch_size: int,
                 warmup: int, iterations: int, blocks: int, seed: int, compile: bool | str, **_) -> list[dict]:
    """Time each variant of the step (and each data path) in interleaved blocks, like compare()."""
    cuda = device.type == "cuda"
    step = dict(batch_size=batch_size, seed=seed)
    variants = {  # name: (channels_last, bf16, fused SGD, compile, CUDA graphs, BN group size)
        "NCHW fp32 (the reference's format)": (False, False, None, False, False, None),
        "channels_last fp32": (True, False, None, False, False, None),
        "channels_last bf16 autocast": (True, True, None, False, False, None),
    }
    eager = (True, True, True if cuda else None, False, False)
    if cuda:
        variants["channels_last bf16 + fused SGD (engine, eager)"] = (*eager, None)
    variants["engine, eager, BN over groups of 64 (bn_batch_size: 64)"] = (*eager, 64)
    if compile is not False:
        base = (True, True, True) if cuda else (True, False, None)
        variants["engine + torch.compile"] = (*base, True, False, None)
        if cuda:
            variants["engine + torch.compile with CUDA graphs"] = (*base, True, True, None)
    makers = {name: (lambda v=v: StepVariant(arch, depth, device, channels_last=v[0], bf16=v[1], fused=v[2],
                                            compile=v[3], cuda_graphs=v[4], bn_batch_size=v[5], **step))
              for name, v in variants.items()}
    makers["data only: engine CifarLoader.batch"] = lambda: DataOnly(data, device, True, **step)
    makers["data only: reference DataLoader, in-process"] = lambda: DataOnly(data, device, False, **step)
    started = {name: start_up(make, device, warmup) for name, make in makers.items()}
    timed = timed_blocks([t for t, _ in started.values()], device, warmup, iterations, blocks, batch_size)
    base = timed[0]["ms_per_iteration"]
    return [{"net": f"{arch}-{depth}", "variant": name, **start, **t,
             "speedup_vs_nchw_fp32": round(base / t["ms_per_iteration"], 3)}
            for (name, (_, start)), t in zip(started.items(), timed)]


# --- command line -----------------------------------------------------------------------------------

def print_tricks(rows: list[dict]) -> None:
    print(f"\n{'net':<10} {'variant':<48} {'ms/iteration':>12} {'img/s':>9} {'vs NCHW fp32':>13} {'start-up s':>11}")
    for r in rows:
        print(f"{r['net']:<10} {r['variant']:<48} {r['ms_per_iteration']:>12.1f} {r['images_per_s']:>9.1f} "
              f"{r['speedup_vs_nchw_fp32']:>12.2f}x {r['startup_s']:>11.2f}")


def print_table(report: dict) -> None:
    print(f"\n{'net':<11} {'engine img/s':>13} {'reference img/s':>16} {'ratio':>7} {'(best block)':>15} "
          f"{'engine start-up s':>18} {'reference start-up s':>21}")
    for r in report["results"]:
        e, ref = r["engine"], r["reference"]
        print(f"{r['net']:<11} {e['images_per_s']:>13.1f} {ref['images_per_s']:>16.1f} {r['ratio']:>6.2f}x "
              f"{r['ratio_best_block']:>14.2f}x {e['startup_s']:>18.2f} {ref['startup_s']:>21.2f}")
    for r in report.get("concurrent", []):
        print(f"{r['net']}: {r['processes']} engine processes on one {report['hardware']['device']}: "
              f"{r['aggregate_images_per_s']:.1f} img/s together ({r['vs_one_process']:.2f}x one process; "
              f"each {r['per_process_images_per_s']})")


def main(argv: list[str] | None = None) -> dict:
    """Engine vs reference-style trainer, images/s side by side; writes a JSON report."""
    p = argparse.ArgumentParser(prog="python -m replicate.bench", description=main.__doc__)
    p.add_argument("--data", default="data", help="root holding cifar-10-batches-py/ (else generated data)")
    p.add_argument("--n-train", type=int, default=50_000, help="generated training images, without CIFAR-10")
    p.add_argument("--n-test", type=int, default=10_000, help="generated test images, without CIFAR-10")
    p.add_argument("--arch", default="resnet", choices=["resnet", "plain"])
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--device", default="auto")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations (default 50 on CPU, 500 on a GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5 on CPU, 50 on a GPU)")
    p.add_argument("--blocks", type=int, default=5,
                   help="timed iterations are split into this many blocks, engine and reference in turn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the trainers (default: torch's, one per core)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default min(2, CPUs) on CPU, min(8, CPUs) on a GPU)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="engine torch.compile: auto decides as train does for a run of this length")
    p.add_argument("--cuda-graphs", action="store_true", help="engine: compile with CUDA graphs (CUDA only)")
    p.add_argument("--concurrent", type=int, default=0, metavar="K",
                   help="also run K engine processes at once on the device and report their aggregate")
    p.add_argument("--tricks", action="store_true",
                   help="instead: time each trick alone (memory format, bf16, fused SGD, compile, data path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/bench.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    gpu = device.type != "cpu"
    iterations = args.iterations if args.iterations is not None else (500 if gpu else 50)
    warmup = args.warmup if args.warmup is not None else (50 if gpu else 5)
    cpus = os.cpu_count() or 1
    workers = args.workers if args.workers is not None else min(8 if gpu else 2, cpus)
    if iterations < 1 or warmup < 1 or args.blocks < 1:
        p.error("--iterations, --warmup and --blocks must be at least 1")
    compile = {"auto": "auto", "on": True, "off": False}[args.compile]
    data_args = {"root": args.data, "n_train": args.n_train, "n_test": args.n_test, "seed": args.seed}
    data, source = load_data(**data_args)
    common = {"batch_size": args.batch_size, "warmup": warmup, "iterations": iterations, "blocks": args.blocks,
              "seed": args.seed}
    report = {
        "hardware": hardware(device),
        "settings": {"data": source, "arch": args.arch, "depths": args.depths, **common, "workers": workers,
                     "compile": args.compile, "cuda_graphs": args.cuda_graphs, "concurrent": args.concurrent,
                     "command": " ".join(["python -m replicate.bench", *(argv if argv is not None else sys.argv[1:])])},
        "load_average_before": load_average(),
        "results": [],
    }
    for depth in args.depths if args.tricks else []:
        print(f"{args.arch}-{depth}: each trick alone ...", flush=True)
        report.setdefault("tricks", []).extend(bench_tricks(data, args.arch, depth, device, **common, compile=compile))
    for depth in [] if args.tricks else args.depths:
        print(f"{args.arch}-{depth}: engine and reference-style trainer ...", flush=True)
        row = compare(data, args.arch, depth, device, **common, workers=workers, compile=compile,
                      cuda_graphs=args.cuda_graphs)
        print(f"{row['net']}: engine {row['engine']['images_per_s']:.1f} img/s, "
              f"reference {row['reference']['images_per_s']:.1f} img/s", flush=True)
        report["results"].append(row)
        if args.concurrent > 1:
            print(f"{row['net']}: {args.concurrent} concurrent engine processes ...", flush=True)
            together = bench_concurrent(args.concurrent, data_args, args.arch, depth, device, compile=compile,
                                        cuda_graphs=args.cuda_graphs, **{k: common[k] for k in (
                                            "warmup", "iterations", "batch_size", "seed")})
            together.update(net=row["net"], vs_one_process=round(
                together["aggregate_images_per_s"] / row["engine"]["images_per_s"], 3))
            report.setdefault("concurrent", []).append(together)
    report["load_average_after"] = load_average()
    if args.tricks:
        print_tricks(report["tricks"])
    else:
        print_table(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
