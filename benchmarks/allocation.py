"""Allocation: the raw global ranking against the cost-aware knapsack, one-shot, on the Fashion-MNIST ResNet-56.

    nice -n 10 python benchmarks/allocation.py              # run (resumes: finished runs are kept), then the tables
    python benchmarks/allocation.py --tables-only           # rebuild docs/results/allocation.md from the JSON

For each calibration seed (512 training images drawn at random from the whole training split, the sweep's draw for
that seed), one HAP sensitivity (``estimate(model, structures, calib, "auto")``, cached under
``runs/allocation/``) is planned at 50% and 70% of the parameters removed with ``make_plan(...,
allocation="global")`` and ``allocation="cost-aware"``, applied with and without compensation
(``apply_plan(..., compensate="sequential")`` on the same calibration batches), BatchNorm statistics re-estimated
(4 shuffled training batches of 128), and evaluated on the first 1,000 test images (a subset: the 2-core machine was
shared by many jobs when this ran): no fine-tuning. Every finished run
is one entry of ``docs/results/allocation.json`` (written atomically); the Markdown is generated from it alone.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from haprune._fileio import atomic_write_json, atomic_write_text  # noqa: E402
from haprune.apply import apply_plan  # noqa: E402
from haprune.data import batches, load_dataset  # noqa: E402
from haprune.estimate import estimate  # noqa: E402
from haprune.graph import build_structures  # noqa: E402
from haprune.models import create_model  # noqa: E402
from haprune.plan import DEFAULT_ALLOCATION, CostModel, make_plan  # noqa: E402
from haprune.recover import evaluate, load_checkpoint_weights, reestimate_batchnorm  # noqa: E402
from haprune.report import count_flops, count_params  # noqa: E402

RESULTS_JSON = ROOT / "docs" / "results" / "allocation.json"
RESULTS_MD = ROOT / "docs" / "results" / "allocation.md"
CACHE = ROOT / "runs" / "allocation"
WEIGHTS = ROOT / "checkpoints" / "resnet56-fmnist.safetensors"
CALIB_SEED_OFFSET = 104729  # benchmarks/sweep.py's stream: the same calibration images per seed as the sweep
CALIB_BATCHES, CALIB_BATCH_SIZE = 4, 128
BN_BATCHES, BN_BATCH_SIZE = 4, 128
EVAL_IMAGES = 1000  # the first 1,000 test images: the machine is shared by many jobs (see the Markdown)
TARGETS = (0.5, 0.7)
ALLOCATIONS = ("global", "cost-aware")
SEEDS = (0, 1, 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calibration(data, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = data.train.tensors
    n = CALIB_BATCHES * CALIB_BATCH_SIZE
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIB_SEED_OFFSET + seed))[:n]
    return [(images[idx[i:i + CALIB_BATCH_SIZE]], labels[idx[i:i + CALIB_BATCH_SIZE]])
            for i in range(0, n, CALIB_BATCH_SIZE)]


def load_results() -> dict:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"meta": {}, "runs": {}}


def save_run(rid: str | None, record: dict | None, meta: dict) -> dict:
    """Merge one finished run (and the meta) into the results JSON under a lock: several seeds may run at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        results.setdefault("meta", {}).update(meta)
        if rid is not None:
            results.setdefault("runs", {})[rid] = record
        atomic_write_json(RESULTS_JSON, results)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return results


def sensitivity(dense, structures, calib, seed: int):
    """The seed's HAP scores, computed once and cached (scores, criterion, seconds)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"sens-resnet56-s{seed}.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.perf_counter()
    sens = estimate(dense, structures, calib, "auto", seed=seed, progress=False)
    record = {"scores": sens.scores.cpu(), "criterion": sens.criterion, "seconds": time.perf_counter() - t0,
              "auto": sens.info.get("auto"), "score_rule": sens.info.get("score_rule"),
              "info": {k: v for k, v in sens.info.items() if isinstance(v, (str, int, float, bool))}}
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return record


def plan_shape(plan, structures) -> dict:
    """How the plan spreads: groups at their removal cap, the smallest kept fraction, the residual groups' widths."""
    fractions = {n: (g.size - len(g.remove)) / g.size for n, g in plan.groups.items()}
    at_cap = sum(1 for n, g in plan.groups.items() if len(g.remove) >= math.floor(0.9 * g.size + 1e-9))
    residual = {g.name: round(fractions[g.name], 4) for g in structures if len(g.out_modules) > 2}  # conv + BN: a block; more: a residual stage
    return {"groups": len(fractions), "groups_at_cap": at_cap, "min_kept_fraction": round(min(fractions.values()), 4),
            "residual_kept_fraction": residual,
            "kept_fraction": {n: round(f, 4) for n, f in fractions.items()}}


