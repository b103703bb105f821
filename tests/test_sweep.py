"""benchmarks/sweep.py: one run on a tiny synthetic setting writes a complete JSON, and a rerun skips it."""
from __future__ import annotations

import copy
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

    return DatasetSplits(name="tiny", train=split(160), val=split(32), test=split(32), num_classes=10,
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
    assert sweep.measure_latencies(ctx, tmp_path / "results", batch=2, threads=1, repeats=2,
                                   loadavg=lambda: 0.0) == 2  # a quiet machine (simulated)
    for path in (tmp_path / "results" / "resnet20").glob("*.json"):
        lat = json.loads(path.read_text())["latency"]
        assert lat["speedup"] > 0 and lat["batch"] == 2 and lat["dense_ms"] > 0
    assert sweep.measure_latencies(ctx, tmp_path / "results", batch=2, threads=1, repeats=2, loadavg=lambda: 0.0) == 0
    assert "CPU speed-up" in sweep.tables(tmp_path / "results")


def _ctx(sweep, tmp_path, **preset_changes):
    torch.manual_seed(0)
    dense = create_model("resnet20", in_channels=1, num_classes=10).eval()
    changes = dict(name="tiny", epochs=0, eval_limit=None, calib_batches=2, calib_batch_size=8)
    preset = dataclasses.replace(sweep.PRESETS["smoke"], **{**changes, **preset_changes})
    return sweep.SweepContext(_tiny_data(), lambda name: dense, preset, results_dir=tmp_path / "results",
                              runs_dir=tmp_path / "runs")


def test_calibration_is_a_per_seed_random_draw_from_the_whole_training_split(tmp_path):
    sweep = load_benchmark("sweep")
    ctx = _ctx(sweep, tmp_path)
    images, labels = ctx.data.train.tensors
    draws = {}
    for seed in range(6):
        idx = ctx.calibration_indices(seed)
        assert len(idx) == 16 and len(set(idx.tolist())) == 16 and 0 <= int(idx.min()) and int(idx.max()) < 160
        batches = ctx.calibration(seed)
        assert [len(x) for x, _ in batches] == [8, 8]
        assert torch.equal(torch.cat([x for x, _ in batches]), images[idx])  # the drawn images, in that order
        assert torch.equal(torch.cat([y for _, y in batches]), labels[idx])
        assert ctx.calibration(seed) is batches  # one draw per seed, shared by every criterion of that seed
        draws[seed] = frozenset(idx.tolist())
    assert len(set(draws.values())) == 6  # another seed, another draw
    assert draws[0] != frozenset(range(16))  # not the first images of the split
    assert len(frozenset().union(*draws.values())) > 60  # across seeds the draws reach far into the split
    # the same draw in a fresh context (resume in another process), recorded with the protocol
    again = _ctx(sweep, tmp_path)
    assert torch.equal(again.calibration_indices(3), ctx.calibration_indices(3))
    rec = ctx.calibration_record(3)
    assert rec["protocol"] == sweep.CALIBRATION_PROTOCOL
    assert rec["first_indices"] == ctx.calibration_indices(3)[:8].tolist()
    assert rec != ctx.calibration_record(4)


def test_finetune_key_changes_with_everything_that_determines_the_weights():
    sweep = load_benchmark("sweep")
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10).eval()
    plan = {"conv1": [16, [0, 3], []]}
    spec = {"implant_init": "zeros", "compensate": None}
    config = {"epochs": 2, "lr": 0.01, "seed": 0}
    key = sweep.finetune_key("resnet20", plan, spec, config, None, model)
    assert key == sweep.finetune_key("resnet20", json.loads(json.dumps(plan)), dict(spec), dict(config), None,
                                     copy.deepcopy(model))  # a value, not an identity: resumes in another process
    changed = [
        sweep.finetune_key("resnet56", plan, spec, config, None, model),
        sweep.finetune_key("resnet20", {"conv1": [16, [0, 4], []]}, spec, config, None, model),  # other channels
        sweep.finetune_key("resnet20", plan, {**spec, "implant_init": "lstsq"}, config, None, model),
        sweep.finetune_key("resnet20", plan, {**spec, "compensate": "sequential"}, config, None, model),
        sweep.finetune_key("resnet20", plan, spec, {**config, "seed": 1}, None, model),
        sweep.finetune_key("resnet20", plan, spec, config, 1000, model),
    ]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.conv1.weight[0, 0, 0, 0] += 1e-6  # the same plan from another init: other starting weights
    changed.append(sweep.finetune_key("resnet20", plan, spec, config, None, other))
    bn = copy.deepcopy(model)
    bn.bn1.running_mean += 1e-3  # buffers count too (BatchNorm re-estimation)
    changed.append(sweep.finetune_key("resnet20", plan, spec, config, None, bn))
    assert len({key, *changed}) == len(changed) + 1


