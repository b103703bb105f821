"""Sweep: every criterion x target x seed on the project's Fashion-MNIST baselines, one JSON per finished run.

    python benchmarks/sweep.py --budget smoke                          # ResNet-20, 1 target, 2 criteria (~2 min CPU)
    python benchmarks/sweep.py --budget cpu --models resnet20 --targets 0.5
    python benchmarks/sweep.py --budget paper --device cuda --data-dir /data/fmnist   # the paper's recipe (GPU)
    python benchmarks/sweep.py --tables-only                           # rebuild docs/results/sweep/README.md + SVGs
    python benchmarks/sweep.py --latency                               # CPU latency of finished runs (quiet machine)

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
import functools
import hashlib
import importlib.util
import json
import os
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
from haprune._fileio import atomic_write_json, atomic_write_text
from haprune.apply import apply_plan, merge_implants
from haprune.data import batches, load_dataset
from haprune.estimate import estimate
from haprune.graph import build_structures
from haprune.models import create_model
from haprune.plan import CostModel, GroupPlan, Plan, make_plan
from haprune.recover import FinetuneConfig, evaluate, finetune, load_checkpoint_weights, reestimate_batchnorm
from haprune.report import count_flops, count_params, measure_latency

ROOT = Path(__file__).resolve().parents[1]
# Calibration protocol of the records in the tables: a per-seed random draw from the whole training split.
# Records without it (the first 512 training images for every seed) live in LEGACY_DIR and are never mixed in.
CALIBRATION_PROTOCOL = "random-train-subset-per-seed"
CALIB_SEED_OFFSET = 104729
LEGACY_DIR = "legacy_first512_calibration"
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
# Compensation (haprune.apply, issue 14): after removal each consumer layer is refitted by least squares to the
# dense model's outputs on the calibration batches. "<row>+comp" is "<row>" with it, everything else equal.
COMPENSATE_MODE = "sequential"
COMPENSATE_SUFFIX = "+comp"
COMPENSATED_ROWS = ("hap", "hap+ni-lstsq", "hap+ni-zeros", "hap-exact-obd", "l1", "l2", "taylor", "fisher", "random")
# BatchNorm statistics re-estimated after compensation (as after plain removal); see docs/results/compensation.md
REESTIMATE_BN_AFTER_COMPENSATION = True
for _name in COMPENSATED_ROWS:
    CRITERIA[_name + COMPENSATE_SUFFIX] = {**CRITERIA[_name], "compensate": COMPENSATE_MODE,
                                          "reestimate_bn": REESTIMATE_BN_AFTER_COMPENSATION}


def base_criterion(name: str) -> str:
    """The row without compensation: ``l2+comp`` -> ``l2``."""
    return name[: -len(COMPENSATE_SUFFIX)] if name.endswith(COMPENSATE_SUFFIX) else name


def is_compensated(name: str) -> bool:
    return name.endswith(COMPENSATE_SUFFIX)


def calibration_indices(n_train: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct indices in ``range(n_train)`` drawn at random with ``seed`` (a stream of its own, so the
    calibration images are not the first images of the BatchNorm or fine-tuning shuffles of that seed)."""
    if not 0 < n <= n_train:
        raise ValueError(f"calibration needs 0 < {n} images <= the {n_train} training images")
    generator = torch.Generator().manual_seed(CALIB_SEED_OFFSET + seed)
    return torch.randperm(n_train, generator=generator)[:n]


