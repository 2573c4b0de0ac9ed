"""CIFAR-100 (the sequel's Table 3): its tarball checked and prepared as CIFAR-10's is, its 100
"fine" labels, and its place in a run's identity: in the run name, in the config and the
checkpoint, never resumed from or mixed with a CIFAR-10 run. Data made here, in its layout."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from conftest import make_tarball, train_until_first_checkpoint
from replicate import checkpoint, pipeline
from replicate import data as cifar
from replicate.train import Config, train


@pytest.fixture(scope="module")
def tarball(tmp_path_factory, small_cifar100):
    return make_tarball(tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz", small_cifar100, "cifar100")


def test_the_official_tarball_is_pinned_by_md5():
    src = cifar.source("cifar100")
    assert (src.tarball, src.md5, src.folder, src.classes) == (
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", 100)
    pin = pipeline.load_yaml(pipeline.Path(__file__).resolve().parents[1] / src.pin)
    assert pin["outs"][0]["md5"] == src.md5 and pin["deps"][0]["path"] == src.url and pin["frozen"]
    params = pipeline.load_params(pipeline.Path(__file__).resolve().parents[1] / "params.yaml")
    assert pipeline.data_params(params, "cifar100")["md5"] == src.md5


def test_prepare_extracts_it_and_reads_the_fine_labels(tarball, tmp_path, small_cifar100):
    md5 = cifar.md5sum(tarball)
    folder = cifar.prepare(tarball, tmp_path, md5, dataset="cifar100")
    assert folder == tmp_path / "cifar-100-python" and sorted(p.name for p in folder.iterdir()) == ["test", "train"]
    data = cifar.load(tmp_path, "cifar100")
    assert np.array_equal(data.train_y, small_cifar100.train_y) and np.array_equal(data.test_x, small_cifar100.test_x)
    assert data.train_y.max() > 9  # fine labels, not the 20 coarse ones, not CIFAR-10's 10
    with open(folder / "train", "rb") as f:
        assert pickle.load(f, encoding="bytes")[b"coarse_labels"] != data.train_y.tolist()


def test_a_corrupt_or_wrong_tarball_is_refused_and_nothing_is_left(tarball, tmp_path, cifar_tarball):
    truncated = tmp_path / "cifar-100-python.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="expected eb9058c3a382ffc7106e4002c42a8d85 \\(data.cifar100.md5 in params.yaml\\)"
                                         ".*the official CIFAR-100 tarball's is"):
        cifar.prepare(truncated, out, dataset="cifar100")
    with pytest.raises(ValueError, match="is not a readable tar.gz .*Run `make repro PAPER=2016`"):  # the md5 it was told, but corrupt
        cifar.prepare(truncated, out, cifar.md5sum(truncated), dataset="cifar100")
    with pytest.raises(ValueError, match="has no file cifar-100-python/train: it is not the CIFAR-100 python tarball"):
        cifar.prepare(cifar_tarball, out, cifar.md5sum(cifar_tarball), dataset="cifar100")  # CIFAR-10's
    assert not (out / "cifar-100-python").exists() and not list(out.glob(".extract-*"))


def test_an_unsafe_member_is_refused(tmp_path):
    evil = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/../../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unsafe member .* It is not the official CIFAR-100 tarball"):
        cifar.prepare(evil, tmp_path / "out", cifar.md5sum(evil), dataset="cifar100")
    assert not (tmp_path / "escape").exists()


def test_the_command_line_prepares_cifar100(tarball, tmp_path, capsys):
    cifar.main(["prepare", str(tarball), str(tmp_path), "--md5", cifar.md5sum(tarball), "--dataset", "cifar100"])
    assert "prepared" in capsys.readouterr().out and (tmp_path / "cifar-100-python" / "test").is_file()


def test_a_cifar100_batch_read_as_cifar10_is_named(tarball, tmp_path):
    cifar.prepare(tarball, tmp_path, cifar.md5sum(tarball), dataset="cifar100")
    with pytest.raises(ValueError, match="has no b'labels'|is not a readable CIFAR-10 batch"):
        cifar.read_batch(tmp_path / "cifar-100-python" / "train")


# --- a run's identity --------------------------------------------------------------------------

def test_the_run_name_carries_the_data_set():
    run = pipeline.Run.parse("preactbottleneck-164-0-cifar100")
    assert (run.arch, run.depth, run.seed, run.dataset) == ("preactbottleneck", 164, 0, "cifar100")
    assert run.name == "preactbottleneck-164-0-cifar100" and pipeline.Run.parse("preact-110-2").dataset == "cifar10"
    with pytest.raises(ValueError, match="unknown data set 'cifar1000': did you mean 'cifar100'"):
        pipeline.Run.parse("preact-110-0-cifar1000")
    with pytest.raises(ValueError, match="a CIFAR-10 run's name has no data set, write preact-110-0"):
        pipeline.Run.parse("preact-110-0-cifar10")


def test_only_the_sequel_runs_on_cifar100():
    params = pipeline.load_params(pipeline.Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = pipeline.config(params, pipeline.Run.parse("bottleneck-164-0-cifar100"), pipeline.profile_of("2016"))
    assert cfg.dataset == "cifar100"
    with pytest.raises(ValueError, match="He et al. 2015.* has no CIFAR-100 runs: its data sets are cifar10"):
        pipeline.config(params, pipeline.Run.parse("resnet-110-0-cifar100"))
    with pytest.raises(ValueError, match="unknown data set 'cifar20'"):
        Config(dataset="cifar20")


def test_a_cifar100_run_trains_100_classes_and_says_so(small_cifar100, tmp_path):
    cfg = Config(arch="preactbottleneck", depth=11, shortcut=None, dataset="cifar100", iterations=4, milestones=[3],
                 batch_size=16, log_every=2, eval_every=2, checkpoint_every=2, device="cpu", compile=False)
    result = train(cfg, dataset=small_cifar100, out_dir=tmp_path, progress=False)
    assert result.model.fc.out_features == 100 and result.metrics["dataset"] == "cifar100"
    with pytest.raises(ValueError, match="labels up to 99, but the run's dataset cifar10 has 10 classes"):
        train(Config(**{**cfg.__dict__, "dataset": "cifar10"}), dataset=small_cifar100, progress=False)


def test_a_checkpoint_of_one_data_set_is_never_resumed_on_the_other(small_dataset, small_cifar100, tmp_path):
    base = dict(arch="resnet", depth=8, iterations=6, milestones=[4], batch_size=16, log_every=2, eval_every=2,
                checkpoint_every=2, device="cpu", compile=False)
    train_until_first_checkpoint(Config(**base), tmp_path, small_dataset)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="is the checkpoint of run resnet-8-0, not of resnet-8-0-cifar100"):
        train(Config(**base, dataset="cifar100"), dataset=small_cifar100, out_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # refused, not moved aside or overwritten
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    del saved["config"]["dataset"]  # made before runs had a data set: CIFAR-10's
    checkpoint.check_identity(saved, {"config": {**saved["config"], "dataset": "cifar10"}}, tmp_path)
