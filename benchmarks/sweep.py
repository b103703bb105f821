"""Sweep: every criterion x target x seed on the project's Fashion-MNIST baselines, one JSON per finished run.

    python benchmarks/sweep.py --budget smoke                          # ResNet-20, 1 target, 2 criteria (~2 min CPU)
    python benchmarks/sweep.py --budget cpu --models resnet20 --targets 0.5
    python benchmarks/sweep.py --budget cpu-lrsel --models resnet56 --targets 0.7   # cpu, best of lr 0.01 / 0.002
    python benchmarks/sweep.py --budget cpu-kd --models resnet56 --targets 0.7      # cpu at lr 0.002, distilled
    python benchmarks/sweep.py --budget paper --device cuda --data-dir /data/fmnist   # the paper's recipe (GPU)
    python benchmarks/sweep.py --tables-only                           # rebuild docs/results/sweep/README.md + SVGs
    python benchmarks/sweep.py --latency                               # CPU latency of finished runs (quiet machine)

Resumable: each finished run is ``docs/results/sweep/<model>/<run-id>.json`` (run id
``<budget>__<criterion>__<p|f><percent>__s<seed>``) and a rerun skips it; fine-tuning checkpoints go to
``runs/sweep/<budget>/<model>/ft-<key>`` every epoch, ``key`` a hash of everything that determines the fine-tuning
(model, plan, implant init, compensation, the exact starting weights, fine-tuning config; never the run id), so an
interrupted run resumes inside fine-tuning and a changed run never joins another's history.

Fairness: for one (model, seed) every criterion sees the same calibration images (drawn at random from the whole
training split with that seed: another draw per seed), the same BatchNorm re-estimation batches and the same
fine-tuning budget and seed. Accuracy is top-1 on the test split; the fine-tuned model is the epoch selected on the
validation split carved from the training data (never the test set). Records of the earlier protocol (the first
512 training images for every seed) are in ``docs/results/sweep/legacy_first512_calibration/`` and never mixed in.

Rows: haprune criteria (``hap`` = auto, exact GGN traces with the paper's score; Neural Implant variants;
3-probe Hutchinson as in the official code; exact OBD; l1, l2, taylor, empirical Fisher, random), each also with
compensation (``<row>+comp``: ``apply_plan(..., compensate="sequential")``, or ``haprune.apply.compensate`` on
Torch-Pruning's pruned model), and external
references run through Torch-Pruning's own ``MetaPruner`` (``tp-*``), whose global channel ratio is bisected so the
fraction of parameters (or FLOPs) removed matches the target within 1 pp.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
from haprune.estimate import CRITERIA as ESTIMATE_CRITERIA
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
# f50 records planned with the raw global ranking (the FLOPs default before docs/results/allocation.md), kept apart
F50_GLOBAL_DIR = "f50_global_allocation"
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
    # structured OBS saliency from the consumers' input Gram matrices (haprune.estimate.obs, issue 14)
    "obs": {"kind": "haprune", "criterion": "obs"},
    "tp-magnitude-l2": {"kind": "tp", "importance": "GroupMagnitudeImportance"},
    "tp-taylor": {"kind": "tp", "importance": "GroupTaylorImportance"},
    "tp-hessian": {"kind": "tp", "importance": "GroupHessianImportance"},
}
# The sensitivity pass is never cut short by a time budget (haprune's ``auto`` stops after 300 s by default): on a
# loaded machine that would let the load decide how many calibration batches a criterion used.
SENSITIVITY_TIME_BUDGET = 1e9
# Compensation (haprune.apply, issue 14): after removal each consumer layer is refitted by least squares to the
# dense model's outputs on the calibration batches. "<row>+comp" is "<row>" with it, everything else equal.
COMPENSATE_MODE = "sequential"
COMPENSATE_SUFFIX = "+comp"
COMPENSATED_ROWS = ("hap", "hap+ni-lstsq", "hap+ni-zeros", "hap-exact-obd", "l1", "l2", "taylor", "fisher", "random",
                    "obs", "tp-magnitude-l2", "tp-taylor", "tp-hessian")
# BatchNorm statistics are not re-estimated after compensation: docs/results/compensation.md measured the
# compensated model one-shot better with the dense statistics kept (compensation reproduces the dense layer outputs
# the BatchNorm statistics describe). Every compensated run records both one-shot accuracies, so the tables follow
# this policy even for runs made under the other; fine-tuning (BatchNorm in training mode, running statistics
# renewed every batch) does not depend on it.
REESTIMATE_BN_AFTER_COMPENSATION = False
for _name in COMPENSATED_ROWS:
    CRITERIA[_name + COMPENSATE_SUFFIX] = {**CRITERIA[_name], "compensate": COMPENSATE_MODE,
                                          "reestimate_bn": REESTIMATE_BN_AFTER_COMPENSATION}


def base_criterion(name: str) -> str:
    """The row without compensation: ``l2+comp`` -> ``l2``."""
    return name[: -len(COMPENSATE_SUFFIX)] if name.endswith(COMPENSATE_SUFFIX) else name


def is_compensated(name: str) -> bool:
    return name.endswith(COMPENSATE_SUFFIX)


def compensation_summary(result: dict | None) -> dict | None:
    """The record's digest of ``haprune.apply.compensate``'s result (``pruned.haprune_compensation``)."""
    if not result:
        return None
    before, after = result.get("error_before", {}), result.get("error_after", {})
    return {"mode": result.get("mode"), "ridge": result.get("ridge"), "layers": len(result.get("layers", [])),
            "samples": result.get("samples"), "seconds": result.get("seconds"),
            "mean_error_before": statistics.fmean(before.values()) if before else None,
            "mean_error_after": statistics.fmean(after.values()) if after else None,
            "max_error_after": max(after.values()) if after else None,
            "bias_added": len(result.get("bias_added", [])), "implants_fit": len(result.get("implants_fit", []))}


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
    # learning rates each run fine-tunes at (one copy of the pruned model each, same batches); the run keeps the
    # copy with the best validation accuracy (the start counting as epoch 0). Empty: ``lr`` alone.
    lr_grid: tuple[float, ...] = ()
    # knowledge distillation from the dense model (haprune.recover.distillation_loss): weight and temperature
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0

    def finetune_config(self, seed: int) -> FinetuneConfig:
        """The fine-tuning every run of this preset gets (at ``lr``; :meth:`finetune_configs` for the grid)."""
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                              batch_size=self.batch_size, schedule=self.schedule, seed=seed,
                              max_batches_per_epoch=self.max_batches_per_epoch, distill_alpha=self.distill_alpha,
                              distill_temperature=self.distill_temperature)

    def finetune_configs(self, seed: int) -> list[FinetuneConfig]:
        """One fine-tuning per learning rate of ``lr_grid`` (or the single ``lr``), otherwise identical."""
        base = self.finetune_config(seed)
        return [replace(base, lr=lr) for lr in self.lr_grid] or [base]


PRESETS = {
    "smoke": Preset("smoke", epochs=1, lr=0.01, batch_size=128, max_batches_per_epoch=20, eval_limit=1000,
                    calib_batches=2, models=("resnet20",), targets=(("params", 0.5),), criteria=("hap", "l1"),
                    seeds=(0,)),
    "cpu": Preset("cpu", epochs=2, lr=0.01, batch_size=128, max_batches_per_epoch=100),
    # the cpu budget per learning rate, the best-validating of two kept: 0.01 recovers a damaged model fast, but
    # knocks an already accurate (compensated) one out of its basin, where 0.002 improves it (ResNet-56, 70%,
    # seed 0: hap+comp 93.03 -> 93.66 at 0.002, none of 0.01's epochs validating above the start)
    "cpu-lrsel": Preset("cpu-lrsel", epochs=2, lr=0.01, batch_size=128, max_batches_per_epoch=100,
                        lr_grid=(0.01, 0.002)),
    # the cpu budget at the learning rate cpu-lrsel kept (0.002 in 17 of its 18 ResNet-56 runs), the loss mixed
    # with distillation from the dense model (alpha 0.9, T 4: Hinton et al. 2015's CIFAR setting): the
    # "(distilled) fine-tuning" recovery step of haprune prune --distill, measured under the short budget
    "cpu-kd": Preset("cpu-kd", epochs=2, lr=0.002, batch_size=128, max_batches_per_epoch=100,
                     distill_alpha=0.9, distill_temperature=4.0),
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


def _obs_sensitivity(dense: nn.Module, structures, calib) -> Any:
    """``haprune.estimate.obs.obs_saliency`` in the shape of a Sensitivity (scores, criterion, info)."""
    from types import SimpleNamespace

    from haprune.estimate.obs import obs_saliency

    start = time.perf_counter()
    scores = obs_saliency(dense, structures, calib)
    return SimpleNamespace(scores=scores, criterion="obs",
                           info={"seconds": time.perf_counter() - start, "score_rule": "structured OBS",
                                 "exact": None, "auto": None, "batches": len(calib)})


def _haprune_prune(ctx: SweepContext, model_name: str, spec: dict, budget: str, target: float, seed: int):
    dense, example, calib = ctx.dense(model_name), ctx.example(), ctx.calibration(seed)
    structures = ctx.structures(model_name)
    options = dict(spec.get("options", {}))
    if spec["criterion"] == "hutchinson" and "max_probes" in options:  # the official row's probe count
        options = {"min_probes": ctx.preset.official_probes, "max_probes": ctx.preset.official_probes}
    key = ("sens", model_name, seed, spec["criterion"], spec.get("score"), json.dumps(options, sort_keys=True))
    if key not in ctx._cache and spec["criterion"] == "obs" and "obs" not in ESTIMATE_CRITERIA:
        ctx._cache[key] = _obs_sensitivity(dense, structures, calib)  # until estimate() knows "obs"
    if key not in ctx._cache:  # the sensitivity does not depend on the target: shared by targets and NI rows
        ctx._cache[key] = estimate(dense, structures, calib, spec["criterion"], score=spec.get("score"), seed=seed,
                                   progress=ctx.progress, time_budget=SENSITIVITY_TIME_BUDGET, **options)
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
            "sensitivity_batches": {k: sens.info[k] for k in ("batches", "samples", "batches_used", "time_budget")
                                    if k in sens.info},
            "compensate": spec.get("compensate"), "apply_seconds": round(apply_seconds, 3),
            "compensation": compensation_summary(getattr(pruned, "haprune_compensation", None)),
            "plan_counts": plan.counts(), "allocation": plan.allocation,
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
    comp = None
    if spec.get("compensate"):  # the same refit as haprune's rows, on Torch-Pruning's pruned model
        from haprune.apply import compensate

        comp = compensation_summary(compensate(dense, model, ctx.calibration(seed), mode=spec["compensate"]).to_dict())
    return model, round(seconds, 3), {"pruning_ratio": ratio, "bisection": trials, "compensation": comp,
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


LATENCY_MAX_LOAD = 0.5    # largest 1-minute load average (the whole machine) at which latency is timed
LATENCY_MAX_WAIT_S = 180  # how long a latency pass waits for the load to fall below it, per record


def measure_latencies(ctx: SweepContext, results_dir: Path = RESULTS, batch: int = 64, threads: int = 2,
                      repeats: int = 20, max_load: float = LATENCY_MAX_LOAD, max_wait_s: float = LATENCY_MAX_WAIT_S,
                      loadavg: Callable[[], float] = lambda: os.getloadavg()[0],
                      sleep: Callable[[float], None] = time.sleep) -> int:
    """Fill ``latency`` into every finished record that has per-layer widths and no latency yet, timing only when
    the machine is quiet.

    Before each record the 1-minute load average must be below ``max_load`` (it waits up to ``max_wait_s`` for
    that, polling every 5 s); otherwise the record is left untimed for a later pass. The load average before and
    after and the dense time go into the record. A record whose load average after timing exceeds ``max_load``
    plus the timer's own threads was disturbed: its timing goes to ``latency_under_load`` (flagged, never shown
    as a speed-up) and ``latency`` stays empty. The pruned architecture is rebuilt from the record's
    ``plan_widths`` (weights do not matter for latency; its parameter count is checked against the record's),
    then timed interleaved with the dense model on CPU. Returns the number of records given a quiet ``latency``."""
    done = 0
    for path in sorted(results_dir.glob("*/*.json")):
        r = json.loads(path.read_text())
        widths = r.get("details", {}).get("plan_widths")
        if "latency" in r or not widths:
            continue
        waited = 0.0
        while (load_before := loadavg()) >= max_load and waited < max_wait_s:
            sleep(5.0)
            waited += 5.0
        if load_before >= max_load:
            _log(f"{path.parent.name}/{path.stem}: not timed, 1-minute load average {load_before:.2f} >= {max_load}")
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
        load_after = loadavg()
        entry = {"batch": batch, "threads": threads, "repeats": repeats, "device": "cpu",
                 "dense_ms": lat["dense"]["median_ms"], "pruned_ms": lat["pruned"]["median_ms"],
                 "speedup": lat["dense"]["median_ms"] / lat["pruned"]["median_ms"],
                 "load_avg_1m_before": load_before, "load_avg_1m_after": load_after, "max_load": max_load,
                 "measured_at": datetime.now(timezone.utc).isoformat(),
                 "how": "architecture rebuilt from plan_widths, implants merged (haprune.merge_implants), eager "
                        "PyTorch, interleaved with dense"}
        quiet = load_after < max_load + threads  # the timer's own threads raise the average by at most that
        r["latency" if quiet else "latency_under_load"] = entry
        atomic_write_json(path, r)
        _log(f"{path.parent.name}/{path.stem}: latency {entry['speedup']:.2f}x (dense {entry['dense_ms']:.1f} ms, "
             f"load {load_before:.2f} -> {load_after:.2f}){'' if quiet else ' UNDER LOAD: flagged, not used'}")
        done += quiet
    return done


@functools.cache
def source_version() -> dict:
    """The git commit of the checkout and the files of src/ changed since (the code a record was made with)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return {"git_commit": git("rev-parse", "HEAD").strip() or None, "src_changed_since_commit": changed}


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
    acc_before_bn = None
    if spec.get("compensate"):  # both one-shot accuracies of a compensated model: with and without BN re-estimation
        acc_before_bn = ctx.test_accuracy(pruned)
    if spec.get("reestimate_bn", True):
        reestimate_batchnorm(pruned, ctx.bn_batches(seed), 16)
    acc_oneshot = ctx.test_accuracy(pruned) if spec.get("reestimate_bn", True) or acc_before_bn is None \
        else acc_before_bn
    p = ctx.preset
    configs = p.finetune_configs(seed)
    plan_desc = info.pop("_plan_desc", None) or info.get("plan_widths")
    keys = [finetune_key(model_name, plan_desc, spec, c.to_dict(), p.eval_limit, pruned) for c in configs]
    config, ft_key = configs[0], keys[0]
    acc_ft, ft, grid = None, None, []
    if p.epochs > 0:
        start = copy.deepcopy(pruned) if len(configs) > 1 else None
        best = None  # (validation accuracy, index, model, result): a tie keeps the earlier learning rate
        for i, (c, key) in enumerate(zip(configs, keys)):
            model = pruned if i == 0 else copy.deepcopy(start)
            res = finetune(model, ctx.data.train, ctx.data.val, c, device=ctx.device, progress=ctx.progress,
                           teacher=dense,  # used only when c.distill_alpha > 0 (haprune.recover.finetune)
                           checkpoint_dir=finetune_dir(ctx, model_name, key),
                           log_fn=lambda r, lr=c.lr: _log(f"  lr {lr:g} epoch {r.epoch}: val {r.val_accuracy:.4f}"))
            grid.append({"lr": c.lr, "val_accuracy": res.final_val_accuracy, "best_epoch": res.best_epoch,
                         "checkpoint_key": key})
            if best is None or res.final_val_accuracy > best[0]:  # the returned model's validation accuracy
                best = (res.final_val_accuracy, i, model, res)
        _, chosen, pruned, ft = best
        config, ft_key = configs[chosen], keys[chosen]
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
                     "oneshot_before_bn_reestimate": acc_before_bn,
                     "split": "test", "eval_images": p.eval_limit or len(ctx.data.test),
                     "selection": "best validation epoch (validation split carved from train)"},
        "sensitivity_seconds": sens_seconds, "details": info,
        "calibration": ctx.calibration_record(seed),
        "finetune": {"config": config.to_dict(), "result": ft.to_dict() if ft else None, "checkpoint_key": ft_key,
                     **({"lr_grid": grid, "selection": "best validation accuracy over the learning rates"}
                        if len(configs) > 1 else {})},
        "seconds": round(time.perf_counter() - t0, 2), "started_at": started.isoformat(),
        "versions": {"haprune": haprune.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **source_version()},
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