def finetune_key(model_name: str, plan_desc: Any, spec: dict, config_dict: dict, eval_limit: int | None,
                 start: nn.Module) -> str:
    """Hash of everything that determines a fine-tuning run's checkpoints: the model, the plan (which channels go
    and which are implanted, or the resulting widths), implant init and compensation, the exact starting weights
    (the pruned, compensated, BatchNorm-re-estimated model) and the fine-tuning configuration. Two runs share a
    checkpoint directory only when they would train the same weights; never keyed by run id."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_name, "plan": plan_desc, "implant_init": spec.get("implant_init"),
                         "compensate": spec.get("compensate"), "reestimate_bn": spec.get("reestimate_bn", True),
                         "finetune": config_dict, "eval_limit": eval_limit}, sort_keys=True, default=str).encode())
    for name, tensor in start.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


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

    def finetune_config(self, seed: int) -> FinetuneConfig:
        """The fine-tuning every run of this preset gets."""
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                              batch_size=self.batch_size, schedule=self.schedule, seed=seed,
                              max_batches_per_epoch=self.max_batches_per_epoch)


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

    def structures(self, model: str):
        """The dense model's structures (haprune.graph.StructureSet), built once."""
        key = ("structures", model)
        if key not in self._cache:
            self._cache[key] = build_structures(self.dense(model), self.example())
        return self._cache[key]

    def dense_accuracy(self, model: str) -> float:
        key = ("dense_acc", model)
        if key not in self._cache:
            self._cache[key] = self.test_accuracy(self.dense(model))
        return self._cache[key]

    def calibration_indices(self, seed: int) -> torch.Tensor:
        """The training images of ``seed``'s calibration: ``calib_batches * calib_batch_size`` drawn at random
        (without replacement) from the whole training split; the same for every criterion of that seed."""
        p = self.preset
        return calibration_indices(len(self.data.train), p.calib_batches * p.calib_batch_size, seed)

    def calibration(self, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same seeded calibration batches for every criterion (:meth:`calibration_indices`, in that order)."""
        key = ("calib", seed)
        if key not in self._cache:
            images, labels = self.data.train.tensors
            idx, size = self.calibration_indices(seed), self.preset.calib_batch_size
            self._cache[key] = [(images[idx[i:i + size]].to(self.device), labels[idx[i:i + size]].to(self.device))
                                for i in range(0, len(idx), size)]
        return self._cache[key]

    def calibration_record(self, seed: int) -> dict:
        """What the run's JSON says about its calibration (the protocol marks records comparable to each other)."""
        idx = self.calibration_indices(seed)
        return {"protocol": CALIBRATION_PROTOCOL, "batches": self.preset.calib_batches,
                "batch_size": self.preset.calib_batch_size, "seed": seed, "train_images": len(self.data.train),
                "indices_sha256": hashlib.sha256(idx.numpy().astype("int64").tobytes()).hexdigest(),
                "first_indices": idx[:8].tolist()}

    def bn_batches(self, seed: int):
        return batches(self.data.train, 256, shuffle=True, seed=seed, device=self.device)


def _haprune_prune(ctx: SweepContext, model_name: str, spec: dict, budget: str, target: float, seed: int):
    dense, example, calib = ctx.dense(model_name), ctx.example(), ctx.calibration(seed)
    structures = ctx.structures(model_name)
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
    extra = {"compensate": spec["compensate"]} if spec.get("compensate") else {}  # only passed when asked for
    t0 = time.perf_counter()
    pruned = apply_plan(dense, plan, example, structures=structures, implant_init=spec.get("implant_init", "zeros"),
                        calibration=calib, **extra)
    apply_seconds = time.perf_counter() - t0
    info = {"resolved_criterion": sens.criterion, "score_rule": sens.info.get("score_rule"),
            "exact": sens.info.get("exact"), "auto": sens.info.get("auto"), "options": options,
            "compensate": spec.get("compensate"), "apply_seconds": round(apply_seconds, 3),
            "plan_counts": plan.counts(),
            # which channels go / are implanted: part of the fine-tuning checkpoint key (popped from the record)
            "_plan_desc": {k: [g.size, list(map(int, g.remove)), list(map(int, g.implant))]
                           for k, g in plan.groups.items()},
            # per-layer widths (group root module -> size, removed, implanted) for the plan-width plots
            "plan_widths": {k: [g.size, len(g.remove), len(g.implant)] for k, g in plan.groups.items()}}
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
                                      "importance": spec["importance"],
                                      "plan_widths": widths_of(ctx.structures(model_name), model)}


def widths_of(structures, pruned: nn.Module) -> dict[str, list[int]]:
    """Per-layer widths of a model pruned by other means, in the ``plan_widths`` form [size, removed, 0]: each
    group's root module's remaining output channels (or features)."""
    out = {}
    for g in structures:
        m = pruned.get_submodule(g.name)
        width = getattr(m, "out_channels", None) or getattr(m, "out_features")
        out[g.name] = [g.size, g.size - int(width), 0]
    return out


def plan_from_widths(widths: dict[str, list[int]], implant_kind: str = "1x1") -> Plan:
    """A plan with the recorded per-layer widths (which channels go does not change the architecture)."""
    return Plan({k: GroupPlan(size, list(range(r)), list(range(r, r + i))) for k, (size, r, i) in widths.items()},
                implant_kind=implant_kind)


