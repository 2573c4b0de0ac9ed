"""Shared fixtures: small CIFAR-10 data in the official layout, made on the fly (no downloads,
nothing from outside the repository)."""

import tarfile
from pathlib import Path

import pytest

from replicate import data as cifar
from replicate import train as engine

ROOT = Path(__file__).resolve().parents[1]
# fixtures/report.ipynb holds the report notebook's expected outputs on fixtures/runs;
# test_report.py runs nbval on a copy of it. Never collect it in place (e.g. under --nbval),
# which would write reports/ into the checkout.
collect_ignore = ["fixtures"]


def make_tarball(path: Path, dataset: cifar.CifarData, name: str = "cifar10") -> Path:
    """A tar.gz laid out like the official cifar-10-python.tar.gz (cifar-100-python.tar.gz), holding `dataset`."""
    staging = path.parent / f".{path.name}.staging"
    folder = cifar.write(staging, dataset, name)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=cifar.source(name).folder)
    return path


@pytest.fixture(scope="session")
def small_dataset() -> cifar.CifarData:
    """500 training and 100 test images of learnable synthetic data."""
    return cifar.synthetic(500, 100, seed=0)


@pytest.fixture(scope="session")
def small_cifar100() -> cifar.CifarData:
    """500 training and 200 test images of 100 learnable synthetic classes."""
    return cifar.synthetic(500, 200, seed=1, classes=100)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory, small_dataset) -> Path:
    """A torchvision-style root holding cifar-10-batches-py/ with the small dataset."""
    root = tmp_path_factory.mktemp("cifar")
    cifar.write_cifar10(root, small_dataset)
    return root


@pytest.fixture(scope="session")
def cifar_tarball(tmp_path_factory, small_dataset) -> Path:
    """The small dataset packed like the official tarball."""
    return make_tarball(tmp_path_factory.mktemp("tarball") / cifar.TARBALL, small_dataset)


@pytest.fixture
def steps(monkeypatch) -> list:
    """Every SGD step `train` takes appends to this list: a resumed run must take exactly the
    iterations after its checkpoint (a run restarted from 0 ends with the same weights)."""
    taken, real = [], engine.train_step

    def counting(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_step", counting)
    return taken


class Interrupted(Exception):
    """What kills a run in `train_until_first_checkpoint`."""


def train_until_first_checkpoint(cfg: "engine.Config", out_dir: Path, dataset: cifar.CifarData) -> None:
    """Train `cfg` into `out_dir` and stop it right after its first checkpoint, as a kill would:
    the folder holds checkpoint.pt alone."""
    real_save = engine.save

    def save_then_die(*args):
        real_save(*args)
        raise Interrupted
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "save", save_then_die)
        with pytest.raises(Interrupted):
            engine.train(cfg, out_dir=out_dir, dataset=dataset, progress=False)
