"""A finished grid as a model zoo: `python -m replicate.export RESULTS DIR [--params params.yaml]`.

Every finished run in RESULTS (a folder of it holding metrics.json and model.pt, not diverged, its
iterations those of its config) becomes one file in DIR, `<arch>-<depth>-<seed>-<sha256[:8]>.pt`
(torch.hub's convention of a hash prefix in the name; option B runs on basic units are
`<arch>-<depth>-B-<seed>-...`, CIFAR-100 runs `<arch>-<depth>-<seed>-cifar100-...`), beside one
MANIFEST.json (files, checksums, provenance, the runs left out and why) and a README.md model card.
Diverged and unfinished runs are left out and listed. The 2015 grid (results/) and the sequel's
(results/2016/, any arch of replicate/preact.py, CIFAR-10 and CIFAR-100) export alike.

Each file is a plain `torch.save` of `weights.pack`: the state dict and the metadata (arch, depth,
shortcut, dataset, num_classes, bn_batch_size, seed, the per-pixel `mean` to subtract from the
inputs as a tensor, precision, final errors, ...), all of it loadable with `torch.load(weights_only=True)`. Chosen
over safetensors: no new dependency, torch.hub's download helpers and `torch.load` read it, and the
metadata needs no second file. `python -m replicate.evaluate DIR/*.pt` and hubconf.py read it.

The mean is computed from the training images of the run's data set under --data (CIFAR-100's
folder is read only when a run needs it), as train.py did; the data must be the run's (the image
counts are checked against metrics.json)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import data as cifar
from . import weights as W
from .evaluate import training_mean
from . import preact
from .papers import he2016
from .papers.he2015 import PAPER_TABLE6, paper_text
from .report import net_name
from . import outputs

MANIFEST = "MANIFEST.json"
HUB_ENTRY_POINTS = W.HUB_ENTRY_POINTS  # (arch, depth) -> hubconf.py's entry point (2015 and 2016)
CARD = "README.md"


def find_runs(results: Path) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """The finished runs in `results` as (folder, metrics), and the others as {run, reason}. Only its
    own run folders: results/quick/ (the quick look's) is a grid of its own, exported on its own."""
    if not results.is_dir():
        raise FileNotFoundError(f"RESULTS {results} is not a folder: pass the folder holding the run folders "
                                "(e.g. results or results/quick)")
    folders = sorted({p.parent for p in results.glob("*/metrics.json")} | {p.parent for p in results.glob("*/checkpoint.pt")})
    done, left = [], []
    for folder in folders:
        run = folder.relative_to(results).as_posix()
        if not (folder / "metrics.json").is_file():
            left.append({"run": run, "reason": "unfinished: checkpoint.pt but no metrics.json yet"})
            continue
        m = outputs.read(folder)
        planned = m.get("config", {}).get("iterations")
        if m.get("diverged"):
            left.append({"run": run, "reason": f"diverged at iteration {m.get('diverged_at')}"})
        elif planned is None or m.get("iterations") != planned:
            left.append({"run": run, "reason": f"unfinished: iteration {m.get('iterations')} of {planned}"})
        elif not (folder / "model.pt").is_file():
            left.append({"run": run, "reason": "no model.pt"})
        else:
            done.append((folder, m))
    seen: dict[tuple, Path] = {}
    for folder, m in done:
        key = (m["arch"], m["depth"], m.get("shortcut", "A"), m["seed"], dataset_of(m))
        if key in seen:
            raise ValueError(f"{seen[key]} and {folder} hold the same run {key}: a zoo holds each net and seed "
                             "once; export each grid's folder on its own (results/quick holds the quick look's)")
        seen[key] = folder
    return done, left


def dataset_of(m: dict) -> str:
    """A run's data set key; runs from before CIFAR-100 say none: CIFAR-10."""
    return m.get("dataset") or m.get("config", {}).get("dataset") or cifar.DEFAULT


def data_of(params: Path | None, dataset: str = cifar.DEFAULT) -> dict:
    """params.yaml's section for `dataset` (`data`, `data.cifar100`): what the reports call the data,
    and the tarball's md5."""
    if params is None:
        return {"name": None, "md5": None}
    from .pipeline import data_params, load_yaml
    section = data_params(load_yaml(params) or {}, dataset)
    return {"name": section.get("name"), "md5": section.get("md5")}


def stem(m: dict) -> str:
    """`<arch>-<depth>[-B]-<seed>[-cifar100]`: -B marks projection shortcuts where identity ones are
    the default (not on bottleneck units, which always project); the data set as run names have it."""
    own = "B" if m["arch"] in preact.ARCHS and preact.ARCHS[m["arch"]].unit == "bottleneck" else "A"
    b = "-B" if m.get("shortcut", "A") == "B" and own == "A" and m["arch"] != "plain" else ""
    return f"{m['arch']}-{m['depth']}{b}-{m['seed']}{cifar.suffix(dataset_of(m))}"


def export_run(folder: Path, run: str, m: dict, mean, data: dict, out: Path) -> dict:
    """Write one run's file into `out`; its manifest entry (`run`: its folder below RESULTS)."""
    config, dataset = m.get("config", {}), dataset_of(m)
    state_dict = W.read(folder / "model.pt").state_dict  # a damaged file is named, with what to do
    meta = {
        "arch": m["arch"], "depth": m["depth"], "shortcut": m.get("shortcut", "A"),
        "dataset": dataset, "num_classes": cifar.source(dataset).classes,
        "bn_batch_size": config.get("bn_batch_size"), "seed": m["seed"], "val_size": config.get("val_size", 0),
        "mean": torch.as_tensor(mean).clone(),  # (3, 32, 32), [0, 1] units: inputs are images / 255 minus it
        "precision": m.get("precision"), "deterministic": config.get("deterministic"),
        "device": m.get("device"), "params": m.get("params"), "iterations": m["iterations"],
        "test_error": m.get("test_error"), "train_error": m.get("train_error"),
        "train_images": m.get("train_images"), "test_images": m.get("test_images"),
        "data_name": data["name"], "data_md5": data["md5"], "torch": m.get("torch"), "commit": m.get("commit"),
        "config": config,
    }
    tmp = out / f".{stem(m)}.partial"
    torch.save(W.pack(state_dict, meta), tmp)
    digest = W.file_sha256(tmp)
    name = f"{stem(m)}-{digest[:8]}.pt"
    os.replace(tmp, out / name)
    return {"file": name, "sha256": digest, "run": run,
            **{k: meta[k] for k in ("arch", "depth", "shortcut", "dataset", "num_classes", "seed", "params",
                                    "iterations", "test_error",
                                    "train_error", "data_md5", "data_name", "precision", "device")},
            "device_name": m.get("device_name"), "torch": m.get("torch"), "commit": m.get("commit"),
            "config": config}


def export(results: str | Path, out: str | Path, data_root: str | Path = "data",
           params: str | Path | None = None) -> dict:
    """Export every finished run below `results` into `out`; the manifest (also written there)."""
    results, out = Path(results), Path(out)
    done, left = find_runs(results)
    if not done:
        raise ValueError(f"no finished run below {results} (a folder holding metrics.json and model.pt, not "
                         f"diverged, at its last iteration); left out: {left or 'nothing found'}")
    datasets = sorted({dataset_of(m) for _, m in done}, key=list(cifar.DATASETS).index)
    data = {d: data_of(Path(params) if params else None, d) for d in datasets}
    loaded, means = {d: read_data(data_root, d, done) for d in datasets}, {d: {} for d in datasets}
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for folder, m in done:
        config, key = m.get("config", {}), dataset_of(m)
        dataset = loaded[key]
        n_train = len(dataset.train_x) - int(config.get("val_size") or 0)
        if (m.get("train_images"), m.get("test_images")) not in ((n_train, len(dataset.test_x)), (None, None)):
            raise ValueError(f"{folder} was trained on {m.get('train_images')} images and tested on {m.get('test_images')}, "
                             f"but {data_root} gives {n_train} and {len(dataset.test_x)} ({cifar.source(key).name}): "
                             "pass the run's data with --data")
        mean = training_mean(dataset, config.get("val_size"), m["seed"], means[key])
        entry = export_run(folder, folder.relative_to(results).as_posix(), m, mean, data[key], out)
        entries.append(entry)
        print(f"exported {entry['run']} -> {out / entry['file']}")
    for item in left:
        print(f"left out {item['run']}: {item['reason']}")
    manifest = {"format": W.FORMAT, "data": data, "runs": entries, "left_out": left}
    remove_stale(out, {e["file"] for e in entries})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / CARD).write_text(model_card(manifest))
    return manifest


