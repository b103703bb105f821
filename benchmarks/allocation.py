"""Allocation: the raw global ranking against the cost-aware knapsack, one-shot, on the Fashion-MNIST ResNet-56.

    nice -n 10 python benchmarks/allocation.py              # run (resumes: finished runs are kept), then the tables
    python benchmarks/allocation.py --seeds 1 &             # seeds can run side by side (the JSON is locked)
    python benchmarks/allocation.py --tables-only           # rebuild docs/results/allocation.md from the JSON

For each calibration seed (512 training images drawn at random from the whole training split: the sweep's draw for
that seed), one sensitivity per criterion (``hap`` = ``estimate(model, structures, calib, "auto")``, the exact GGN
traces with the paper's score; ``l2``), cached under ``runs/allocation/``, is planned at every target (50% and 70%
of the parameters, 50% of the FLOPs removed) with ``make_plan(..., allocation="global")`` and
``allocation="cost-aware"``, then applied two ways: plain (BatchNorm statistics re-estimated on 4 shuffled
training batches of 128: the ``--compensate none`` pipeline) and compensated (``apply_plan(...,
compensate="sequential")`` on the same calibration batches, the dense BatchNorm statistics kept: the default
pipeline). Each pruned model is evaluated on the validation split (carved from the training data; the default is
chosen on it) and on the 10,000 test images (reported): no fine-tuning. Every finished run is one entry of
``docs/results/allocation.json`` (written atomically under a lock); the Markdown is generated from it alone.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
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
from haprune.plan import ALLOCATIONS, DEFAULT_ALLOCATION, CostModel, make_plan  # noqa: E402
from haprune.recover import evaluate, load_checkpoint_weights, reestimate_batchnorm  # noqa: E402
from haprune.report import count_flops, count_params  # noqa: E402

RESULTS_JSON = ROOT / "docs" / "results" / "allocation.json"
RESULTS_MD = ROOT / "docs" / "results" / "allocation.md"
CACHE = ROOT / "runs" / "allocation"
WEIGHTS = ROOT / "checkpoints" / "resnet56-fmnist.safetensors"
CALIB_SEED_OFFSET = 104729  # benchmarks/sweep.py's stream: the same calibration images per seed as the sweep
CALIB_BATCHES, CALIB_BATCH_SIZE = 4, 128
BN_BATCHES, BN_BATCH_SIZE = 4, 128
CRITERIA = {"hap": "auto", "l2": "l2"}  # row name -> estimate() criterion
TARGETS = ("params:0.5", "params:0.7", "flops:0.5")
SEEDS = (0, 1, 2)
SCHEMA = 2  # 1: HAP only, parameter targets, 1,000 test images, BN re-estimated after compensation (git history)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_target(spec: str) -> tuple[str, float]:
    """``"flops:0.5"`` -> ("flops", 0.5)."""
    budget, _, frac = spec.partition(":")
    if budget not in ("params", "flops") or not frac:
        raise argparse.ArgumentTypeError(f"target {spec!r}: write params:<fraction> or flops:<fraction>")
    return budget, float(frac)


def tag(budget: str, target: float) -> str:
    return f"{budget[0]}{round(100 * target)}"


def run_id(criterion: str, seed: int, budget: str, target: float, allocation: str, comp: bool) -> str:
    return f"{criterion}-s{seed}-{tag(budget, target)}-{allocation}" + ("+comp" if comp else "")


def calibration(data, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = data.train.tensors
    n = CALIB_BATCHES * CALIB_BATCH_SIZE
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIB_SEED_OFFSET + seed))[:n]
    return [(images[idx[i:i + CALIB_BATCH_SIZE]], labels[idx[i:i + CALIB_BATCH_SIZE]])
            for i in range(0, n, CALIB_BATCH_SIZE)]


def load_results() -> dict:
    if RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text())
        if results.get("meta", {}).get("schema") == SCHEMA:
            return results
        log(f"{RESULTS_JSON.name}: records of an earlier schema (kept in git history) are replaced")
    return {"meta": {"schema": SCHEMA}, "runs": {}}


def save_run(rid: str | None, record: dict | None, meta: dict) -> dict:
    """Merge one finished run (and the meta) into the results JSON under a lock: several seeds may run at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        results["meta"].update(meta)
        if rid is not None:
            results["runs"][rid] = record
        atomic_write_json(RESULTS_JSON, results)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return results