def measure_latencies(ctx: SweepContext, results_dir: Path = RESULTS, batch: int = 64, threads: int = 2,
                      repeats: int = 20) -> int:
    """Fill ``latency`` into every finished record that has per-layer widths and no latency yet.

    The pruned architecture is rebuilt from the record's ``plan_widths`` (weights do not matter for latency; its
    parameter count is checked against the record's), then timed interleaved with the dense model on CPU. Kept
    apart from the runs so that it can run when the machine is quiet. Returns the number of records filled."""
    done = 0
    for path in sorted(results_dir.glob("*/*.json")):
        r = json.loads(path.read_text())
        widths = r.get("details", {}).get("plan_widths")
        if "latency" in r or not widths:
            continue
        dense = ctx.dense(r["model"]).cpu().eval()
        example = ctx.example().cpu()
        plan = plan_from_widths(widths, r["spec"].get("implant_kind", "1x1"))
        pruned = apply_plan(dense, plan, example, structures=ctx.structures(r["model"])).eval()
        if count_params(pruned) != r["params"]["after"]:
            raise RuntimeError(f"{path.name}: widths rebuild {count_params(pruned)} params, the run had "
                               f"{r['params']['after']}")
        pruned = merge_implants(pruned)  # timed as deployed: each implanted layer one k x k conv
        x = torch.randn(batch, *example.shape[1:])
        lat = measure_latency({"dense": dense, "pruned": pruned}, x, threads=threads, repeats=repeats, warmup=3)
        r["latency"] = {"batch": batch, "threads": threads, "repeats": repeats, "device": "cpu",
                        "dense_ms": lat["dense"]["median_ms"], "pruned_ms": lat["pruned"]["median_ms"],
                        "speedup": lat["dense"]["median_ms"] / lat["pruned"]["median_ms"],
                        "how": "architecture rebuilt from plan_widths, implants merged (haprune.merge_implants), eager "
                               "PyTorch, interleaved with dense"}
        atomic_write_json(path, r)
        _log(f"{path.parent.name}/{path.stem}: latency {r['latency']['speedup']:.2f}x")
        done += 1
    return done


def finetune_dir(ctx: SweepContext, model_name: str, key: str) -> Path:
    """Fine-tuning checkpoints of the run whose :func:`finetune_key` is ``key``."""
    return ctx.runs_dir / ctx.preset.name / model_name / f"ft-{key}"


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
    if spec.get("reestimate_bn", True):
        reestimate_batchnorm(pruned, ctx.bn_batches(seed), 16)
    acc_oneshot = ctx.test_accuracy(pruned)
    p = ctx.preset
    config = p.finetune_config(seed)
    plan_desc = info.pop("_plan_desc", None) or info.get("plan_widths")
    ft_key = finetune_key(model_name, plan_desc, spec, config.to_dict(), p.eval_limit, pruned)
    acc_ft, ft = None, None
    if p.epochs > 0:
        ft = finetune(pruned, ctx.data.train, ctx.data.val, config, device=ctx.device, progress=ctx.progress,
                      checkpoint_dir=finetune_dir(ctx, model_name, ft_key),
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
        "calibration": ctx.calibration_record(seed),
        "finetune": {"config": config.to_dict(), "result": ft.to_dict() if ft else None, "checkpoint_key": ft_key},
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

HAP_VARIANTS = tuple(c for c in CRITERIA if c.startswith("hap"))  # rows of this library's HAP (goal b's "own")
IMPLANT_ROWS = ("hap+ni-lstsq", "hap+ni-zeros")
# goal (a): (fraction of parameters removed, largest fine-tuned loss vs dense in pp) for the implant rows
IMPLANT_LOSS_GOALS = ((0.5, 0.3), (0.7, 0.8))
WIDTH_ROWS = ("hap+ni-lstsq", "hap")  # plan-width plot: the first of these whose records carry plan_widths
# (file suffix, accuracy key, x axis budget, what it shows) of the per-(model, preset) line plots
LINE_PLOTS = (("acc_vs_params", "finetuned", "params", "fine-tuned accuracy vs parameters remaining"),
              ("acc_vs_flops", "finetuned", "flops", "fine-tuned accuracy vs FLOPs remaining"),
              ("oneshot_vs_params", "oneshot", "params", "one-shot accuracy vs parameters remaining"))
# kept / implanted / removed bars: blue, orange, vermillion (Okabe-Ito)
WIDTH_COLOURS = ("#0072B2", "#E69F00", "#D55E00")

TableKey = tuple[str, str, str, float]  # (model, preset name, budget, target)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None when n < 2) of n values."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class PlotJob:
    """One SVG of the sweep: its file name, Markdown alt text, the tables it is linked above and how to draw it."""

    name: str
    alt: str
    tables: tuple[TableKey, ...]
    draw: Callable[[Path], None]


def _stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def _mean_std(values: list[float]) -> str:
    """Accuracies (fractions) as ``mean ± std (n=k)`` in percent."""
    s = _stat([100 * v for v in values])
    if s is None:
        return "-"
    return f"{s.mean:.2f} (n=1)" if s.std is None else f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})"


