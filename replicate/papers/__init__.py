"""The papers replicated here, one module each: its title, its runs' section of params.yaml, the
nets its runs may be, and its report (tables, figures, verdicts) and quick look. Everything else
is shared: the engine, the data, the DVC stages, the grid runner, Slurm, resume, the report helpers.

A paper module defines:
    YEAR         "2016": `make repro PAPER=2016`; its stages, results and reports carry it
    TITLE        what the reports call it
    SECTION      params.yaml section with its `train` changes, `grid` and `quick`; None: the top level
    NETS         the arch names its runs may use
    DATASETS     the data sets its runs may train on (replicate.data.DATASETS keys)
    QUICK_NOTE   what its quick look's caption adds (how it differs from the paper's nets)
    OUTPUTS      kind -> the files its report writes besides report.ipynb and verdicts.md
    tables(runs, out, note, kind), figures(runs, out, note, kind), verdicts(runs, kind)
kind is "paper" (the paper's protocol) or "quick" (the quick look).
"""

from __future__ import annotations

from types import ModuleType

from . import he2015, he2016

PAPERS: dict[str, ModuleType] = {m.YEAR: m for m in (he2015, he2016)}
DEFAULT = "2015"   # `make repro` and `make quick` with no PAPER=


def get(year: str) -> ModuleType:
    if str(year) not in PAPERS:
        raise ValueError(f"no paper {year!r}: PAPER is one of {', '.join(PAPERS)}")
    return PAPERS[str(year)]
