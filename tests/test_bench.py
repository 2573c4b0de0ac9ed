"""`python -m replicate.bench` runs end to end on tiny data and writes its report. This is a
benchmark, not a timed test: nothing here asserts a speed, only that the numbers exist."""

import json
from pathlib import Path

import pytest
import torch

from replicate import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depths", "8", "--iterations", "2", "--warmup", "1", "--batch-size", "32", "--device", "cpu"]


def check_timings(t: dict) -> None:
    assert t["images_per_s"] > 0 and t["ms_per_iteration"] > 0 and t["best_block_images_per_s"] > 0
    assert len(t["block_images_per_s"]) == 2  # --iterations 2 in (at most) 5 blocks
    for key in ("setup_s", "first_iteration_s", "startup_s", "warmup_s", "steady_s"):
        assert t[key] >= 0, key
    assert t["startup_s"] >= t["setup_s"]


def test_bench_writes_a_report_on_real_layout_data(cifar_root, tmp_path, capsys):
    out = tmp_path / "reports" / "bench.json"
    returned = bench.main(["--data", str(cifar_root), *TINY, "--workers", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["settings"]["data"].startswith("CIFAR-10 from")
    assert report["settings"]["workers"] == 1 and report["settings"]["iterations"] == 2
    for key in ("device", "device_name", "cpu_count", "torch", "torchvision", "torch_threads"):
        assert key in report["hardware"], key
    assert report["hardware"]["torch"] == torch.__version__
    [row] = report["results"]
    assert row["net"] == "resnet-8"
    check_timings(row["engine"])
    check_timings(row["reference"])
    assert row["engine"]["compiled"] is False  # "auto" never compiles a 3-iteration CPU run
    assert row["ratio"] == pytest.approx(row["engine"]["images_per_s"] / row["reference"]["images_per_s"], rel=1e-2)
    assert row["ratio_best_block"] > 0 and row["reference"]["workers"] == 1
    table = capsys.readouterr().out
    assert "engine img/s" in table and "resnet-8" in table


def test_bench_falls_back_to_generated_data(tmp_path):
    data, source = bench.load_data(tmp_path / "nothing-here", n_train=64, n_test=16)
    assert source.startswith("synthetic")
    assert data.train_x.shape == (64, 3, 32, 32) and data.train_x.dtype.name == "uint8"
    report = bench.main(["--data", str(tmp_path), "--n-train", "256", "--n-test", "16", *TINY,
                         "--workers", "0", "--out", ""])
    assert report["results"][0]["reference"]["images_per_s"] > 0


@pytest.mark.slow
def test_concurrent_engine_processes_report_an_aggregate(small_dataset):
    result = bench.bench_concurrent(2, {"root": "no-such-folder", "n_train": 256, "n_test": 16}, "resnet", 8,
                                    torch.device("cpu"), batch_size=32, warmup=1, iterations=2, seed=0,
                                    compile=False, cuda_graphs=False)
    assert result["processes"] == 2 and len(result["per_process_images_per_s"]) == 2
    assert result["aggregate_images_per_s"] > 0 and result["threads_per_process"] >= 1
    assert all(v > 0 for v in result["per_process_images_per_s"])


def test_tricks_mode_times_each_variant_and_both_data_paths(tmp_path):
    report = bench.main(["--tricks", "--data", str(tmp_path), "--n-train", "256", "--n-test", "16", *TINY,
                         "--compile", "off", "--out", ""])
    rows = report["tricks"]
    names = [r["variant"] for r in rows]
    assert names[0].startswith("NCHW fp32") and "channels_last fp32" in names
    assert any(n.startswith("data only: engine") for n in names)
    assert any(n.startswith("data only: reference") for n in names)
    assert any(n.startswith("engine, eager, BN over groups of 64") for n in names)
    assert all(r["images_per_s"] > 0 and r["speedup_vs_nchw_fp32"] > 0 for r in rows)
    assert rows[0]["speedup_vs_nchw_fp32"] == 1.0 and report["results"] == []


def test_make_bench_runs_the_module():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nbench: $(STAMP)\n\t$(PY) -m replicate.bench" in makefile
    assert "## bench:" in makefile


def test_timed_blocks_alternate_the_trainers_over_the_same_iterations():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, first, last):
            calls.append((self.name, first, last))

    assert bench.blocks_of(50, 5) == [10] * 5 and bench.blocks_of(7, 3) == [3, 2, 2] and bench.blocks_of(2, 5) == [1, 1]
    results = bench.timed_blocks([Fake("a"), Fake("b")], torch.device("cpu"), warmup=5, iterations=7, blocks=3,
                                 batch_size=4)
    assert calls == [("a", 5, 8), ("b", 5, 8), ("a", 8, 10), ("b", 8, 10), ("a", 10, 12), ("b", 10, 12)]
    assert [len(r["block_images_per_s"]) for r in results] == [3, 3]


def test_each_trick_is_timed_with_the_engines_backend_settings(monkeypatch):
    """--tricks built its nets without the engine's cuDNN settings, so on CUDA it did not time the
    engine that trains (no cudnn.benchmark)."""
    seen = []
    monkeypatch.setattr(bench, "set_backends", lambda device, **kw: seen.append((device, kw)))
    bench.StepVariant("resnet", 8, torch.device("cuda"), batch_size=4, seed=0, channels_last=True, bf16=False,
                      fused=None, compile=False) if torch.cuda.is_available() else None
    bench.StepVariant("resnet", 8, torch.device("cpu"), batch_size=4, seed=0, channels_last=True, bf16=False,
                      fused=None, compile=False)
    assert seen[-1] == (torch.device("cpu"), {"tf32": False, "deterministic": False})