def _signed(s: Stat | None) -> str:
    """A change in pp as ``+mean ± std`` (std left out when n = 1)."""
    if s is None:
        return "-"
    return f"{s.mean:+.2f}" if s.std is None else f"{s.mean:+.2f} ± {s.std:.2f}"


def _accuracies(records: list[dict], key: str = "finetuned") -> list[float]:
    return [r["accuracy"][key] for r in records if r["accuracy"][key] is not None]


def _change_vs_dense(records: list[dict]) -> Stat | None:
    """Fine-tuned minus dense accuracy (pp) over the records (seeds) that were fine-tuned."""
    return _stat([100 * (r["accuracy"]["finetuned"] - r["accuracy"]["dense"])
                  for r in records if r["accuracy"]["finetuned"] is not None])


def _group(records: list[dict], key: Callable[[dict], Any]) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return groups


def _by_criterion(records: list[dict]) -> dict[str, list[dict]]:
    """Records per criterion, in the order of ``CRITERIA`` (unknown names last)."""
    order = {name: i for i, name in enumerate(CRITERIA)}
    groups = _group(records, lambda r: r["criterion"])
    return {c: groups[c] for c in sorted(groups, key=lambda c: (order.get(c, len(order)), c))}


def _target_order(budget_target: tuple[str, float]) -> tuple[bool, float]:
    """Parameter targets first, then FLOPs targets, each by increasing fraction removed."""
    return budget_target[0] != "params", budget_target[1]