def is_hap(name: str) -> bool:
    """Rows of this library's HAP (any variant, with or without compensation or implants)."""
    return name.startswith("hap")


HAP_VARIANTS = tuple(c for c in CRITERIA if is_hap(c))
# goal 1: (fraction of parameters removed, largest fine-tuned loss vs dense in pp) for the best HAP row
DENSE_LOSS_GOALS = ((0.5, 0.3), (0.7, 0.8))
# goal 3: at this target, this row at least level with that one (paired by seed)
LEVEL_GOAL = (("flops", 0.5), "hap+comp", "l2+comp")
# fine-tuning budgets compared run for run (same model, criterion, target and seed: the same pruned start)
PRESET_PAIRS = (("cpu-kd", "cpu-lrsel"),)
# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: Cornish-Fisher expansion of the normal)
_T975 = (12.7062047, 4.30265273, 3.18244631, 2.77644511, 2.57058184, 2.44691185, 2.36462425, 2.30600414,
         2.26215716, 2.22813885, 2.20098516, 2.17881283, 2.16036866, 2.14478669, 2.13144955, 2.11990530,
         2.10981558, 2.10092204, 2.09302405, 2.08596345, 2.07961384, 2.07387307, 2.06865761, 2.06389856,
         2.05953855, 2.05552944, 2.05183052, 2.04840714, 2.04522964, 2.04227246)
