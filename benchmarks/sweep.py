"""Sweep: every criterion x target x seed on the project's Fashion-MNIST baselines, one JSON per finished run.

    python benchmarks/sweep.py --budget smoke                          # ResNet-20, 1 target, 2 criteria (~2 min CPU)
    python benchmarks/sweep.py --budget cpu --models resnet20 --targets 0.5
    python benchmarks/sweep.py --budget paper --device cuda --data-dir /data/fmnist   # the paper's recipe (GPU)
    python benchmarks/sweep.py --tables-only                           # rebuild docs/results/sweep/README.md

Resumable: each finished run is ``docs/results/sweep/<model>/<run-id>.json`` (run id
``<budget>__<criterion>__<p|f><percent>__s<seed>``) and a rerun skips it; fine-tuning
checkpoints go to ``runs/sweep/<budget>/<model>/<run-id>/finetune`` every epoch, so an interrupted run resumes
inside fine-tuning (haprune.recover.finetune's ``checkpoint_dir``).

Fairness: for one (model, seed) every criterion sees the same calibration batches (drawn from the training split
with that seed), the same BatchNorm re-estimation batches and the same fine-tuning budget and seed. Accuracy is
top-1 on the test split; the fine-tuned model is the epoch selected on the validation split carved from the
training data (never the test set).

Rows: haprune criteria (``hap`` = auto, exact GGN traces with the paper's score; Neural Implant variants;
3-probe Hutchinson as in the official code; exact OBD; l1, l2, taylor, empirical Fisher, random) and external
references run through Torch-Pruning's own ``MetaPruner`` (``tp-*``), whose global channel ratio is bisected so the
fraction of parameters (or FLOPs) removed matches the target within 1 pp.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import haprune
from haprune._fileio import atomic_write_json
from haprune.apply import apply_plan
from haprune.data import batches, load_dataset
from haprune.estimate import estimate
from haprune.graph import build_structures
from haprune.models import create_model
from haprune.plan import CostModel, make_plan
from haprune.recover import FinetuneConfig, evaluate, finetune, load_checkpoint_weights, reestimate_batchnorm
from haprune.report import count_flops, count_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "sweep"
RUNS = ROOT / "runs" / "sweep"
MODELS = ("resnet20", "resnet56", "vgg16_bn")
# (budget, fraction removed)
TARGETS = (("params", 0.3), ("params", 0.5), ("params", 0.7), ("flops", 0.5))

# row name -> how it is produced. kind "haprune": estimate(criterion, score, options) -> make_plan -> apply_plan;
# kind "tp": Torch-Pruning's MetaPruner with that importance (global pruning, classifier ignored).
CRITERIA: dict[str, dict[str, Any]] = {
    "hap": {"kind": "haprune", "criterion": "auto", "score": None},
    "hap+ni-zeros": {"kind": "haprune", "criterion": "auto", "score": None, "implant_ratio": 0.1,
                     "implant_init": "zeros"},
    "hap+ni-lstsq": {"kind": "haprune", "criterion": "auto", "score": None, "implant_ratio": 0.1,
                     "implant_init": "lstsq"},
    "hap-official-3probes": {"kind": "haprune", "criterion": "hutchinson", "score": "hap",
                             "options": {"min_probes": 3, "max_probes": 3}},
    "hap-exact-obd": {"kind": "haprune", "criterion": "ggn", "score": "obd"},
    "l1": {"kind": "haprune", "criterion": "l1"},
    "l2": {"kind": "haprune", "criterion": "l2"},
    "taylor": {"kind": "haprune", "criterion": "taylor"},
    "fisher": {"kind": "haprune", "criterion": "empirical_fisher", "score": "obd"},
    "random": {"kind": "haprune", "criterion": "random"},
    "tp-magnitude-l2": {"kind": "tp", "importance": "GroupMagnitudeImportance"},
    "tp-taylor": {"kind": "tp", "importance": "GroupTaylorImportance"},
    "tp-hessian": {"kind": "tp", "importance": "GroupHessianImportance"},
}


@dataclass(frozen=True)
class Preset:
    """A fine-tuning / evaluation budget; the same for every criterion of a sweep."""

    name: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    max_batches_per_epoch: int | None = None
    eval_limit: int | None = None          # test images evaluated (None: all)
    calib_batches: int = 4
    calib_batch_size: int = 128
    official_probes: int = 3               # probes of the "hap-official-3probes" row
    hessian_samples: int = 128             # per-sample gradients for tp-hessian
    models: tuple[str, ...] = MODELS
    targets: tuple[tuple[str, float], ...] = TARGETS
    criteria: tuple[str, ...] = tuple(CRITERIA)
    seeds: tuple[int, ...] = (0, 1, 2)


PRESETS = {
    "smoke": Preset("smoke", epochs=1, lr=0.01, batch_size=128, max_batches_per_epoch=20, eval_limit=1000,
                    calib_batches=2, models=("resnet20",), targets=(("params", 0.5),), criteria=("hap", "l1"),
                    seeds=(0,)),
    "cpu": Preset("cpu", epochs=2, lr=0.01, batch_size=128, max_batches_per_epoch=100),
    # The paper's CIFAR fine-tuning recipe (PAPER.md): SGD momentum 0.9, batch 64, 160 epochs, lr 1e-3,
    # weight decay 1e-4, x0.1 at 50% and 75% of the epochs ("step"); the official row uses 300 probes.
    "paper": Preset("paper", epochs=160, lr=1e-3, batch_size=64, weight_decay=1e-4, schedule="step",
                    official_probes=300, hessian_samples=512),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def target_tag(budget: str, target: float) -> str:
    return f"{'p' if budget == 'params' else 'f'}{round(100 * target):02d}"


def run_id(preset: str, criterion: str, budget: str, target: float, seed: int) -> str:
    return f"{preset}__{criterion}__{target_tag(budget, target)}__s{seed}"


def parse_target(text: str) -> tuple[str, float]:
    """``0.5`` or ``params:0.5`` -> params 0.5; ``flops:0.5`` -> FLOPs 0.5."""
    budget, _, value = text.rpartition(":")
    budget = budget or "params"
    if budget not in ("params", "flops"):
        raise argparse.ArgumentTypeError(f"target {text!r}: budget must be params or flops")
    return budget, float(value)


def classifier_of(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` of the model (ignored by every pruner)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear classifier")
    return linears[-1]


# ------------------------------------------------------------------------------------------------ the sweep core

@dataclass
class SweepContext:
    """Everything one run needs; the test builds a tiny one."""

    data: Any                                  # haprune.data.DatasetSplits (train / val / test ImageDatasets)
    load_dense: Callable[[str], nn.Module]     # model name -> trained dense model (eval mode, on the CPU)
    preset: Preset
    results_dir: Path = RESULTS
    runs_dir: Path = RUNS
    device: str = "cpu"
    progress: bool = False
    _cache: dict = field(default_factory=dict)  # dense models, accuracies, calibration, sensitivities

    def dense(self, model: str) -> nn.Module:
        key = ("dense", model)
        if key not in self._cache:
            self._cache[key] = self.load_dense(model).to(self.device).eval()
        return self._cache[key]

    def example(self) -> torch.Tensor:
        return self.data.test.tensors[0][:1].to(self.device)

    def test_accuracy(self, model: nn.Module) -> float:
        images, labels = self.data.test.tensors
        if self.preset.eval_limit:
            images, labels = images[: self.preset.eval_limit], labels[: self.preset.eval_limit]
        return evaluate(model, torch.utils.data.TensorDataset(images, labels), device=self.device)["accuracy"]

    def dense_accuracy(self, model: str) -> float:
        key = ("dense_acc", model)
        if key not in self._cache:
            self._cache[key] = self.test_accuracy(self.dense(model))
        return self._cache[key]

    def calibration(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same seeded calibration batches for every criterion."""
        key = ("calib", seed)
        if key not in self._cache:
            p = self.preset
            self._cache[key] = list(batches(self.data.train, p.calib_batch_size, shuffle=True, seed=seed,
                                            limit=p.calib_batches * p.calib_batch_size, device=self.device))
        return self._cache[key]

    def bn_batches(self, seed: int):
        return batches(self.data.train, 256, shuffle=True, seed=seed, device=self.device)


