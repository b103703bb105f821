"""`torchrun --nproc-per-node 2 -m haprune.cli prune ...` (gloo, CPU): rank 0 alone writes --out; the plan is the
one a single process makes on the same data, the one-shot model the same, and fine-tuning runs as DDP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from haprune.cli import main
from haprune.models import create_model
from idxdata import make_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    make_data(d, n_test=64)
    torch.manual_seed(0)
    weights = d / "resnet20.safetensors"  # untrained weights: the run's mechanics, not its accuracy, are tested
    save_file({k: v.contiguous() for k, v in create_model("resnet20", in_channels=1, num_classes=10)
               .state_dict().items()}, str(weights))
    return d, weights


ARGS = ["prune", "--model", "resnet20", "--target", "0.4", "--finetune-epochs", "1", "--train-limit", "128",
        "--calib-batches", "4", "--calib-batch-size", "16", "--latency-batch", "2", "--latency-repeats", "2",
        "--eval-limit", "64", "--quiet", "--no-cache"]


def test_torchrun_prune_writes_one_folder_with_the_single_process_plan(setup, tmp_path):
    data, weights = setup
    common = ARGS + ["--weights", str(weights), "--data-dir", str(data)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "haprune.cli", *common, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    assert done.stderr.count("sensitivity: ggn") == 1
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("two", "one"))
    plans = [json.loads((tmp_path / n / "plan.json").read_text())["groups"] for n in ("two", "one")]
    assert plans[0] == plans[1]  # scores all-reduced over 2 processes: the same plan as one process
    assert two["accuracy"]["after_oneshot"] == pytest.approx(one["accuracy"]["after_oneshot"])
    assert two["sensitivity"]["info"]["samples"] == one["sensitivity"]["info"]["samples"] == 64
    assert len(two["finetune"]["history"]) == 1 and two["accuracy"]["after_finetune"] is not None
    assert not list(tmp_path.glob(".two.haprune/tmp-*"))  # nothing left behind by either rank
    assert set(load_file(str(tmp_path / "two" / "model.safetensors"))) == \
        set(load_file(str(tmp_path / "one" / "model.safetensors")))


def _torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "haprune.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=600)


def test_torchrun_prune_hf_makes_the_single_process_plan(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_cli import args, folder  # noqa: F401  (the tiny BERT classifier and its CSV data)

    d = tmp_path / "hf"
    d.mkdir()
    src = folder.__wrapped__(d) if hasattr(folder, "__wrapped__") else None
    assert src is not None
    argv = args(src, "--target", "0.5", "--criterion", "hap", "--calib-batches", "2")
    two = argv[:argv.index("--out")] + ["--out", str(tmp_path / "two")] + argv[argv.index("--out") + 2:]
    done = _torchrun(two)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    assert main(argv) == 0
    plans = [json.loads((p / "plan.json").read_text())["groups"] for p in (tmp_path / "two", src / "out")]
    assert plans[0] == plans[1]