def load_records(results_dir: Path = RESULTS) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*/*.json"))]


# -- plots

@functools.cache
def _plot_svg():
    """benchmarks/plot_svg.py, loaded from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("haprune_plot_svg", Path(__file__).with_name("plot_svg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line_series(records: list[dict], acc_key: str, x_budget: str) -> dict[str, list[tuple[float, float, float]]]:
    """criterion -> (fraction of ``x_budget`` remaining, accuracy % mean, std) per target, over seeds."""
    series = {}
    for crit, rs in _by_criterion(records).items():
        points = []
        for _, ts in sorted(_group(rs, lambda r: r["target"]).items()):
            done = [r for r in ts if r["accuracy"][acc_key] is not None]
            s = _stat([100 * r["accuracy"][acc_key] for r in done])
            if s is not None:
                points.append((statistics.fmean(1 - r[x_budget]["removed"] for r in done), s.mean, s.std or 0.0))
        if points:
            series[crit] = points
    return series


def _network_order(name: str) -> tuple:
    """Natural sort key of a dotted module name (numbers compare as numbers: ``layer2.10`` after ``layer2.9``).

    plan_widths lists groups in the pruning graph's order (ResNet shortcut groups first, VGG last layer first);
    for this project's models the natural order of the names is the network's definition order.
    """
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _short_names(names: list[str]) -> list[str]:
    """``names`` without the longest dotted prefix they all share (each keeps at least one component)."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def _width_record(records: list[dict]) -> dict | None:
    """The record whose plan widths are drawn: first of ``WIDTH_ROWS`` with plan_widths, lowest seed."""
    for crit in WIDTH_ROWS:
        rs = [r for r in records if r["criterion"] == crit and r.get("details", {}).get("plan_widths")]
        if rs:
            return min(rs, key=lambda r: r["seed"])
    return None


def _draw_widths(record: dict, title: str, path: Path) -> None:
    """Stacked kept / implanted / removed bar per group of ``record``'s plan, in network order."""
    widths = record["details"]["plan_widths"]
    names = sorted(widths, key=_network_order)
    sizes, removed, implanted = ([widths[n][k] for n in names] for k in range(3))
    stacks = {"kept": [s - r - i for s, r, i in zip(sizes, removed, implanted)], "implanted": implanted,
              "removed": removed}
    _plot_svg().stacked_bar_plot(_short_names(names), stacks, path, title=title, xlabel="group (root module)",
                                 ylabel="channels", colours=WIDTH_COLOURS)


def _draw_lines(series: dict, dense: float, title: str, xlabel: str, ylabel: str, path: Path) -> None:
    _plot_svg().line_plot(series, path, title=title, xlabel=xlabel, ylabel=ylabel, width=760, height=520,
                          hline=(f"dense {dense:.2f}%", dense))


def plot_jobs(records: list[dict]) -> list[PlotJob]:
    """The SVGs of every (model, preset), from the records with a parameter budget; none without data."""
    jobs = []
    params = [r for r in records if r["budget"] == "params"]
    for (model, preset), rs in sorted(_group(params, lambda r: (r["model"], r["preset"]["name"])).items()):
        by_target = dict(sorted(_group(rs, lambda r: r["target"]).items()))
        keys = tuple((model, preset, "params", t) for t in by_target)
        dense = 100 * statistics.fmean(r["accuracy"]["dense"] for r in rs)
        for suffix, acc_key, x_budget, what in LINE_PLOTS:
            series = _line_series(rs, acc_key, x_budget)
            if series:
                title = f"{model} ({preset}): {what}"
                xlabel = f"fraction of {'parameters' if x_budget == 'params' else 'FLOPs'} remaining"
                ylabel = f"{'fine-tuned' if acc_key == 'finetuned' else 'one-shot'} test accuracy (%)"
                jobs.append(PlotJob(f"{model}_{preset}_{suffix}.svg", what, keys,
                                    functools.partial(_draw_lines, series, dense, title, xlabel, ylabel)))
        for target, ts in by_target.items():
            record = _width_record(ts)
            if record is not None:
                what = f"per-layer widths of the {record['criterion']} plan"
                title = (f"{model} ({preset}): {what}, {100 * target:.0f}% of params removed "
                         f"(seed {record['seed']})")
                jobs.append(PlotJob(f"{model}_{preset}_plan_widths_{target_tag('params', target)}.svg", what,
                                    ((model, preset, "params", target),),
                                    functools.partial(_draw_widths, record, title)))
    return jobs


def plots(results_dir: Path = RESULTS) -> list[Path]:
    """Write every plot of ``plot_jobs`` as SVG into ``results_dir``; returns the paths written."""
    written = []
    for job in plot_jobs(load_records(results_dir)):
        job.draw(results_dir / job.name)
        written.append(results_dir / job.name)
    return written


# -- README

HEADER = [
    "# Pruning sweep on Fashion-MNIST: criteria x targets x seeds",
    "",
    "Generated by `python benchmarks/sweep.py --tables-only` from the per-run JSON files in "
    "`docs/results/sweep/<model>/` (one per finished run); the same command draws the SVG plots linked above "
    "each table (from the runs with a parameter budget). Accuracy is **test accuracy of the "
    "validation-selected model**: fine-tuning keeps the epoch with the best accuracy on a validation split "
    "carved from the training data (never the test set), then BatchNorm statistics are re-estimated. One-shot "
    "accuracy is after pruning and BatchNorm re-estimation, before any fine-tuning. Values are mean ± standard "
    "deviation over seeds (n = number of seeds); \"change vs dense\" is the mean over seeds of fine-tuned minus "
    "dense accuracy, in percentage points (pp). Every criterion of a (model, seed) saw the same calibration "
    "batches and the same fine-tuning budget. `tp-*` rows are Torch-Pruning's own MetaPruner (global pruning, "
    "classifier ignored, ratio bisected to the target). **CPU speed-up**: dense / pruned median latency in eager "
    "PyTorch, batch 64, 2 threads, the two timed interleaved by `python benchmarks/sweep.py --latency` after the "
    "runs (the pruned architecture rebuilt from the run's per-layer widths, its parameter count checked); "
    "\"-\" where it has not been measured (runs from before per-layer widths were recorded).",
    "",
]


def _table(key: TableKey, records: list[dict], links: list[str]) -> list[str]:
    model, preset, budget, target = key
    p = records[0]["preset"]
    dense = statistics.fmean(r["accuracy"]["dense"] for r in records)
    lines = [f"## {model}, {target_tag(budget, target)}: {100 * target:.0f}% of {budget} removed "
             f"(budget `{preset}`)", "",
             f"Dense accuracy {100 * dense:.2f}% on {records[0]['accuracy']['eval_images']} test images; fine-tuning "
             f"{p['epochs']} epoch(s) of at most {p['max_batches_per_epoch'] or 'all'} batches of "
             f"{p['batch_size']}, SGD lr {p['lr']} ({p['schedule']}), device `{records[0]['device']}`.", ""]
    if links:
        lines += ["Plots: " + " ".join(links), ""]
    lines += ["| criterion | params removed % | FLOPs removed % | one-shot acc % | fine-tuned acc % "
              "| fine-tuned change vs dense (pp) | sensitivity s | CPU speed-up |", "|---|---|---|---|---|---|---|---|"]
    for crit, cr in _by_criterion(records).items():
        lines.append("| {} | {:.2f} | {:.2f} | {} | {} | {} | {:.2f} | {} |".format(
            crit, 100 * statistics.fmean(r["params"]["removed"] for r in cr),
            100 * statistics.fmean(r["flops"]["removed"] for r in cr),
            _mean_std(_accuracies(cr, "oneshot")), _mean_std(_accuracies(cr)), _signed(_change_vs_dense(cr)),
            statistics.fmean(r["sensitivity_seconds"] for r in cr), _speedup(cr)))
    return lines + [""]


def _speedup(records: list[dict]) -> str:
    """Mean CPU speed-up over dense of the runs whose latency was measured (``--latency``), with n."""
    values = [r["latency"]["speedup"] for r in records if "latency" in r]
    return f"{statistics.fmean(values):.2f}x (n={len(values)})" if values else "-"


def _implant_loss_goal(records: list[dict]) -> list[str]:
    """Goal (a): the implant rows lose at most 0.3 pp (50% of params removed) / 0.8 pp (70%) vs dense."""
    lines = ["**(a) Neural Implant keeps the dense accuracy.** Goal: the fine-tuned accuracy of "
             + " and ".join(f"`{c}`" for c in IMPLANT_ROWS) + " is within "
             + " and ".join(f"{tol} pp of dense at {100 * t:.0f}%" for t, tol in IMPLANT_LOSS_GOALS)
             + " of parameters removed (mean over seeds; a gain over dense meets it).", "",
             "| params removed | criterion | n | change vs dense (pp) | goal (pp) | verdict |",
             "|---|---|---|---|---|---|"]
    for target, tol in IMPLANT_LOSS_GOALS:
        for crit in IMPLANT_ROWS:
            s = _change_vs_dense([r for r in records if r["criterion"] == crit and r["budget"] == "params"
                                  and abs(r["target"] - target) < 1e-9])
            verdict = "no runs yet" if s is None else "met" if s.mean >= -tol else "not met"
            lines.append(f"| {100 * target:.0f}% | {crit} | {s.n if s else 0} | {_signed(s)} | ≥ {-tol:+.1f} "
                         f"| {verdict} |")
    return lines + [""]


def _best(by_crit: dict[str, list[dict]], names: list[str]) -> tuple[str, Stat] | None:
    """The criterion of ``names`` with the highest mean fine-tuned accuracy (%), and its statistics."""
    stats = [(c, _stat([100 * a for a in _accuracies(by_crit[c])])) for c in names if c in by_crit]
    stats = [(c, s) for c, s in stats if s is not None]
    return max(stats, key=lambda cs: cs[1].mean) if stats else None


def _margin_verdict(ours: Stat, other: Stat) -> str:
    margin = ours.mean - other.mean
    if margin <= 0:
        return "not met"
    if ours.std is None or other.std is None:
        return "not enough seeds (n<2)"
    return "met" if margin > max(ours.std, other.std) else "not met"


def _margin_goal(records: list[dict]) -> list[str]:
    """Goal (b): the best implant row beats the best non-HAP criterion by more than the seed spread."""
    lines = ["**(b) HAP + Neural Implant beats every other criterion by more than the seed spread.** Margin = "
             "mean fine-tuned accuracy of the best implant row minus that of the best criterion outside this "
             "library's HAP variants (" + ", ".join(f"`{c}`" for c in HAP_VARIANTS) + "); met when the margin "
             "exceeds the larger of the two rows' standard deviations over seeds (needs n ≥ 2 in both rows; a "
             "margin ≤ 0 is not met whatever n).", "",
             "| target | best HAP+NI row | n | fine-tuned acc % | best other row | n | fine-tuned acc % "
             "| margin (pp) | spread (pp) | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (budget, target), ts in sorted(_group(records, lambda r: (r["budget"], r["target"])).items(),
                                       key=lambda kv: _target_order(kv[0])):
        by_crit = _by_criterion(ts)
        ours = _best(by_crit, list(IMPLANT_ROWS))
        other = _best(by_crit, [c for c in by_crit if c not in HAP_VARIANTS])
        tag = target_tag(budget, target)
        if ours is None or other is None:
            missing = "HAP+NI" if ours is None else "other"
            lines.append(f"| {tag} |" + " - |" * 8 + f" no fine-tuned {missing} row |")
            continue
        (ours_crit, ours_s), (other_crit, other_s) = ours, other
        spread = "-" if ours_s.std is None or other_s.std is None else f"{max(ours_s.std, other_s.std):.2f}"
        lines.append(f"| {tag} | {ours_crit} | {ours_s.n} | {ours_s.mean:.2f} | {other_crit} | {other_s.n} "
                     f"| {other_s.mean:.2f} | {ours_s.mean - other_s.mean:+.2f} | {spread} "
                     f"| {_margin_verdict(ours_s, other_s)} |")
    return lines + [""]


def _goals(model: str, preset: str, records: list[dict]) -> list[str]:
    return ([f"## Goals: {model}, budget `{preset}`", "", "Checked against the numbers above, whatever they are.",
             ""] + _implant_loss_goal(records) + _margin_goal(records))


def tables(results_dir: Path = RESULTS) -> str:
    """The README: per (model, preset) one table per target (with its plots linked) and a Goals section."""
    records = load_records(results_dir)
    if not records:
        return "\n".join(HEADER + ["No results yet: run `python benchmarks/sweep.py --budget cpu`.", ""])
    links: dict[TableKey, list[str]] = {}
    for job in plot_jobs(records):
        for key in job.tables:
            links.setdefault(key, []).append(f"![{job.alt}]({job.name})")
    lines = list(HEADER)
    for (model, preset), rs in sorted(_group(records, lambda r: (r["model"], r["preset"]["name"])).items()):
        by_target = _group(rs, lambda r: (r["budget"], r["target"]))
        for budget, target in sorted(by_target, key=_target_order):
            key = (model, preset, budget, target)
            lines += _table(key, by_target[(budget, target)], links.get(key, []))
        lines += _goals(model, preset, rs)
    return "\n".join(lines)


def write_tables(results_dir: Path = RESULTS) -> Path:
    """Draw the SVG plots and write README.md into ``results_dir``; returns the README's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for path in plots(results_dir):
        _log(f"wrote {path}")
    out = results_dir / "README.md"
    atomic_write_text(out, tables(results_dir))
    return out


# ------------------------------------------------------------------------------------------------ command line

def load_dense_model(name: str, data, checkpoints: str | Path) -> nn.Module:
    model = create_model(name, in_channels=data.in_channels, num_classes=data.num_classes)
    return load_checkpoint_weights(model, Path(checkpoints) / f"{name}-fmnist.safetensors").eval()


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
    p.add_argument("--tables-only", action="store_true", help="only regenerate docs/results/sweep/README.md and its SVG plots")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--latency", action="store_true",
                   help="only measure the CPU latency (batch 64, 2 threads) of finished runs that lack it; run it "
                        "when nothing else loads the machine")
    a = p.parse_args(argv)
    if a.latency:
        data = load_dataset(a.dataset, root=a.data_dir)
        ctx = SweepContext(data, lambda name: load_dense_model(name, data, a.checkpoints), PRESETS[a.budget])
        _log(f"latency measured for {measure_latencies(ctx)} run(s)")
    elif not a.tables_only:
        preset = PRESETS[a.budget]
        if a.budget == "paper" and not str(a.device).startswith("cuda"):
            p.error("--budget paper needs --device cuda (160 epochs per run)")
        data = load_dataset(a.dataset, root=a.data_dir)

        ctx = SweepContext(data, lambda name: load_dense_model(name, data, a.checkpoints), preset, device=a.device,
                           progress=a.progress)
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
