"""Every open GPU question of the project, answered in one command on a lent GPU.

    PYTHONPATH=. python3 scripts/gpu_check.py --out DIR [--sample NPZ] [--budget-s 330]
    PYTHONPATH=. python3 scripts/gpu_check.py --device cpu --budget-s 60 --out DIR   # the CPU dry run

It needs Python, torch, numpy and this package's imports: pandas and tqdm (train.py), pyyaml
(data.py), psutil (local.py), Pillow (bench.py; it comes with matplotlib) and pytest (part 1). The
GPU machine's image has those (Python 3.12, torch, numpy, pandas, matplotlib, seaborn, pyyaml, tqdm,
psutil, pytest) and nothing to install from; it has no DVC, papermill, jupyter, submitit or
torchvision, and nothing here imports them (tests/test_gpu_check.py blocks them in the dry run).
It measures, within --budget-s seconds of wall time:

1. the `cuda` tests (tests/test_cuda.py), with pytest's summary line;
2. the training step of ResNet-56 at batch 128 in every variant (eager, compiled, compiled with
   CUDA graphs; bf16, TF32, strict fp32; deterministic on and off; BN over 64 images, the
   paper's two GPUs), compile time apart from the steady state; then the best one or two for
   ResNet-20 and ResNet-110;
3. a ResNet-56 run killed with SIGKILL mid-way and resumed, against an uninterrupted one, with
   `deterministic: true`: the same weights?
4. k training processes on one GPU (k = 1, 2, 4, 8), images/s in all: what JOBS=auto should use;
5. k ResNet-56 nets packed into one process as grouped convolutions (replicate/packed.py);
6. from those, the predicted wall time of one 64k-iteration ResNet-56 run and of the paper's
   14-run grid, each with how it was computed.

DIR/gpu-check.json and DIR/gpu-check.md are rewritten after every part, so a run cut short keeps
what it measured. A part that does not fit the budget left is skipped and says so. The dry run
(`--device cpu`) does the same on small nets in about a minute; `make test` runs it, so that the
script cannot first break in the minutes a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replicate import bench, local  # noqa: E402
from replicate import data as cifar  # noqa: E402
from replicate import device as dev  # noqa: E402
from replicate import train as engine  # noqa: E402
from replicate.models import record_responses  # noqa: E402
from replicate.packed import PackedResNet, packed_loss  # noqa: E402

dev.fix_cublas_workspace()  # the deterministic variants run after others in this process

# The paper's grid: (arch, depth) of its 14 runs (ResNet-110 five times).
GRID = [(a, d) for a in ("plain", "resnet") for d in (20, 32, 44, 56, 110)] + [("resnet", 110)] * 4
ITERATIONS = 64_000  # a paper-length run
EVALS = ITERATIONS // 1_000  # params.yaml's eval_every: 1000
# Each part's share of the budget, in order of what the next decision needs most. The cuda tests
# come first and matter most: two cold compiles (with and without CUDA graphs) and a deterministic
# resume, eager and compiled. A cold Inductor compile of ResNet-20 is 20-47 s on our 2-core CPU
# (docs/speed.md); ~60 s each is budgeted on a 16-core GPU machine, so 0.45 of the default 330 s
# (~148 s: 2 x 60 s of compiles, ~28 s for the rest) instead of 0.28 (~92 s, a timeout there).
SHARES = {"cuda tests": 0.45, "step times": 0.28, "resume": 0.08, "processes": 0.13, "packed": 0.06}
# What a compile costs before one is measured (s, for ResNet-56): tens of seconds on a GPU; on our
# 2-core CPU 46-47 s with an empty cache (docs/speed.md), far more when the machine is loaded.
COMPILE_GUESS_S = {"cuda": 45.0, "cpu": 90.0}


class Sizes:
    """What is measured where: the paper's nets at batch 128 on a GPU; small nets in the CPU dry run."""

    def __init__(self, device: torch.device, scale: float):
        gpu = device.type == "cuda"
        self.main, self.others = (56, [20, 110]) if gpu else (8, [14])
        self.batch = 128 if gpu else 32
        self.warmup = 20 if gpu else 2
        self.steps = max(10, int(200 * scale)) if gpu else 4  # timed steps per variant
        self.resume_iterations = 400 if gpu else 24
        self.processes = [1, 2, 4, 8] if gpu else [1, 2]
        self.packs = [2, 4, 8] if gpu else [2]
        self.n_train, self.n_test = (10_000, 10_000) if gpu else (1_000, 200)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Check:
    """The run's context and results; every part adds one entry and both files are rewritten."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.budget = Budget(args.budget_s)
        self.sizes = Sizes(self.device, min(1.0, args.budget_s / 330))
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.data_root, self.data_label = prepare_data(args.sample, self.work / "data", self.sizes)
        self.data = cifar.load_cifar10(self.data_root)
        self.results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "budget_s": args.budget_s,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "data": self.data_label, "parts": {}}

    def write(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.budget.start, 1)
        (self.out / "gpu-check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(self.results))


def prepare_data(sample: str | None, root: Path, sizes: Sizes) -> tuple[Path, str]:
    """The real CIFAR-10 sample in the pickle layout when given; generated images otherwise (the
    speed of a step does not depend on the pixels)."""
    if sample:
        arrays = np.load(sample)
        cifar.write_cifar10(root, cifar.CifarData(arrays["train_x"], arrays["train_y"].astype(np.int64),
                                                arrays["test_x"], arrays["test_y"].astype(np.int64)))
        return root, f"real CIFAR-10 sample {Path(sample).name}: {len(arrays['train_y'])} train, {len(arrays['test_y'])} test images"
    cifar.write_cifar10(root, cifar.synthetic(sizes.n_train, sizes.n_test, seed=0))
    return root, f"generated, {sizes.n_train} train / {sizes.n_test} test images"


# --- 0. the machine ---------------------------------------------------------------------------------

def environment(check: Check) -> dict:
    d = check.device
    info = {"device": d.type, "device_name": dev.device_name(d), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if d.type == "cuda":
        smi = run_quietly(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                           "--format=csv,noheader"])
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(d))),
                    gpu_memory_gib=round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1),
                    nvidia_smi=smi.strip(), visible_gpus=local.visible_gpus(),
                    native_bf16=dev.native_bf16(d))
    return info


def run_quietly(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"({type(e).__name__}: {e})"


# --- 1. the cuda tests --------------------------------------------------------------------------------

def cuda_tests(check: Check, seconds: float) -> dict:
    """tests/test_cuda.py under the image's own pytest: no plugins (there is no nbval there)."""
    argv = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"]
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, seconds))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {e.timeout:.0f} s)", None
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   lines[-1] if lines else "no output")
    return {"command": " ".join(["python", *argv[1:]]), "exit_code": code, "summary": summary,
            "output_tail": output[-3000:]}