def sensitivity(dense, structures, calib, criterion: str, seed: int) -> dict:
    """The seed's scores for ``criterion``, computed once and cached (scores, resolved criterion, seconds)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"sens-resnet56-{criterion}-s{seed}.pt"
    if path.exists():
        return torch.load(path)
    t0 = time.perf_counter()
    sens = estimate(dense, structures, calib, CRITERIA[criterion], seed=seed, progress=False, time_budget=1e9)
    record = {"scores": sens.scores.cpu(), "criterion": sens.criterion, "seconds": time.perf_counter() - t0,
              "score_rule": sens.info.get("score_rule"),
              "info": {k: v for k, v in sens.info.items() if isinstance(v, (str, int, float, bool))}}
    tmp = path.with_suffix(".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return record


def plan_shape(plan) -> dict:
    """How the plan spreads: groups at their removal cap (90%), the smallest kept fraction."""
    fractions = {n: (g.size - len(g.remove)) / g.size for n, g in plan.groups.items()}
    at_cap = sum(1 for g in plan.groups.values() if len(g.remove) >= math.floor(0.9 * g.size + 1e-9))
    return {"groups": len(fractions), "groups_at_cap": at_cap, "min_kept_fraction": round(min(fractions.values()), 4),
            "kept_fraction": {n: round(f, 4) for n, f in fractions.items()}}


def setup():
    """Fashion-MNIST, the project's trained ResNet-56, its structures and exact cost model."""
    data = load_dataset("fashion-mnist")
    dense = create_model("resnet56", in_channels=data.in_channels, num_classes=data.num_classes)
    dense = load_checkpoint_weights(dense, WEIGHTS).eval()
    example = data.test.tensors[0][:1]
    structures = build_structures(dense, example)
    return data, dense, example, structures, CostModel(dense, structures, example)


def run(seeds, criteria, targets, compensations) -> None:
    data, dense, example, structures, cost = setup()
    meta = dict(load_results()["meta"])
    if "dense_test_accuracy" not in meta:
        meta["dense_test_accuracy"] = evaluate(dense, data.test)["accuracy"]
        meta["dense_val_accuracy"] = evaluate(dense, data.val)["accuracy"]
    meta.update(model="resnet56", dataset="fashion-mnist", calibration=f"{CALIB_BATCHES} x {CALIB_BATCH_SIZE} "
                f"training images per seed, drawn at random (seed + {CALIB_SEED_OFFSET})",
                bn_reestimation=f"{BN_BATCHES} shuffled training batches of {BN_BATCH_SIZE} (plain runs only)",
                val_images=len(data.val), test_images=len(data.test),
                torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads())
    for seed in seeds:
        calib = calibration(data, seed)
        for criterion in criteria:
            sens = None
            for comp in compensations:  # the default pipeline (compensated) first: the default is chosen on it
                for budget, target in targets:
                    for allocation in ALLOCATIONS:
                        rid = run_id(criterion, seed, budget, target, allocation, comp)
                        if rid in load_results()["runs"]:
                            continue
                        if sens is None:
                            sens = sensitivity(dense, structures, calib, criterion, seed)
                            log(f"seed {seed}: sensitivity {criterion} -> {sens['criterion']} "
                                f"({sens['seconds']:.0f} s)")
                        load_before = os.getloadavg()[0]
                        t0 = time.perf_counter()
                        plan = make_plan(structures, sens["scores"], cost, target, budget=budget,
                                         allocation=allocation, criterion=sens["criterion"], seed=seed)
                        plan_seconds = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        extra = {"compensate": "sequential"} if comp else {}
                        pruned = apply_plan(dense, plan, example, structures=structures, calibration=calib, **extra)
                        apply_seconds = time.perf_counter() - t0
                        if not comp:  # compensated: the dense statistics are kept (docs/results/compensation.md)
                            reestimate_batchnorm(pruned, batches(data.train, BN_BATCH_SIZE, shuffle=True, seed=seed),
                                                 BN_BATCHES)
                        record = {
                            "criterion": criterion, "resolved_criterion": sens["criterion"], "seed": seed,
                            "budget": budget, "target": target, "allocation": allocation, "compensate": comp,
                            "val_accuracy": evaluate(pruned, data.val)["accuracy"],
                            "test_accuracy": evaluate(pruned, data.test)["accuracy"],
                            "params_removed": 1 - count_params(pruned) / count_params(dense),
                            "flops_removed": 1 - count_flops(pruned, example) / count_flops(dense, example),
                            "planned": {k: v for k, v in plan.achieved.items() if k.endswith("removed")},
                            "plan_seconds": round(plan_seconds, 3), "apply_seconds": round(apply_seconds, 2),
                            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                            "shape": plan_shape(plan), "notes": plan.notes,
                            "sensitivity": {k: v for k, v in sens.items() if k != "scores"},
                            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                        save_run(rid, record, meta)
                        log(f"{rid}: val {record['val_accuracy']:.4f}, test {record['test_accuracy']:.4f}, "
                            f"params -{record['params_removed']:.3f}, flops -{record['flops_removed']:.3f} "
                            f"({apply_seconds:.0f} s apply)")
    atomic_write_text(RESULTS_MD, tables(save_run(None, None, meta)))


# ------------------------------------------------------------------------------------------------ tables

def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the two-sided 95% t-interval (None below two values)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt_interval(values: list[float]) -> str:
    if not values:
        return "-"
    m, half = interval([100 * v for v in values])
    if half is None:
        return f"{m:+.2f} (n=1)"
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}] (n={len(values)})"


