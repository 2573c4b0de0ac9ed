"""`make repro` and `make quick`: a profile's runs side by side, in local worker slots
(replicate/local.py) or as one Slurm job array (replicate/slurm.py).

Each run is its own `dvc --wait-for-lock repro -s <stage>@<run>`. DVC releases its repo lock while
a stage's command runs and re-takes it only to write that stage's entry in dvc.lock, so several
such processes share one workspace safely. `--wait-for-lock` (DVC >= 3.61) waits for a busy lock
instead of failing after 3 s, and `-s` keeps each process from reproducing the upstream stages.
The order is: the upstream stages (`prepare`, `check`), the runs that are not up to date, then
`dvc repro <report>`, which finds every run up to date. Nothing here edits dvc.lock.

    python -m replicate.grid --jobs auto              # make repro
    python -m replicate.grid --profile quick          # make quick
    python -m replicate.grid --paper 2016 [--profile quick]   # make repro PAPER=2016 (make quick PAPER=2016)
    python -m replicate.grid --executor slurm --slurm partition=gpu timeout_min=120
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from . import gpus, local, memory, papers, pipeline, slurm
from .pipeline import Run
from .tasks import Task, View, outcome, pins_text, rel


def dvc(*args: str, root: Path, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, text=True,
                          capture_output=capture, stdin=subprocess.DEVNULL)


def pending(stages: list[str], root: Path) -> list[str]:
    """The stages that are not up to date (never run, changed, or interrupted)."""
    done = dvc("status", "--json", *stages, root=root, capture=True)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc status` failed:\n{done.stderr}")
    changed = set(json.loads(done.stdout or "{}"))
    return [s for s in stages if s in changed]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m replicate.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=pipeline.PARAMS)
    p.add_argument("--paper", choices=sorted(papers.PAPERS), default=papers.DEFAULT, help="which paper's runs")
    p.add_argument("--profile", choices=("paper", "quick"), default="paper", help="its grid, or its quick look")
    p.add_argument("--jobs", default="auto", help="runs trained at once, or auto (default)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--slurm", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of params.yaml's slurm section, e.g. partition=gpu timeout_min=120")
    p.add_argument("--every", type=float, default=30.0, help="seconds between status lines")
    args = p.parse_args(argv)
    root = Path.cwd()
    profile = pipeline.profile_of(args.paper, args.profile)
    try:
        params = pipeline.load_params(args.params)
        pipeline.check(params, pipeline.NOTEBOOK, pipeline.DVC_YAML)
        grid_runs = pipeline.runs(params, profile)
        names = [r.name for r in grid_runs]
        protocol = pipeline.train_params(params, profile)
        batch = protocol.get("batch_size", 128)
        largest = largest_run(grid_runs, batch)
        deepest = local.Deepest(largest.depth, protocol.get("precision", "auto"), batch, largest.arch,
                                protocol.get("activation_checkpointing", "auto"))
        local.parse_jobs(args.jobs)  # before any DVC command runs
        options = slurm_options(params, args.slurm) if args.executor == "slurm" else {}
        if args.executor == "local":  # a Slurm task checks on its own node (pipeline.train_stage)
            gpus.check_gpus_usable(str(protocol.get("device", "auto")))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")

    upstream = [pipeline.prepare_stage(d) for d in pipeline.datasets(params, profile)] + ["check"]
    print(f"grid: the upstream stages (dvc repro {' '.join(upstream)})", flush=True)
    if dvc("repro", *upstream, root=root).returncode != 0:
        sys.exit("error: the upstream stages failed (above); no run was started")
    stages = [f"{profile.stage}@{n}" for n in names]
    todo = pending(stages, root)
    pins, why = local.plan(args.jobs, len(todo), deepest=deepest) if args.executor == "local" and todo else ([], "")
    tasks = [Task(s.split("@", 1)[1], s, root / profile.results / s.split("@", 1)[1] / "train.log") for s in todo]
    view = View(tasks, already_done=len(stages) - len(todo), every=args.every)
    if pins and "CUDA_VISIBLE_DEVICES" in pins[0]:
        preflight(params, profile, [Run.parse(t.run) for t in tasks], pins[0])
    where = ("as one Slurm job array" if args.executor == "slurm" else
             f"{len(pins)} at a time: " + "; ".join(pins_text(env) for env in pins) + f"; because {why}")
    view.say(f"{len(stages)} runs of `{profile.make}`: {len(stages) - len(todo)} up to date, "
             f"{len(todo)} to train" + (f" ({where})" if todo else ""))
    try:
        if args.executor == "slurm" and tasks:
            codes = slurm.run(tasks, root, options, view)
        else:
            codes = local.run_local(tasks, root, view, pins, again=profile.make)
    except KeyboardInterrupt:
        sys.exit(130)
    failed = [t for t in tasks if codes.get(t.run) != 0]
    view.say(view.status())
    if failed:
        for t in failed:
            print(f"  FAILED {t.run}: {outcome(t, codes.get(t.run))}; its log: {rel(t.log)}", file=sys.stderr)
        sys.exit(f"error: {len(failed)} of {len(stages)} runs failed, so the report ({profile.report_stage}) "
                 f"was not built. Fix the cause (see the logs) and run the same command again: finished "
                 f"runs are not trained again, interrupted ones resume from their checkpoints.")
    print(f"grid: every run is done; the report (dvc repro {profile.report_stage})", flush=True)
    if dvc("repro", profile.report_stage, root=root).returncode != 0:
        sys.exit(f"error: the report stage {profile.report_stage} failed (above)")
    shown = [f for f in papers.get(profile.paper).OUTPUTS[profile.kind] if not f.endswith((".csv", ".json"))] + ["verdicts.md"]
    print(f"grid: report in {profile.reports}/ ({', '.join(shown)})")


def largest_run(runs: list[Run], batch: int) -> Run:
    """The run that holds the most memory (memory.run_gb): ResNet-1001, not the deepest basic net."""
    return max(runs, key=lambda r: memory.run_gb(r.arch, r.depth, "fp32", batch))


def preflight(params: dict, profile: pipeline.Profile, runs: list, pin: dict[str, str]) -> None:
    """Before GPU workers start: CUDA and one eager step of the net to train that holds the most
    memory, on the first slot (gpus.preflight), in seconds, rather than the same failure in every
    worker an hour later."""
    batch = pipeline.train_params(params, profile).get("batch_size", 128)
    deepest = pipeline.config(params, largest_run(runs, batch), profile)
    if deepest.device not in ("auto", "cuda"):  # device: cpu with GPUs present: they stay idle
        return
    try:
        found = gpus.preflight(dataclasses.asdict(deepest), pin)
    except gpus.GpusUnusable as e:
        sys.exit(f"error: {e}")
    print(f"grid: preflight on {found['where']} ({found['device_name']}): CUDA started and one eager step of "
          f"{found['net']} ({found['precision']}) took {found['seconds']:.1f} s, peak {found['peak_of']} "
          f"{found['peak_gib']:.2f} GiB", flush=True)


def slurm_options(params: dict, overrides: list[str]) -> dict:
    """params.yaml's slurm section with KEY=VALUE overrides (values parsed as YAML: 120, null, gpu)."""
    options = dict(params.get("slurm") or {})
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"SLURM_ARGS takes KEY=VALUE items, got {item!r}")
        options[key] = yaml.safe_load(value)
    return options


if __name__ == "__main__":
    main()
