"""Latency-budget plans: planned against a measured latency table, are pruned models faster, and at what accuracy?

    python benchmarks/latency_plan.py                  # ResNet-56, Fashion-MNIST, batch 64, 2 threads; resumes
    python benchmarks/latency_plan.py --seeds 0 1 2    # more fine-tuning seeds (finished ones are kept)
    python benchmarks/latency_plan.py --seeds 2 --variants params@50 latency@50   # only some plans
    python benchmarks/latency_plan.py --tables-only    # rebuild docs/results/latency_plan.md from the JSON

One HAP sensitivity pass (exact traces, the sweep's seed-0 calibration batches) feeds every plan, so the plans
differ only in their budget: 50% of parameters removed (``haprune prune``'s default budget), 50% of FLOPs
removed, and 30/40/50% of the *predicted latency* removed (``make_plan(budget="latency")`` against a
:class:`haprune.latency.LatencyTable` measured first on this machine at batch 64, 2 threads); all with widths
rounded to 4. Every plan is then

- timed interleaved with the dense model (eager PyTorch and ONNX Runtime, batch 64, 2 threads): measured speed-up,
  FLOPs reduction, their ratio, and the table's predicted speed-up beside the measured one;
- BatchNorm-re-estimated and tested (one-shot), and fine-tuned with the sweep's ``cpu`` budget (2 epochs of 100
  batches, validation-selected) per seed.

Outputs: ``docs/results/latency_plan.json`` (written after every step, so an interrupted run resumes),
``docs/results/latency_plan_table.json`` (the measured table; reused when present, ``--remeasure`` to redo it),
``docs/results/latency_plan.md`` (generated from the JSON). Run it on a quiet machine: the table and the timings
are wall-clock measurements.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402  (benchmarks/sweep.py: data, calibration, fine-tuning budget shared with the sweep)
from latency import OrtModule  # noqa: E402  (benchmarks/latency.py)

from haprune import CostModel, apply_plan, make_plan  # noqa: E402
from haprune._fileio import atomic_write_json, atomic_write_text  # noqa: E402
from haprune.data import load_dataset  # noqa: E402
from haprune.estimate import estimate  # noqa: E402
from haprune.io import export_onnx  # noqa: E402
from haprune.latency import LatencyTable, measure_latency_table  # noqa: E402
from haprune.recover import finetune, reestimate_batchnorm  # noqa: E402
from haprune.report import count_flops, count_params, measure_latency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "latency_plan.json"
TABLE = ROOT / "docs" / "results" / "latency_plan_table.json"
MD = ROOT / "docs" / "results" / "latency_plan.md"
RUNS = ROOT / "runs" / "latency_plan"
MODEL, BATCH, THREADS, ROUND_TO = "resnet56", 64, 2, 4
# variant name -> (budget, target)
VARIANTS = {"params@50": ("params", 0.5), "flops@50": ("flops", 0.5), "latency@30": ("latency", 0.3),
            "latency@40": ("latency", 0.4), "latency@50": ("latency", 0.5)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(seeds: list[int], repeats: int, remeasure: bool, variants: list[str] | None = None) -> dict:
    result = _load(OUT) or {"model": MODEL, "batch": BATCH, "threads": THREADS, "round_to": ROUND_TO, "plans": {},
                           "accuracy": {}}
    data = load_dataset("fashion-mnist")
    preset = sweep.PRESETS["cpu"]
    ctx = sweep.SweepContext(data, lambda name: sweep.load_dense_model(name, data, sweep.ROOT / "checkpoints"), preset)
    dense, example, structures = ctx.dense(MODEL), ctx.example(), ctx.structures(MODEL)
    x = torch.randn(BATCH, *example.shape[1:], generator=torch.Generator().manual_seed(0))

    if TABLE.exists() and not remeasure:
        table = LatencyTable.load(TABLE)
    else:
        log("measuring the latency table (batch 64, 2 threads)")
        table = measure_latency_table(dense, structures, x, step=ROUND_TO, threads=THREADS, progress=True)
        table.save(TABLE)
    result["table"] = {"path": str(TABLE.relative_to(ROOT)), **table.meta}
    result["other_ms"] = table.other_ms

    log("HAP sensitivity (exact traces, seed-0 calibration)")
    sens = estimate(dense, structures, ctx.calibration(0), "auto", progress=False)
    cost = CostModel(dense, structures, example, latency=table)
    pruned, plans = {}, {}
    for name, (budget, target) in VARIANTS.items():
        plan = make_plan(structures, sens.scores, cost, target, budget=budget, round_to=ROUND_TO,
                         criterion=sens.criterion)
        pruned[name] = apply_plan(dense, plan, example, structures=structures).eval()
        plans[name] = {"budget": budget, "target": target, **plan.achieved,
                       "params_after_counted": count_params(pruned[name]),
                       "flops_after_counted": count_flops(pruned[name], example),
                       "widths": {k: [g.size, len(g.remove)] for k, g in plan.groups.items()}}
    if plans != result["plans"]:  # another table or code: what was measured for the old plans is stale
        result.update(plans=plans, accuracy={})
        result.pop("timing", None)
    _save(result)

    if "timing" not in result:
        result["timing"] = time_variants(dense, pruned, x, repeats)
        _save(result)

    for seed in seeds:
        for name, model in pruned.items():
            key = f"{name}/s{seed}"
            if key in result["accuracy"] or (variants and name not in variants):
                continue
            result["accuracy"][key] = accuracy(ctx, model, name, seed, plans[name]["widths"])
            log(f"{key}: {result['accuracy'][key]}")
            _save(result)
    result["versions"] = {"torch": torch.__version__, "python": platform.python_version(),
                          "machine": platform.machine()}
    _save(result)
    return result


def time_variants(dense, pruned: dict, x: torch.Tensor, repeats: int) -> dict:
    """Dense and every variant, interleaved, in eager PyTorch and in ONNX Runtime."""
    models = {"dense": dense, **pruned}
    out = {}
    log("timing eager")
    out["eager"] = measure_latency(models, x, threads=THREADS, repeats=repeats, warmup=3)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {k: OrtModule(export_onnx(m, x[:1], Path(tmp) / f"{k.replace('@', '_')}.onnx"), THREADS)
                    for k, m in models.items()}
        log("timing onnx")
        out["onnx"] = measure_latency(sessions, x, threads=THREADS, repeats=repeats, warmup=3)
    return out


def accuracy(ctx, model, name: str, seed: int, widths: dict) -> dict:
    model = copy.deepcopy(model)
    # fine-tuning checkpoints are keyed by the plan's widths: a resumed run never loads another plan's weights
    digest = hashlib.sha256(json.dumps(widths, sort_keys=True).encode()).hexdigest()[:10]
    reestimate_batchnorm(model, ctx.bn_batches(seed), 16)
    oneshot = ctx.test_accuracy(model)
    finetune(model, ctx.data.train, ctx.data.val, ctx.preset.finetune_config(seed), checkpoint_dir=RUNS / f"{name.replace('@', '_')}_{digest}_s{seed}",
             log_fn=lambda r: log(f"  {name} s{seed} epoch {r.epoch}: val {r.val_accuracy:.4f}"))
    return {"oneshot": oneshot, "finetuned": ctx.test_accuracy(model), "dense": ctx.dense_accuracy(MODEL)}


# ------------------------------------------------------------------------------------------------ tables

def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f} (n=1)"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f} (n={len(xs)})"


def tables(result: dict) -> str:
    t = result.get("timing", {})
    dense_acc = next((a["dense"] for a in result["accuracy"].values()), None)
    meta = result.get("table", {})
    lines = [
        "# Latency-budget plans vs parameter and FLOPs budgets (ResNet-56, Fashion-MNIST)",
        "",
        "Generated by `python benchmarks/latency_plan.py` (Markdown from `latency_plan.json`). One HAP sensitivity "
        "pass (exact traces) feeds every plan; the plans differ only in their budget, all with widths rounded to 4. "
        "`latency@P`: `make_plan(budget=\"latency\")` removes P% of the latency that a table measured on this machine "
        f"predicts (`latency_plan_table.json`: batch {meta.get('batch')}, {meta.get('threads')} threads, "
        f"{meta.get('distinct_shapes')} distinct layer shapes, measured in {meta.get('seconds')} s), choosing per "
        "group the channels with the least score per millisecond saved. Speed-ups: dense median / pruned median, "
        f"batch {result['batch']}, {result['threads']} threads, all variants timed interleaved in one run per "
        "runtime; ratio = speed-up / FLOPs reduction (the latency issue's goal: >= 0.8). Predicted = the table's "
        "dense time / its time for the plan: its conv and linear layers, each timed alone at the plan's widths, "
        f"plus the rest of the dense forward pass held fixed ({meta.get('model_ms') or 0:.1f} ms measured for the "
        f"whole dense model when the table was made, {result.get('other_ms', 0):.1f} ms of it outside the "
        "table's layers). Accuracy: test accuracy, "
        "one-shot after BatchNorm re-estimation, fine-tuned with the sweep's `cpu` budget (2 epochs of at most 100 "
        "batches, SGD lr 0.01 cosine, validation-selected), mean ± std over fine-tuning seeds"
        + (f"; dense {100 * dense_acc:.2f}%." if dense_acc else "."),
        "",
        "| plan | params removed % | FLOPs reduction | predicted speed-up | eager speed-up | eager ratio | "
        "ORT speed-up | ORT ratio | one-shot acc % | fine-tuned acc % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in result["plans"].items():
        red = p["flops_before"] / p["flops_after"]
        pred = p["latency_before_ms"] / p["latency_after_ms"]
        cells = [name, f"{100 * p['params_removed']:.1f}", f"{red:.2f}x", f"{pred:.2f}x"]
        for rt in ("eager", "onnx"):
            if rt in t:
                s = t[rt]["dense"]["median_ms"] / t[rt][name]["median_ms"]
                cells += [f"{s:.2f}x", f"{s / red:.2f}"]
            else:
                cells += ["-", "-"]
        accs = [a for k, a in result["accuracy"].items() if k.split("/")[0] == name]
        cells += [_mean_std([a["oneshot"] for a in accs]), _mean_std([a["finetuned"] for a in accs])]
        lines.append("| " + " | ".join(cells) + " |")
    if t:
        lines += ["", "Median / p10-p90 ms:", "", "| plan | eager ms | ONNX Runtime ms |", "|---|---|---|"]
        for name in ["dense", *result["plans"]]:
            lines.append(f"| {name} | " + " | ".join(
                f"{t[rt][name]['median_ms']:.2f} ({t[rt][name]['p10_ms']:.2f}-{t[rt][name]['p90_ms']:.2f})"
                for rt in ("eager", "onnx")) + " |")
    return "\n".join(lines) + "\n"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save(result: dict) -> None:
    atomic_write_json(OUT, result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="*", type=int, default=[0], help="fine-tuning seeds (default: 0)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per runtime (default: 20)")
    p.add_argument("--remeasure", action="store_true", help="measure the latency table again (replans everything)")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=None,
                   help="fine-tune only these plans for --seeds (all are still planned and timed)")
    p.add_argument("--tables-only", action="store_true")
    a = p.parse_args(argv)
    result = _load(OUT) if a.tables_only else run(a.seeds, a.repeats, a.remeasure, a.variants)
    if result is None:
        p.error(f"{OUT} does not exist yet: run without --tables-only first")
    atomic_write_text(MD, tables(result))
    print(MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