def read_data(root: str | Path, dataset: str, done: list[tuple[Path, dict]]) -> cifar.CifarData:
    """The data set under `root`; if it is missing, the error names the runs that need it."""
    try:
        return cifar.load(root, dataset)
    except FileNotFoundError as e:
        runs = [folder.name for folder, m in done if dataset_of(m) == dataset]
        raise FileNotFoundError(f"{', '.join(runs[:3])}{' ...' if len(runs) > 3 else ''} ran on "
                                f"{cifar.source(dataset).name}, needed for their input mean: {e}") from None


def remove_stale(out: Path, keep: set[str]) -> None:
    """Delete the files an earlier export into `out` listed and this one did not write, so that
    the folder holds exactly what the new manifest lists."""
    old = out / MANIFEST
    if old.is_file():
        for e in json.loads(old.read_text()).get("runs", []):
            if e.get("file") not in keep and "/" not in e.get("file", "/"):
                (out / e["file"]).unlink(missing_ok=True)


def values(entries: list[dict], key: str, fmt: str = "{}") -> str:
    """The distinct values of one config field over the runs, '/'-joined ('?' when none)."""
    seen = []
    for e in entries:
        v = e["config"].get(key)
        if v not in seen:
            seen.append(v)
    return " / ".join(fmt.format(v) for v in seen) or "?"


