"""`haprune prune` / `eval` under bad input, interruption and concurrency: each case asserts the message or the
correct result (docs/reliability.md lists them). Tiny synthetic IDX data (8x8 images, 4 classes), ResNet-20."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from haprune import _fileio, cli
from haprune.cli import main
from haprune.io import save_weights
from haprune.models import create_model
from idxdata import make_data, write_idx


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    make_data(d)
    return d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ResNet-20 weights for 1-channel images and the registered data sets' 10 classes (random: untrained)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "resnet20.safetensors"
    save_weights(create_model("resnet20", in_channels=1, num_classes=10), path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs run fastest on one thread; on a busy 2-core machine, two threads per process crawl."""
    from haprune.report import num_threads

    with num_threads(1):
        yield


def run(*args) -> int:
    return main([str(a) for a in args])


def prune_args(data_dir, weights, out, *extra):
    return ["prune", "--model", "resnet20", "--weights", weights, "--data-dir", data_dir, "--out", out,
            "--target", "0.3", "--finetune-epochs", "0", "--calib-batches", "1", "--calib-batch-size", "16",
            "--latency-batch", "2", "--latency-repeats", "1", "--eval-limit", "64", "--criterion", "l2", "--quiet",
            *extra]


@pytest.fixture
def no_estimation(monkeypatch):
    """Fail the test if the sensitivity pass starts: bad input must be refused before it."""
    import haprune.estimate

    def estimate(*a, **k):
        raise AssertionError("the sensitivity pass ran before the bad input was refused")

    monkeypatch.setattr(haprune.estimate, "estimate", estimate)


def test_parser_choices_match_the_library():
    from haprune.apply import COMPENSATE_MODES, IMPLANT_INITS
    from haprune.estimate import CRITERIA, SCORE_RULES
    from haprune.plan import ALLOCATIONS, IMPLANT_KINDS

    assert cli.ALLOCATIONS == ALLOCATIONS
    assert cli.CRITERIA == CRITERIA and cli.SCORE_RULES == SCORE_RULES
    assert cli.IMPLANT_INITS == IMPLANT_INITS and cli.IMPLANT_KINDS == IMPLANT_KINDS
    assert cli.COMPENSATE_CHOICES == ("auto", "none", *COMPENSATE_MODES)


def test_help_and_argument_errors_import_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom haprune.cli import main\n"
            "try:\n    main(['prune', '--model', 'resnet20', '--target', 'x'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "False" and "invalid float value" in res.stderr


# ------------------------------------------------------------------------------------ bad input, before any work