def _haprune_prune(ctx: SweepContext, model_name: str, spec: dict, budget: str, target: float, seed: int):
    dense, example, calib = ctx.dense(model_name), ctx.example(), ctx.calibration(seed)
    structures = ctx._cache.get(("structures", model_name))
    if structures is None:
        structures = ctx._cache[("structures", model_name)] = build_structures(dense, example)
    options = dict(spec.get("options", {}))
    if spec["criterion"] == "hutchinson" and "max_probes" in options:  # the official row's probe count
        options = {"min_probes": ctx.preset.official_probes, "max_probes": ctx.preset.official_probes}
    key = ("sens", model_name, seed, spec["criterion"], spec.get("score"), json.dumps(options, sort_keys=True))
    if key not in ctx._cache:  # the sensitivity does not depend on the target: shared by targets and NI rows
        ctx._cache[key] = estimate(dense, structures, calib, spec["criterion"], score=spec.get("score"), seed=seed,
                                   progress=ctx.progress, **options)
    sens = ctx._cache[key]
    plan = make_plan(structures, sens.scores, CostModel(dense, structures, example), target, budget=budget,
                     implant_ratio=spec.get("implant_ratio", 0.0), criterion=sens.criterion, seed=seed)
    pruned = apply_plan(dense, plan, example, structures=structures, implant_init=spec.get("implant_init", "zeros"),
                        calibration=calib)
    info = {"resolved_criterion": sens.criterion, "score_rule": sens.info.get("score_rule"),
            "exact": sens.info.get("exact"), "auto": sens.info.get("auto"), "options": options,
            "plan_counts": plan.counts()}
    return pruned, float(sens.info["seconds"]), info