def paper_of(e: dict) -> str:
    """The papers' test error for this net, with its table; '-' where they have none."""
    dataset = e.get("dataset", cifar.DEFAULT)
    if e["arch"] == "resnet" and e["shortcut"] == "A" and dataset == cifar.DEFAULT and e["depth"] in PAPER_TABLE6:
        return f"{paper_text(e['depth'])} (2015 Table 6)"
    for table, _, arch, depth, err, data in he2016.rows():
        if (arch, depth, data) == (e["arch"], e["depth"], dataset):
            return f"{err if isinstance(err, str) else f'{err:.2f}'} (2016 {table})"
    return "-"


def model_card(manifest: dict) -> str:
    """README.md of the zoo: the nets beside the paper's numbers, how to load them, how they were made."""
    runs, data = manifest["runs"], manifest["data"]
    datasets = [d for d in cifar.DATASETS if d in data]
    names = " and ".join(cifar.source(d).name for d in datasets)
    sequel = datasets != [cifar.DEFAULT] or any(r["arch"] in preact.ARCHS for r in runs)
    lines = [
        f"# Residual nets on {names} (He et al. 2015 and its 2016 sequel)" if sequel else
        "# Plain and residual nets on CIFAR-10 (He et al. 2015, section 4.2)", "",
        f"{len(runs)} net{'s' * (len(runs) != 1)} trained by this repository. Test errors are top-1 on the whole test set at the "
        "final iteration (never the best one); the paper column is the papers' number and table, not ours.", "",
        "| net | data | seed | params | test error % (ours, final) | paper | file |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in runs:
        ours = "-" if e["test_error"] is None else f"{e['test_error']:.2f}"
        lines.append(f"| {net_name(e['arch'], e['depth'], e['shortcut'])} | "
                     f"{cifar.source(e.get('dataset', cifar.DEFAULT)).name} | {e['seed']} | {e['params']:,} | "
                     f"{ours} | {paper_of(e)} | `{e['file']}` |")
    lines += ["", "The 2015 paper gives no numbers for plain nets; its ResNet-110 entry is its best of 5 runs "
              "(mean±std)." + (" The 2016 paper's are medians of 5 runs." if sequel else ""), ""]
    if manifest["left_out"]:
        lines += ["Left out: " + "; ".join(f"{x['run']} ({x['reason']})" for x in manifest["left_out"]) + ".", ""]
    warming = ", ".join(sorted({net_name(r["arch"], r["depth"], r["shortcut"]) for r in runs if r["config"].get("warmup")}))
    until = (f"iteration {values(runs, 'warmup_iterations')}" if any(r["config"].get("warmup_iterations") for r in runs)
             else f"the training error is below {values(runs, 'warmup_until')}%")  # the sequel's: 400 iterations
    hub = [r for r in runs if (r["arch"], r["depth"]) in HUB_ENTRY_POINTS]
    e = (hub or runs)[0]
    load = (f"model = torch.hub.load(\"path/to/checkout\", \"{HUB_ENTRY_POINTS[e['arch'], e['depth']]}\", "
            f"source=\"local\",\n                       weights=\"{e['file']}\", sha256=\"{e['sha256']}\")" if hub else
            # no entry point for this net: hubconf's own loader
            f"from replicate.weights import load\nmodel = load(\"{e['arch']}\", {e['depth']}, \"{e['file']}\", "
            f"sha256=\"{e['sha256']}\")")
    c100 = "cifar100" in datasets
    lines += [
        "## Loading", "",
        ("With torch.hub, from a checkout of this repository (or `\"<owner>/<repo>\"` on GitHub, without `source=`); "
         if hub else "With hubconf.py's loader (torch.hub has entry points for the papers' nets only); ") +
        "`weights=` takes a path or an http(s) URL, checked by `sha256=` (MANIFEST.json lists each file's):", "",
        "```python",
        "import torch",
        load,
        "x = images.float() / 255 - model.meta[\"mean\"]  # uint8 (N, 3, 32, 32) RGB; the per-pixel mean, no std",
        "logits = model(x)  # the model comes in eval mode",
        "```", "",
        f"The entry points are {', '.join(HUB_ENTRY_POINTS.values())} (any other net: "
        "`replicate.weights.load(arch, depth, weights)`)." +
        (" A CIFAR-100 net has 100 outputs: the weights set `num_classes=100` (passing another number is refused; "
         "`model.meta[\"dataset\"]` says the data set)." if c100 else "") +
        " To check the table's errors on your copy of the data:", "",
        "```",
        "python -m replicate.evaluate *.pt --data data   # data/ holds cifar-10-batches-py/" +
        (" and cifar-100-python/" if c100 else ""),
        "```", "",
        "## How they were trained", "",
        "- Data: " + "; ".join(f"{data[d]['name'] or cifar.source(d).name} (tarball md5 {data[d]['md5'] or 'unknown'})"
                               for d in datasets) + f", {values(runs, 'val_size')} training images held out.",
        f"- {values(runs, 'iterations', '{:,}')} iterations of SGD, batch {values(runs, 'batch_size')} "
        f"(BN statistics over {values(runs, 'bn_batch_size', 'groups of {}').replace('groups of None', 'the whole batch')}), "
        f"momentum "
        f"{values(runs, 'momentum')}, weight decay {values(runs, 'weight_decay')}.",
        f"- lr {values(runs, 'lr')}, divided by 10 at iterations {values(runs, 'milestones')}; lr ramp "
        f"{values(runs, 'lr_ramp')} iterations (0: none, the paper's); warm-up at lr {values(runs, 'warmup_lr')} "
        f"until {until} for {warming or 'none of them'}.",
        "- Augmentation: 4-pixel padding, random 32x32 crop, horizontal flip; inputs minus the per-pixel mean.",
        f"- Precision {'/'.join(sorted({str(r['precision']) for r in runs}))} on "
        f"{'/'.join(sorted({str(r['device_name'] or r['device']) for r in runs}))}; torch "
        f"{'/'.join(sorted({str(r['torch']) for r in runs}))}, commit {'/'.join(sorted({str(r['commit']) for r in runs}))}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Export the finished runs below RESULTS into DIR as a model zoo."""
    p = argparse.ArgumentParser(prog="python -m replicate.export", description=main.__doc__)
    p.add_argument("results", metavar="RESULTS", help="folder holding the run folders (e.g. results)")
    p.add_argument("out", metavar="DIR", help="where the zoo goes (weights, MANIFEST.json, README.md)")
    p.add_argument("--params", default=None,
                   help="params.yaml whose data sections (name, md5) the manifest records (default: ./params.yaml if present)")
    p.add_argument("--data", default="data", metavar="DATA",
                   help="the runs' data, holding cifar-10-batches-py/ (and cifar-100-python/ for CIFAR-100 runs): the "
                        "per-pixel mean to store is computed from it (default: data)")
    args = p.parse_args(argv)
    params = args.params
    if params is None and Path("params.yaml").is_file():
        params = "params.yaml"
    try:
        if params is not None and not Path(params).is_file():
            raise FileNotFoundError(f"--params {params} does not exist: pass the project's params.yaml")
        return export(args.results, args.out, args.data, params)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