@pytest.mark.parametrize("extra, message", [
    (["--implant-ratio", "2"], "--implant-ratio must be in [0, 1]"),
    (["--target", "-0.1"], "--target must be a fraction in [0, 1)"),
    (["--target", "nan"], "--target must be a fraction in [0, 1)"),
    (["--max-layer-ratio", "0"], "--max-layer-ratio must be in (0, 1]"),
    (["--calib-batches", "0"], "--calib-batches must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--distill", "0.5"], "--distill applies to fine-tuning"),
    (["--round-to", "0"], "--round-to must be at least 1"),
    (["--ignore", "layer9.conv"], "--ignore names no layer of the model: layer9.conv"),
])
def test_bad_options_are_refused_before_the_sensitivity_pass(data_dir, weights, tmp_path, capsys, no_estimation,
                                                             extra, message):
    out = tmp_path / "out"
    assert run(*prune_args(data_dir, weights, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no lock or staging folder left


def test_bad_out_is_refused_before_any_work(data_dir, weights, tmp_path, capsys, no_estimation):
    a_file = tmp_path / "report.txt"
    a_file.write_text("x")
    assert run(*prune_args(data_dir, weights, a_file)) == 2
    assert "is an existing file" in capsys.readouterr().err
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    assert run(*prune_args(data_dir, weights, home)) == 2
    assert "other files in it" in capsys.readouterr().err and (home / "notes.txt").read_text() == "mine"
    import os

    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert run(*prune_args(data_dir, weights, ro / "run")) == 2
            assert "permission denied" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_a_second_writer_on_the_same_out_is_refused(data_dir, weights, tmp_path, capsys, no_estimation):
    with _fileio.run_folder(tmp_path / "out"):
        assert run(*prune_args(data_dir, weights, tmp_path / "out")) == 2
    assert "another haprune process" in capsys.readouterr().err


def _weights_variant(weights, tmp_path, name, change):
    tensors = load_file(weights)
    change(tensors)
    path = tmp_path / name
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("variant, message", [
    ("resnet56", "does not match the model: it lacks layer1.3"),
    ("empty", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("int32", "integer tensors where the model has floating-point ones"),
    ("nan", "NaN or infinite values in conv1.weight"),
])
def test_bad_weight_files_are_refused_before_any_work(data_dir, weights, tmp_path, capsys, no_estimation,
                                                      variant, message):
    model = "resnet20"
    if variant == "resnet56":
        path, model = weights, "resnet56"
    elif variant == "empty":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"")
    elif variant == "truncated":
        path = tmp_path / "w.safetensors"
        path.write_bytes(weights.read_bytes()[:5000])
    elif variant == "int32":
        path = _weights_variant(weights, tmp_path, "w.safetensors",
                                lambda t: t.update({"conv1.weight": (t["conv1.weight"] * 10).to(torch.int32)}))
    else:
        path = _weights_variant(weights, tmp_path, "w.safetensors", lambda t: t["conv1.weight"].view(-1)[0].fill_(
            float("nan")))
    args = prune_args(data_dir, path, tmp_path / "out")
    args[2] = model
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_data_faults_are_messages(weights, tmp_path, capsys, no_estimation):
    short = tmp_path / "short"
    short.mkdir()
    make_data(short, n_train=600, n_labels=590)
    assert run(*prune_args(short, weights, tmp_path / "a")) == 2
    assert "holds 590 labels but" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    make_data(broken, n_train=600)
    gz = broken / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])
    assert run(*prune_args(broken, weights, tmp_path / "b")) == 2
    assert "gzip data is truncated or corrupt" in capsys.readouterr().err


def test_an_infinite_calibration_loss_is_refused_before_planning(data_dir, weights, tmp_path, capsys, no_estimation):
    huge = _weights_variant(weights, tmp_path, "huge.safetensors", lambda t: t["fc.weight"].fill_(3e38))
    assert run(*prune_args(data_dir, huge, tmp_path / "out")) == 2
    assert "loss on the calibration data is" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ run folders