# --- 2. step times ----------------------------------------------------------------------------------

def variants(device: torch.device, batch: int) -> dict[str, dict]:
    """The engine's settings per variant (train.Config fields), most wanted first."""
    v = {"eager bf16": dict(compile=False, precision="bf16"),
         "compiled bf16": dict(compile=True, precision="bf16"),
         "compiled bf16 + CUDA graphs": dict(compile=True, cuda_graphs=True, precision="bf16"),
         "eager strict fp32": dict(compile=False, precision="fp32"),
         "eager tf32": dict(compile=False, precision="tf32"),
         # the paper's two GPUs: BN over each half of the batch (64 images at batch 128)
         f"eager bf16, BN over {batch // 2} images": dict(compile=False, precision="bf16", bn_batch_size=batch // 2),
         "eager bf16, deterministic": dict(compile=False, precision="bf16", deterministic=True),
         "compiled bf16, deterministic": dict(compile=True, precision="bf16", deterministic=True)}
    if device.type != "cuda":  # no CUDA graphs or TF32 on a CPU: the dry run says so
        v = {name: s for name, s in v.items() if "CUDA graphs" not in name and "tf32" not in name}
    return v


def compile_counters() -> dict:
    """Inductor's count of graphs it ran without CUDA graphs, when it keeps one."""
    try:
        from torch._dynamo.utils import counters
        return {"cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    except Exception:  # noqa: BLE001 - private API: absent is fine
        return {}


def time_variant(check: Check, depth: int, settings: dict) -> dict:
    s, d = check.sizes, check.device
    before = compile_counters()
    trainer, startup = bench.start_up(lambda: bench.Engine(
        check.data, "resnet", depth, d, batch_size=s.batch, seed=0, run_length=s.warmup + s.steps,
        log_every=50, **settings), d, s.warmup)
    [timed] = bench.timed_blocks([trainer], d, s.warmup, s.steps, 3, s.batch)
    after = compile_counters()
    compiled = trainer.info()["compiled"]
    # The warm-up's time beyond its steps at the steady rate: compiling, CUDA graph capture, autotuning.
    overhead = startup["warmup_s"] - s.warmup * timed["ms_per_iteration"] / 1000
    row = {"depth": depth, **settings, "compiled": compiled, "compile_s": round(max(overhead, 0.0), 2) if compiled else 0.0,
           **startup, **{k: timed[k] for k in ("ms_per_iteration", "images_per_s", "best_block_images_per_s")},
           "precision": trainer.engine.precision}
    if after and before and after["cudagraph_skips"] > before["cudagraph_skips"]:
        row["cudagraphs_skipped"] = after["cudagraph_skips"] - before["cudagraph_skips"]
    del trainer
    if d.type == "cuda":
        torch.cuda.empty_cache()
    return row


def eval_seconds(check: Check, depth: int) -> dict:
    """One evaluation on the whole test set (a run makes EVALS of them), and the final one with
    Fig. 7's responses recorded."""
    d = check.device
    e = engine.make_engine(engine.Config(depth=depth, device=d.type, compile=False), check.data)
    x = cifar.normalize(e.split.test_x, e.split.mean, d)
    y = torch.as_tensor(e.split.test_y, device=d)
    engine.evaluate(e.model, x, y, e.autocast, e.memory_format)  # warm
    t = time.perf_counter()
    engine.evaluate(e.model, x, y, e.autocast, e.memory_format)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    with record_responses(e.model):
        engine.evaluate(e.model, x, y, e.autocast, e.memory_format)
    return {"depth": depth, "test_images": len(y), "eval_s": round(plain, 3),
            "eval_with_responses_s": round(time.perf_counter() - t, 3)}


def step_times(check: Check, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    rows, skipped = [], []
    main = check.sizes.main
    compile_s = COMPILE_GUESS_S[check.device.type] * (main / 56 if check.device.type == "cuda" else 1)

    def fits(depth: int, settings: dict) -> bool:
        """Whether a variant's compile, if any, still fits the part's time (the first always runs)."""
        cost = compile_s * depth / main if settings.get("compile") else 5.0
        return not rows or time.monotonic() + cost < deadline

    table = variants(check.device, check.sizes.batch)
    for name, settings in table.items():
        if not fits(main, settings):
            skipped.append(f"resnet-{main} {name}: does not fit the budget left")
            continue
        rows.append({"variant": name, **guarded(lambda: time_variant(check, main, settings))})
        measured = [r["compile_s"] for r in rows if r.get("compile_s")]
        compile_s = max(measured) if measured else compile_s  # the guess, until one is measured
    timed = [r["variant"] for r in sorted(rows, key=lambda r: r.get("ms_per_iteration", float("inf")))
             if "ms_per_iteration" in r]
    picks = list(dict.fromkeys(["eager bf16", *timed[:1]]))  # eager bf16 for the ratio, and the best
    for depth in check.sizes.others:
        for name in picks:
            settings = table[name]
            if not fits(depth, settings):
                skipped.append(f"resnet-{depth} {name}: does not fit the budget left")
                continue
            rows.append({"variant": name, **guarded(lambda: time_variant(check, depth, settings))})
    evals = guarded(lambda: eval_seconds(check, main))  # needed by the prediction: always
    return {"rows": rows, "skipped": skipped, "evaluation": evals}


def guarded(measure) -> dict:
    """A measurement that fails is recorded with its error, not fatal to the check."""
    try:
        return measure()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-1500:]}


# --- 3. kill and resume ------------------------------------------------------------------------------

def train_command(check: Check, out: Path, deterministic: bool) -> list[str]:
    s = check.sizes
    n = s.resume_iterations
    return [sys.executable, "-m", "replicate.train", "--data", str(check.data_root), "--out", str(out),
            "--arch", "resnet", "--depth", str(s.main), "--iterations", str(n), "--milestones", str(n // 2),
            "--batch-size", str(s.batch), "--log-every", str(n // 8), "--eval-every", str(n // 2),
            "--checkpoint-every", str(n // 4), "--compile", "false", "--device", check.device.type,
            "--deterministic", str(deterministic).lower()]


def resume(check: Check, seconds: float) -> dict:
    """An uninterrupted run, and the same run SIGKILLed once it has checkpointed, then resumed."""
    deadline = time.monotonic() + seconds
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = {"depth": check.sizes.main, "iterations": check.sizes.resume_iterations, "deterministic": True}
    whole, cut = check.work / "whole", check.work / "killed"
    t = time.monotonic()
    subprocess.run(train_command(check, whole, True), env=env, check=True, capture_output=True,
                   timeout=max(120, deadline - time.monotonic()))
    result["uninterrupted_s"] = round(time.monotonic() - t, 1)
    proc = subprocess.Popen(train_command(check, cut, True), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not (cut / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)  # mid-interval, between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result["killed"] = proc.returncode == -signal.SIGKILL
    result["killed_at_checkpoint"] = torch.load(cut / "checkpoint.pt", map_location="cpu",
                                                weights_only=False)["state"]["iteration"]
    again = subprocess.run(train_command(check, cut, True), env=env, check=True, capture_output=True, text=True,
                           timeout=max(120, deadline - time.monotonic()))
    # a restart from iteration 0 ends with the same weights: only this line proves a resume
    result["resumed"] = f"resuming from {cut / 'checkpoint.pt'} at iteration {result['killed_at_checkpoint']:,}" in again.stdout
    a, b = (torch.load(p / "model.pt", map_location="cpu") for p in (whole, cut))
    result["identical_weights"] = all(torch.equal(a[k], b[k]) for k in a)
    result["max_abs_difference"] = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (whole, cut))
    result["test_errors"] = [ma["test_error"], mb["test_error"]]
    return result


# --- 4. k processes on one device ------------------------------------------------------------------

def processes(check: Check, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    s, rows = check.sizes, []
    data_args = {"root": str(check.data_root), "seed": 0}
    for k in s.processes:
        left = deadline - time.monotonic()
        if rows and left < 10:  # k = 1 always runs
            rows.append({"processes": k, "error": "skipped: budget"})
            continue
        rows.append(guarded(lambda: bench.bench_concurrent(
            k, data_args, "resnet", s.main, check.device, warmup=s.warmup, iterations=max(4, s.steps // 2),
            batch_size=s.batch,
            seed=0, compile=False, cuda_graphs=False, timeout=max(120, left))))
    ok = [r for r in rows if "aggregate_images_per_s" in r]
    one = next((r["aggregate_images_per_s"] for r in ok if r["processes"] == 1), None)
    for r in ok:
        r["vs_one_process"] = round(r["aggregate_images_per_s"] / one, 2) if one else None
    best = max(ok, key=lambda r: r["aggregate_images_per_s"], default=None)
    return {"depth": s.main, "variant": "eager bf16 (the grid's default for short runs)", "rows": rows,
            "best_k": best and best["processes"]}


# --- 5. k nets packed into one program --------------------------------------------------------------

def packed(check: Check, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    s, d, rows = check.sizes, check.device, []
    bf16 = dev.native_bf16(d)
    for k in s.packs:
        if rows and time.monotonic() > deadline:
            rows.append({"nets": k, "error": "skipped: budget"})
            continue
        rows.append({"nets": k, **guarded(lambda: time_packed(check, k, bf16))})
    return {"depth": s.main, "precision": "bf16" if bf16 else "fp32", "rows": rows}


def time_packed(check: Check, k: int, bf16: bool) -> dict:
    s, d = check.sizes, check.device
    dev.set_backends(d, tf32=False, deterministic=False)
    model = PackedResNet("resnet", s.main, k).to(d, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                          fused=True if d.type == "cuda" else None)
    ds = cifar.split(check.data)
    loaders = [cifar.CifarLoader(ds.train_x, ds.train_y, ds.mean, s.batch, seed, d, torch.channels_last)
               for seed in range(k)]
    autocast = lambda: torch.autocast(d.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    class Packed:
        def run(self, first, last):
            for it in range(first, last):
                batches = [loader.batch(it) for loader in loaders]
                x = torch.cat([b[0] for b in batches], 1).contiguous(memory_format=torch.channels_last)
                y = torch.stack([b[1] for b in batches], 1)
                with autocast():
                    loss = packed_loss(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    trainer, startup = bench.start_up(Packed, d, s.warmup)
    [timed] = bench.timed_blocks([trainer], d, s.warmup, s.steps, 3, s.batch * k)
    return {**startup, "ms_per_step": timed["ms_per_iteration"], "images_per_s": timed["images_per_s"]}


# --- 6. predictions ----------------------------------------------------------------------------------

def predict(results: dict) -> dict:
    """Wall times of a paper-length ResNet-56 run and of the 14-run grid, from the figures above."""
    parts = results["parts"]
    rows = [r for r in parts.get("step times", {}).get("rows", []) if "ms_per_iteration" in r]
    if not rows:
        return {"error": "no step time was measured"}
    main = results["main_depth"]
    at_main = [r for r in rows if r["depth"] == main]
    if not at_main:
        return {"error": f"no step time of ResNet-{main} was measured"}
    best = min(at_main, key=lambda r: r["ms_per_iteration"])
    evals = parts["step times"].get("evaluation", {})
    # CIFAR-10's test set is 10,000 images; the sample's is a tenth of that
    eval_s = round(evals["eval_s"] * 10_000 / evals["test_images"], 3) if "eval_s" in evals else 0.0
    one_run = ITERATIONS * best["ms_per_iteration"] / 1000 + best["compile_s"] + EVALS * eval_s
    how_one = (f"{ITERATIONS:,} x {best['ms_per_iteration']} ms ({best['variant']}, steady) + {best['compile_s']} s "
               f"compile + {EVALS} evaluations of 10,000 test images x {eval_s} s")
    # A step costs about its depth (the grid's own cost model): scale the best variant's time at
    # `main` to each depth, or use that depth's own time where it was measured with the same variant.
    measured = {r["depth"]: r["ms_per_iteration"] for r in rows if r["variant"] == best["variant"]}
    per_run = [ITERATIONS * measured.get(d, best["ms_per_iteration"] * d / main) / 1000 + best["compile_s"] * d / main
               + EVALS * eval_s * d / main for _, d in GRID]
    sequential = sum(per_run)
    procs = [r for r in parts.get("processes", {}).get("rows", []) if r.get("vs_one_process")]
    speedup = max((r["vs_one_process"] for r in procs), default=1.0)
    k = max(procs, key=lambda r: r["vs_one_process"])["processes"] if procs else 1
    out = {"one_run_s": round(one_run, 1), "one_run_how": how_one,
           "grid_sequential_s": round(sequential, 1),
           "grid_sequential_how": f"the 14 runs one after another, each {ITERATIONS:,} steps at the best variant's "
                                  f"time scaled by depth from ResNet-{main} (measured where measured)",
           "grid_one_gpu_s": round(sequential / speedup, 1),
           "grid_one_gpu_how": f"the sequential time / {speedup} (the aggregate of {k} processes on one GPU against one)"}
    packs = [r for r in parts.get("packed", {}).get("rows", []) if "images_per_s" in r]
    single = next((r.get("aggregate_images_per_s") for r in parts.get("processes", {}).get("rows", [])
                   if r.get("processes") == 1), None)
    if packs and single:
        p = max(packs, key=lambda r: r["images_per_s"])
        out["packed_vs_one_process"] = round(p["images_per_s"] / single, 2)
        out["packed_how"] = (f"{p['nets']} nets packed: {p['images_per_s']} img/s against {single} img/s of one "
                             f"eager process; the grid packed {p['nets']} at a time would take about "
                             f"{round(sequential / (p['images_per_s'] / single), 1)} s")
    return out


# --- the report ---------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    parts = results["parts"]
    lines = [f"# GPU check: {parts.get('environment', {}).get('device_name', '?')}", "",
             f"`{results['command']}`, started {results['started']}, {results.get('wall_s', '?')} s of wall time "
             f"(budget {results['budget_s']} s). Data: {results['data']}.", ""]
    env = parts.get("environment", {})
    lines += ["## Machine", "", *[f"- {k}: {v}" for k, v in env.items() if k not in ("status", "seconds")], ""]
    t = parts.get("cuda tests", {})
    lines += ["## cuda tests", "", f"- `{t.get('command', '')}`: **{t.get('summary', t.get('status', ''))}**", ""]
    st = parts.get("step times", {})
    lines += ["## Step times (batch %s)" % results.get("batch", "?"), "",
              "| net | variant | precision | ms/step (steady) | img/s | compile s | first step s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in st.get("rows", []):
        if "ms_per_iteration" in r:
            lines.append(f"| ResNet-{r['depth']} | {r['variant']}{' (CUDA graphs skipped)' if r.get('cudagraphs_skipped') else ''} | "
                         f"{r['precision']} | {r['ms_per_iteration']} | {r['images_per_s']} | {r['compile_s']} | "
                         f"{r['first_iteration_s']} |")
        else:
            lines.append(f"| ResNet-{r.get('depth', '?')} | {r['variant']} | | failed: {r.get('error', '?')} | | | |")
    lines += [f"- skipped: {s}" for s in st.get("skipped", [])]
    if st.get("evaluation"):
        lines += ["", f"- evaluation: {st['evaluation']}"]
    r = parts.get("resume", {})
    lines += ["", "## Killed with SIGKILL and resumed", ""]
    lines += [f"- {k}: {v}" for k, v in r.items() if k not in ("seconds",)]
    p = parts.get("processes", {})
    lines += ["", f"## k processes on one device (ResNet-{p.get('depth', '?')}, {p.get('variant', '')})", "",
              "| processes | img/s in all | vs one | each |", "|---:|---:|---:|---|"]
    for row in p.get("rows", []):
        if "aggregate_images_per_s" in row:
            lines.append(f"| {row['processes']} | {row['aggregate_images_per_s']} | {row.get('vs_one_process')} | "
                         f"{row['per_process_images_per_s']} |")
        else:
            lines.append(f"| {row.get('processes')} | {row.get('error')} | | |")
    pk = parts.get("packed", {})
    lines += ["", f"## k nets packed in one process (ResNet-{pk.get('depth', '?')}, grouped convolutions)", "",
              "| nets | img/s in all | ms/step | first step s |", "|---:|---:|---:|---:|"]
    for row in pk.get("rows", []):
        lines.append(f"| {row['nets']} | {row.get('images_per_s', row.get('error'))} | {row.get('ms_per_step', '')} | "
                     f"{row.get('first_iteration_s', '')} |")
    pr = parts.get("prediction", {})
    lines += ["", "## Predicted (computed from the figures above, not measured)", ""]
    lines += [f"- {k}: {v}" for k, v in pr.items() if k not in ("status", "seconds")]
    lines += ["", "## Parts", "", *[f"- {name}: {part.get('status')} ({part.get('seconds')} s)" for name, part in parts.items()]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--sample", help="the real CIFAR-10 sample (.npz: train_x, train_y, test_x, test_y)")
    p.add_argument("--budget-s", type=float, default=330, help="wall time to fit in (default 330)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check = Check(args)
    check.results.update(batch=check.sizes.batch, main_depth=check.sizes.main)
    steps = [("environment", lambda s: environment(check)), ("cuda tests", lambda s: cuda_tests(check, s)),
             ("step times", lambda s: step_times(check, s)), ("resume", lambda s: resume(check, s)),
             ("processes", lambda s: processes(check, s)), ("packed", lambda s: packed(check, s)),
             ("prediction", lambda s: predict(check.results))]
    for i, (name, part) in enumerate(steps):
        share = SHARES.get(name, 0.0)
        later = sum(SHARES.get(n, 0.0) for n, _ in steps[i + 1:])
        seconds = check.budget.left() * share / (share + later) if share else 0.0
        print(f"[gpu-check {check.budget.seconds - check.budget.left():6.1f} s] {name} ({seconds:.0f} s) ...", flush=True)
        t = time.monotonic()
        # Every part runs at least its smallest measurement, budget or not: the dry run must reach
        # all the code, and a GPU run rather overruns by seconds than leaves a question open.
        found = guarded(lambda: part(max(seconds, 1.0)))
        found["status"] = f"failed: {found['error']}" if set(found) <= {"error", "traceback"} else "ok"
        found["seconds"] = round(time.monotonic() - t, 1)
        check.results["parts"][name] = found
        check.write()
    print(markdown(check.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
