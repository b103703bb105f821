"""`haprune explore` end to end on a tiny synthetic IDX data set: its plans are the plans of separate `haprune prune`
runs at the same targets, the sensitivity cache is reused and invalidated when the model, data or options change,
`prune --from-explore --pick` fine-tunes a point from the stored pass, and an interrupted exploration resumes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from haprune.cli import main
from test_cli import data_dir, trained  # noqa: F401  (the tiny data set and ResNet-20 of the CLI tests)

TARGETS = (0.3, 0.5)
FAST = ("--calib-batches", "1", "--calib-batch-size", "32", "--latency-batch", "2", "--latency-repeats", "2",
        "--quiet")


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def explored(data_dir, trained, tmp_path_factory):
    """One exploration (with the L2 baseline) into a fresh cache; returns (folder, cache, explore.json, stderr)."""
    root = tmp_path_factory.mktemp("explore")
    cache, out = root / "cache", root / "explore"
    code = run("explore", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir, "--out", out,
               "--targets", *TARGETS, "--baseline", "l2", "--cache-dir", cache, "--eval-limit", "150", *FAST)
    assert code == 0
    return out, cache, json.loads((out / "explore.json").read_text())


def prune(data_dir, weights, out, cache, *extra) -> int:
    return run("prune", "--model", "resnet20", "--weights", weights, "--data-dir", data_dir, "--out", out,
               "--finetune-epochs", "0", "--cache-dir", cache, *FAST, *extra)


def test_explore_writes_points_picture_and_page(explored):
    out, cache, result = explored
    assert {"explore.json", "explore.png", "report.html", "sensitivity.safetensors", "run.json"} <= \
        {p.name for p in out.iterdir()}
    assert result["labels"] == ["ggn", "l2"]  # auto chose the exact GGN traces on this ReLU network
    assert [(p["label"], p["target"]) for p in result["points"]] == [(c, t) for c in ("ggn", "l2") for t in TARGETS]
    dense = result["dense"]
    for p in result["points"]:
        assert abs(1 - p["params"]["remaining"] - p["target"]) <= 0.01  # params budget met within the tolerance
        assert p["params"]["after"] == round(p["params"]["remaining"] * dense["params"])
        assert 0.0 <= p["accuracy"] <= 1.0 and p["latency"]["pruned_ms"] > 0
        assert p["counts"]["removed"] == sum(w[1] for w in p["widths"].values())
    assert result["evaluation"] == {"split": "validation", "images": 150, "bn_reestimated": True, "compensate": "none"}
    assert len(list((cache / "sensitivity").glob("*.safetensors"))) == 1  # the chosen criterion's pass is cached


def test_explore_plans_equal_separate_prune_runs(explored, data_dir, trained, tmp_path, capfd):
    out, cache, result = explored
    for i, target in enumerate(TARGETS):
        # the first run computes its own sensitivity (fresh cache), the second reuses the exploration's cached pass
        run_cache = tmp_path / "fresh-cache" if i == 0 else cache
        assert prune(data_dir, trained, tmp_path / f"p{i}", run_cache, "--target", target) == 0
        err = capfd.readouterr().err
        assert ("reusing the cached" in err) == (i > 0)
        plan = json.loads((tmp_path / f"p{i}" / "plan.json").read_text())
        (point,) = [p for p in result["points"] if p["label"] == "ggn" and p["target"] == target]
        assert plan["groups"] == point["plan"]["groups"]  # the same channels removed, not only the same widths
        widths = {n: [g["size"], len(g["remove"]), len(g["implant"])] for n, g in plan["groups"].items()}
        assert widths == point["widths"]
        report = json.loads((tmp_path / f"p{i}" / "report.json").read_text())
        assert report["params"]["after"] == point["params"]["after"]
        assert report["flops"]["after"] == point["flops"]["after"]
        assert report["sensitivity"]["cache"]["reused"] == (i > 0)


def test_prune_from_explore_uses_the_stored_pass(explored, data_dir, tmp_path, capfd):
    out, _, result = explored
    code = run("prune", "--from-explore", out, "--pick", "0.5", "--out", tmp_path / "ft", "--finetune-epochs", "1",
               "--train-limit", "128", "--no-cache", "--quiet")
    assert code == 0
    err = capfd.readouterr().err
    assert "reusing the ggn pass of the exploration" in err
    plan = json.loads((tmp_path / "ft" / "plan.json").read_text())
    (point,) = [p for p in result["points"] if p["label"] == "ggn" and p["target"] == 0.5]
    assert plan["groups"] == point["plan"]["groups"]
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["accuracy"]["after_finetune"] is not None and len(report["finetune"]["history"]) == 1
    assert report["sensitivity"]["cache"]["from_explore"].endswith("explore.json")
    # a target that was not explored is refused before any work, naming the explored ones
    assert run("prune", "--from-explore", out, "--pick", "0.4", "--out", tmp_path / "x", "--quiet") == 2
    assert "0.3, 0.5" in capfd.readouterr().err and not (tmp_path / "x").exists()


def test_cache_is_invalidated_by_model_data_and_options(explored, data_dir, trained, tmp_path, capfd):
    _, cache, _ = explored
    other = tmp_path / "other.safetensors"  # the same architecture, other weights
    state = load_file(trained)
    name = next(k for k in state if k.endswith("conv1.weight"))
    state[name] = state[name] * 1.01
    save_file(state, other)
    cases = {"weights": (other,), "data": (trained, "--split-seed", "1"), "calibration": (trained, "--calib-batches", "2"),
             "criterion": (trained, "--criterion", "fisher"), "score rule": (trained, "--score", "obd")}
    before = len(list((cache / "sensitivity").glob("*.safetensors")))
    for i, (what, (weights, *extra)) in enumerate(cases.items()):
        args = FAST[2:] if "--calib-batches" in extra else FAST  # FAST[:2] is --calib-batches 1
        code = run("prune", "--model", "resnet20", "--weights", weights, "--data-dir", data_dir,
                   "--out", tmp_path / f"r{i}", "--finetune-epochs", "0", "--cache-dir", cache, "--target", "0.3",
                   *args, *extra)
        assert code == 0, what
        assert "reusing the cached" not in capfd.readouterr().err, what
    assert len(list((cache / "sensitivity").glob("*.safetensors"))) == before + len(cases)


def test_explore_resumes_from_the_points_already_measured(tmp_path):
    from haprune.estimate import Sensitivity
    from haprune.explore import explore
    from haprune.plan import Plan

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    calls = []

    def plan_fn(sens, target):
        calls.append(target)
        return Plan({}, target=target)

    sens = {"l2": Sensitivity("l2", torch.ones(1))}
    kwargs = dict(dense=model, example=torch.zeros(1, 4), plan_fn=plan_fn, prune_fn=lambda plan: model,
                  evaluate_fn=lambda m: 0.5, state_dir=tmp_path / "state", progress=False)
    first = explore(sens, [0.2, 0.4], **kwargs)
    assert calls == [0.2, 0.4] and len(list((tmp_path / "state").iterdir())) == 2
    again = explore(sens, [0.2, 0.4, 0.6], **kwargs)  # the two measured points are read back, only 0.6 is new
    assert calls == [0.2, 0.4, 0.6] and again[:2] == json.loads(json.dumps(first))


def test_explore_refuses_bad_targets_before_any_work(data_dir, trained, tmp_path, capsys):
    for targets, message in ((["0.5", "1.2"], "fractions in (0, 1)"), (["0.5", "0.5"], "twice")):
        code = run("explore", "--model", "resnet20", "--weights", trained, "--data-dir", data_dir,
                   "--out", tmp_path / "e", "--targets", *targets, "--quiet")
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "e").exists()


def test_report_command_rebuilds_the_page_from_json(explored, tmp_path):
    out, _, _ = explored
    page = (out / "report.html").read_bytes()
    assert run("report", out, "--output", tmp_path / "again.html") == 0
    assert (tmp_path / "again.html").read_bytes() == page  # the page is a function of explore.json