def paired(runs: dict, criterion: str, budget: str, target: float, comp: bool, split: str) -> list[float]:
    """cost-aware minus global, per seed, on ``split`` ("val" or "test")."""
    out = []
    for r in runs.values():
        if (r["criterion"], r["budget"], r["target"], r["compensate"], r["allocation"]) == \
                (criterion, budget, target, comp, "global"):
            other = runs.get(run_id(criterion, r["seed"], budget, target, "cost-aware", comp))
            if other:
                out.append(other[f"{split}_accuracy"] - r[f"{split}_accuracy"])
    return out


def favoured(runs: dict, budget: str, comp: bool) -> tuple[str | None, int, int]:
    """The allocation the paired validation differences favour at ``budget`` (cells whose interval excludes 0 all
    in its direction, at least one), the number of such cells and of cells."""
    cells = sorted({(r["criterion"], r["target"]) for r in runs.values()
                    if r["budget"] == budget and r["compensate"] == comp})
    signs = []
    for criterion, target in cells:
        diffs = paired(runs, criterion, budget, target, comp, "val")
        m, half = interval(diffs) if diffs else (0.0, None)
        signs.append(0 if half is None or abs(m) <= half else (1 if m > 0 else -1))
    which = "cost-aware" if 1 in signs and -1 not in signs else "global" if -1 in signs and 1 not in signs else None
    return which, sum(1 for x in signs if x != 0), len(signs)


def verdict(runs: dict) -> list[str]:
    """Per budget kind: which allocation the paired validation differences favour, with compensation (the default
    pipeline, which decides) and without, and whether the code's default (``DEFAULT_ALLOCATION``) follows."""
    lines = []
    for budget in ("params", "flops"):
        parts = []
        for comp in (True, False):
            which, won, cells = favoured(runs, budget, comp)
            if not cells:
                continue
            pipeline = "with compensation" if comp else "without (`--compensate none`)"
            if which is None:
                parts.append(f"{pipeline}: no allocation ahead (no paired validation interval excludes 0 "
                             "consistently in one direction)")
            else:
                parts.append(f"{pipeline}: `{which}` ahead in {won} of {cells} criterion x target cells whose "
                             "validation interval excludes 0, none the other way")
        if not parts:
            continue
        which, _, _ = favoured(runs, budget, True)
        default = DEFAULT_ALLOCATION[budget]
        follows = "." if which in (None, default) else ": **the default should follow the compensated pipeline**."
        if which is None:
            follows = " (the compensated pipeline does not separate them)."
        lines.append(f"- **{budget}**: " + "; ".join(parts) + f". Default: `{default}`" + follows)
    return lines


