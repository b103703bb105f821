"""The command line end to end on a tiny synthetic IDX data set (written to a temporary folder)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from haprune.cli import main
from idxdata import make_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """5,400 train + 300 test 8x8 images; the class is which quadrant is bright (learnable in a few steps)."""
    d = tmp_path_factory.mktemp("idx")
    make_data(d, n_test=300)
    return d


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert run("train", "--model", "resnet20", "--epochs", "1", "--train-limit", "512", "--data-dir", data_dir,
               "--out", out, "--quiet") == 0
    return out / "resnet20-fashion-mnist.safetensors"


def test_prune_writes_a_complete_output_folder_that_eval_reloads(data_dir, trained, tmp_path, capsys):
    out = tmp_path / "run"
    code = run("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", out,
               "--target", "0.4", "--implant-ratio", "0.2", "--finetune-epochs", "1", "--train-limit", "256",
               "--calib-batches", "1", "--calib-batch-size", "32", "--latency-batch", "2", "--latency-repeats", "2",
               "--onnx", "--quiet")
    assert code == 0
    printed = capsys.readouterr().out
    assert "params" in printed and "accuracy, fine-tuned" in printed
    report = json.loads((out / "report.json").read_text())
    assert abs(report["params"]["removed"] - 0.4) <= 0.01
    assert report["sensitivity"]["criterion"] == "ggn"  # auto: ReLU network -> exact traces
    assert report["plan"]["counts"]["implanted"] > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["round_to"] == 4  # the default, chosen by benchmarks/latency.py --round-to-study
    for g in plan["groups"].values():  # remaining widths (kept + implanted) are multiples of 4 or untouched
        alive = g["size"] - len(g["remove"])
        assert alive % 4 == 0 or alive == g["size"], g
    for key in ("before", "after_oneshot", "after_finetune"):
        assert 0.0 <= report["accuracy"][key] <= 1.0
    assert report["latency"]["speedup"] > 0
    assert report["onnx"]["max_abs_diff"] < 1e-4  # model.onnx is the merged form, checked against the trained one
    # latency and ONNX run the deployment form: implanted layers merged into one k x k conv, which costs more MACs
    assert report["deployed"]["merged_implants"] > 0
    assert report["deployed"]["flops"] > report["flops"]["after"]
    assert report["deployed"]["params"] > report["params"]["after"]
    assert {"plan.json", "model.safetensors", "model.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    # a fresh process reloads the folder onto the base architecture and measures the same accuracy
    res = subprocess.run([sys.executable, "-m", "haprune.cli", "eval", str(out), "--data-dir", str(data_dir)],
                         capture_output=True, text=True, check=True)
    reloaded = json.loads(res.stdout)
    assert reloaded["test_accuracy"] == pytest.approx(report["accuracy"]["after_finetune"], abs=1e-9)
    assert reloaded["params"] == report["params"]["after"]


@pytest.mark.parametrize("args, message", [
    (["--target", "1.5"], "fraction in [0, 1)"),
    (["--target", "0.3", "--criterion", "hutchinson", "--max-probes", "2", "--max-layer-ratio", "0.05"],
     "max_layer_ratio"),
])
def test_bad_options_give_a_clear_error_and_write_nothing(data_dir, trained, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code = run("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", out,
               "--finetune-epochs", "0", "--calib-batches", "1", "--calib-batch-size", "16", "--quiet", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_inputs_are_explained(data_dir, tmp_path, capsys):
    assert run("prune", "--model", "resnet20", "--weights", tmp_path / "none.safetensors", "--data-dir", data_dir,
               "--out", tmp_path / "o", "--target", "0.3") == 2
    assert "haprune train" in capsys.readouterr().err
    assert run("train", "--model", "resnet20", "--data-dir", tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "apt-get install" in capsys.readouterr().err
    assert run("eval", tmp_path) == 2
    assert "output folder" in capsys.readouterr().err


def test_prune_to_a_latency_budget_measures_saves_and_reuses_its_table(data_dir, trained, tmp_path, capsys):
    import torch
    from haprune.graph import build_structures
    from haprune.latency import measure_latency_table
    from haprune.models import create_model

    common = ["prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--budget", "latency",
              "--finetune-epochs", "0", "--calib-batches", "1", "--calib-batch-size", "16", "--latency-batch", "2",
              "--latency-repeats", "2", "--threads", "1", "--quiet"]
    # without --latency-table the table is measured (wall clock: only target 0 is deterministic) and saved
    assert run(*common, "--target", "0", "--out", tmp_path / "a") == 0
    assert "predicted by the latency table" in capsys.readouterr().out
    measured = json.loads((tmp_path / "a" / "latency_table.json").read_text())
    assert measured["meta"]["batch"] == 2 and measured["meta"]["timer"] == "wall clock"
    # a saved table is planned on as given: here an analytic one (time = MACs), so the plan is deterministic
    net = create_model("resnet20", in_channels=1, num_classes=10).eval()  # the CLI's Fashion-MNIST head
    x = torch.randn(1, 1, 8, 8)

    def macs(layer, inp):
        y = layer(inp)
        return float(layer.weight.numel() * (y.shape[2:].numel() if y.dim() == 4 else 1))

    table = tmp_path / "macs.json"
    measure_latency_table(net, build_structures(net, x), x, timer=macs).save(table)
    plans = []
    for out in ("b", "c"):
        assert run(*common, "--target", "0.3", "--latency-table", table, "--out", tmp_path / out) == 0
        plans.append(json.loads((tmp_path / out / "plan.json").read_text()))
        assert not (tmp_path / out / "latency_table.json").exists()
    assert plans[0]["budget"] == "latency" and abs(plans[0]["achieved"]["latency_removed"] - 0.3) <= 0.01
    assert plans[0]["groups"] == plans[1]["groups"]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    # the table's time is the MACs of its layers (all convs and the classifier): it predicts the FLOPs removed
    assert report["flops"]["removed"] == pytest.approx(plans[0]["achieved"]["latency_removed"], abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--budget", "latency", "--implant-ratio", "0.1"], "plans no implants"),
    (["--latency-table", "t.json"], "only with --budget latency"),
    (["--budget", "latency", "--latency-table", "missing.json"], "cannot read the latency table"),
])
def test_latency_budget_options_are_checked(data_dir, trained, tmp_path, capsys, args, message):
    code = run("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", tmp_path / "x",
               "--target", "0.3", "--finetune-epochs", "0", "--calib-batches", "1", "--calib-batch-size", "16",
               "--quiet", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_prune_with_compensation_records_it_and_keeps_the_dense_batchnorm_statistics(data_dir, trained, tmp_path,
                                                                                     capsys):
    """--compensate sequential: the layers are refit (recorded in report.json, reconstruction error down), the
    one-shot model is the compensated one (dense BatchNorm statistics kept), and eval reloads it."""
    out = tmp_path / "comp"
    code = run("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", out,
               "--target", "0.5", "--compensate", "sequential", "--finetune-epochs", "0", "--calib-batches", "4",
               "--calib-batch-size", "64",
               "--latency-batch", "2", "--latency-repeats", "2", "--quiet")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    comp = report["compensation"]
    assert comp["mode"] == "sequential" and len(comp["layers"]) > 0
    assert "BatchNorm statistics kept" in capsys.readouterr().err
    res = subprocess.run([sys.executable, "-m", "haprune.cli", "eval", str(out), "--data-dir", str(data_dir)],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["test_accuracy"] == pytest.approx(report["accuracy"]["after_oneshot"], abs=1e-9)


def test_compensation_with_too_little_calibration_data_is_refused_before_the_sensitivity_pass(
        data_dir, trained, tmp_path, capsys, monkeypatch):
    """4 images cannot determine the refit of ResNet-20's narrowed layers (its classifier: 64 inputs, one row per
    image, 8 samples even at the narrowest width a plan allows, 10% kept): a clear error naming a layer and what to
    change, no sensitivity pass, nothing written."""
    import haprune.estimate

    def no_pass(*a, **k):
        raise AssertionError("the sensitivity pass ran")

    monkeypatch.setattr(haprune.estimate, "estimate", no_pass)
    out = tmp_path / "few"
    code = run("prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", out,
               "--target", "0.5", "--compensate", "sequential", "--finetune-epochs", "0", "--calib-batches", "1",
               "--calib-batch-size", "4", "--quiet", "--no-cache")
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(r"--compensate: 4 calibration samples cannot determine the refit of '[\w.]+'", err)
    assert "--calib-batches" in err and not out.exists()


def test_compensation_is_on_by_default_where_the_calibration_data_determines_it(data_dir, trained, tmp_path, capsys):
    """--compensate auto (the default) resolves to sequential with enough calibration samples (report: the resolved
    mode, what was asked, the refit layers) and to none, with a warning and BatchNorm re-estimation, with too few."""
    common = ["prune", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--target", "0.5",
              "--finetune-epochs", "0", "--latency-batch", "2", "--latency-repeats", "2", "--quiet", "--no-cache"]
    assert run(*common, "--out", tmp_path / "many", "--calib-batches", "4", "--calib-batch-size", "64") == 0
    report = json.loads((tmp_path / "many" / "report.json").read_text())
    assert report["settings"]["compensate"] == "sequential"
    assert report["settings"]["compensate_requested"] == "auto"
    assert len(report["compensation"]["layers"]) > 0
    assert "compensation off" not in capsys.readouterr().err
    assert run(*common, "--out", tmp_path / "few", "--calib-batches", "1", "--calib-batch-size", "4") == 0
    report = json.loads((tmp_path / "few" / "report.json").read_text())
    assert report["settings"]["compensate"] == "none" and not report["compensation"]
    err = capsys.readouterr().err
    assert "compensation off" in err and "--compensate none" in err