def _tp_gradients(ctx: SweepContext, model_name: str, seed: int, kind: str) -> dict[str, torch.Tensor]:
    """Per-parameter tensors the Torch-Pruning importance reads from ``param.grad``, computed once on the dense model.

    Taylor: the summed gradient of the mean loss over the calibration batches (Torch-Pruning's documented use:
    ``loss.backward()`` before ``pruner.step()``). Hessian: the mean of squared per-sample gradients (the OBD
    diagonal) over the first ``hessian_samples`` calibration images. Torch-Pruning 1.6.1's
    ``GroupHessianImportance.accumulate_grad`` keys its running sum by parameter but tests membership by name, so
    each call overwrites the sum (only the last sample would count); we therefore put the mean squared gradient in
    ``param.grad`` ourselves, which is exactly what its ``__call__`` does with a correct running sum.
    """
    key = ("tpgrad", model_name, seed, kind)
    if key in ctx._cache:
        return ctx._cache[key]
    model = copy.deepcopy(ctx.dense(model_name)).eval()
    calib = ctx.calibration(seed)
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    if kind == "GroupTaylorImportance":
        model.zero_grad()
        for x, y in calib:
            F.cross_entropy(model(x), y).backward()
        out = {n: p.grad.detach().clone() for n, p in params.items()}
    else:
        xs = torch.cat([x for x, _ in calib])[: ctx.preset.hessian_samples]
        ys = torch.cat([y for _, y in calib])[: ctx.preset.hessian_samples]
        for i in range(len(ys)):
            model.zero_grad()
            F.cross_entropy(model(xs[i:i + 1]), ys[i:i + 1]).backward()
            for n, p in params.items():
                out[n] += p.grad.detach() ** 2
        out = {n: g / len(ys) for n, g in out.items()}
    ctx._cache[key] = out
    return out


