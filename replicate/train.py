"""The papers' training protocol, counted in iterations (He et al. 2015, section 4.2).

SGD (momentum 0.9, weight decay 1e-4, batch 128), lr 0.1 divided by 10 at 32k and 48k, stop at
64k; for depth >= 110 a warm-up at lr 0.01 until the training error is below 80%, then back to
0.1 (the sequel, He et al. 2016: for every net, over exactly its first 400 iterations).
Checkpoints are atomic (replicate/checkpoint.py); a non-finite loss ends the run as 'diverged'.
`lr_ramp` (not the paper's, off in its protocol) is the quick look's short lr ramp.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import difflib
import json
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, code_commit, code_fingerprint, outputs
from . import data as cifar
from .device import (PRECISIONS, autocast, channels_last, compile_pays, device_name, pick_device, resolve_precision,
                     set_backends)
from .models import build, check_depth, record_responses

CHECKPOINT = "checkpoint.pt"
# Fields that cannot change a run's results (resume is exact): a change reruns no DVC stage, and a
# checkpoint made with another value is still resumed. Every other field is part of what made a run.
# activation_checkpointing: the same loss, gradients and BN statistics, bitwise in eager mode
# (tests/test_checkpointing.py); compiled, the rounding of a compiled step (docs/memory.md).
NO_EFFECT = ("checkpoint_every", "activation_checkpointing")


@dataclass
class Config:
    """One training run. The defaults are the paper's protocol (its ResNet-20 run), exactly
    params.yaml's `train` section: tests/test_pipeline.py fails when the two disagree."""

    arch: str = "resnet"
    depth: int = 20
    shortcut: str | None = "A"     # None: each net's own (the sequel's bottlenecks: 1x1 projections)
    seed: int = 0
    dataset: str = "cifar10"       # cifar10, or cifar100 (the sequel's Table 3): a run's data is part of its identity
    iterations: int = 64_000
    milestones: list[int] = field(default_factory=lambda: [32_000, 48_000])
    lr: float = 0.1
    lr_ramp: int = 0               # >0: lr rises linearly to lr over this many first iterations (not the paper's)
    batch_size: int = 128
    bn_batch_size: int | None = None  # BN statistics over groups of this many images (the paper's two GPUs: 64)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: bool | None = None     # None: the paper's rule, on for depth >= 110
    warmup_lr: float = 0.01
    warmup_until: float = 80.0     # warm-up ends once the training error (%) is below this
    warmup_iterations: int = 0     # >0: instead, it ends after exactly this many iterations (the sequel: 400)
    val_size: int = 0              # 5000 gives the paper's 45k/5k split
    log_every: int = 100           # history row, progress, warm-up and divergence checks
    eval_every: int = 1_000        # a test error point (a multiple of log_every)
    eval_subset: int = 0           # >0: intermediate test errors on the first N test images only
    checkpoint_every: int = 4_000
    device: str = "auto"           # cuda, then mps, then cpu
    precision: str = "auto"        # auto, bf16, fp16, tf32, fp32 (device.resolve_precision); BN statistics stay fp32
    deterministic: bool = False    # CUDA: deterministic kernels, so resume is bitwise exact there too
    compile: bool | str = "auto"   # torch.compile: True, False, or "auto" (where it pays: device.compile_pays)
    cuda_graphs: bool = False      # CUDA only: compile with CUDA graphs (mode="reduce-overhead")
    activation_checkpointing: bool | str = "auto"  # recompute in backward: True, False, "auto" (memory.checkpointing_on)

    def __post_init__(self):
        for name, problem in type_errors(dataclasses.asdict(self)):
            raise ValueError(f"{name} {problem}")
        check_depth(self.arch, self.depth, self.shortcut)
        cifar.source(self.dataset)
        self.milestones = list(self.milestones)
        if self.warmup is None:
            self.warmup = self.depth >= 110
        for name in ("iterations", "batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, zero in (("lr_ramp", "no ramp, the paper's"), ("eval_subset", "the whole test set"),
                           ("warmup_iterations", "until the training error is below warmup_until")):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 ({zero}) or a positive count, got {getattr(self, name)!r}")
        if self.lr_ramp >= self.iterations:
            raise ValueError(f"lr_ramp must be less than iterations, got lr_ramp {self.lr_ramp} and iterations "
                             f"{self.iterations}: shorten the ramp (0: none, the paper's) or lengthen the run")
        if self.warmup_iterations >= self.iterations:
            raise ValueError(f"warmup_iterations must be less than iterations, got {self.warmup_iterations} and "
                             f"{self.iterations}: shorten the warm-up (0: the 2015 rule) or lengthen the run")
        if self.milestones != sorted(self.milestones) or any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones must be increasing positive iterations, got {self.milestones}")
        if self.lr <= 0 or self.warmup_lr <= 0:
            raise ValueError(f"lr and warmup_lr must be positive, got {self.lr} and {self.warmup_lr}")
        if self.bn_batch_size is not None and not (
                1 < self.bn_batch_size <= self.batch_size and self.batch_size % self.bn_batch_size == 0):
            raise ValueError(f"bn_batch_size must be null (the whole batch) or a divisor of batch_size "
                             f"{self.batch_size} of at least 2 (the paper's: 64), got {self.bn_batch_size!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or 'auto', got {self.compile!r}")
        if self.activation_checkpointing not in (True, False, "auto"):
            raise ValueError(f"activation_checkpointing must be true, false or 'auto' (on where a run would not fit "
                             f"the device's memory), got {self.activation_checkpointing!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        known = [f.name for f in dataclasses.fields(cls)]
        if {"bf16", "tf32"} & set(values):
            raise ValueError("bf16 and tf32 are now one setting, precision (auto, bf16, fp16, tf32 or fp32): replace "
                             "them with `precision: auto` (bf16 where native, fp16 on V100/T4, fp32 elsewhere)")
        for key in values:
            if key not in known:
                raise ValueError(f"unknown training parameter {key!r}{did_you_mean(key, known)}")
        return cls(**values)


def did_you_mean(key: str, known) -> str:
    """The closest of `known` as a hint (`; did you mean 'lr_ramp'?`): one name, not the whole list."""
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see replicate.train.Config for the known ones"


def type_errors(values: dict) -> list[tuple[str, str]]:
    """(field, what it must be) for each value of `values` whose type does not fit its Config field,
    so that `lr: 0.1x` in params.yaml is named as such, not met later as a failed comparison."""
    hints = typing.get_type_hints(Config)
    return [(name, f"must be {_describe(hints[name])}, got {value!r} ({type(value).__name__})")
            for name, value in values.items() if name in hints and not _fits(value, hints[name])]


def _fits(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(hint, str(hint))


class PaperSchedule:
    """lr multiplier at an iteration: x0.1 per milestone passed, and warmup_lr/lr while warming up.
    With `ramp` > 0 (the quick look only), also (iteration + 1) / ramp over the first `ramp` iterations.
    With `warmup_iterations` > 0 (the sequel's), the warm-up ends at that iteration, whatever the error.

    A callable object (not a lambda) so LambdaLR saves its state, the warm-up flag included.
    """

    def __init__(self, milestones: list[int], warmup_factor: float, warming: bool, ramp: int = 0,
                 warmup_iterations: int = 0):
        self.milestones, self.warmup_factor, self.warming = list(milestones), warmup_factor, warming
        self.ramp, self.warmup_iterations = ramp, warmup_iterations

    def __call__(self, iteration: int) -> float:
        if self.warmup_iterations and iteration >= self.warmup_iterations:
            self.warming = False
        factor = 0.1 ** bisect.bisect_right(self.milestones, iteration)
        if self.ramp:
            factor *= min(1.0, (iteration + 1) / self.ramp)
        return factor * (self.warmup_factor if self.warming else 1.0)


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.SGD:
    """The paper's SGD over every parameter (BN's too). On CUDA the fused kernel does the whole
    update in a few launches (gain unmeasured: no GPU yet); elsewhere torch's default, which on
    CPU is a per-parameter loop: 0.5% of a ResNet-20 step there, not worth more."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None)


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, autocast,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch. Returns the loss and the number of wrong predictions as device
    tensors: no host-device sync here (the caller reads them once per log interval). `scaler`: fp16's
    gradient scaler (a disabled one is a plain step, bit for bit)."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped where fp16 gradients overflowed; the scale then halves
        scaler.update()
    return loss.detach(), (logits.argmax(1) != y).sum()


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, autocast, memory_format,
             mean: torch.Tensor | None = None) -> float:
    """Top-1 error (%) in eval mode (BN running statistics), in large batches, one sync at the end.
    With `mean`, `images` are uint8 and normalised batch by batch (cifar.eval_batches)."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=images.device)
    for x, y in cifar.eval_batches(images, labels, 1000, memory_format, mean):
        with autocast():
            wrong += (model(x).argmax(1) != y).sum()
    model.train(was_training)
    return 100.0 * wrong.item() / len(labels)


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
    precision: str               # what the convolutions compute in: bf16, fp16, tf32 or fp32
    scaler: torch.amp.GradScaler  # fp16's loss scaling; disabled (a plain step) otherwise
    memory_format: torch.memory_format = torch.channels_last  # device.channels_last: NCHW on MPS
    compile_error: str | None = None  # why the compiled step failed to build, and the run went on eagerly
    compile_tried: bool = False       # whether this process's first compiled step has been taken

    def autocast(self):
        """bf16 or fp16 autocast where the run computes in it (device.resolve_precision: bf16 is 2x
        fp32 on our CPU, with the same final errors on real CIFAR-10, docs/speed.md); off otherwise."""
        return autocast(self.device.type, self.precision)


def make_engine(cfg: Config, dataset: cifar.CifarData) -> Engine:
    """Data on the device, the net, SGD and the paper's schedule for `cfg`, weights initialised from
    cfg.seed, and the step compiled where that pays."""
    device = pick_device(cfg.device)
    ran, note = resolve_precision(device, cfg.precision)
    if note:
        print(f"precision {cfg.precision}: {note}", flush=True)
    set_backends(device, tf32=ran == "tf32", deterministic=cfg.deterministic)
    memory_format = channels_last(device)
    ds = cifar.split(dataset, cfg.val_size, cfg.seed)
    loader = cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, cfg.batch_size, cfg.seed, device, memory_format)
    torch.manual_seed(cfg.seed)  # the weight init
    from . import memory  # decides activation_checkpointing alone (NO_EFFECT): not a dep of dvc.yaml's train stage

    recompute = memory.checkpointing_on(cfg.activation_checkpointing, cfg.arch, cfg.depth, ran, cfg.batch_size,
                                        memory.device_gb(device))
    if recompute and cfg.activation_checkpointing == "auto":
        print(f"activation_checkpointing auto: on, one run of {cfg.arch}-{cfg.depth} at batch {cfg.batch_size} "
              f"would not fit the device's {memory.device_gb(device):.0f} GB", flush=True)
    model = build(cfg.arch, cfg.depth, shortcut=cfg.shortcut, bn_batch_size=cfg.bn_batch_size,
                  num_classes=cifar.source(cfg.dataset).classes, checkpointing=recompute).to(
        device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg, device)
    schedule = PaperSchedule(cfg.milestones, cfg.warmup_lr / cfg.lr, warming=cfg.warmup, ramp=cfg.lr_ramp,
                             warmup_iterations=cfg.warmup_iterations)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step_model = model
    if compile_pays(cfg.compile, device, cfg.iterations):  # the whole run decides: resume stays exact
        # CUDA graphs replay the compiled forward and backward without per-kernel launch costs
        # (unmeasured: scripts/gpu_check.py times it). Off unless asked for, and CUDA only.
        cuda_graphs = device.type == "cuda" and cfg.cuda_graphs
        step_model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    scaler = torch.amp.GradScaler(device.type, enabled=ran == "fp16")
    return Engine(device, ds, loader, model, step_model, optimizer, schedule, scheduler, ran, scaler, memory_format)


@dataclass
class Result:
    metrics: dict
    history: pd.DataFrame
    responses: list[float]
    model: torch.nn.Module


def train(cfg: Config, data_root: str | Path | None = None, out_dir: str | Path | None = None, *,
          dataset: cifar.CifarData | None = None, progress: bool = True) -> Result:
    """Train one network by the paper's protocol; resume from `out_dir/checkpoint.pt` if present.

    Writes into `out_dir` (if given): checkpoint.pt, and at the end metrics.json, history.csv,
    responses.csv (Fig. 7) and model.pt (final weights). `dataset` replaces `data_root` in tests.
    """
    clock = time.perf_counter()
    dataset = dataset if dataset is not None else cifar.load(data_root, cfg.dataset)
    check_labels(dataset, cfg.dataset)
    engine = make_engine(cfg, dataset)
    made = checkpoint.made_by({k: v for k, v in dataclasses.asdict(cfg).items() if k not in NO_EFFECT},
                              cifar.fingerprint(dataset), code_fingerprint(), engine.device.type)
    tests = EvalSets(engine, cfg)
    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    state = resume(engine, cfg, ckpt, made) if ckpt is not None and ckpt.exists() else new_state(cfg)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    interval = state["interval"].to(engine.device)  # each iteration's loss and errors, read once per interval
    it = state["iteration"]
    bar = tqdm(total=cfg.iterations, initial=it, desc=f"{cfg.arch}-{cfg.depth}", disable=not progress,
               dynamic_ncols=True)
    engine.model.train()
    while it < cfg.iterations and state["diverged_at"] is None:
        x, y = engine.loader.batch(it)
        k = it % cfg.log_every
        interval[0, k], interval[1, k] = step(engine, x, y)
        lr = engine.optimizer.param_groups[0]["lr"]
        it += 1
        bar.update(1)
        done = it == cfg.iterations
        if it % cfg.log_every == 0 or done:
            bar.set_postfix(**log_interval(engine, cfg, tests, state, interval[:, :k + 1], it, lr, done))
        engine.scheduler.step()
        if it % cfg.checkpoint_every == 0 or done or state["diverged_at"] is not None:
            now = time.perf_counter()
            state.update(iteration=it, interval=interval.cpu(), seconds=state["seconds"] + now - clock)
            clock = now
            if ckpt is not None:
                save(engine, cfg, state, made, ckpt)
    bar.close()
    state["seconds"] += time.perf_counter() - clock
    result = final_result(engine, cfg, state, made)
    if out is not None:
        write_outputs(out, result)
    return result


def check_labels(data: cifar.CifarData, dataset: str) -> None:
    """Labels beyond the net's classes would index past its last layer: name the mix-up instead."""
    classes, top = cifar.source(dataset).classes, int(max(data.train_y.max(), data.test_y.max()))
    if top >= classes:
        raise ValueError(f"the data has labels up to {top}, but the run's dataset {dataset} has {classes} classes: "
                         f"train it with the dataset its data is ({', '.join(cifar.DATASETS)})")


def step(engine: Engine, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step. A compiled step builds at its first call, and a missing C compiler or
    Python.h, or any backend error, would otherwise end the run there: the step is then taken
    again eagerly on the same batch (not fetched twice) from the same weights, BN statistics and
    RNG states (restored: a lazily compiled backward fails after the forward updated BN), so the
    run is an eager run bit for bit and its resume stays exact. Said once, and kept in run.json."""
    if engine.compile_tried or engine.step_model is engine.model:
        return train_step(engine.step_model, engine.optimizer, x, y, engine.autocast, engine.scaler)
    engine.compile_tried = True
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    rng = checkpoint.rng_states()
    try:
        return train_step(engine.step_model, engine.optimizer, x, y, engine.autocast, engine.scaler)
    except Exception as e:  # noqa: BLE001 - any compile failure; an eager failure raises from the retry
        cause = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed, InductorError: the backend's
        first = (str(cause).strip().splitlines() or [""])[0]
        engine.compile_error = (f"{type(e).__name__}: " if cause is not e else "") + f"{type(cause).__name__}: {first}"[:500]
        print(f"torch.compile failed ({engine.compile_error}): training in eager mode", flush=True)
        engine.model.load_state_dict(before)
        engine.optimizer.zero_grad(set_to_none=True)
        checkpoint.set_rng_states(rng)
        engine.step_model = engine.model
        return train_step(engine.model, engine.optimizer, x, y, engine.autocast, engine.scaler)


def new_state(cfg: Config) -> dict:
    """What a checkpoint keeps besides the weights, optimizer, schedule and RNG states."""
    return {"iteration": 0, "history": [], "seconds": 0.0, "diverged_at": None, "warmup_ended_at": None,
            "interval": torch.zeros(2, cfg.log_every)}


def resume(engine: Engine, cfg: Config, path: Path, made: dict) -> dict:
    """Load `path` into the engine if the same run, data, code and settings (`made`) made it, and
    return its saved state. A checkpoint of this run made otherwise is stale: moved aside, and the
    run starts over. Another run's checkpoint is refused (checkpoint.check_identity)."""
    saved = checkpoint.load(path)
    checkpoint.check_identity(saved, made, path)
    stale = checkpoint.changes(saved, made)
    if stale:
        aside = checkpoint.move_aside(path, stale)
        print(f"{path} was made otherwise ({'; '.join(stale)}): moved aside to {aside.name}, "
              "training from iteration 0", flush=True)
        return new_state(cfg)
    engine.model.load_state_dict(saved["model"])
    engine.optimizer.load_state_dict(saved["optimizer"])  # moves its state to the parameters' device
    engine.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and engine.scaler.is_enabled():  # fp16's loss scale and its growth count
        engine.scaler.load_state_dict(saved["scaler"])
    checkpoint.set_rng_states(saved["rng"])
    state = saved["state"]
    print(f"resuming from {path} at iteration {state['iteration']:,} of {cfg.iterations:,}", flush=True)
    return state


def save(engine: Engine, cfg: Config, state: dict, made: dict, path: Path) -> None:
    checkpoint.save_atomic({"config": dataclasses.asdict(cfg), "made_by": made, "device_type": engine.device.type,
                            "model": engine.model.state_dict(), "optimizer": engine.optimizer.state_dict(),
                            "scheduler": engine.scheduler.state_dict(), "scaler": engine.scaler.state_dict(),
                            "rng": checkpoint.rng_states(),
                            "state": state}, path)


class EvalSets:
    """The test set (and validation split) on the device as uint8, normalised batch by batch (a
    quarter of float32's memory). Intermediate points may use the first `eval_subset` test images
    (the quick look: evaluation must not dominate); the final point always uses the whole test set,
    with Fig. 7's responses recorded in the same pass."""

    def __init__(self, engine: Engine, cfg: Config):
        ds, device = engine.split, engine.device
        self.engine, self.subset = engine, slice(0, cfg.eval_subset or None)
        self.mean = torch.as_tensor(ds.mean, device=device)
        self.test = torch.as_tensor(ds.test_x, device=device), torch.as_tensor(ds.test_y, device=device)
        self.val = ((torch.as_tensor(ds.val_x, device=device), torch.as_tensor(ds.val_y, device=device))
                    if cfg.val_size else None)

    def errors(self, final: bool, state: dict) -> dict:
        e, (x, y) = self.engine, self.test
        args = (e.autocast, e.memory_format, self.mean)
        if final:
            with record_responses(e.model) as state["responses"]:
                row = {"test_error": evaluate(e.model, x, y, *args)}
        else:
            row = {"test_error": evaluate(e.model, x[self.subset], y[self.subset], *args)}
        if self.val is not None:
            row["val_error"] = evaluate(e.model, *self.val, *args)
        return row


def log_interval(engine: Engine, cfg: Config, tests: EvalSets, state: dict, interval: torch.Tensor,
                 it: int, lr: float, done: bool) -> dict:
    """Close a log interval ending at iteration `it`: its history row (train loss and error, read in
    the loop's one sync), divergence, the end of the warm-up, and the test error when one is due.
    Returns what the progress bar shows."""
    n = interval.shape[1]
    losses, wrong = interval.cpu()  # the sync point of the loop
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        state["diverged_at"] = it - n + int(bad[0]) + 1
    row = {"iteration": it, "lr": lr, "train_loss": losses.double().mean().item(),
           "train_error": 100.0 * wrong.sum().item() / (n * cfg.batch_size), "test_error": float("nan")}
    if cfg.warmup and state["warmup_ended_at"] is None and (
            it >= cfg.warmup_iterations if cfg.warmup_iterations else row["train_error"] < cfg.warmup_until):
        engine.schedule.warming = False  # the paper: back to lr 0.1 and the normal schedule
        state["warmup_ended_at"] = cfg.warmup_iterations or it
    if (it % cfg.eval_every == 0 or done) and state["diverged_at"] is None:
        row.update(tests.errors(done, state))
    state["history"].append(row)
    shown = {"lr": f"{lr:.3g}", "loss": f"{row['train_loss']:.3f}", "train_err": f"{row['train_error']:.1f}"}
    return {**shown, "test_err": f"{row['test_error']:.1f}" if row["test_error"] == row["test_error"] else "-"}


def final_result(engine: Engine, cfg: Config, state: dict, made: dict) -> Result:
    """The run's final numbers (the final iteration's, never the best), and what made them."""
    history = pd.DataFrame(state["history"])
    last = state["history"][-1] if state["history"] else {}
    diverged = state["diverged_at"] is not None
    ds, model = engine.split, engine.model
    metrics = {
        "arch": cfg.arch, "depth": cfg.depth, "shortcut": getattr(model, "shortcut", cfg.shortcut), "seed": cfg.seed,
        "dataset": cfg.dataset,
        "params": sum(p.numel() for p in model.parameters()),
        "iterations": state["iteration"],
        "train_error": None if diverged else last.get("train_error"),
        "test_error": None if diverged else last.get("test_error"),  # the final iteration's, never the best
        "diverged": diverged, "diverged_at": state["diverged_at"],
        "warmup": cfg.warmup, "warmup_ended_at": state["warmup_ended_at"],
        "seconds": round(state["seconds"], 2), "device": engine.device.type, "device_name": device_name(engine.device),
        # where it ran: the grid gives each worker its GPU or its share of the cores
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(),
        "precision": engine.precision,
        # whether the last process trained compiled; why not, where its compile failed (train.step)
        "compiled": engine.step_model is not engine.model, "compile_error": engine.compile_error,
        "train_images": len(ds.train_y), "test_images": len(ds.test_y),
        "torch": torch.__version__, "commit": code_commit(), "config": dataclasses.asdict(cfg),
        "made_by": made,
    }
    if cfg.val_size:
        metrics["val_error"] = None if diverged else last.get("val_error")
    responses = [] if diverged else state.get("responses", [])  # from the final evaluation
    return Result(metrics, history, responses, model)


def write_outputs(out: Path, result: Result) -> None:
    """The run's results in the layout the pipeline and the report read (replicate/outputs.py)."""
    outputs.write(out, result.metrics)
    result.history.to_csv(out / "history.csv", index=False)
    responses = result.responses
    pd.DataFrame({"layer": range(1, len(responses) + 1), "std": responses}).to_csv(out / "responses.csv", index=False)
    checkpoint.save_atomic({k: v.cpu() for k, v in result.model.state_dict().items()}, out / "model.pt")


def main(argv: list[str] | None = None) -> None:
    """Train one net from the command line: `python -m replicate.train --arch resnet --depth 20 ...`."""
    p = argparse.ArgumentParser(prog="python -m replicate.train", description=main.__doc__)
    p.add_argument("--data", default="data", help="root holding cifar-10-batches-py/ (cifar-100-python/)")
    p.add_argument("--out", default=None, help="run folder (checkpoint, metrics, history)")
    p.add_argument("--params", default=None, help="params.yaml whose `train` section sets the protocol")
    flag = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
    auto_or_flag = lambda s: "auto" if s.lower() == "auto" else flag(s)  # noqa: E731

    def null_or(parse):
        return lambda s: None if s.lower() in ("null", "none") else parse(s)
    kind = {"milestones": lambda s: [int(v) for v in s.split(",")], "warmup": null_or(flag), "deterministic": flag,
            "cuda_graphs": flag, "bn_batch_size": null_or(int), "shortcut": null_or(str),
            "compile": auto_or_flag, "activation_checkpointing": auto_or_flag}
    for f in dataclasses.fields(Config):  # absent unless given: `--shortcut null` must set None, not be skipped
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                       type=kind.get(f.name, type(f.default) if f.default is not dataclasses.MISSING else str))
    args = vars(p.parse_args(argv))
    values = {}
    params, data_root, out = args.pop("params"), args.pop("data"), args.pop("out")
    try:
        if params:
            from .pipeline import load_yaml  # here: pipeline imports this module

            section = (load_yaml(params) or {}).get("train")
            if not isinstance(section, dict):
                raise ValueError(f"{params} has no train section (see params.yaml)")
            values.update(section)
        values.update(args)
        cfg = Config.from_dict(values)
        from .gpus import check_gpus_usable  # here: it cannot change results, so no dep of the stages (dvc.yaml)

        check_gpus_usable(cfg.device)
        result = train(cfg, data_root, out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: v for k, v in result.metrics.items() if k not in ("config", "made_by")}, indent=2))


if __name__ == "__main__":
    main()
