"""benchmarks/sweep.py: one run on a tiny synthetic setting writes a complete JSON, and a rerun skips it."""
from __future__ import annotations

import dataclasses
import json

import torch

from benchmarks_loader import load_benchmark
from haprune.data import DatasetSplits, ImageDataset
from haprune.models import create_model


def _tiny_data() -> DatasetSplits:
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> ImageDataset:
        return ImageDataset(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))

    return DatasetSplits(name="tiny", train=split(64), val=split(32), test=split(32), num_classes=10,
                         in_channels=1, image_size=8, mean=(0.0,), std=(1.0,))


def test_one_run_writes_json_and_resumes(tmp_path):
    sweep = load_benchmark("sweep")
    torch.manual_seed(0)
    dense = create_model("resnet20", in_channels=1, num_classes=10).eval()
    preset = dataclasses.replace(sweep.PRESETS["smoke"], name="tiny", epochs=1, batch_size=16,
                                 max_batches_per_epoch=2, eval_limit=None, calib_batches=1, calib_batch_size=16)
    ctx = sweep.SweepContext(_tiny_data(), lambda name: dense, preset, results_dir=tmp_path / "results",
                             runs_dir=tmp_path / "runs")
    record = sweep.run_one(ctx, "resnet20", "hap", "params", 0.5, 0)
    path = tmp_path / "results" / "resnet20" / "tiny__hap__p50__s0.json"
    assert path.is_file()
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["criterion"] == "hap" and saved["seed"] == 0 and saved["budget"] == "params"
    assert abs(saved["params"]["removed"] - 0.5) <= 0.01
    assert 0 < saved["flops"]["after"] < saved["flops"]["before"]
    for key in ("dense", "oneshot", "finetuned"):
        assert 0.0 <= saved["accuracy"][key] <= 1.0
    assert saved["accuracy"]["split"] == "test" and saved["accuracy"]["eval_images"] == 32
    assert saved["sensitivity_seconds"] >= 0 and saved["details"]["resolved_criterion"] == "ggn"
    assert saved["finetune"]["result"]["best_epoch"] is not None
    assert (tmp_path / "runs" / "tiny" / "resnet20" / f"ft-{saved['finetune']['checkpoint_key']}").is_dir()
    # resume: a second call finds the JSON and skips the run
    assert sweep.run_one(ctx, "resnet20", "hap", "params", 0.5, 0) is None
    # the tables come from the JSON only
    text = sweep.tables(tmp_path / "results")
    assert "test accuracy of the" in text and "| hap |" in text


def test_latency_pass_rebuilds_each_runs_widths_and_fills_latency_once(tmp_path):
    sweep = load_benchmark("sweep")
    torch.manual_seed(0)
    dense = create_model("resnet20", in_channels=1, num_classes=10).eval()
    preset = dataclasses.replace(sweep.PRESETS["smoke"], name="tiny", epochs=0, calib_batches=1, calib_batch_size=16,
                                 eval_limit=None)
    ctx = sweep.SweepContext(_tiny_data(), lambda name: dense, preset, results_dir=tmp_path / "results",
                             runs_dir=tmp_path / "runs")
    for criterion in ("hap+ni-zeros", "tp-magnitude-l2"):  # an implanted plan, and Torch-Pruning's own surgery
        sweep.run_one(ctx, "resnet20", criterion, "params", 0.5, 0)
    tp_widths = json.loads((tmp_path / "results" / "resnet20" / "tiny__tp-magnitude-l2__p50__s0.json").read_text()
                           )["details"]["plan_widths"]
    assert any(removed > 0 for _, removed, _ in tp_widths.values())
    # measure_latencies raises if a rebuilt architecture's parameter count differs from the run's
    assert sweep.measure_latencies(ctx, tmp_path / "results", batch=2, threads=1, repeats=2) == 2
    for path in (tmp_path / "results" / "resnet20").glob("*.json"):
        lat = json.loads(path.read_text())["latency"]
        assert lat["speedup"] > 0 and lat["batch"] == 2 and lat["dense_ms"] > 0
    assert sweep.measure_latencies(ctx, tmp_path / "results", batch=2, threads=1, repeats=2) == 0
    assert "CPU speed-up" in sweep.tables(tmp_path / "results")