def _run_ids(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        weights_id = f.metadata()[cli.RUN_ID_KEY]
    return {json.loads((folder / n).read_text())["run_id"] for n in ("model.json", "report.json", "run.json")} | {
        weights_id}


def test_a_run_is_stamped_and_a_dense_model_at_chance_is_flagged(data_dir, weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(*prune_args(data_dir, weights, out)) == 0
    captured = capsys.readouterr()
    assert "WARNING: the dense model's test accuracy" in captured.err  # random weights: chance level
    report = json.loads((out / "report.json").read_text())
    assert len(_run_ids(out)) == 1 and report["run_id"] in _run_ids(out)
    assert any("majority-class rate" in w for w in report["warnings"])
    labels = torch.tensor(np.frombuffer(gzip.decompress((data_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:],
                                        dtype=np.uint8).astype(np.int64))[:64]
    assert report["majority_class_rate"] == pytest.approx(float(torch.bincount(labels).max()) / 64)
    assert report["compensation"] is None and report["plan_notes"] == list(report.get("plan_notes") or [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, staging or checkpoint folder left


@pytest.fixture(scope="module")
def finished(data_dir, weights, tmp_path_factory):
    """A complete run folder (one-shot), and what eval measures on it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert run(*prune_args(data_dir, weights, out)) == 0
    return out


def _eval_json(folder, data_dir, capsys):
    code = run("eval", folder, "--data-dir", data_dir, "--eval-limit", "64")
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


@pytest.mark.parametrize("fail_at", range(1, 6))
def test_a_failure_at_any_write_step_leaves_the_complete_previous_run(data_dir, weights, finished, tmp_path, capsys,
                                                                      monkeypatch, fail_at):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = _fileio.atomic_write_bytes
    calls = []

    def failing(path, data):  # the fail_at-th file write of the run "dies" (the process would be killed here)
        calls.append(path)
        if len(calls) == fail_at:
            raise KeyboardInterrupt(f"simulated kill writing {path}")
        return real(path, data)

    monkeypatch.setattr(_fileio, "atomic_write_bytes", failing)
    assert run(*prune_args(data_dir, weights, out, "--target", "0.5")) == 130
    monkeypatch.setattr(_fileio, "atomic_write_bytes", real)
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte for byte the previous run
    code, result = _eval_json(out, data_dir, capsys)
    assert code == 0 and result["run_id"] == json.loads((finished / "run.json").read_text())["run_id"]
    assert len(calls) >= fail_at


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "model.json").write_text("{not json"), "model.json is not valid JSON"),
    (lambda d: _edit_json(d / "model.json", lambda j: j.pop("num_classes")), "model.json lacks num_classes"),
    (lambda d: _edit_json(d / "model.json", lambda j: j.update(num_classes=2_000_000_000)),
     "num_classes must be an integer in [1, 100000]"),
    (lambda d: _edit_json(d / "model.json", lambda j: j.update(in_channels=3)),
     "describes a model for 3-channel images"),
    (lambda d: _edit_json(d / "plan.json", lambda j: j.update(groups=list(j["groups"].values()))),
     "plan.json is not a valid haprune plan"),
    (lambda d: _edit_json(d / "report.json", lambda j: j.update(run_id="20260101T000000-00000000")),
     "mixes files of different runs"),
    (lambda d: _resave(d / "model.safetensors", lambda t: t["fc.weight"].view(-1)[0].fill_(float("nan"))),
     "NaN or infinite values in fc.weight"),
    (lambda d: _resave(d / "model.safetensors", lambda t: t.update(
        {"conv1.weight": (t["conv1.weight"] * 100).to(torch.int32)})), "integer tensors"),
])
def test_eval_refuses_a_tampered_folder_with_a_message(finished, data_dir, tmp_path, capsys, tamper, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(finished, folder)
    tamper(folder)
    code, err = _eval_json(folder, data_dir, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def _edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _resave(path, change):
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


# ------------------------------------------------------------------------------------ resume

class _Stop(KeyboardInterrupt):
    pass


def _interrupt_after_epoch(monkeypatch, epoch: int):
    real = cli._log

    def log(msg):
        real(msg)
        if msg.startswith(f"fine-tune epoch {epoch}:"):
            raise _Stop(msg)

    monkeypatch.setattr(cli, "_log", log)
    return lambda: monkeypatch.setattr(cli, "_log", real)


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """Your own data as a .npz: 400 train (360 + 40 validation) and 64 test 8x8 images of 10 classes."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("npz") / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (400, 8, 8), dtype=np.uint8), y_train=np.arange(400) % 10,
             x_test=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8), y_test=np.arange(64) % 10)
    return path


def test_resume_continues_its_own_run_and_never_another(small_npz, weights, tmp_path, capsys, monkeypatch):
    data_dir = small_npz  # prune_args passes it as --data-dir; replaced by --data below
    ft = ["--finetune-epochs", "2", "--train-limit", "64", "--batch-size", "32", "--implant-ratio", "0.5"]

    def prune_args(_, w, out, *extra):  # noqa: F811 - the same run on the .npz data
        args = globals()["prune_args"](small_npz, w, out, *extra)
        args[args.index("--data-dir")] = "--data"
        return args

    straight = tmp_path / "straight"
    assert run(*prune_args(data_dir, weights, straight, *ft)) == 0
    out = tmp_path / "out"
    restore = _interrupt_after_epoch(monkeypatch, 1)
    assert run(*prune_args(data_dir, weights, out, *ft)) == 130  # killed after epoch 1: nothing at --out yet
    restore()
    assert not out.exists() and len(list(_fileio.work_dir(out).glob("checkpoint-*"))) == 1
    capsys.readouterr()
    # a re-run with another implant init must not pick up that checkpoint (issue 18.1)
    restore = _interrupt_after_epoch(monkeypatch, 1)
    assert run(*prune_args(data_dir, weights, out, *ft, "--implant-init", "zeros")) == 130
    restore()
    err = capsys.readouterr().err
    assert "not resuming the fine-tuning checkpoints of other runs" in err and "resuming from epoch" not in err
    # the original settings resume their own run, and end bit-identical to the uninterrupted one
    assert run(*prune_args(data_dir, weights, out, *ft)) == 0
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert f"resuming from epoch 1 of run {report['finetune_run']}" in err
    assert report["finetune"]["resumed_from_epoch"] == 1
    reference = json.loads((straight / "report.json").read_text())
    assert report["finetune_run"] == reference["finetune_run"]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(_fileio.work_dir(out).glob("checkpoint-*")) if _fileio.work_dir(out).exists() else True


# ------------------------------------------------------------------------------------ any model a user brings

MODEL_FILE = '''
import torch.nn as nn


def make(in_channels=1, num_classes=10):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def _npz_prune(small_npz, out, *model):
    return ["prune", *model, "--data", small_npz, "--out", out, "--target", "0.3", "--finetune-epochs", "0",
            "--calib-batches", "1", "--calib-batch-size", "16", "--latency-batch", "2", "--latency-repeats", "1",
            "--criterion", "l2", "--round-to", "1", "--quiet"]


def test_a_model_file_and_factory_prunes_and_eval_reloads_it(small_npz, tmp_path, capsys):
    import importlib.util

    (tmp_path / "mynet.py").write_text(MODEL_FILE)
    spec = importlib.util.spec_from_file_location("mynet_for_test", tmp_path / "mynet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    save_weights(module.make(1, 10), tmp_path / "w.safetensors")
    out = tmp_path / "run"
    model = ["--model-file", f"{tmp_path / 'mynet.py'}:make", "--weights", tmp_path / "w.safetensors"]
    assert run(*_npz_prune(small_npz, out, *model)) == 0
    report = json.loads((out / "report.json").read_text())
    spec_json = json.loads((out / "model.json").read_text())
    assert spec_json["source"] == "model-file" and spec_json["factory"] == "make" and spec_json["data"]
    assert report["params"]["after"] < report["params"]["before"]
    capsys.readouterr()
    assert run("eval", out) == 2  # eval never runs code that a run folder names: the user passes it again
    assert "pass --model-file again" in capsys.readouterr().err
    assert run("eval", out, "--model-file", f"{tmp_path / 'mynet.py'}:make") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == pytest.approx(report["accuracy"]["after_oneshot"], abs=1e-12)
    assert result["params"] == report["params"]["after"]
    assert run(*_npz_prune(small_npz, tmp_path / "x", "--model-file", f"{tmp_path / 'mynet.py'}:nothing",
                           "--weights", tmp_path / "w.safetensors")) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err


def test_a_hugging_face_image_classifier_folder_prunes_and_eval_reloads_it(small_npz, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=10, layer_type="basic")
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    assert run(*_npz_prune(small_npz, out, "--hf-vision", tmp_path / "hf")) == 0
    captured = capsys.readouterr()
    assert "1 -> 3 channels" in captured.err  # grey data repeated to the model's 3 channels
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert run("eval", out) == 0  # rebuilt from the folder's config.json alone (no code, no weights)
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == pytest.approx(report["accuracy"]["after_oneshot"], abs=1e-12)
    assert run(*_npz_prune(small_npz, tmp_path / "y", "--hf-vision", tmp_path)) == 2
    assert "no config.json" in capsys.readouterr().err


def test_sensitivity_writes_valid_json_and_refuses_non_finite_scores(data_dir, weights, tmp_path, capsys,
                                                                       monkeypatch):
    import haprune.estimate

    args = ["sensitivity", "--model", "resnet20", "--weights", weights, "--data-dir", data_dir, "--criterion", "l2",
            "--calib-batches", "1", "--calib-batch-size", "16", "--quiet"]
    assert run(*args, "--out", tmp_path / "s.json") == 0
    scores = json.loads((tmp_path / "s.json").read_text())  # strict JSON: no NaN tokens
    groups = scores["groups"]
    assert groups and all(isinstance(v, (int, float)) for g in groups.values() for v in g["score"])
    real = haprune.estimate.estimate

    def nan_estimate(*a, **k):
        sens = real(*a, **k)
        sens.scores[3] = float("nan")
        return sens

    monkeypatch.setattr(haprune.estimate, "estimate", nan_estimate)
    assert run(*args, "--out", tmp_path / "t.json") == 2
    assert "gave 1 NaN or infinite scores" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