def test_comp_rows_share_the_plan_and_checkpoints_are_keyed_by_weights_not_run_id(tmp_path):
    sweep = load_benchmark("sweep")
    assert sweep.CRITERIA["l2+comp"] == {**sweep.CRITERIA["l2"], "compensate": sweep.COMPENSATE_MODE,
                                         "reestimate_bn": sweep.REESTIMATE_BN_AFTER_COMPENSATION}
    assert sweep.base_criterion("hap+ni-lstsq+comp") == "hap+ni-lstsq" and sweep.is_hap("hap-exact-obd+comp")
    # 8 x 8 images leave 2 x 2 positions in the last stage: 128 images give 512 rows >= its 352 regressors
    ctx = _ctx(sweep, tmp_path, epochs=1, batch_size=16, max_batches_per_epoch=1, calib_batches=4, calib_batch_size=32)
    plain = sweep.run_one(ctx, "resnet20", "l2", "params", 0.5, 1)
    comp = sweep.run_one(ctx, "resnet20", "l2+comp", "params", 0.5, 1)
    # the same plan (same criterion, calibration and target): compensation changes weights, never shapes
    assert comp["details"]["plan_widths"] == plain["details"]["plan_widths"]
    assert comp["params"] == plain["params"] and comp["flops"] == plain["flops"]
    assert plain["details"]["compensation"] is None
    summary = comp["details"]["compensation"]
    assert summary["mode"] == "sequential" and summary["layers"] > 0 and summary["samples"] == 128
    assert summary["mean_error_after"] <= summary["mean_error_before"]
    assert comp["calibration"] == plain["calibration"] and comp["calibration"]["seed"] == 1
    assert plain["accuracy"]["oneshot_before_bn_reestimate"] is None
    assert 0 <= comp["accuracy"]["oneshot_before_bn_reestimate"] <= 1
    if not sweep.REESTIMATE_BN_AFTER_COMPENSATION:  # the dense BatchNorm statistics kept: one value
        assert comp["accuracy"]["oneshot"] == comp["accuracy"]["oneshot_before_bn_reestimate"]
    keys = {r["finetune"]["checkpoint_key"] for r in (plain, comp)}
    assert len(keys) == 2
    dirs = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "resnet20").iterdir())
    assert dirs == sorted(f"ft-{k}" for k in keys)  # one directory per starting point, no run id in it
    for r in (plain, comp):
        assert "_plan_desc" not in r["details"]


def test_flops_target(tmp_path):
    sweep = load_benchmark("sweep")
    assert ("flops", 0.5) in sweep.PRESETS["cpu"].targets and sweep.parse_target("flops:0.5") == ("flops", 0.5)
    ctx = _ctx(sweep, tmp_path)
    record = sweep.run_one(ctx, "resnet20", "l2", "flops", 0.5, 0)
    assert record["run_id"] == "tiny__l2__f50__s0"
    assert abs(record["flops"]["removed"] - 0.5) <= 0.02 and record["params"]["removed"] != record["flops"]["removed"]


def test_latency_only_on_a_quiet_machine(tmp_path):
    sweep = load_benchmark("sweep")
    ctx = _ctx(sweep, tmp_path)
    sweep.run_one(ctx, "resnet20", "l2", "params", 0.5, 0)
    path = tmp_path / "results" / "resnet20" / "tiny__l2__p50__s0.json"
    waits = []
    kw = dict(batch=2, threads=1, repeats=2, max_load=1.0, max_wait_s=10, sleep=waits.append)
    # busy throughout: waits (bounded), times nothing, writes nothing
    assert sweep.measure_latencies(ctx, tmp_path / "results", loadavg=lambda: 3.0, **kw) == 0
    assert waits == [5.0, 5.0] and "latency" not in json.loads(path.read_text())
    # quiet before, but load arrived during the timing: kept apart, flagged, never shown as a speed-up
    loads = iter([0.2, 4.5])
    assert sweep.measure_latencies(ctx, tmp_path / "results", loadavg=lambda: next(loads), **kw) == 0
    r = json.loads(path.read_text())
    assert "latency" not in r and r["latency_under_load"]["load_avg_1m_after"] == 4.5
    assert "timed under load, omitted" in sweep._speedup([r]) and sweep._speedup([r]).startswith("-")
    # quiet: timed, load and dense time recorded
    assert sweep.measure_latencies(ctx, tmp_path / "results", loadavg=lambda: 0.3, **kw) == 1
    lat = json.loads(path.read_text())["latency"]
    assert lat["load_avg_1m_before"] == 0.3 and lat["dense_ms"] > 0 and lat["speedup"] > 0
    assert sweep._speedup([json.loads(path.read_text())]).startswith(f"{lat['speedup']:.2f}x (n=1, dense")


def test_obs_row(tmp_path):
    sweep = load_benchmark("sweep")
    ctx = _ctx(sweep, tmp_path, calib_batches=4, calib_batch_size=32)
    record = sweep.run_one(ctx, "resnet20", "obs", "params", 0.5, 0)
    assert record["details"]["resolved_criterion"] == "obs" and abs(record["params"]["removed"] - 0.5) <= 0.01
    assert record["sensitivity_seconds"] > 0 and sweep.CRITERIA["obs+comp"]["compensate"] == sweep.COMPENSATE_MODE