def tables(results: dict) -> str:
    runs, meta = results["runs"], results.get("meta", {})
    lines = [
        "# Allocation: global ranking vs cost-aware knapsack (ResNet-56, Fashion-MNIST, one-shot)",
        "",
        "Generated by `python benchmarks/allocation.py` (Markdown from `docs/results/allocation.json`; each seed "
        "can run as its own process). "
        f"Model `{meta.get('model')}`, dense accuracy {100 * meta.get('dense_val_accuracy', float('nan')):.2f}% "
        f"validation ({meta.get('val_images')} images carved from the training split) and "
        f"{100 * meta.get('dense_test_accuracy', float('nan')):.2f}% test ({meta.get('test_images')} images). "
        f"Sensitivity per seed on {meta.get('calibration')}: `hap` = `estimate(..., \"auto\")` (exact GGN traces, "
        "the paper's score), `l2`. One plan per (criterion, seed, target, allocation) with `make_plan(..., "
        "allocation=...)` (max_layer_ratio 0.9). `comp` = `apply_plan(..., compensate=\"sequential\")` on the "
        "calibration batches, dense BatchNorm statistics kept (the default pipeline); `plain` = no compensation, "
        f"BatchNorm re-estimated on {meta.get('bn_reestimation', '').split(' (')[0]} (`--compensate none`). "
        "No fine-tuning.",
        "",
        "`global`: remove structures in score order. `cost-aware`: greedy knapsack, least summed score per unit of "
        "the budget (parameters or FLOPs) saved first. Groups at cap: groups with 90% of their channels removed "
        "(the planner never removes more, so no residual branch is ever emptied).",
        "",
        "| criterion | target | pipeline | allocation | seeds | validation acc % | test acc % (mean ± std) | "
        "params removed % | FLOPs removed % | groups at cap | smallest kept fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"params": 0, "flops": 1}
    keys = sorted({(r["criterion"], r["budget"], r["target"], r["compensate"], r["allocation"])
                   for r in runs.values()},
                  key=lambda k: (list(CRITERIA).index(k[0]), order[k[1]], k[2], not k[3], ALLOCATIONS.index(k[4])))
    for key in keys:
        criterion, budget, target, comp, allocation = key
        rs = [r for r in runs.values()
              if (r["criterion"], r["budget"], r["target"], r["compensate"], r["allocation"]) == key]
        test = [100 * r["test_accuracy"] for r in rs]
        std = statistics.stdev(test) if len(test) > 1 else 0.0
        lines.append(
            f"| {criterion} | {budget} {100 * target:.0f}% | {'comp' if comp else 'plain'} | {allocation} | "
            f"{len(rs)} | {statistics.fmean(100 * r['val_accuracy'] for r in rs):.2f} | "
            f"{statistics.fmean(test):.2f} ± {std:.2f} | "
            f"{100 * statistics.fmean(r['params_removed'] for r in rs):.2f} | "
            f"{100 * statistics.fmean(r['flops_removed'] for r in rs):.2f} | "
            f"{statistics.fmean(r['shape']['groups_at_cap'] for r in rs):.1f} / {rs[0]['shape']['groups']} | "
            f"{min(r['shape']['min_kept_fraction'] for r in rs):.3f} |")
    lines += ["", "Paired by seed: cost-aware minus global, one-shot accuracy in percentage points, mean and 95% "
              "t-interval; validation (where the default is chosen) and test.", "",
              "| criterion | target | pipeline | cost-aware − global, validation (pp) | cost-aware − global, test (pp) |",
              "|---|---|---|---|---|"]
    cells = sorted({k[:4] for k in keys}, key=lambda k: (list(CRITERIA).index(k[0]), order[k[1]], k[2], not k[3]))
    for criterion, budget, target, comp in cells:
        val = paired(runs, criterion, budget, target, comp, "val")
        if val:
            lines.append(f"| {criterion} | {budget} {100 * target:.0f}% | {'comp' if comp else 'plain'} | "
                         f"{fmt_interval(val)} | {fmt_interval(paired(runs, criterion, budget, target, comp, 'test'))} |")
    lines += ["", "## Verdict", "",
              "The default allocation (`haprune.plan.DEFAULT_ALLOCATION`, used when `make_plan` / `--allocation` is "
              f"not given) is {', '.join(f'`{v}` for {k}' for k, v in DEFAULT_ALLOCATION.items())} budgets. It is "
              "chosen on the default pipeline (compensated), by the paired validation differences:", ""]
    lines += verdict(runs) + [
        "", "Why FLOPs differ: a score order ignores what a channel costs, and at a FLOPs budget the cheapest channels "
        "to lose by score are often the deep, low-resolution ones, which carry many parameters but few FLOPs, so the "
        "raw ranking removes more parameters than needed to reach the FLOPs target (compare the params-removed "
        "columns at `flops 50%`); the knapsack spends the score where FLOPs fall most. At a parameter budget the "
        "knapsack instead favours the channels with most parameters per unit of score, which removes fewer FLOPs "
        "for the same parameters, and without compensation it loses accuracy (the `plain` rows).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables-only", action="store_true", help="only rebuild the Markdown from the JSON")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--criteria", nargs="+", choices=list(CRITERIA), default=list(CRITERIA))
    p.add_argument("--targets", type=parse_target, nargs="+", default=[parse_target(t) for t in TARGETS],
                   help="budget:fraction, e.g. params:0.5 flops:0.5 (default: %(default)s)")
    p.add_argument("--no-plain", action="store_true", help="only the compensated runs (the default pipeline)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.tables_only:
        run(a.seeds, a.criteria, a.targets, (True,) if a.no_plain else (True, False))
    atomic_write_text(RESULTS_MD, tables(load_results()))
    log(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
