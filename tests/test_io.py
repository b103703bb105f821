"""Saving / loading pruned models without pickle, and ONNX export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from haprune.estimate import estimate
from haprune.apply import PlanMismatchError, apply_plan
from haprune.graph import build_structures
from haprune.io import PLAN_FILE, WEIGHTS_FILE, export_onnx, load_pruned, onnx_matches, save_pruned
from haprune.models import create_model
from haprune.plan import CostModel, make_plan
from haprune.report import num_threads

ARCH = dict(in_channels=1, num_classes=10)
X = torch.zeros(1, 1, 16, 16)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (implants included) and re-estimate the BatchNorm statistics on random inputs,
    so that a round trip that drops any tensor shows, while the outputs keep a moderate scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.05
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * scale)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(16, 1, 16, 16, generator=g))
    model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs run fastest (and bit-reproducibly) on one thread; on a busy machine, many threads crawl."""
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def base():
    """A dense ResNet-20, its structures and its cost model."""
    torch.manual_seed(0)
    m = create_model("resnet20", **ARCH).eval()
    s = build_structures(m, X)
    return m, s, CostModel(m, s, X)


@pytest.fixture(scope="module")
def pruned(base):
    """(kind -> (plan, pruned model)) for no implants, 1x1 implants and separable implants."""
    m, s, cm = base
    xb, yb = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    sens = estimate(m, s, [(xb, yb)], "l2", progress=False)
    out = {}
    for kind, ratio in (("none", 0.0), ("1x1", 0.2), ("separable", 0.2)):
        plan = make_plan(s, sens.scores, cm, 0.5, implant_ratio=ratio, implant_kind="1x1" if kind == "none" else kind)
        pm = apply_plan(m, plan, X, structures=s)
        _randomise(pm, seed=len(out))
        out[kind] = (plan, pm.eval())
    return out


def test_round_trip_same_process(pruned, tmp_path):
    plan, pm = pruned["1x1"]
    save_pruned(tmp_path, pm, plan, extra_metadata={"note": "test", "epochs": 3})
    loaded = load_pruned(tmp_path, create_model("resnet20", **ARCH), X).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), pm(x))
    assert loaded.state_dict().keys() == pm.state_dict().keys()
    assert sorted(os.listdir(tmp_path)) == [WEIGHTS_FILE, PLAN_FILE]  # no temporary files left behind


def test_round_trip_fresh_process(pruned, tmp_path):
    plan, pm = pruned["separable"]
    save_pruned(tmp_path / "model", pm, plan)
    x = torch.randn(3, 1, 16, 16)
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from haprune.io import load_pruned
        from haprune.models import create_model
        torch.set_num_threads(1)
        m = load_pruned({str(tmp_path / "model")!r}, create_model("resnet20", in_channels=1, num_classes=10),
                        torch.zeros(1, 1, 16, 16)).eval()
        with torch.no_grad():
            y = m(load_file({str(tmp_path / "x.safetensors")!r})["x"])
        save_file({{"y": y}}, {str(tmp_path / "y.safetensors")!r})
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
    with torch.no_grad():
        expected = pm(x)  # one thread here too (fixture one_thread)
    assert torch.equal(load_file(tmp_path / "y.safetensors")["y"], expected)


def test_files_are_not_pickles(pruned, tmp_path):
    plan, pm = pruned["1x1"]
    save_pruned(tmp_path, pm, plan)
    plan_bytes = (tmp_path / PLAN_FILE).read_bytes()
    assert plan_bytes.lstrip()[:1] == b"{" and json.loads(plan_bytes)["groups"]
    raw = (tmp_path / WEIGHTS_FILE).read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor torch.save's zip archive
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    assert set(header) - {"__metadata__"} == set(pm.state_dict())


@pytest.mark.parametrize("kind", ["none", "1x1", "separable"])
def test_onnx_matches_pytorch(pruned, tmp_path, kind):
    plan, pm = pruned[kind]
    path = export_onnx(pm, X, tmp_path / f"{kind}.onnx")
    assert sorted(os.listdir(tmp_path)) == [f"{kind}.onnx"]
    assert onnx_matches(pm, path, torch.randn(5, 1, 16, 16)) <= 1e-5  # batch 5: the batch axis is dynamic
    assert not pm.training


def test_onnx_mismatch_is_reported(pruned, tmp_path):
    from haprune.io import OnnxMismatchError

    plan, pm = pruned["none"]
    path = export_onnx(pm, X, tmp_path / "m.onnx")
    other = pruned["1x1"][1]
    with pytest.raises(OnnxMismatchError, match="differs from the PyTorch model"):
        onnx_matches(other, path, X)