def _tp_prune(ctx: SweepContext, model_name: str, spec: dict, budget: str, target: float, seed: int):
    import torch_pruning as tp

    dense, example = ctx.dense(model_name), ctx.example()
    start = time.perf_counter()
    grads = None if spec["importance"] == "GroupMagnitudeImportance" else _tp_gradients(ctx, model_name, seed,
                                                                                       spec["importance"])
    seconds = time.perf_counter() - start
    before = count_params(dense) if budget == "params" else count_flops(dense, example)

    def prune_at(ratio: float) -> tuple[nn.Module, float]:
        model = copy.deepcopy(dense).eval()
        if spec["importance"] == "GroupMagnitudeImportance":
            importance = tp.importance.GroupMagnitudeImportance(p=2)
        else:
            importance = getattr(tp.importance, spec["importance"])()
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
        pruner = tp.pruner.MetaPruner(model, example, importance=importance, global_pruning=True,
                                      pruning_ratio=ratio, max_pruning_ratio=0.9,
                                      ignored_layers=[classifier_of(model)])
        pruner.step()
        model.zero_grad(set_to_none=True)
        after = count_params(model) if budget == "params" else count_flops(model, example)
        return model, 1.0 - after / before

    lo, hi, best = 0.0, 0.95, None
    trials = []
    for _ in range(14):  # bisection on the global channel ratio
        mid = (lo + hi) / 2
        model, removed = prune_at(mid)
        trials.append({"ratio": round(mid, 5), "removed": round(removed, 5)})
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (model, removed, mid)
        if abs(removed - target) <= 0.005:
            break
        lo, hi = (mid, hi) if removed < target else (lo, mid)
    model, removed, ratio = best
    if abs(removed - target) > 0.01:
        raise RuntimeError(f"Torch-Pruning bisection reached {removed:.4f} removed, target {target} (+-0.01)")
    return model, round(seconds, 3), {"pruning_ratio": ratio, "bisection": trials,
                                      "torch_pruning": getattr(tp, "__version__", "?"),
                                      "importance": spec["importance"]}


def run_one(ctx: SweepContext, model_name: str, criterion: str, budget: str, target: float, seed: int) -> dict | None:
    """One run: prune, BN re-estimation, one-shot accuracy, fine-tune, accuracy; write its JSON.

    Returns the record, or None when its JSON exists already (resume).
    """
    rid = run_id(ctx.preset.name, criterion, budget, target, seed)
    dest = ctx.results_dir / model_name / f"{rid}.json"
    if dest.exists():
        _log(f"{model_name}/{rid}: done already")
        return None
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    spec = CRITERIA[criterion]
    dense, example = ctx.dense(model_name), ctx.example()
    torch.manual_seed(seed)
    if spec["kind"] == "haprune":
        pruned, sens_seconds, info = _haprune_prune(ctx, model_name, spec, budget, target, seed)
    else:
        pruned, sens_seconds, info = _tp_prune(ctx, model_name, spec, budget, target, seed)
    pruned = pruned.to(ctx.device).eval()
    reestimate_batchnorm(pruned, ctx.bn_batches(seed), 16)
    acc_oneshot = ctx.test_accuracy(pruned)
    p = ctx.preset
    config = FinetuneConfig(epochs=p.epochs, lr=p.lr, weight_decay=p.weight_decay, batch_size=p.batch_size,
                            schedule=p.schedule, seed=seed, max_batches_per_epoch=p.max_batches_per_epoch)
    acc_ft, ft = None, None
    if p.epochs > 0:
        ft = finetune(pruned, ctx.data.train, ctx.data.val, config, device=ctx.device, progress=ctx.progress,
                      checkpoint_dir=ctx.runs_dir / p.name / model_name / rid / "finetune",
                      log_fn=lambda r: _log(f"  epoch {r.epoch}: val {r.val_accuracy:.4f}"))
        acc_ft = ctx.test_accuracy(pruned)
    pruned.eval()
    cpu_example = example.cpu()
    dense_cpu, pruned_cpu = copy.deepcopy(dense).cpu(), copy.deepcopy(pruned).cpu()
    params = {"before": count_params(dense_cpu), "after": count_params(pruned_cpu)}
    flops = {"before": count_flops(dense_cpu, cpu_example), "after": count_flops(pruned_cpu, cpu_example)}
    for d in (params, flops):
        d["removed"] = 1.0 - d["after"] / d["before"]
    record = {
        "model": model_name, "dataset": ctx.data.name, "run_id": rid, "criterion": criterion, "spec": spec,
        "budget": budget, "target": target, "seed": seed, "preset": asdict(p), "device": str(ctx.device),
        "params": params, "flops": flops,
        "accuracy": {"dense": ctx.dense_accuracy(model_name), "oneshot": acc_oneshot, "finetuned": acc_ft,
                     "split": "test", "eval_images": p.eval_limit or len(ctx.data.test),
                     "selection": "best validation epoch (validation split carved from train)"},
        "sensitivity_seconds": sens_seconds, "details": info,
        "calibration": {"batches": p.calib_batches, "batch_size": p.calib_batch_size, "seed": seed},
        "finetune": {"config": config.to_dict(), "result": ft.to_dict() if ft else None},
        "seconds": round(time.perf_counter() - t0, 2), "started_at": started.isoformat(),
        "versions": {"haprune": haprune.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dest, record)
    ft_text = "-" if acc_ft is None else f"{acc_ft:.4f}"
    _log(f"{model_name}/{rid}: params -{params['removed']:.3f} flops -{flops['removed']:.3f} "
         f"one-shot {acc_oneshot:.4f} fine-tuned {ft_text} ({record['seconds']} s)")
    return record


def sweep(ctx: SweepContext, models, targets, criteria, seeds) -> list[str]:
    """Every run in order (model, seed, target, criterion); returns the ids of failed runs (others go on)."""
    failed = []
    for model_name in models:
        for seed in seeds:
            for budget, target in targets:
                for criterion in criteria:
                    try:
                        run_one(ctx, model_name, criterion, budget, target, seed)
                    except Exception as e:  # one failed run must not stop a long sweep; it is reported
                        rid = f"{model_name}/{run_id(ctx.preset.name, criterion, budget, target, seed)}"
                        _log(f"{rid}: FAILED: {e!r}")
                        failed.append(rid)
    return failed


# ------------------------------------------------------------------------------------------------ tables

def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.2f} (n=1)"
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f} (n={len(values)})"