def test_lr_grid_fine_tunes_each_rate_from_the_same_start_and_keeps_the_best_validating(tmp_path):
    """A preset with lr_grid trains one copy per learning rate (each its own keyed checkpoints) from the same
    pruned model and records every rate; the kept model is the one with the best validation accuracy."""
    sweep = load_benchmark("sweep")
    torch.manual_seed(0)
    dense = create_model("resnet20", in_channels=1, num_classes=10).eval()
    preset = dataclasses.replace(sweep.PRESETS["cpu-lrsel"], name="tiny", epochs=1, batch_size=16,
                                 max_batches_per_epoch=2, eval_limit=None, calib_batches=1, calib_batch_size=16)
    assert [c.lr for c in preset.finetune_configs(0)] == [0.01, 0.002]
    ctx = sweep.SweepContext(_tiny_data(), lambda name: dense, preset, results_dir=tmp_path / "results",
                             runs_dir=tmp_path / "runs")
    record = sweep.run_one(ctx, "resnet20", "l2", "params", 0.5, 0)
    grid = record["finetune"]["lr_grid"]
    assert [g["lr"] for g in grid] == [0.01, 0.002]
    assert len({g["checkpoint_key"] for g in grid}) == 2
    for g in grid:
        assert (tmp_path / "runs" / "tiny" / "resnet20" / f"ft-{g['checkpoint_key']}").is_dir()
    best = max(grid, key=lambda g: g["val_accuracy"])
    assert record["finetune"]["config"]["lr"] == best["lr"]
    assert record["finetune"]["result"]["final_val_accuracy"] == best["val_accuracy"]
    assert record["finetune"]["checkpoint_key"] == best["checkpoint_key"]


def test_distilled_preset_trains_against_the_dense_teacher_under_its_own_key(tmp_path):
    """cpu-kd mixes in distillation from the dense model: the same start and batches as the undistilled run, another
    loss (so other weights) and another checkpoint key; the record says how it was trained."""
    sweep = load_benchmark("sweep")
    kd = sweep.PRESETS["cpu-kd"]
    assert kd.distill_alpha > 0 and kd.finetune_config(0).distill_alpha == kd.distill_alpha
    records = {}
    for alpha in (0.0, kd.distill_alpha):
        torch.manual_seed(0)
        dense = create_model("resnet20", in_channels=1, num_classes=10).eval()
        preset = dataclasses.replace(kd, name=f"tiny{alpha}", epochs=1, batch_size=16, max_batches_per_epoch=2,
                                     eval_limit=None, calib_batches=1, calib_batch_size=16, distill_alpha=alpha)
        ctx = sweep.SweepContext(_tiny_data(), lambda name: dense, preset, results_dir=tmp_path / "results",
                                 runs_dir=tmp_path / "runs")
        records[alpha] = sweep.run_one(ctx, "resnet20", "l2", "params", 0.5, 0)
    plain, distilled = records[0.0], records[kd.distill_alpha]
    assert distilled["finetune"]["config"]["distill_alpha"] == kd.distill_alpha
    assert distilled["finetune"]["config"]["distill_temperature"] == kd.distill_temperature
    assert plain["accuracy"]["oneshot"] == distilled["accuracy"]["oneshot"]  # the same pruned start
    assert plain["finetune"]["checkpoint_key"] != distilled["finetune"]["checkpoint_key"]
    loss = [r["finetune"]["result"]["history"][0]["train_loss"] for r in (plain, distilled)]
    assert loss[0] != loss[1]  # the teacher's term is in the loss


def test_preset_comparison_pairs_runs_of_two_budgets_by_seed():
    """The budget comparison section: one row per (model, target, criterion) both presets ran, the difference paired
    by the seeds both have (here 0-2; seed 3 only in one), with its 95% t-interval."""
    sweep = load_benchmark("sweep")

    def rec(preset, crit, seed, acc):
        return {"preset": {"name": preset}, "model": "resnet56", "budget": "params", "target": 0.7,
                "criterion": crit, "seed": seed, "accuracy": {"finetuned": acc}, "spec": {}}

    kd = [0.9360, 0.9375, 0.9371, 0.9400]
    ref = [0.9350, 0.9360, 0.9361]
    records = ([rec("cpu-kd", "hap+comp", s, a) for s, a in enumerate(kd)]
               + [rec("cpu-lrsel", "hap+comp", s, a) for s, a in enumerate(ref)]
               + [rec("cpu-lrsel", "l2", 0, 0.93)])  # l2 has no cpu-kd run: no row
    lines = sweep.preset_comparison(records)
    rows = [line for line in lines if line.startswith("| resnet56")]
    assert len(rows) == 1
    diffs = [100 * (k - r) for k, r in zip(kd, ref)]  # +0.10, +0.15, +0.10
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    half = 4.303 * sd / 3 ** 0.5
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["resnet56", "p70", "hap+comp", "3"]
    assert cells[6] == f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"
    assert sweep.preset_comparison([r for r in records if r["preset"]["name"] == "cpu-lrsel"]) == []