WIDTH_ROWS = ("hap+comp", "hap")  # plan-width plot: the first of these whose records carry plan_widths
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


def accuracy(record: dict, key: str) -> float | None:
    """A record's accuracy ``key``; the one-shot accuracy of a compensated row follows the BatchNorm policy
    (:data:`REESTIMATE_BN_AFTER_COMPENSATION`) whatever the run did, since every compensated run records both."""
    acc = record["accuracy"]
    if key == "oneshot" and record.get("spec", {}).get("compensate") and not REESTIMATE_BN_AFTER_COMPENSATION \
            and acc.get("oneshot_before_bn_reestimate") is not None:
        return acc["oneshot_before_bn_reestimate"]
    return acc[key]


def _accuracies(records: list[dict], key: str = "finetuned") -> list[float]:
    values = [accuracy(r, key) for r in records]
    return [v for v in values if v is not None]


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
    """Records per criterion in the order of ``CRITERIA``, each ``+comp`` row right after its plain row (unknown
    names last)."""
    order = {name: i for i, name in enumerate(CRITERIA)}
    groups = _group(records, lambda r: r["criterion"])

    def key(c: str) -> tuple:
        return order.get(base_criterion(c), len(order)), base_criterion(c), is_compensated(c)

    return {c: groups[c] for c in sorted(groups, key=key)}


