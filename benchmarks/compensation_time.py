"""Compensation time against the sensitivity pass it follows, side by side in one process (issue #14's time goal).

    python benchmarks/compensation_time.py                 # 3 rounds, then docs/results/compensation_time.{json,md}
    python benchmarks/compensation_time.py --tables-only   # rebuild the Markdown from the JSON

Fashion-MNIST ResNet-56, 512 calibration images (the sweep's per-seed draw), the default pipeline: per round, the
HAP sensitivity pass (``estimate(model, structures, calib, "auto")``: the exact GGN traces) is timed, then for each
target the plan and the sequential compensation (``apply_plan(..., compensate="sequential")``) are timed right
after it, with the same threads. The machine is shared and its speed drifts, so only ratios within a round are
reported (compensation seconds / sensitivity seconds), with the 1-minute load average before and after each timed
step. A round is flagged as disturbed when a load average exceeds the benchmark's own threads + 0.5 (its own
threads count in the load average), and flagged rounds are left out of the verdict. Rounds append to the JSON (the
command resumes after an interruption and more rounds can be added later).
"""
from __future__ import annotations

import argparse
import json
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
from haprune.data import load_dataset  # noqa: E402
from haprune.estimate import estimate  # noqa: E402
from haprune.graph import build_structures  # noqa: E402
from haprune.models import create_model  # noqa: E402
from haprune.plan import CostModel, make_plan  # noqa: E402
from haprune.recover import load_checkpoint_weights  # noqa: E402

RESULTS_JSON = ROOT / "docs" / "results" / "compensation_time.json"
RESULTS_MD = ROOT / "docs" / "results" / "compensation_time.md"
WEIGHTS = ROOT / "checkpoints" / "resnet56-fmnist.safetensors"
CALIB_SEED_OFFSET = 104729  # benchmarks/sweep.py's stream: the sweep's calibration images of that seed
CALIB_BATCHES, CALIB_BATCH_SIZE = 4, 128
TARGETS = (("params", 0.5), ("params", 0.7), ("flops", 0.5))
LOAD_MARGIN = 0.5


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def load_results() -> dict:
    if RESULTS_JSON.exists():
        return json.loads(RESULTS_JSON.read_text())
    return {"meta": {}, "rounds": []}


def run(rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    data = load_dataset("fashion-mnist")
    dense = create_model("resnet56", in_channels=data.in_channels, num_classes=data.num_classes)
    dense = load_checkpoint_weights(dense, WEIGHTS).eval()
    example = data.test.tensors[0][:1]
    structures = build_structures(dense, example)
    cost = CostModel(dense, structures, example)
    images, labels = data.train.tensors
    results = load_results()
    results["meta"] = {"model": "resnet56", "dataset": "fashion-mnist", "threads": threads,
                       "calibration": f"{CALIB_BATCHES} x {CALIB_BATCH_SIZE} training images (seed + "
                                      f"{CALIB_SEED_OFFSET}, the sweep's draw)",
                       "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                       "flag_rule": f"load average > threads + {LOAD_MARGIN}"}
    for _ in range(rounds):
        seed = len(results["rounds"])
        n = CALIB_BATCHES * CALIB_BATCH_SIZE
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIB_SEED_OFFSET + seed))[:n]
        calib = [(images[idx[i:i + CALIB_BATCH_SIZE]], labels[idx[i:i + CALIB_BATCH_SIZE]])
                 for i in range(0, n, CALIB_BATCH_SIZE)]
        loads = [load()]
        t0 = time.perf_counter()
        sens = estimate(dense, structures, calib, "auto", seed=seed, progress=False, time_budget=1e9)
        sens_seconds = time.perf_counter() - t0
        loads.append(load())
        log(f"round {seed}: sensitivity ({sens.criterion}) {sens_seconds:.1f} s, load {loads}")
        steps = []
        for budget, target in TARGETS:
            before = load()
            t0 = time.perf_counter()
            plan = make_plan(structures, sens.scores, cost, target, budget=budget, seed=seed)
            plan_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            pruned = apply_plan(dense, plan, example, structures=structures, calibration=calib,
                                compensate="sequential")
            apply_seconds = time.perf_counter() - t0
            info = getattr(pruned, "haprune_compensation", {}) or {}
            steps.append({"budget": budget, "target": target, "allocation": plan.allocation,
                          "plan_seconds": round(plan_seconds, 3), "apply_seconds": round(apply_seconds, 2),
                          "compensation_seconds": round(float(info.get("seconds", apply_seconds)), 2),
                          "layers": len(info.get("layers", [])), "load": [before, load()]})
            loads += steps[-1]["load"]
            log(f"  {budget} {target}: compensation {steps[-1]['compensation_seconds']} s "
                f"(ratio {steps[-1]['compensation_seconds'] / sens_seconds:.2f}), load {steps[-1]['load']}")
        results["rounds"].append({
            "seed": seed, "sensitivity_seconds": round(sens_seconds, 2), "criterion": sens.criterion,
            "steps": steps, "max_load": max(loads), "disturbed": max(loads) > threads + LOAD_MARGIN,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        atomic_write_json(RESULTS_JSON, results)
    atomic_write_text(RESULTS_MD, tables(results))


def tables(results: dict) -> str:
    meta, rounds = results["meta"], results["rounds"]
    lines = ["# Compensation time against the sensitivity pass (ResNet-56, CPU, side by side)", "",
             "Generated by `python benchmarks/compensation_time.py` (Markdown from "
             "`docs/results/compensation_time.json`). In one process with "
             f"{meta.get('threads')} thread(s) on a {meta.get('cpus')}-CPU machine, per round: the HAP sensitivity "
             f"pass (`estimate(..., \"auto\")`, exact GGN traces) on {meta.get('calibration')}, then per target the "
             "plan (default allocation) and the sequential compensation (`apply_plan(..., "
             "compensate=\"sequential\")`) on the same images. Ratio = compensation seconds / sensitivity seconds of "
             "the same round. Load = 1-minute load average before and after each timed step; a round is flagged "
             f"when one exceeds {meta.get('flag_rule')} and is left out of the verdict.", "",
             "| round | sensitivity s | target | compensation s | ratio | layers refit | load (max of round) | "
             "flagged |", "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        for s in r["steps"]:
            lines.append(f"| {r['seed']} | {r['sensitivity_seconds']:.1f} | {s['budget']} {100 * s['target']:.0f}% "
                         f"({s['allocation']}) | {s['compensation_seconds']:.1f} | "
                         f"{s['compensation_seconds'] / r['sensitivity_seconds']:.2f} | {s['layers']} | "
                         f"{r['max_load']:.2f} | {'yes' if r['disturbed'] else 'no'} |")
    quiet = [s["compensation_seconds"] / r["sensitivity_seconds"] for r in rounds if not r["disturbed"]
             for s in r["steps"]]
    lines.append("")
    if quiet:
        ok = max(quiet) <= 1.0
        lines.append(f"**Verdict** (issue 14: compensation costs no more time than the sensitivity pass it follows): "
                     f"over {sum(not r['disturbed'] for r in rounds)} unflagged round(s), ratio median "
                     f"{statistics.median(quiet):.2f}, max {max(quiet):.2f}: " + ("met." if ok else "**not met**."))
    else:
        lines.append("**Verdict**: no unflagged round yet; run again on a quieter machine.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds to add (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--tables-only", action="store_true", help="only rebuild the Markdown from the JSON")
    a = p.parse_args(argv)
    if not a.tables_only:
        run(a.rounds, a.threads)
    atomic_write_text(RESULTS_MD, tables(load_results()))
    log(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