def load_records(results_dir: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*/*.json"))]


def tables(results_dir: Path = RESULTS) -> str:
    records = load_records(results_dir)
    head = [
        "# Pruning sweep on Fashion-MNIST: criteria x targets x seeds",
        "",
        "Generated by `python benchmarks/sweep.py --tables-only` from the per-run JSON files in "
        "`docs/results/sweep/<model>/` (one per finished run). Accuracy is **test accuracy of the "
        "validation-selected model**: fine-tuning keeps the epoch with the best accuracy on a validation split "
        "carved from the training data (never the test set), then BatchNorm statistics are re-estimated. One-shot "
        "accuracy is after pruning and BatchNorm re-estimation, before any fine-tuning. Values are mean ± standard "
        "deviation over seeds (n = number of seeds); every criterion of a (model, seed) saw the same calibration "
        "batches and the same fine-tuning budget. `tp-*` rows are Torch-Pruning's own MetaPruner (global pruning, "
        "classifier ignored, ratio bisected to the target).",
        "",
    ]
    if not records:
        return "\n".join(head + ["No results yet: run `python benchmarks/sweep.py --budget cpu`.", ""])
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["preset"]["name"], r["budget"], r["target"]), []).append(r)
    order = {name: i for i, name in enumerate(CRITERIA)}
    lines = list(head)
    for (model, preset, budget, target), rs in sorted(groups.items()):
        p = rs[0]["preset"]
        dense = statistics.fmean(r["accuracy"]["dense"] for r in rs)
        lines += [f"## {model}, {target_tag(budget, target)}: {100 * target:.0f}% of {budget} removed "
                  f"(budget `{preset}`)", "",
                  f"Dense accuracy {100 * dense:.2f}% on {rs[0]['accuracy']['eval_images']} test images; fine-tuning "
                  f"{p['epochs']} epoch(s) of at most {p['max_batches_per_epoch'] or 'all'} batches of "
                  f"{p['batch_size']}, SGD lr {p['lr']} ({p['schedule']}), device `{rs[0]['device']}`.", "",
                  "| criterion | params removed % | FLOPs removed % | one-shot acc % | fine-tuned acc % "
                  "| sensitivity s |", "|---|---|---|---|---|---|"]
        by_crit: dict[str, list[dict]] = {}
        for r in rs:
            by_crit.setdefault(r["criterion"], []).append(r)
        for crit in sorted(by_crit, key=lambda c: order.get(c, len(order))):
            cr = by_crit[crit]
            ft = [r["accuracy"]["finetuned"] for r in cr if r["accuracy"]["finetuned"] is not None]
            lines.append("| {} | {:.2f} | {:.2f} | {} | {} | {:.2f} |".format(
                crit, 100 * statistics.fmean(r["params"]["removed"] for r in cr),
                100 * statistics.fmean(r["flops"]["removed"] for r in cr),
                _mean_std([r["accuracy"]["oneshot"] for r in cr]), _mean_std(ft),
                statistics.fmean(r["sensitivity_seconds"] for r in cr)))
        lines.append("")
    return "\n".join(lines)


def plots(results_dir: Path = RESULTS) -> list[Path]:
    """Accuracy vs parameters remaining per model (PNG), only if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plots (the tables are complete without them)")
        return []
    written = []
    records = [r for r in load_records(results_dir) if r["budget"] == "params"]
    for model in sorted({r["model"] for r in records}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for crit in CRITERIA:
            pts: dict[float, list[float]] = {}
            for r in records:
                if r["model"] == model and r["criterion"] == crit and r["accuracy"]["finetuned"] is not None:
                    pts.setdefault(round(1 - r["params"]["removed"], 3), []).append(r["accuracy"]["finetuned"])
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [100 * statistics.fmean(pts[x]) for x in xs], marker="o", label=crit)
        ax.set_xlabel("fraction of parameters remaining")
        ax.set_ylabel("fine-tuned test accuracy %")
        ax.set_title(model)
        ax.legend(fontsize=6)
        path = results_dir / f"{model}_accuracy_vs_params.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_tables(results_dir: Path = RESULTS) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / "README.md"
    out.write_text(tables(results_dir))
    for path in plots(results_dir):
        _log(f"wrote {path}")
    return out


# ------------------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=list(PRESETS), default="cpu", help="fine-tuning budget preset (default: cpu)")
    p.add_argument("--models", nargs="*", choices=MODELS, default=None, help="(default: the preset's)")
    p.add_argument("--targets", nargs="*", type=parse_target, default=None,
                   help="0.5 or params:0.5 (params removed), flops:0.5 (default: the preset's)")
    p.add_argument("--criteria", nargs="*", choices=list(CRITERIA), default=None, help="(default: the preset's)")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="(default: the preset's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files (or HAPRUNE_DATA_DIR)")
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="folder of <model>-fmnist.safetensors")
    p.add_argument("--tables-only", action="store_true", help="only regenerate docs/results/sweep/README.md")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if not a.tables_only:
        preset = PRESETS[a.budget]
        if a.budget == "paper" and not str(a.device).startswith("cuda"):
            p.error("--budget paper needs --device cuda (160 epochs per run)")
        data = load_dataset(a.dataset, root=a.data_dir)

        def load_dense(name: str) -> nn.Module:
            model = create_model(name, in_channels=data.in_channels, num_classes=data.num_classes)
            return load_checkpoint_weights(model, Path(a.checkpoints) / f"{name}-fmnist.safetensors").eval()

        ctx = SweepContext(data, load_dense, preset, device=a.device, progress=a.progress)
        models = a.models or preset.models
        targets = a.targets or preset.targets
        criteria = a.criteria or preset.criteria
        seeds = a.seeds if a.seeds is not None else preset.seeds
        _log(f"sweep ({preset.name}): models {list(models)}, targets {list(targets)}, {len(criteria)} criteria, "
             f"seeds {list(seeds)} = {len(models) * len(targets) * len(criteria) * len(seeds)} runs")
        failed = sweep(ctx, models, targets, criteria, seeds)
        if failed:
            _log(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    out = write_tables()
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