def setup():
    """Fashion-MNIST, the project's trained ResNet-56, its structures and exact cost model."""
    data = load_dataset("fashion-mnist")
    dense = create_model("resnet56", in_channels=data.in_channels, num_classes=data.num_classes)
    dense = load_checkpoint_weights(dense, WEIGHTS).eval()
    example = data.test.tensors[0][:1]
    structures = build_structures(dense, example)
    return data, dense, example, structures, CostModel(dense, structures, example)


def plans_summary(seeds, targets) -> None:
    """Without evaluation: for every seed whose sensitivity is cached, what each allocation removes (summed score
    of the removed structures, the knapsack's objective; params / FLOPs; residual-stage widths; groups at cap)."""
    data, dense, example, structures, cost = setup()
    out = {}
    for seed in seeds:
        path = CACHE / f"sens-resnet56-s{seed}.pt"
        if not path.exists():
            continue
        scores = torch.load(path)["scores"]
        flat = structures.split(scores)
        for target in targets:
            for allocation in ALLOCATIONS:
                plan = make_plan(structures, scores, cost, target, allocation=allocation)
                out[f"s{seed}-p{round(100 * target)}-{allocation}"] = {
                    "seed": seed, "target": target, "allocation": allocation,
                    "removed_score": sum(float(flat[n][g.remove].sum()) for n, g in plan.groups.items()),
                    "planned": {k: v for k, v in plan.achieved.items() if k.endswith("removed")},
                    "shape": {k: v for k, v in plan_shape(plan, structures).items() if k != "kept_fraction"}}
    with open(CACHE / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        results["plans"] = out
        atomic_write_json(RESULTS_JSON, results)
        fcntl.flock(lock, fcntl.LOCK_UN)


def run(seeds, targets, compensations) -> None:
    results = load_results()
    data, dense, example, structures, cost = setup()
    test = torch.utils.data.TensorDataset(*(t[:EVAL_IMAGES] for t in data.test.tensors))
    meta = dict(results.get("meta", {}))
    if "dense_accuracy" not in meta:
        meta["dense_accuracy"] = evaluate(dense, test)["accuracy"]
    meta.update(model="resnet56", dataset="fashion-mnist", calibration=f"{CALIB_BATCHES} x {CALIB_BATCH_SIZE} "
                f"training images per seed, drawn at random (seed + {CALIB_SEED_OFFSET})",
                bn_reestimation=f"{BN_BATCHES} shuffled training batches of {BN_BATCH_SIZE}",
                eval_images=f"the first {EVAL_IMAGES} test images",
                torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads())
    for seed in seeds:
        calib = calibration(data, seed)
        sens = None
        for comp in compensations:  # every plain run first: the allocation question needs them most
            for target in targets:
                for allocation in ALLOCATIONS:
                    rid = f"s{seed}-p{round(100 * target)}-{allocation}" + ("+comp" if comp else "")
                    if rid in results["runs"]:
                        continue
                    if sens is None:
                        sens = sensitivity(dense, structures, calib, seed)
                        log(f"seed {seed}: sensitivity {sens['criterion']} ({sens['seconds']:.0f} s)")
                    t0 = time.perf_counter()
                    plan = make_plan(structures, sens["scores"], cost, target, allocation=allocation,
                                     criterion=sens["criterion"], seed=seed)
                    plan_seconds = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    extra = {"compensate": "sequential"} if comp else {}
                    pruned = apply_plan(dense, plan, example, structures=structures, calibration=calib, **extra)
                    apply_seconds = time.perf_counter() - t0
                    reestimate_batchnorm(pruned, batches(data.train, BN_BATCH_SIZE, shuffle=True, seed=seed),
                                         BN_BATCHES)
                    acc = evaluate(pruned, test)["accuracy"]
                    record = {
                        "seed": seed, "target": target, "allocation": allocation, "compensate": bool(comp),
                        "criterion": sens["criterion"], "oneshot_accuracy": acc,
                        "params_removed": 1 - count_params(pruned) / count_params(dense),
                        "flops_removed": 1 - count_flops(pruned, example) / count_flops(dense, example),
                        "planned": {k: v for k, v in plan.achieved.items() if k.endswith("removed")},
                        "plan_seconds": round(plan_seconds, 3), "apply_seconds": round(apply_seconds, 2),
                        "shape": plan_shape(plan, structures), "notes": plan.notes,
                        "sensitivity": {k: v for k, v in sens.items() if k != "scores"},
                        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    results = save_run(rid, record, meta)
                    log(f"{rid}: one-shot {acc:.4f}, params -{record['params_removed']:.3f}, "
                        f"flops -{record['flops_removed']:.3f} ({apply_seconds:.0f} s apply)")
    atomic_write_text(RESULTS_MD, tables(save_run(None, None, meta)))


# ------------------------------------------------------------------------------------------------ tables

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_interval(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{100 * m:+.2f} (n=1)"
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{100 * m:+.2f} [{100 * (m - half):+.2f}, {100 * (m + half):+.2f}] (n={len(values)})"


def verdict(runs: dict) -> str:
    """What the paired one-shot differences say, and the default the code uses."""
    text = [f"Default in the code: `DEFAULT_ALLOCATION = \"{DEFAULT_ALLOCATION}\"` (haprune.plan) for params and "
            "FLOPs budgets; latency budgets always use the cost-aware knapsack."]
    settled = []
    for target in sorted({r["target"] for r in runs.values()}):
        diffs = [runs[k.replace("-global", "-cost-aware")]["oneshot_accuracy"] - r["oneshot_accuracy"]
                 for k, r in runs.items() if r["allocation"] == "global" and not r["compensate"]
                 and r["target"] == target and k.replace("-global", "-cost-aware") in runs]
        if len(diffs) >= 2:
            m = statistics.fmean(diffs)
            half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            settled.append((target, m, m - half > 0 or m + half < 0))
        elif diffs:
            settled.append((target, diffs[0], False))
    if not settled or not all(sig for _, _, sig in settled):
        text.append("These runs do not establish a difference in one-shot accuracy between the allocations at every "
                    "target (fewer than two seeds, or a paired 95% interval that contains 0), so the default stays "
                    "the raw global ranking (the behaviour every earlier result was measured with); `cost-aware` is "
                    "one argument away (`make_plan(..., allocation=\"cost-aware\")`).")
        if settled:
            text.append("Measured so far (no compensation): " + "; ".join(
                f"{100 * t:.0f}%: cost-aware {100 * m:+.1f} pp against global" for t, m, _ in settled) + ".")
    else:
        better = all(m > 0 for _, m, _ in settled)
        text.append("At every target the paired interval excludes 0 and favours "
                    f"`{'cost-aware' if better else 'global'}`" + ("." if better == (DEFAULT_ALLOCATION == "cost-aware")
                                                                  else ": the default should follow."))
    return " ".join(text)


def tables(results: dict) -> str:
    runs = results["runs"]
    meta = results.get("meta", {})
    lines = [
        "# Allocation: global ranking vs cost-aware knapsack (ResNet-56, Fashion-MNIST, one-shot)",
        "",
        "Generated by `python benchmarks/allocation.py` (Markdown from `docs/results/allocation.json`). "
        f"Model `{meta.get('model')}` (dense test accuracy {100 * meta.get('dense_accuracy', float('nan')):.2f}%); "
        f"HAP scores from `estimate(model, structures, calib, \"auto\")` on {meta.get('calibration')}; one plan per "
        "(seed, target, allocation) with `make_plan(..., allocation=...)` (parameters budget, max_layer_ratio 0.9); "
        "`+comp`: `apply_plan(..., compensate=\"sequential\")` on the same calibration batches; BatchNorm "
        f"re-estimated on {meta.get('bn_reestimation')}; top-1 on {meta.get('eval_images')}, no fine-tuning.",
        "",
        "`global`: remove structures in score order. `cost-aware`: greedy knapsack, least summed score per "
        "parameter saved first. Groups at cap: groups with 90% of their channels removed (the planner never "
        "removes more, so no residual branch is ever emptied: each keeps at least 10% of its channels).",
        "",
        "| target | allocation | compensation | seeds | one-shot accuracy % (mean ± std) | params removed % | "
        "FLOPs removed % | groups at cap | smallest kept fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["target"], r["allocation"], r["compensate"]) for r in runs.values()},
                  key=lambda k: (k[0], k[2], ALLOCATIONS.index(k[1])))
    for target, allocation, comp in keys:
        rs = [r for r in runs.values() if (r["target"], r["allocation"], r["compensate"]) == (target, allocation, comp)]
        accs = [100 * r["oneshot_accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {100 * target:.0f}% | {allocation} | {'yes' if comp else 'no'} | {len(rs)} | "
            f"{statistics.fmean(accs):.2f} ± {std:.2f} | "
            f"{100 * statistics.fmean(r['params_removed'] for r in rs):.2f} | "
            f"{100 * statistics.fmean(r['flops_removed'] for r in rs):.2f} | "
            f"{statistics.fmean(r['shape']['groups_at_cap'] for r in rs):.1f} / {rs[0]['shape']['groups']} | "
            f"{min(r['shape']['min_kept_fraction'] for r in rs):.3f} |")
    lines += ["", "Paired by seed: cost-aware minus global, one-shot accuracy in percentage points, mean and 95% "
              "t-interval.", "", "| target | compensation | cost-aware − global (pp) |", "|---|---|---|"]
    for target in sorted({r["target"] for r in runs.values()}):
        for comp in (False, True):
            diffs = []
            for r in runs.values():
                if r["target"] == target and r["compensate"] == comp and r["allocation"] == "global":
                    other = runs.get(f"s{r['seed']}-p{round(100 * target)}-cost-aware" + ("+comp" if comp else ""))
                    if other:
                        diffs.append(other["oneshot_accuracy"] - r["oneshot_accuracy"])
            if diffs:
                lines.append(f"| {100 * target:.0f}% | {'yes' if comp else 'no'} | {mean_interval(diffs)} |")
    plans = results.get("plans", {})
    if plans:
        lines += ["", "What each allocation removes (plans only, no evaluation; every cached sensitivity): summed score "
                  "of the removed structures (the loss increase the scores predict, the knapsack's objective), FLOPs "
                  "removed, channels kept in the three residual stages (16 / 32 / 64 wide), groups at cap.", "",
                  "| seed | target | allocation | removed score | params removed % | FLOPs removed % | "
                  "residual stages kept | groups at cap |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(plans.values(), key=lambda r: (r["seed"], r["target"], ALLOCATIONS.index(r["allocation"]))):
            kept = " / ".join(str(round(f * w)) for f, w in zip(
                [r["shape"]["residual_kept_fraction"][k] for k in sorted(r["shape"]["residual_kept_fraction"],
                                                                         key=lambda k: ("layer" in k, k))],
                (16, 32, 64)))
            lines.append(f"| {r['seed']} | {100 * r['target']:.0f}% | {r['allocation']} | {r['removed_score']:.4g} | "
                         f"{100 * r['planned']['params_removed']:.2f} | {100 * r['planned']['flops_removed']:.2f} | "
                         f"{kept} | {r['shape']['groups_at_cap']} / {r['shape']['groups']} |")
    lines += ["", verdict(runs), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables-only", action="store_true", help="only rebuild the Markdown from the JSON")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--no-compensation", action="store_true", help="skip the compensated runs")
    p.add_argument("--plans-only", action="store_true", help="only the plan summary of every cached sensitivity")
    a = p.parse_args(argv)
    if a.plans_only:
        plans_summary(a.seeds, a.targets)
    elif not a.tables_only:
        run(a.seeds, a.targets, (False,) if a.no_compensation else (False, True))
    atomic_write_text(RESULTS_MD, tables(load_results()))
    log(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
