"""A finished run's two JSON files: metrics.json holds its metrics only (what `dvc metrics show`
lists, one row a run), run.json what made them (net, config, data, code, machine). Everything that
reads a run folder reads both through `read`. No torch here: the report's kernel imports it."""

from __future__ import annotations

import json
from pathlib import Path

METRICS, RUN = "metrics.json", "run.json"
METRIC_KEYS = ("train_error", "test_error", "val_error", "diverged", "seconds")


def write(folder: Path, values: dict) -> None:
    """Split `values` (train.Result.metrics) into the two files."""
    (folder / RUN).write_text(json.dumps({k: v for k, v in values.items() if k not in METRIC_KEYS}, indent=2) + "\n")
    (folder / METRICS).write_text(json.dumps({k: values[k] for k in METRIC_KEYS if k in values}, indent=2) + "\n")


def read(folder: str | Path) -> dict:
    """A run's metrics.json and run.json as one dict (a run of older code: metrics.json, which held
    both). A damaged file is named, with what to do."""
    folder, found = Path(folder), {}
    for name in (RUN, METRICS):
        path = folder / name
        if not path.is_file():
            continue
        try:
            found.update(json.loads(path.read_text()))
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the run's outputs are damaged; delete the run "
                             f"folder's {METRICS} and {RUN} to train it again") from None
    return found