def _target_order(budget_target: tuple[str, float]) -> tuple[bool, float]:
    """Parameter targets first, then FLOPs targets, each by increasing fraction removed."""
    return budget_target[0] != "params", budget_target[1]


def is_current_protocol(record: dict) -> bool:
    """Whether a record was calibrated the current way (per-seed random draw from the whole training split)."""
    return record.get("calibration", {}).get("protocol") == CALIBRATION_PROTOCOL


def load_records(results_dir: Path = RESULTS) -> list[dict]:
    """The current-protocol run records of ``results_dir/<model>/*.json`` (others are never mixed in)."""
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*/*.json"))]
    return [r for r in records if is_current_protocol(r)]


# -- plots

def _line_series(records: list[dict], acc_key: str, x_budget: str) -> dict[str, list[tuple[float, float, float]]]:
    """criterion -> (fraction of ``x_budget`` remaining, accuracy % mean, std) per target, over seeds."""
    series = {}
    for crit, rs in _by_criterion(records).items():
        points = []
        for _, ts in sorted(_group(rs, lambda r: r["target"]).items()):
            done = [r for r in ts if accuracy(r, acc_key) is not None]
            s = _stat([100 * accuracy(r, acc_key) for r in done])
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
    from haprune.plots import save_figure, stacked_bar_plot

    save_figure(stacked_bar_plot(_short_names(names), stacks, title=title, xlabel="group (root module)",
                                 ylabel="channels", colours=WIDTH_COLOURS), path)


def _draw_lines(series: dict, dense: float, title: str, xlabel: str, ylabel: str, path: Path) -> None:
    from haprune.plots import line_plot, save_figure

    save_figure(line_plot(series, title=title, xlabel=xlabel, ylabel=ylabel, hline=(f"dense {dense:.2f}%", dense)),
                path)


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
    "accuracy is after pruning and BatchNorm re-estimation (for `+comp` rows: after pruning and compensation, "
    + ("with" if REESTIMATE_BN_AFTER_COMPENSATION else "without") + " BatchNorm re-estimation, as "
    "docs/results/compensation.md advises; both values are in each record), before any fine-tuning. Values are mean ± standard deviation over seeds, with n (the number of seeds) in every cell; "
    "\"change vs dense\" is the mean over seeds of fine-tuned minus dense accuracy, in percentage points (pp). "
    "The Goals section compares rows by **paired-by-seed differences with 95% t-intervals**.",
    "",
    "Fairness: for one (model, seed) every criterion sees the same calibration images, **drawn at random "
    "without replacement from the whole training split with that seed** (a different draw per seed, so the spread "
    "over seeds includes the plan's dependence on its calibration), the same BatchNorm re-estimation batches and "
    "the same fine-tuning budget and seed. Fine-tuning checkpoints are keyed by a hash of everything that "
    "determines them (model, which channels go and which are implanted, implant init, compensation, the exact "
    "starting weights, the fine-tuning configuration), never by run id. `<row>+comp` is `<row>` with "
    "compensation (`haprune.apply.apply_plan(..., compensate=\"" + COMPENSATE_MODE + "\")`: each consumer layer "
    "refitted by least squares to the dense model's outputs on the calibration images), everything else equal. "
    "`tp-*` rows are Torch-Pruning's own MetaPruner (global pruning, classifier ignored, ratio bisected to the "
    "target). Records made with the earlier protocol (every seed calibrated on the first 512 training images) are "
    "kept apart in [" + LEGACY_DIR + "/](" + LEGACY_DIR + "/README.md) and never mixed in. Plans use "
    "`make_plan`'s default allocation for their budget (each record says which: the raw global ranking for "
    "parameters, the cost-aware knapsack for FLOPs, see ../allocation.md); the f50 records planned with the "
    "global ranking before FLOPs budgets defaulted to the knapsack are in [" + F50_GLOBAL_DIR + "/](" +
    F50_GLOBAL_DIR + "/README.md).",
    "",
    "Budgets (fine-tuning presets; SGD, momentum " + f"{FinetuneConfig.momentum:g}): " + "; ".join(
        f"`{p.name}` {p.epochs} epochs x {p.max_batches_per_epoch or 'all'} batches of {p.batch_size}, "
        + (f"lr {' and '.join(f'{lr:g}' for lr in p.lr_grid)} (each from the same start; the best-validating kept)"
           if p.lr_grid else f"lr {p.lr:g}") + f", {p.schedule}, weight decay {p.weight_decay:g}"
        + (f", distilled from the dense model (alpha {p.distill_alpha:g}, T {p.distill_temperature:g})"
           if p.distill_alpha else "")
        for p in PRESETS.values() if p.name != "smoke") + ".",
    "",
    "**CPU speed-up**: dense / pruned median latency in eager PyTorch, batch 64, 2 threads, the two timed "
    "interleaved by `python benchmarks/sweep.py --latency` (the pruned architecture rebuilt from the run's "
    "per-layer widths, its parameter count checked), only while the machine's 1-minute load average is below "
    f"{LATENCY_MAX_LOAD}; the load average before and after and the dense time are in each record, and timings "
    "disturbed by load are flagged and omitted. \"-\" where no quiet timing exists yet.",
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
             f"{p['batch_size']}, SGD lr {_lr_text(p)} ({p['schedule']}), device `{records[0]['device']}`.", ""]
    grid = {crit: [str(r["finetune"]["config"]["lr"]) for r in sorted(cr, key=lambda r: r["seed"])]
            for crit, cr in _by_criterion(records).items() if (cr[0].get("finetune") or {}).get("lr_grid")}
    if grid:
        lines += ["Learning rate kept per seed (best validation): "
                  + "; ".join(f"{c} {', '.join(lrs)}" for c, lrs in grid.items()) + ".", ""]
    if links:
        lines += ["Plots: " + " ".join(links), ""]
    lines += ["| criterion | params removed % | FLOPs removed % | one-shot acc % | fine-tuned acc % "
              "| fine-tuned change vs dense (pp) | sensitivity s | CPU speed-up | surgery + compensation s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for crit, cr in _by_criterion(records).items():
        apply_s = [r["details"]["apply_seconds"] for r in cr if r.get("details", {}).get("apply_seconds") is not None]
        lines.append("| {} | {:.2f} | {:.2f} | {} | {} | {} | {:.2f} | {} | {} |".format(
            crit, 100 * statistics.fmean(r["params"]["removed"] for r in cr),
            100 * statistics.fmean(r["flops"]["removed"] for r in cr),
            _mean_std(_accuracies(cr, "oneshot")), _mean_std(_accuracies(cr)), _signed(_change_vs_dense(cr)),
            statistics.fmean(r["sensitivity_seconds"] for r in cr), _speedup(cr),
            f"{statistics.fmean(apply_s):.2f}" if apply_s else "-"))
    return lines + [""]


def _lr_text(p: dict) -> str:
    grid = p.get("lr_grid") or ()
    return f"{p['lr']}" if not grid else f"each of {', '.join(map(str, grid))}, the best-validating copy kept"


def _speedup(records: list[dict]) -> str:
    """Mean CPU speed-up over dense of the runs timed on a quiet machine (``--latency``), with n, the dense time,
    and how many timings were flagged as taken under load (never averaged in)."""
    quiet = [r["latency"] for r in records if "latency" in r]
    flagged = sum("latency_under_load" in r and "latency" not in r for r in records)
    text = "-"
    if quiet:
        text = (f"{statistics.fmean(q['speedup'] for q in quiet):.2f}x (n={len(quiet)}, dense "
                f"{statistics.fmean(q['dense_ms'] for q in quiet):.0f} ms)")
    return text + (f"; {flagged} timed under load, omitted" if flagged else "")


def t_quantile_975(df: int) -> float:
    """t_{0.975} of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Paired:
    """Paired-by-seed differences a - b (pp): mean, 95% t-interval (None when n < 2), n pairs, the seeds."""

    mean: float
    low: float | None
    high: float | None
    n: int
    seeds: tuple[int, ...]

    def text(self) -> str:
        return f"{self.mean:+.2f}" + ("" if self.low is None else f" [{self.low:+.2f}, {self.high:+.2f}]")


def paired_difference(a: list[dict], b: list[dict], key: str = "finetuned") -> Paired | None:
    """100 x (accuracy of ``a`` - accuracy of ``b``) over the seeds both have, with a 95% t-interval (n = seeds)."""
    va = {r["seed"]: accuracy(r, key) for r in a if accuracy(r, key) is not None}
    vb = {r["seed"]: accuracy(r, key) for r in b if accuracy(r, key) is not None}
    seeds = tuple(sorted(set(va) & set(vb)))
    if not seeds:
        return None
    diffs = [100 * (va[s] - vb[s]) for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Paired(mean, None, None, 1, seeds)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return Paired(mean, mean - half, mean + half, len(diffs), seeds)


def _dense_diff(records: list[dict]) -> Paired | None:
    """Fine-tuned minus dense accuracy (pp) over seeds, with a 95% t-interval (dense is fixed per seed)."""
    dense = [{**r, "accuracy": {"finetuned": r["accuracy"]["dense"]}} for r in records]
    return paired_difference(records, dense)


def _best_hap(by_crit: dict[str, list[dict]]) -> str | None:
    """The HAP row with the highest mean fine-tuned accuracy (ties: the first in table order)."""
    stats = [(c, _stat(_accuracies(rs))) for c, rs in by_crit.items() if is_hap(c)]
    stats = [(c, st) for c, st in stats if st is not None]
    return max(stats, key=lambda cs: cs[1].mean)[0] if stats else None


def _excludes_zero_verdict(d: Paired | None) -> str:
    if d is None:
        return "no paired seeds"
    if d.low is None:
        return "not enough seeds (n<2)"
    return "met" if d.low > 0 else "not met"


def _dense_goal(records: list[dict]) -> list[str]:
    """Goal 1: the best HAP row loses at most 0.3 pp (50% of params removed) / 0.8 pp (70%) vs dense."""
    lines = ["**(1) Accuracy kept.** Goal: after fine-tuning, the best HAP row (highest mean fine-tuned accuracy "
             "among the HAP rows, with or without compensation) is within "
             + " and ".join(f"{tol} pp of dense at {100 * t:.0f}%" for t, tol in DENSE_LOSS_GOALS)
             + " of parameters removed. Met when the mean change over seeds is at least minus that (a gain meets "
             "it); the 95% t-interval is shown beside it. Every HAP row is listed.", "",
             "| params removed | HAP row | n | change vs dense (pp) [95% interval] | goal (pp) | verdict |",
             "|---|---|---|---|---|---|"]
    for target, tol in DENSE_LOSS_GOALS:
        ts = [r for r in records if r["budget"] == "params" and abs(r["target"] - target) < 1e-9]
        by_crit = _by_criterion(ts)
        best = _best_hap(by_crit)
        if best is None:
            lines.append(f"| {100 * target:.0f}% | - | 0 | - | ≥ {-tol:+.1f} | no fine-tuned HAP row yet |")
            continue
        for crit in [c for c in by_crit if is_hap(c)]:
            d = _dense_diff([r for r in by_crit[crit] if r["accuracy"]["finetuned"] is not None])
            if d is None:
                continue
            verdict = ("met" if d.mean >= -tol else "not met") if crit == best else "(not the best HAP row)"
            name = f"**{crit}** (best)" if crit == best else crit
            lines.append(f"| {100 * target:.0f}% | {name} | {d.n} | {d.text()} | ≥ {-tol:+.1f} | {verdict} |")
    return lines + [""]


def _best_vs_others_goal(records: list[dict]) -> list[str]:
    """Goal 2: the best HAP row beats every non-HAP row (with and without compensation), paired 95% interval > 0."""
    lines = ["**(2) HAP beats every other criterion.** Goal: the best HAP row is above every non-HAP row, with and "
             "without compensation, by a paired-by-seed difference whose 95% t-interval (n = seeds both rows have) "
             "excludes 0. Difference = best HAP row minus the other row, fine-tuned accuracy, pp; a target's goal is "
             "met when every comparison is.", "",
             "| target | best HAP row | other row | n | difference (pp) [95% interval] | verdict |",
             "|---|---|---|---|---|---|"]
    for (budget, target), ts in sorted(_group(records, lambda r: (r["budget"], r["target"])).items(),
                                       key=lambda kv: _target_order(kv[0])):
        by_crit = _by_criterion(ts)
        tag = target_tag(budget, target)
        best = _best_hap(by_crit)
        others = [c for c in by_crit if not is_hap(c) and _accuracies(by_crit[c])]
        if best is None or not others:
            lines.append(f"| {tag} | {best or '-'} | - | 0 | - | no fine-tuned {'HAP' if best is None else 'other'} "
                         "row yet |")
            continue
        verdicts = []
        for other in others:
            d = paired_difference(by_crit[best], by_crit[other])
            verdicts.append(_excludes_zero_verdict(d))
            lines.append(f"| {tag} | {best} | {other} | {d.n if d else 0} | {d.text() if d else '-'} "
                         f"| {verdicts[-1]} |")
        overall = ("met" if all(v == "met" for v in verdicts) else "not met" if "not met" in verdicts
                   else "not enough seeds (n<2)")
        lines.append(f"| {tag} | **all of the above** | | | | **{overall}** |")
    return lines + [""]


def _level_goal(records: list[dict]) -> list[str]:
    """Goal 3: at flops:0.5, HAP + compensation at least level with L2 + compensation (paired by seed)."""
    (budget, target), ours, theirs = LEVEL_GOAL
    tag = target_tag(budget, target)
    lines = [f"**(3) FLOPs-matched target.** Goal: at {tag} ({100 * target:.0f}% of {budget} removed), `{ours}` at "
             f"least level with `{theirs}` after fine-tuning. Met when the paired-by-seed mean difference is ≥ 0; "
             "when it is below 0 the verdict says whether the 95% t-interval still contains 0.", "",
             "| target | row | other row | n | difference (pp) [95% interval] | verdict |", "|---|---|---|---|---|---|"]
    ts = [r for r in records if r["budget"] == budget and abs(r["target"] - target) < 1e-9]
    d = paired_difference([r for r in ts if r["criterion"] == ours], [r for r in ts if r["criterion"] == theirs])
    if d is None:
        verdict = "no paired runs yet"
    elif d.mean >= 0:
        verdict = "met"
    else:
        verdict = "not met (interval contains 0)" if d.low is not None and d.high >= 0 else "not met"
    lines.append(f"| {tag} | {ours} | {theirs} | {d.n if d else 0} | {d.text() if d else '-'} | {verdict} |")
    return lines + [""]


def _goals(model: str, preset: str, records: list[dict]) -> list[str]:
    return ([f"## Goals: {model}, budget `{preset}`", "",
             "Checked against the numbers above, whatever they are (issue 14). Intervals are two-sided 95% Student t "
             "intervals of the paired-by-seed differences (n = number of seeds both rows have; none when n < 2).",
             ""] + _dense_goal(records) + _best_vs_others_goal(records) + _level_goal(records))


def preset_comparison(records: list[dict], pairs=PRESET_PAIRS) -> list[str]:
    """For each (preset, reference preset) pair: fine-tuned accuracy of the one minus the other, paired by seed, per
    (model, target, criterion) both ran. Both start from the same pruned model (the plan and compensation do not
    depend on the budget), so the difference is the fine-tuning's alone."""
    lines: list[str] = []
    for name, ref in pairs:
        ours, theirs = (_group([r for r in records if r["preset"]["name"] == preset],
                               lambda r: (r["model"], r["budget"], r["target"], r["criterion"]))
                        for preset in (name, ref))
        rows = []
        for key in sorted(set(ours) & set(theirs), key=lambda k: (k[0], _target_order(k[1:3]), k[3])):
            d = paired_difference(ours[key], theirs[key])
            if d is None:
                continue
            a, b = (_stat(_accuracies([r for r in rs if r["seed"] in d.seeds])) for rs in (ours[key], theirs[key]))
            model, budget, target, crit = key
            rows.append(f"| {model} | {target_tag(budget, target)} | {crit} | {d.n} | {100 * a.mean:.2f} "
                        f"| {100 * b.mean:.2f} | {d.text()} |")
        if rows:
            lines += [f"## Budget `{name}` against `{ref}`", "",
                      f"Fine-tuned test accuracy (%) under `{name}` and under `{ref}` from the same pruned model (same "
                      "plan, compensation and seed), means over the seeds both have, and their paired-by-seed "
                      "difference in pp with its 95% t-interval.",
                      "", f"| model | target | criterion | n | `{name}` | `{ref}` | difference [95% interval] |",
                      "|---|---|---|---|---|---|---|"] + rows + [""]
    return lines


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
        secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
        if secs:
            lines += [f"Runs of {model} (budget `{preset}`): {len(rs)} record(s); wall time per run {min(secs):.0f} to "
                      f"{max(secs):.0f} s (mean {statistics.fmean(secs):.0f} s), as measured on the machine and load "
                      "of the time (recorded per run as `seconds`).", ""]
    lines += preset_comparison(records)
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