def test_plan_for_another_model(pruned, tmp_path):
    plan, pm = pruned["1x1"]
    save_pruned(tmp_path, pm, plan)
    with pytest.raises(PlanMismatchError, match="same architecture"):
        load_pruned(tmp_path, create_model("resnet20", in_channels=1, num_classes=10, width=2), X)
    with pytest.raises(ValueError, match="other shapes.*conv1.weight"):
        load_pruned(tmp_path, create_model("resnet20", in_channels=3, num_classes=10), torch.zeros(1, 3, 16, 16))
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    del tensors["fc.bias"]
    with safe_open(tmp_path / WEIGHTS_FILE, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, tmp_path / WEIGHTS_FILE, metadata=metadata)
    with pytest.raises(ValueError, match="does not match the model rebuilt.*fc.bias"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    lenient = load_pruned(tmp_path, create_model("resnet20", **ARCH), X, strict=False)
    assert torch.equal(lenient.conv1.weight, tensors["conv1.weight"])


def test_missing_and_mismatched_files(pruned, tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json and model.safetensors"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    plan, pm = pruned["1x1"]
    with pytest.raises(ValueError, match="reserved"):
        save_pruned(tmp_path, pm, plan, extra_metadata={"format": "np"})
    save_pruned(tmp_path, pm, plan)
    reformatted = json.dumps(json.loads((tmp_path / PLAN_FILE).read_text()), indent=4)
    (tmp_path / PLAN_FILE).write_text(reformatted)  # a hand-edited layout still matches its weights
    load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    other_plan = pruned["separable"][0]
    Path(tmp_path / PLAN_FILE).write_text(other_plan.to_json())
    with pytest.raises(ValueError, match="saved with another plan"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    (tmp_path / PLAN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="lacks plan.json"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)


def _resave(path: Path, change) -> None:
    """Rewrite a safetensors file with ``change(tensors)`` applied, keeping its metadata."""
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_int_tensors_and_nan_weights_in_a_run_folder_are_refused(pruned, tmp_path):
    plan, pm = pruned["1x1"]
    save_pruned(tmp_path, pm, plan)
    _resave(tmp_path / WEIGHTS_FILE, lambda t: t.update({"conv1.weight": (t["conv1.weight"] * 100).to(torch.int32)}))
    with pytest.raises(ValueError, match=r"integer tensors.*conv1.weight: file torch.int32.*truncate"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)
    save_pruned(tmp_path, pm, plan)
    _resave(tmp_path / WEIGHTS_FILE, lambda t: t["fc.weight"].view(-1)[3].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"NaN or infinite values in fc.weight"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)


def test_plan_json_with_groups_as_a_list_is_a_clear_error(pruned, tmp_path):
    plan, pm = pruned["1x1"]
    save_pruned(tmp_path, pm, plan)
    d = json.loads((tmp_path / PLAN_FILE).read_text())
    d["groups"] = list(d["groups"].values())
    (tmp_path / PLAN_FILE).write_text(json.dumps(d))
    with pytest.raises(ValueError, match="plan.json is not a valid haprune plan"):
        load_pruned(tmp_path, create_model("resnet20", **ARCH), X)


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable safetensors file"),
    (None, "not a readable safetensors file"),  # truncated
    (b"garbage" * 10, "not a readable safetensors file"),
])
def test_corrupt_weight_files_name_the_file(tmp_path, content, message):
    from haprune.io import load_checkpoint_weights, save_weights

    model = create_model("resnet20", **ARCH)
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    path.write_bytes(path.read_bytes()[:-100] if content is None else content)
    with pytest.raises(ValueError, match=f"{path}.*{message}|{message}.*{path}"):
        load_checkpoint_weights(create_model("resnet20", **ARCH), path)


def test_weights_of_another_architecture_say_so(tmp_path):
    from haprune.io import load_checkpoint_weights, save_weights

    save_weights(create_model("resnet20", **ARCH), tmp_path / "r20.safetensors")
    with pytest.raises(ValueError, match=r"r20.safetensors does not match the model: it lacks layer1.3"):
        load_checkpoint_weights(create_model("resnet56", **ARCH), tmp_path / "r20.safetensors")
    with pytest.raises(ValueError, match="other shapes"):
        load_checkpoint_weights(create_model("resnet20", in_channels=3, num_classes=10), tmp_path / "r20.safetensors")
    half = create_model("resnet20", **ARCH)
    save_weights(half, tmp_path / "half.safetensors", dtype=torch.float16)  # float16 into float32: allowed
    load_checkpoint_weights(create_model("resnet20", **ARCH), tmp_path / "half.safetensors")
