"""The paper's training protocol, counted in iterations (He et al. 2015, section 4.2).

SGD (momentum 0.9, weight decay 1e-4, batch 128), lr 0.1 divided by 10 at 32k and 48k, stop at
64k; for depth >= 110 a warm-up at lr 0.01 until the training error is below 80%, then back to
0.1. Checkpoints are atomic and resume is exact; a non-finite loss ends the run as 'diverged'.
`lr_ramp` (not the paper's, off in its protocol) is the quick look's short linear lr ramp.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as cifar
from .models import build, check_depth, record_responses

CHECKPOINT = "checkpoint.pt"
# Fields that define the experiment: a checkpoint may only be resumed by the same ones.
# (log_every too: the warm-up is judged, and the saved partial interval sized, per log interval.)
PROTOCOL = ("arch", "depth", "shortcut", "seed", "milestones", "lr", "lr_ramp", "batch_size", "momentum",
            "weight_decay", "warmup", "warmup_lr", "warmup_until", "val_size", "log_every")


@dataclass
class Config:
    """One training run. Defaults are the paper's ResNet-20 run; params.yaml overrides them."""

    arch: str = "resnet"
    depth: int = 20
    shortcut: str = "A"
    seed: int = 0
    iterations: int = 64_000
    milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    lr: float = 0.1
    lr_ramp: int = 0               # >0: lr rises linearly to lr over this many first iterations (not the paper's)
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: bool | None = None     # None: the paper's rule, on for depth >= 110
    warmup_lr: float = 0.01
    warmup_until: float = 80.0     # warm-up ends once the training error (%) is below this
    val_size: int = 0              # 5000 gives the paper's 45k/5k split
    log_every: int = 100           # history row, progress, warm-up and divergence checks
    eval_every: int = 2_000
    eval_subset: int = 0           # >0: intermediate test errors on the first N test images only
    checkpoint_every: int = 4_000
    device: str = "auto"
    bf16: bool = True              # autocast where bf16 is native (native_bf16); BN statistics stay fp32
    compile: bool | str = "auto"   # torch.compile: True, False, or "auto" (where it pays: compile_pays)
    cuda_graphs: bool = False      # CUDA only: compile with CUDA graphs (mode="reduce-overhead")

    def __post_init__(self):
        check_depth(self.arch, self.depth, self.shortcut)
        self.milestones = [int(m) for m in self.milestones]
        if self.warmup is None:
            self.warmup = self.depth >= 110
        for name in ("iterations", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, zero in (("lr_ramp", "no ramp, the paper's"), ("eval_subset", "the whole test set")):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be 0 ({zero}) or a positive count, got {getattr(self, name)!r}")
        if self.milestones != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be increasing positive iterations, got {self.milestones}")
        if self.lr <= 0 or self.warmup_lr <= 0:
            raise ValueError(f"lr and warmup_lr must be positive, got {self.lr} and {self.warmup_lr}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or 'auto', got {self.compile!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training parameter(s) {unknown}; known ones are {sorted(known)}")
        return cls(**values)


class PaperSchedule:
    """lr multiplier at an iteration: x0.1 per milestone passed, and warmup_lr/lr while warming up.
    With `ramp` > 0 (the quick look only), also (iteration + 1) / ramp over the first `ramp` iterations.

    A callable object (not a lambda) so LambdaLR saves its state, the warm-up flag included.
    """

    def __init__(self, milestones: list[int], warmup_factor: float, warming: bool, ramp: int = 0):
        self.milestones, self.warmup_factor, self.warming = list(milestones), warmup_factor, warming
        self.ramp = ramp

    def __call__(self, iteration: int) -> float:
        factor = 0.1 ** bisect.bisect_right(self.milestones, iteration)
        if self.ramp:
            factor *= min(1.0, (iteration + 1) / self.ramp)
        return factor * (self.warmup_factor if self.warming else 1.0)


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


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively, so that autocast pays: CUDA GPUs that support
    it, and CPUs with AVX512-BF16 or AMX (the ISAs oneDNN's bf16 convolutions use; elsewhere it
    emulates bf16 and is slower than fp32). On our AVX512-BF16 CPU bf16 measured 2x fp32: docs/speed.md."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, so stay fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


# Fewest iterations for which torch.compile pays on a CPU. Measured on our shared 2-core CPU (torch
# 2.15, batch 128, empty compile cache, eager channels_last vs compiled in one process):
#   ResNet-20, 2 threads: compile 20 s, then 113 vs 124 ms/step (1.10x): pays after ~1,700 steps;
#   ResNet-20, 1 thread, loaded machine: 32 s, 216 vs 228 ms (1.06x): ~2,600 steps;
#   ResNet-56, 1 thread, loaded machine: 47 s, 911 vs 937 ms (1.03x): ~1,900 steps.
# 5,000 leaves a margin; a paper-length run (64k steps) gains far more than the compile costs.
CPU_COMPILE_MIN_ITERATIONS = 5_000


def compile_pays(setting: bool | str, device: torch.device, iterations: int) -> bool:
    """Whether to torch.compile the training step: `setting` True or False decides; "auto" decides
    by device and run length.

    CUDA: yes (unmeasured here: no GPU was lent). CPU: only for runs of at least
    CPU_COMPILE_MIN_ITERATIONS iterations, where the one-off compile is paid back. MPS: no.
    """
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and iterations >= CPU_COMPILE_MIN_ITERATIONS


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.SGD:
    """The paper's SGD over every parameter (BN's too). On CUDA the fused kernel does the whole
    update in a few launches (gain unmeasured: no GPU yet); elsewhere torch's default, which on
    CPU is a per-parameter loop: 0.5% of a ResNet-20 step there, not worth more."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None)


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch. Returns the loss and the number of wrong predictions as device
    tensors: no host-device sync here (the caller reads them once per log interval)."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) != y).sum()


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, autocast, memory_format) -> float:
    """Top-1 error (%) in eval mode (BN running statistics), in large batches, one sync at the end."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=images.device)
    for x, y in cifar.eval_batches(images, labels, 1000, memory_format):
        with autocast():
            wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return 100.0 * wrong.item() / len(labels)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over the target:
    a kill at any moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    """A checkpoint may only continue the same experiment; say exactly what differs."""
    ours = dataclasses.asdict(cfg)
    if (saved["arch"], saved["depth"], saved["shortcut"]) != (cfg.arch, cfg.depth, cfg.shortcut):
        raise ValueError(
            f"{path} is a checkpoint of {saved['arch']}-{saved['depth']} (shortcut {saved['shortcut']}) "
            f"but this run is {cfg.arch}-{cfg.depth} (shortcut {cfg.shortcut}): use another out_dir "
            "or delete the checkpoint"
        )
    # A field newer than the checkpoint had its default (the class attribute) when it was saved.
    saved = {k: saved.get(k, getattr(Config, k, None)) for k in PROTOCOL}
    diff = {k: (saved[k], ours[k]) for k in PROTOCOL if saved[k] != ours[k]}
    if diff:
        raise ValueError(
            f"{path} was trained with other settings {{name: (checkpoint, now)}} = {diff}: "
            "delete the checkpoint to start over, or use another out_dir"
        )


@dataclass
class Engine:
    """What a run trains with. `train` and the benchmark both build it with `make_engine`, so the
    benchmark times exactly the engine that runs train."""

    device: torch.device
    split: cifar.Split
    loader: cifar.CifarLoader
    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its torch.compile wrapper (same parameters)
    optimizer: torch.optim.SGD
    schedule: PaperSchedule
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool
    # channels_last: ResNet-20 steps 1.27x faster than NCHW on our 2-core CPU (115 vs 146 ms at batch
    # 128, fp32, 2 threads; 1.24x on 1 thread), and it is cuDNN's fast NHWC path (GPU: unmeasured).
    memory_format: torch.memory_format = torch.channels_last

    def autocast(self):
        """bf16 autocast where the device has it natively (`native_bf16`: 2x fp32 on our CPU, and
        the same final errors on real CIFAR-10, docs/speed.md); fp32 elsewhere."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def make_engine(cfg: Config, dataset: cifar.Cifar10) -> Engine:
    """Data on the device, the net, SGD and the paper's schedule for `cfg`, weights initialised from
    cfg.seed, and the step compiled where that pays."""
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    memory_format = torch.channels_last
    ds = cifar.split(dataset, cfg.val_size, cfg.seed)
    loader = cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, cfg.batch_size, cfg.seed, device, memory_format)
    torch.manual_seed(cfg.seed)  # the weight init
    model = build(cfg.arch, cfg.depth, shortcut=cfg.shortcut).to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg, device)
    schedule = PaperSchedule(cfg.milestones, cfg.warmup_lr / cfg.lr, warming=cfg.warmup, ramp=cfg.lr_ramp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step_model = model
    if compile_pays(cfg.compile, device, cfg.iterations):  # the whole run decides: resume stays exact
        # CUDA graphs replay the compiled forward and backward without per-kernel launch costs.
        # UNMEASURED: no GPU was lent to this project yet; off unless asked for, and CUDA only.
        step_model = torch.compile(model, mode="reduce-overhead" if cuda and cfg.cuda_graphs else None)
    bf16 = cfg.bf16 and native_bf16(device)
    return Engine(device, ds, loader, model, step_model, optimizer, schedule, scheduler, bf16, memory_format)


@dataclass
class Result:
    metrics: dict
    history: pd.DataFrame
    responses: list[float]
    model: torch.nn.Module


def train(cfg: Config, data_root: str | Path | None = None, out_dir: str | Path | None = None, *,
          dataset: cifar.Cifar10 | None = None, progress: bool = True) -> Result:
    """Train one network by the paper's protocol; resume from `out_dir/checkpoint.pt` if present.

    Writes into `out_dir` (if given): checkpoint.pt, and at the end metrics.json, history.csv,
    responses.csv (Fig. 7) and model.pt (final weights). `dataset` replaces `data_root` in tests.
    """
    start_time = time.perf_counter()
    engine = make_engine(cfg, dataset if dataset is not None else cifar.load_cifar10(data_root))
    device, ds, model, optimizer = engine.device, engine.split, engine.model, engine.optimizer
    schedule, scheduler, autocast, memory_format = engine.schedule, engine.scheduler, engine.autocast, engine.memory_format
    test_x, test_y = cifar.normalize(ds.test_x, ds.mean, device), torch.as_tensor(ds.test_y, device=device)
    # Intermediate points on a fixed subset when asked (quick runs: evaluation must not dominate);
    # the final point is always on the whole test set.
    subset = slice(0, cfg.eval_subset or None)
    if cfg.val_size:
        val_x, val_y = cifar.normalize(ds.val_x, ds.mean, device), torch.as_tensor(ds.val_y, device=device)

    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    state = {"iteration": 0, "history": [], "seconds": 0.0, "diverged_at": None, "warmup_ended_at": None,
             "interval": torch.zeros(2, cfg.log_every)}
    if ckpt_path is not None and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location=device, weights_only=False)
        check_resumable(saved["config"], cfg, ckpt_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
        state = saved["state"]
        print(f"resuming from {ckpt_path} at iteration {state['iteration']:,} of {cfg.iterations:,}", flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def checkpoint():
        if ckpt_path is not None:
            save_atomic({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": rng_states(), "state": state}, ckpt_path)

    # Per-iteration loss and error stay on the device; one sync per log interval reads them.
    interval = state["interval"].to(device)
    start = state["iteration"]
    bar = tqdm(total=cfg.iterations, initial=start, desc=f"{cfg.arch}-{cfg.depth}", disable=not progress,
               dynamic_ncols=True)
    model.train()
    it = start
    while it < cfg.iterations and state["diverged_at"] is None:
        x, y = engine.loader.batch(it)
        k = it % cfg.log_every
        interval[0, k], interval[1, k] = train_step(engine.step_model, optimizer, x, y, autocast)
        lr = optimizer.param_groups[0]["lr"]
        it += 1
        bar.update(1)
        done = it == cfg.iterations
        if it % cfg.log_every == 0 or done:
            n = k + 1
            losses, wrong = interval[:, :n].cpu()  # the sync point of the loop
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                state["diverged_at"] = it - n + int(bad[0]) + 1
            row = {"iteration": it, "lr": lr, "train_loss": losses.double().mean().item(),
                   "train_error": 100.0 * wrong.sum().item() / (n * cfg.batch_size),
                   "test_error": float("nan")}
            if schedule.warming and row["train_error"] < cfg.warmup_until:
                schedule.warming = False  # the paper: back to lr 0.1 and the normal schedule
                state["warmup_ended_at"] = it
            if (it % cfg.eval_every == 0 or done) and state["diverged_at"] is None:
                if done:  # the final test error and Fig. 7's responses in one pass over the whole test set
                    with record_responses(model) as state["responses"]:
                        row["test_error"] = evaluate(model, test_x, test_y, autocast, memory_format)
                else:
                    row["test_error"] = evaluate(model, test_x[subset], test_y[subset], autocast, memory_format)
                if cfg.val_size:
                    row["val_error"] = evaluate(model, val_x, val_y, autocast, memory_format)
            state["history"].append(row)
            bar.set_postfix(lr=f"{lr:.3g}", loss=f"{row['train_loss']:.3f}",
                            train_err=f"{row['train_error']:.1f}",
                            test_err=f"{row['test_error']:.1f}" if row["test_error"] == row["test_error"] else "-")
        scheduler.step()
        if it % cfg.checkpoint_every == 0 or done or state["diverged_at"] is not None:
            state["iteration"] = it
            state["interval"] = interval.cpu()
            state["seconds"] += time.perf_counter() - start_time
            start_time = time.perf_counter()
            checkpoint()
    bar.close()
    state["seconds"] += time.perf_counter() - start_time

    history = pd.DataFrame(state["history"])
    last = state["history"][-1] if state["history"] else {}
    diverged = state["diverged_at"] is not None
    responses = [] if diverged else state.get("responses", [])  # from the final evaluation
    metrics = {
        "arch": cfg.arch, "depth": cfg.depth, "shortcut": cfg.shortcut, "seed": cfg.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "iterations": state["iteration"],
        "train_error": None if diverged else last.get("train_error"),
        "test_error": None if diverged else last.get("test_error"),  # the final iteration's, never the best
        "diverged": diverged, "diverged_at": state["diverged_at"],
        "warmup": cfg.warmup, "warmup_ended_at": state["warmup_ended_at"],
        "seconds": round(state["seconds"], 2), "device": device.type, "device_name": device_name(device),
        # where it ran: the grid gives each worker its GPU or its share of the cores
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
        "precision": "bf16" if engine.bf16 else "fp32",
        "train_images": len(ds.train_y), "test_images": len(ds.test_y),
        "torch": torch.__version__, "config": dataclasses.asdict(cfg),
    }
    if cfg.val_size:
        metrics["val_error"] = None if diverged else last.get("val_error")
    if out is not None:
        write_outputs(out, metrics, history, responses, model)
    return Result(metrics, history, responses, model)


def write_outputs(out: Path, metrics: dict, history: pd.DataFrame, responses: list[float], model) -> None:
    """The run's results in the layout the pipeline and the report read."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    history.to_csv(out / "history.csv", index=False)
    pd.DataFrame({"layer": range(1, len(responses) + 1), "std": responses}).to_csv(out / "responses.csv", index=False)
    save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")


def main(argv: list[str] | None = None) -> None:
    """Train one net from the command line: `python -m replicate.train --arch resnet --depth 20 ...`."""
    p = argparse.ArgumentParser(prog="python -m replicate.train", description=main.__doc__)
    p.add_argument("--data", default="data", help="root holding cifar-10-batches-py/")
    p.add_argument("--out", default=None, help="run folder (checkpoint, metrics, history)")
    p.add_argument("--params", default=None, help="params.yaml whose `train` section sets the protocol")
    flag = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
    kind = {"milestones": lambda s: [int(v) for v in s.split(",")], "warmup": flag, "bf16": flag,
            "cuda_graphs": flag, "compile": lambda s: "auto" if s.lower() == "auto" else flag(s)}
    for f in dataclasses.fields(Config):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       type=kind.get(f.name, type(f.default) if f.default is not dataclasses.MISSING else str))
    args = vars(p.parse_args(argv))
    values = {}
    params = args.pop("params")
    if params:
        import yaml
        values.update(yaml.safe_load(Path(params).read_text())["train"])
    data_root, out = args.pop("data"), args.pop("out")
    values.update({k: v for k, v in args.items() if v is not None})
    result = train(Config.from_dict(values), data_root, out)
    print(json.dumps({k: v for k, v in result.metrics.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
