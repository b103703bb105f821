"""Cost and ranking quality of haprune's sensitivity estimators against exact Hessian traces.

    python benchmarks/hessian_speed.py            # full run (batch 128; ~45 min on 2 CPU cores; resumable)
    python benchmarks/hessian_speed.py --quick    # smoke run (batch 32, ResNet-20 and its GELU variant; < 1 min)
    python benchmarks/hessian_speed.py --tables-only   # rebuild docs/results/performance.md from the JSON

What is measured, on one fixed calibration batch of Fashion-MNIST training images (the same batch for every
estimator of a run), for the trained ResNet-20 and ResNet-56 and for ResNet-20 with every ``nn.ReLU`` module
replaced by ``nn.GELU`` (same weights):

- every estimator of ``haprune.estimate.estimate`` that computes curvature (``auto``, ``ggn``, ``fisher`` with its
  default importance sampling at one and at half a draw per input, ``fisher`` with one label per input drawn from
  the model (``fisher_multinomial``, the plain sampled Fisher), ``empirical_fisher``, ``hutchinson`` with its
  default stopping rule and with a fixed
  number of probes), all with the paper's score rule ``hap`` = Tr(H_s) / n_s * ||w_s||^2;
- the official HAP recipe, re-implemented here (:func:`official_hap`), at 3 and 300 probes;
- the reference: for the ReLU networks the exact traces from a plain per-sample float64 loop written here
  (:func:`exact_float64`), for the GELU network, where nothing cheap is exact, a long Hutchinson run written here
  (:func:`reference_hutchinson`), two independent halves whose mutual agreement is reported.

Cost is in units of G, the median time of one forward + backward pass of the same batch (eval mode,
cross-entropy, gradient of every parameter), measured in the same process right before and after each
estimator run, so that machine load cancels to first order. Estimators that take only seconds are run up to
three times (seeds 0, 1, 2), interleaved with the G measurements; time and quality are medians over the runs.
In the full run each (model, estimator) runs in its own subprocess, which reports its peak resident set size
(``ru_maxrss``); ``--quick`` runs everything in one process and reports no memory.

Results go to ``docs/results/hessian_speed.json`` (``hessian_speed_quick.json`` for ``--quick``), written after
every entry; a run that is interrupted resumes where it stopped (finished entries are kept; raw per-structure
vectors are cached under ``runs/hessian_speed/``). ``docs/results/performance.md`` is generated from the full
run's JSON only.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CACHE = ROOT / "runs" / "hessian_speed"
CHECKPOINTS = ROOT / "checkpoints"
SCRIPT = "python benchmarks/hessian_speed.py"

# model key -> (registry name, activation)
MODELS = {"resnet20": ("resnet20", "relu"), "resnet56": ("resnet56", "relu"), "resnet20-gelu": ("resnet20", "gelu")}

CONFIGS: dict[str, dict[str, Any]] = {
    "full": {
        "batch": 128, "models": ["resnet20", "resnet56", "resnet20-gelu"], "probes": [3, 30, 300],
        "official_probes": [3, 300], "default_hutchinson": {}, "reference_probes": 1000,
        "repeat_budget_s": 20.0, "subprocess": True, "json": RESULTS / "hessian_speed.json",
    },
    "quick": {
        "batch": 32, "models": ["resnet20", "resnet20-gelu"], "probes": [3, 30], "official_probes": [3, 30],
        "default_hutchinson": {"max_probes": 30}, "reference_probes": 64,
        "repeat_budget_s": 1.0, "subprocess": False, "json": RESULTS / "hessian_speed_quick.json",
    },
}
GOALS = {"max_rel_diff": 1e-4, "default_vs_official300_speedup": 30.0, "fisher_spearman": 0.95, "fisher_cost_G": 2.0,
         "ggn_peak_rss_gib_resnet56": 4.0}
BUSY_PATTERN = "make demo|pytest|haprune|benchmarks/"
THREADS = 2


# ----------------------------------------------------------------------------------------------------------------
# models, data, entries


def build_model(key: str) -> nn.Module:
    from haprune.models import create_model
    from haprune.recover import load_checkpoint_weights

    name, act = MODELS[key]
    model = load_checkpoint_weights(create_model(name, in_channels=1, num_classes=10),
                                    CHECKPOINTS / f"{name}-fmnist.safetensors")
    if act == "gelu":
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, child_name, nn.GELU())
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    return model.eval()


def calibration_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` training images drawn with a fixed seed (cached so that every subprocess sees the same tensors)."""
    path = CACHE / f"batch{batch}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    from haprune.data import load_dataset

    train = load_dataset("fashion-mnist").train
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[:batch]
    x, y = train.images[idx].contiguous(), train.labels[idx].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y, "indices": idx}, path)
    return x, y


def entries_for(cfg: dict[str, Any], key: str) -> list[str]:
    """Estimators run on one model, in order (the reference first)."""
    ref = "exact_float64" if MODELS[key][1] == "relu" else "reference_hutchinson"
    return ([ref, "auto", "ggn", "fisher", "fisher_half", "fisher_multinomial", "empirical_fisher", "hutchinson"]
            + [f"hutchinson_{n}" for n in cfg["probes"]] + [f"official_{n}" for n in cfg["official_probes"]])


def describe(entry: str, cfg: dict[str, Any]) -> str:
    if entry == "hutchinson":
        opts = cfg["default_hutchinson"]
        return "haprune defaults (split-half rank reliability >= 0.95, min 16, max 300 probes)" if not opts else \
            f"haprune defaults but max_probes={opts['max_probes']}"
    if entry.startswith("hutchinson_"):
        return f"min_probes = max_probes = {entry.split('_')[1]}"
    if entry.startswith("official_"):
        return f"official HAP recipe, {entry.split('_')[1]} probes"
    if entry == "auto" and cfg["default_hutchinson"]:
        return f"haprune default (where it resolves to hutchinson: max_probes={cfg['default_hutchinson']['max_probes']})"
    return {"auto": "haprune default", "ggn": "exact GGN diagonal",
            "fisher": "importance-sampled, 1 draw per input (default)",
            "fisher_half": "importance-sampled, 0.5 draw per input",
            "fisher_multinomial": "1 label per input drawn from the model",
            "empirical_fisher": "true labels", "exact_float64": "reference: per-sample float64 loop",
            "reference_hutchinson": f"reference: {cfg['reference_probes']} probes in two halves"}[entry]


# ----------------------------------------------------------------------------------------------------------------
# the reference and the official recipe, written here independently of haprune.estimate


def exact_float64(model: nn.Module, structures, x: torch.Tensor) -> dict[str, Any]:
    """Exact Hessian diagonal of the mean cross-entropy for a network piecewise linear in each parameter.

    Plain loop in float64: for each sample n and class k the gradient of log p_k(x_n) by autograd, accumulating
    p_nk * g^2 (the Gauss-Newton diagonal, which is the Hessian diagonal when the second derivative of the
    network output in each single parameter vanishes, as for ReLU networks with eval-mode BatchNorm).
    """
    m = copy.deepcopy(model).double().eval()
    named = dict(m.named_parameters())
    diag = {n: torch.zeros_like(p) for n, p in named.items()}
    params = list(named.values())
    for i in range(len(x)):
        logp = F.log_softmax(m(x[i:i + 1].double()), -1)[0]
        p = logp.detach().exp()
        for k in range(len(logp)):
            grads = torch.autograd.grad(logp[k], params, retain_graph=k < len(logp) - 1)
            for (n, d), g in zip(diag.items(), grads):
                d.add_(p[k] * g * g)
    diag = {n: d / len(x) for n, d in diag.items()}
    return {"diag": diag}


def reference_hutchinson(model: nn.Module, structures, x: torch.Tensor, y: torch.Tensor, probes: int,
                         seed: int = 1000) -> dict[str, Any]:
    """A long Hutchinson run in two independent halves (seeds ``seed`` and ``seed + 1``).

    One backward with create_graph=True; per probe a Rademacher vector over the structures' parameters (zero
    elsewhere), Hv by double backward, v * Hv accumulated per element in float64 (per-structure sums are then
    unbiased estimates of Tr(H_s)). Returns both halves' per-element means and the per-structure per-probe
    samples' variance (for the standard error of the combined estimate).
    """
    named = dict(model.named_parameters())
    names = [n for n in structures.param_names() if n in named]
    params = [named[n] for n in names]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    halves, sq = [], torch.zeros(structures.num_structures, dtype=torch.float64)
    for h in range(2):
        gen = torch.Generator().manual_seed(seed + h)
        acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
        for _ in range(probes // 2):
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            elem = {n: (v * hv).double() for n, v, hv in zip(names, vs, hvs)}
            for n in names:
                acc[n] += elem[n]
            sq += structures.reduce(elem) ** 2
        halves.append({n: a / (probes // 2) for n, a in acc.items()})
    diag = {n: (halves[0][n] + halves[1][n]) / 2 for n in names}
    return {"diag": diag, "halves": halves, "sum_sq": sq, "probes": 2 * (probes // 2)}


def official_hap(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_v: int, seed: int) -> dict[str, Any]:
    """The official HAP code's channel-wise Hutchinson trace and importance (yaozhewei/HAP, hessian_pruner.py
    ``_compute_hessian_importance`` and hessian_fact.py ``get_trace_hut(channelwise=True)``), on one batch.

    As there: only 2-D and 4-D weights (convs and the classifier) require grad; one ``loss.backward(
    create_graph=True)``; per probe a Rademacher vector over those weights, ``autograd.grad(grads, params,
    grad_outputs=v, retain_graph=True)``, Hv and v copied to the CPU and, per output channel of every such
    weight, ``Hv[c].flatten().dot(v[c].flatten()).item()`` appended to a Python list. The trace of a channel is
    the mean of its list, its importance trace_c * ||w_c||^2 / numel(w_c) over that layer's own weight row.
    Returns per-layer (parameter name) channel traces and importances.
    """
    torch.manual_seed(seed)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(p.dim() in (2, 4))
    try:
        model.eval()
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        with warnings.catch_warnings():  # "backward with create_graph=True creates a reference cycle": as official
            warnings.simplefilter("ignore", UserWarning)
            loss.backward(create_graph=True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        grads = [p.grad + 0. for p in params]
        trace_vhv = [[[] for _ in range(p.size(0))] for p in params]
        for i in range(n_v):
            v = [torch.randint_like(p, high=2).float() * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, only_inputs=True, retain_graph=i < n_v - 1)
            hv = [h.detach().cpu() for h in hv]
            v = [vi.detach().cpu() for vi in v]
            with torch.no_grad():
                for li in range(len(hv)):
                    for c in range(hv[li].size(0)):
                        trace_vhv[li][c].append(hv[li][c].flatten().dot(v[li][c].flatten()).item())
        traces, importances = {}, {}
        for (n, p), layer in zip(named, trace_vhv):
            t = torch.tensor([sum(ch) / len(ch) for ch in layer], dtype=torch.float64)
            w = p.detach().double()
            traces[n] = t
            importances[n] = t * w.flatten(1).pow(2).sum(1) / w[0].numel()
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags[p])
    return {"channel_trace": traces, "channel_importance": importances}


def hessian_diag_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, picks: list) -> dict[str, Any]:
    """Is the float64 GGN diagonal the Hessian diagonal? H_ii of the mean cross-entropy by double backward in
    float64 (H e_i, restricted to e_i's own tensor) at a few seeded coordinates, against the loop's values."""
    m = copy.deepcopy(model).double().eval()
    named = dict(m.named_parameters())
    loss = F.cross_entropy(m(x.double()), y)
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), create_graph=True)))
    rows = []
    for n, i, d in picks:
        e = torch.zeros_like(named[n])
        e.view(-1)[i] = 1.0
        h = torch.autograd.grad(grads[n], named[n], grad_outputs=e, retain_graph=True)[0].flatten()[i].item()
        rows.append({"param": n, "index": i, "hessian": h, "loop": d, "rel_diff": abs(h - d) / max(abs(h), 1e-300)})
    return {"coordinates": rows, "max_rel_diff": max(r["rel_diff"] for r in rows)}


def conv_channel_traces(model: nn.Module, diag: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per output channel of every Conv2d weight: the sum of a per-element diagonal over that conv's own row."""
    return {f"{mn}.weight": diag[f"{mn}.weight"].double().flatten(1).sum(1).cpu()
            for mn, m in model.named_modules() if isinstance(m, nn.Conv2d) and f"{mn}.weight" in diag}


def conv_importance(model: nn.Module, traces: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official importance trace_c * ||w_c||^2 / numel(w_c) per conv output channel."""
    named = dict(model.named_parameters())
    out = {}
    for n, t in traces.items():
        w = named[n].detach().double()
        out[n] = t * w.flatten(1).pow(2).sum(1) / w[0].numel()
    return out


def map_conv_channels(structures, model: nn.Module, per_channel: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-structure sums of per-conv-output-channel values: for every group, every Conv2d among the group's
    tensors sliced along dim 0 (its output rows) adds its channel ``idxs[j]`` to the group's structure
    ``root_idxs[j]``. Other tensors of the structure (BatchNorm, consumers' input columns) add nothing."""
    convs = {f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    out = torch.zeros(structures.num_structures, dtype=torch.float64)
    for g in structures:
        base = structures.offsets[g.name]
        for s in g.param_slices:
            if s.dim == 0 and s.tensor in convs and s.tensor in per_channel:
                out.index_add_(0, s.root_idxs + base, per_channel[s.tensor][s.idxs].double())
    return out


def hap_scores(model: nn.Module, structures, trace: torch.Tensor) -> torch.Tensor:
    """Tr(H_s) / n_s * ||w_s||^2 from a trace vector, computed here (not with haprune's score code)."""
    named = dict(model.named_parameters())
    wsq = structures.reduce({n: named[n].detach().double() ** 2 for n in structures.param_names()})
    return trace.double().cpu() * wsq / structures.numel()


# ----------------------------------------------------------------------------------------------------------------
# one (model, entry) measurement


def measure_g(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    params = [p for p in model.parameters()]
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, params)
    return time.perf_counter() - t


def busy_jiffies() -> tuple[int, int]:
    """(CPU time used by the whole machine, by this process) so far, in clock ticks (Linux /proc)."""
    try:
        total = sum(int(v) for i, v in enumerate(Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:])
                    if i not in (3, 4))  # all but idle and iowait
        own = sum(int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        return total, own
    except (OSError, ValueError):
        return 0, 0


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_once(key: str, entry: str, model: nn.Module, structures, x, y, cfg: dict[str, Any],
             seed: int) -> dict[str, Any]:
    """Run one estimator once; return its raw outputs as plain lists."""
    from haprune.estimate import estimate

    if entry == "exact_float64":
        r = exact_float64(model, structures, x)
        trace = structures.reduce(r["diag"])
        gen = torch.Generator().manual_seed(0)
        names = structures.param_names()
        picks = []
        for _ in range(8):  # coordinates for the Hessian-diagonal check in measure(), outside the timing
            n = names[int(torch.randint(len(names), (1,), generator=gen))]
            i = int(torch.randint(r["diag"][n].numel(), (1,), generator=gen))
            picks.append([n, i, float(r["diag"][n].flatten()[i])])
        return {"trace": trace.tolist(), "diag_at": picks, "conv_channel_trace": {
            k: v.tolist() for k, v in conv_channel_traces(model, r["diag"]).items()}}
    if entry == "reference_hutchinson":
        r = reference_hutchinson(model, structures, x, y, cfg["reference_probes"])
        halves = [structures.reduce(h) for h in r["halves"]]
        trace = structures.reduce(r["diag"])
        n = r["probes"]
        var = (r["sum_sq"] / n - trace ** 2).clamp_min(0) * n / (n - 1)
        return {"trace": trace.tolist(), "halves": [h.tolist() for h in halves], "stderr": (var / n).sqrt().tolist(),
                "probes": n, "conv_channel_trace": {k: v.tolist() for k, v in
                                                     conv_channel_traces(model, r["diag"]).items()}}
    if entry.startswith("official_"):
        r = official_hap(model, x, y, int(entry.split("_")[1]), seed)
        convs = {n for n in r["channel_trace"] if n.endswith(".weight") and r["channel_trace"][n].numel()
                 and isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Conv2d)}
        return {"scores": map_conv_channels(structures, model, r["channel_importance"]).tolist(),
                "conv_channel_trace": {k: r["channel_trace"][k].tolist() for k in convs}}
    options: dict[str, Any] = {}
    criterion = entry
    if entry == "hutchinson" or (entry == "auto" and MODELS[key][1] != "relu"):  # auto resolves to hutchinson there
        options = dict(cfg["default_hutchinson"])
    elif entry.startswith("hutchinson_"):
        criterion, n = "hutchinson", int(entry.split("_")[1])
        options = {"min_probes": n, "max_probes": n}
    elif entry == "fisher":
        options = {"samples_per_input": 1}
    elif entry == "fisher_half":
        criterion, options = "fisher", {"samples_per_input": 0.5}
    elif entry == "fisher_multinomial":
        criterion, options = "fisher", {"samples_per_input": 1, "sampling": "multinomial"}
    s = estimate(model, structures, [(x, y)], criterion, score="hap", seed=seed, progress=False, **options)
    info = {k: v for k, v in s.info.items() if isinstance(v, (int, float, str, bool, list, dict))}
    return {"scores": s.scores.tolist(), "trace": s.trace.double().tolist(), "info": info}


def measure(key: str, entry: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Time ``entry`` on ``key`` in units of G (interleaved, repeated while cheap) and keep its outputs."""
    from haprune import build_structures

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = build_model(key)
    x, y = calibration_batch(cfg["batch"])
    structures = build_structures(model, x[:1])
    for _ in range(3):  # warm-up
        measure_g(model, x, y)
    rss_before = maxrss_mib()
    g_times, times, runs, cpu = [], [], [], 0.0
    jiffies0, wall0 = busy_jiffies(), time.perf_counter()
    reference = entry in ("exact_float64", "reference_hutchinson")
    while True:
        g_times += [measure_g(model, x, y) for _ in range(3)]
        t, c = time.perf_counter(), time.process_time()
        out = run_once(key, entry, model, structures, x, y, cfg, seed=len(runs))
        times.append(time.perf_counter() - t)
        cpu += time.process_time() - c
        runs.append(out)
        g_times += [measure_g(model, x, y) for _ in range(3)]
        if reference or len(runs) >= 3 or sum(times) + times[-1] > cfg["repeat_budget_s"]:
            break
    jiffies1, wall = busy_jiffies(), time.perf_counter() - wall0
    others = ((jiffies1[0] - jiffies0[0]) - (jiffies1[1] - jiffies0[1])) / os.sysconf("SC_CLK_TCK") / wall
    check = hessian_diag_check(model, x, y, runs[0]["diag_at"]) if entry == "exact_float64" else None
    with torch.no_grad():
        logits = model(x)
    return {
        "hessian_diag_check": check, "model": key, "entry": entry, "batch": len(x), "structures": structures.num_structures,
        "groups": len(structures), "loss": F.cross_entropy(logits, y).item(),
        "batch_accuracy": (logits.argmax(1) == y).double().mean().item(),
        "G_s": statistics.median(g_times), "G_samples_s": g_times, "seconds": times,
        "rss_before_mib": rss_before if cfg["subprocess"] else None,
        "peak_rss_mib": maxrss_mib() if cfg["subprocess"] else None,
        "loadavg_1min": os.getloadavg()[0], "cpu_per_wall": cpu / sum(times),
        "other_processes_cores": others, "runs": runs,
    }


# ----------------------------------------------------------------------------------------------------------------
# metrics against the reference


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def overlap50(a, b) -> float:
    """Overlap of the sets a 50% prune would remove: the lowest-scored half of all structures (global ranking)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    k = len(a) // 2
    low_a = set(torch.argsort(a, stable=True)[:k].tolist())
    low_b = set(torch.argsort(b, stable=True)[:k].tolist())
    return len(low_a & low_b) / k


def rel_diff(t, ref) -> tuple[float, float]:
    t, ref = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    r = (t - ref).abs() / ref.abs().clamp_min(1e-300)
    return float(r.max()), float(r.median())


def metrics(raw: dict[str, Any], ref: dict[str, Any], model: nn.Module, structures) -> dict[str, Any]:
    """Quality of every run of an entry against the reference; medians over runs."""
    ref_run = ref["runs"][0]
    ref_trace = torch.tensor(ref_run["trace"], dtype=torch.float64)
    ref_scores = hap_scores(model, structures, ref_trace)
    ref_conv = {k: torch.tensor(v, dtype=torch.float64) for k, v in ref_run["conv_channel_trace"].items()}
    ref_conv_scores = map_conv_channels(structures, model, conv_importance(model, ref_conv))
    per_run = []
    for run in raw["runs"]:
        m: dict[str, Any] = {}
        if raw["entry"] == "reference_hutchinson":
            a, b = (hap_scores(model, structures, torch.tensor(h)) for h in run["halves"])
            m["split_half_spearman"] = spearman(a, b)
            m["split_half_overlap50"] = overlap50(a, b)
            se = torch.tensor(run["stderr"]) / ref_trace.abs()
            m["rel_stderr_median"], m["rel_stderr_max"] = float(se.median()), float(se.max())
        elif raw["entry"] != "exact_float64":
            scores = torch.tensor(run["scores"], dtype=torch.float64)
            m["spearman"] = spearman(scores, ref_scores)
            m["overlap50"] = overlap50(scores, ref_scores)
            if "trace" in run:
                m["spearman_trace"] = spearman(run["trace"], ref_trace)
                m["max_rel_diff"], m["median_rel_diff"] = rel_diff(run["trace"], ref_trace)
                own = hap_scores(model, structures, torch.tensor(run["trace"]))
                m["score_rule_check"] = float(((own - scores).abs() / scores.abs().clamp_min(1e-300)).max())
            if "conv_channel_trace" in run:  # official: also against the reference on its own structure definition
                m["spearman_convonly"] = spearman(scores, ref_conv_scores)
                m["overlap50_convonly"] = overlap50(scores, ref_conv_scores)
                ch = torch.cat([torch.tensor(run["conv_channel_trace"][k]) for k in sorted(ref_conv)])
                ch_ref = torch.cat([ref_conv[k] for k in sorted(ref_conv)])
                m["spearman_channel_trace"] = spearman(ch, ch_ref)
            if "info" in run and "probes_per_batch" in run["info"]:
                m["probes"] = run["info"]["probes_per_batch"]
        per_run.append(m)
    out: dict[str, Any] = {"per_run": per_run}
    for k in per_run[0]:
        vals = [r[k] for r in per_run]
        out[k] = statistics.median(vals) if isinstance(vals[0], float) else vals[0]
    return out


def summarise(raw: dict[str, Any], quality: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    sec = statistics.median(raw["seconds"])
    first = raw["runs"][0]
    out = {
        "description": describe(raw["entry"], cfg), "seconds": sec, "seconds_all": raw["seconds"],
        "G_s": raw["G_s"], "cost_G": sec / raw["G_s"], "runs": len(raw["runs"]),
        "peak_rss_mib": raw["peak_rss_mib"], "rss_before_mib": raw["rss_before_mib"],
        "loadavg_1min": raw["loadavg_1min"], "cpu_per_wall": raw.get("cpu_per_wall"),
        "other_processes_cores": raw.get("other_processes_cores"),
        "reused_from": raw.get("reused_from"),
    }
    if raw.get("hessian_diag_check"):
        out["hessian_diag_check"] = raw["hessian_diag_check"]
    if "info" in first:
        info = first["info"]
        out["haprune_info"] = {k: info[k] for k in ("auto", "exact", "probes_per_batch", "samples", "labels",
                                                     "samples_per_input", "seconds") if k in info}
    out.update({k: v for k, v in quality.items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# orchestration


_GAVE_UP_WAITING = False
MAX_WAIT_S = 600.0


def wait_if_busy(max_wait_s: float | None = None) -> float:
    """Sleep while another heavy job (``make demo``, pytest, the haprune CLI) runs; return seconds waited.
    After one wait that hits ``max_wait_s`` (a job that never ends?) later calls do not wait."""
    global _GAVE_UP_WAITING
    max_wait_s = MAX_WAIT_S if max_wait_s is None else max_wait_s
    waited, me = 0.0, {os.getpid(), os.getppid()}
    while waited < max_wait_s and not _GAVE_UP_WAITING:
        r = subprocess.run(["pgrep", "-af", BUSY_PATTERN], capture_output=True, text=True)
        busy = [line for line in r.stdout.splitlines()
                if line and int(line.split()[0]) not in me and "hessian_speed" not in line]
        if not busy:
            return waited
        print(f"  waiting: busy with {busy[0][:100]}", flush=True)
        time.sleep(15)
        waited += 15
    _GAVE_UP_WAITING = _GAVE_UP_WAITING or waited >= max_wait_s > 0
    return waited


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def raw_result(key: str, entry: str, cfg: dict[str, Any], mode: str) -> dict[str, Any]:
    """The raw measurement of (key, entry), from the cache or measured now (in a subprocess in full mode)."""
    path = CACHE / mode / f"{key}__{entry}.json"
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg["subprocess"]:
        waited = wait_if_busy()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", key, entry, "--mode", mode]
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0 or not path.exists():
            raise SystemExit(f"worker for {key} / {entry} failed (exit {proc.returncode})")
        raw = json.loads(path.read_text())
        raw["waited_for_other_jobs_s"] = waited
        atomic_write(path, json.dumps(raw))
        return raw
    raw = measure(key, entry, cfg)
    atomic_write(path, json.dumps(raw))
    return raw


def reusable(key: str, entry: str, cfg: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """hutchinson_N with seed 0 is the same computation as the default run when that one used all N = max probes
    (the stopping rule never fired): the same probes in the same order. Reuse it instead of running it again."""
    if not entry.startswith("hutchinson_"):
        return None
    n = int(entry.split("_")[1])
    path = CACHE / mode / f"{key}__hutchinson.json"
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    info = raw["runs"][0].get("info", {})
    if info.get("max_probes") == n and info.get("probes_per_batch") == [n] and len(raw["runs"]) == 1:
        return {**raw, "entry": entry, "reused_from": "hutchinson"}
    return None


def run_all(mode: str, only: list[str] | None) -> dict[str, Any]:
    cfg = CONFIGS[mode]
    from haprune import build_structures

    torch.set_num_threads(THREADS)
    path = cfg["json"]
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("models", {})
    doc["setup"] = {
        "mode": mode, "command": SCRIPT + (" --quick" if mode == "quick" else ""), "batch": cfg["batch"],
        "threads": THREADS, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": _cpu_name(), "score_rule": "hap",
        "reference_probes_gelu": cfg["reference_probes"], "data": "fashion-mnist train split, seed-0 permutation",
    }
    x, y = calibration_batch(cfg["batch"])
    if not cfg["subprocess"]:
        wait_if_busy()
    start = time.perf_counter()
    for key in only or cfg["models"]:
        model = build_model(key)
        structures = build_structures(model, x[:1])
        mdoc = doc["models"].setdefault(key, {"entries": {}})
        mdoc.update({"structures": structures.num_structures, "groups": len(structures),
                     "parameters": sum(p.numel() for p in model.parameters()), "activation": MODELS[key][1]})
        ref, ref_entry = None, entries_for(cfg, key)[0]
        for entry in entries_for(cfg, key):
            if entry in mdoc["entries"]:
                print(f"{key} / {entry}: done already", flush=True)
                continue
            print(f"{key} / {entry} ...", flush=True)
            raw = reusable(key, entry, cfg, mode) or raw_result(key, entry, cfg, mode)
            if ref is None:
                ref = raw if entry == ref_entry else raw_result(key, ref_entry, cfg, mode)
            quality = metrics(raw, ref, model, structures)
            mdoc["entries"][entry] = summarise(raw, quality, cfg)
            mdoc["G_s"] = statistics.median(e["G_s"] for e in mdoc["entries"].values())
            mdoc["loss"], mdoc["batch_accuracy"] = raw["loss"], raw["batch_accuracy"]
            e = mdoc["entries"][entry]
            print(f"  {e['seconds']:.2f} s = {e['cost_G']:.1f} G, spearman {e.get('spearman', float('nan')):.4f}, "
                  f"max rel diff {e.get('max_rel_diff', float('nan')):.2e}, peak RSS {e['peak_rss_mib']}", flush=True)
            doc["wall_s_last_invocation"] = round(time.perf_counter() - start, 1)
            atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return doc


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------------------------------------------
# the Markdown report, from the full run's JSON only

ORDER_NOTE = {
    "auto": "auto", "ggn": "ggn", "fisher": "fisher", "empirical_fisher": "empirical_fisher",
    "hutchinson": "hutchinson (default)",
}


def fmt(x: Any, spec: str = ".3f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def table(key: str, m: dict[str, Any]) -> list[str]:
    relu = m["activation"] == "relu"
    ref_name = "exact" if relu else "reference"
    lines = [
        f"| estimator | what | cost (G) | seconds | first call (G) | Spearman vs {ref_name} | 50% overlap | "
        f"max rel. diff of traces | peak RSS MiB (before) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry, e in m["entries"].items():
        if entry in ("exact_float64", "reference_hutchinson"):
            continue
        name = ORDER_NOTE.get(entry, entry)
        what = e["description"]
        if "haprune_info" in e and "auto" in e["haprune_info"]:
            what += f" -> `{e['haprune_info']['auto']['chose']}`"
        if e.get("probes") and not entry.startswith("hutchinson_"):
            what += f" ({e['probes'][0]} probes used)"
        if e.get("reused_from"):
            what += f" (same run as `{e['reused_from']}`)"
        sp = fmt(e.get("spearman"), ".4f")
        ov = fmt(e.get("overlap50"), ".3f")
        if "spearman_convonly" in e:
            sp += f" ({fmt(e['spearman_convonly'], '.4f')})"
            ov += f" ({fmt(e['overlap50_convonly'], '.3f')})"
        if e["runs"] > 1:
            sp += f" [{e['runs']} runs]"
        rss = "-" if e["peak_rss_mib"] is None else f"{e['peak_rss_mib']:.0f} ({e['rss_before_mib']:.0f})"
        cost = fmt(e["cost_G"], ".1f") + (" †" if contended(e) else "")
        first = fmt(e["seconds_all"][0] / e["G_s"], ".1f") if e["runs"] > 1 else "="
        lines.append(f"| `{name}` | {what} | {cost} | {fmt(e['seconds'], '.2f')} | {first} | {sp} | {ov} | "
                     f"{fmt(e.get('max_rel_diff'), '.1e')} | {rss} |")
    if any(contended(e) for e in m["entries"].values()):
        lines += ["", "† other processes used more than 0.3 of the 2 cores on average while this entry ran "
                  "(from /proc/stat; the JSON has the figure per entry): its seconds are inflated, its cost in G "
                  "less so (G was measured in the same process, before and after), but it is noisier."]
    return lines


def contended(e: dict[str, Any]) -> bool:
    return (e.get("other_processes_cores") or 0.0) > 0.3


def runs_note(e: dict[str, Any], key: str) -> str:
    vals = [r[key] for r in e["per_run"] if key in r]
    if len(vals) <= 1:
        return "seed 0"
    return f"median of seeds 0-{len(vals) - 1}, range {min(vals):.4f}-{max(vals):.4f}"


def goals(doc: dict[str, Any]) -> list[str]:
    ms = doc["models"]
    out = []
    for key in ("resnet20", "resnet56"):
        if key not in ms:
            continue
        es = ms[key]["entries"]
        auto, off = es.get("auto"), es.get("official_300")
        if auto and off:
            ok_exact = auto["max_rel_diff"] < GOALS["max_rel_diff"]
            ratio = off["seconds"] / auto["seconds"]
            ok_speed = ratio >= GOALS["default_vs_official300_speedup"]
            out.append(
                f"- **{key}, default equals exact within 1e-4 at <= 1/30 of the official 300-probe time**: max "
                f"relative difference {auto['max_rel_diff']:.1e} ({'met' if ok_exact else 'NOT met'}); time "
                f"{auto['seconds']:.1f} s = {auto['cost_G']:.1f} G vs {off['seconds']:.0f} s = {off['cost_G']:.0f} G, "
                f"i.e. 1/{ratio:.1f} of it ({'met' if ok_speed else 'NOT met'}).")
    for key in ms:  # against exact traces only: on the GELU net fisher estimates the GGN, not that Hessian
        if ms[key].get("activation") != "relu":
            continue
        f = ms[key]["entries"].get("fisher")
        if f:
            ok = f["spearman"] >= GOALS["fisher_spearman"] and f["cost_G"] <= GOALS["fisher_cost_G"]
            out.append(f"- **{key}, fisher Spearman >= 0.95 at <= 2 G**: Spearman {f['spearman']:.4f} "
                       f"({runs_note(f, 'spearman')}), cost {f['cost_G']:.2f} G ({'met' if ok else 'NOT met'}; "
                       f"the first call in a fresh process costs {f['seconds_all'][0] / f['G_s']:.1f} G).")
    g = ms.get("resnet56", {}).get("entries", {}).get("ggn")
    if g and g["peak_rss_mib"] is not None:
        gib = g["peak_rss_mib"] / 1024
        out.append(f"- **ResNet-56 ggn peak memory < 4 GiB at batch 128**: peak RSS {gib:.2f} GiB of the whole "
                   f"process ({g['rss_before_mib'] / 1024:.2f} GiB before the estimator) "
                   f"({'met' if gib < GOALS['ggn_peak_rss_gib_resnet56'] else 'NOT met'}).")
    return out


def findings(doc: dict[str, Any]) -> list[str]:
    """Plain statements generated from the numbers."""
    ms, out = doc["models"], []
    relu = [k for k in ("resnet20", "resnet56") if ms.get(k, {}).get("entries")]
    for key in relu:
        es = ms[key]["entries"]
        auto, ex = es.get("auto"), es.get("exact_float64")
        if auto and ex:
            chk = ex.get("hessian_diag_check") or {}
            out.append(
                f"- **Exact traces, {key}**: `auto` chose `{auto['haprune_info']['auto']['chose']}`; its traces differ "
                f"from the float64 loop by at most {auto['max_rel_diff']:.1e} relative (median "
                f"{auto['median_rel_diff']:.1e}; float32 arithmetic), and the ranking is identical (Spearman "
                f"{auto['spearman']:.6f}, 50% overlap {auto['overlap50']:.3f}). The float64 loop itself matches the true "
                f"Hessian diagonal (double backward, e_i^T H e_i) at {len(chk.get('coordinates', []))} random "
                f"coordinates to {chk.get('max_rel_diff', float('nan')):.0e}. Cost {auto['cost_G']:.1f} G, about "
                f"{auto['cost_G'] / 10:.1f} G per class (one per-sample gradient pass per class).")
    for key in relu:
        es = ms[key]["entries"]
        h, h3, h30, o3, o300 = (es.get(k) for k in ("hutchinson", "hutchinson_3", "hutchinson_30", "official_3",
                                                      "official_300"))
        if not (h and o300 and h3 and o3):
            continue
        per_probe_h = h["cost_G"] / h["probes"][0]
        per_probe_o = o300["cost_G"] / 300
        out.append(
            f"- **Hutchinson, {key}**: the default stopping rule (split-half Spearman-Brown rank reliability >= "
            f"0.95 at two checks in a row) "
            + ("did not fire within" if h['probes'][0] >= 300 else "stopped at") +
            f" {h['probes'][0]} probes, {h['cost_G']:.0f} G ({h['seconds']:.0f} s), "
            f"{h['cost_G'] / auto_cost(es):.0f}x the exact traces, for Spearman {h['spearman']:.4f} and traces off by "
            f"up to {h['max_rel_diff']:.3g}x (median {h['median_rel_diff']:.2f}) relative. At 3 / 30 probes the "
            f"Spearman is {h3['spearman']:.3f} / {h30['spearman']:.3f}. One probe costs {per_probe_h:.1f} G in "
            f"haprune and {per_probe_o:.1f} G in the official recipe (the Hessian-vector product dominates; the "
            f"official per-channel `.item()` loop does not).")
        out.append(
            f"- **Official recipe, {key}**: 3 probes rank hardly better than chance: Spearman {o3['spearman']:.3f} ({runs_note(o3, 'spearman')}), 50% overlap {o3['overlap50']:.2f} "
            f"(chance 0.5); on its own conv-only structure definition {o3['spearman_convonly']:.3f}. "
            f"300 probes: Spearman {o300['spearman']:.4f} against the exact haprune-structure scores, "
            f"{o300['spearman_convonly']:.4f} against the exact conv-only scores (the difference is the structure "
            f"definition: BatchNorm and consumer columns are not in the official score).")
    for key in relu:
        es = ms[key]["entries"]
        f, fh, fm = (es.get(k) for k in ("fisher", "fisher_half", "fisher_multinomial"))
        if f and fh and fm:
            out.append(
                f"- **Importance-sampled Fisher, {key}**: drawing (input, label) pairs in proportion to their curvature "
                f"at the logits, p_nk * ||p_n - e_k||^2, ranks at Spearman {f['spearman']:.4f} for {f['cost_G']:.1f} G "
                f"(one draw per input) and {fh['spearman']:.4f} for {fh['cost_G']:.1f} G (half a draw), against "
                f"{fm['spearman']:.4f} for {fm['cost_G']:.1f} G when each input gets one label drawn from the model. "
                "On a trained net most of the GGN sits in a few uncertain inputs and in their non-predicted classes; "
                "the plain draw spends most gradients on confident inputs' predicted class, whose gradient is "
                "nearly zero, and the importance draw merges repeated pairs, so it also computes fewer gradients.")
    gm = ms.get("resnet20-gelu", {})
    if gm.get("entries"):
        es = gm["entries"]
        ref = es.get("reference_hutchinson")
        line = (f"- **GELU ResNet-20** (the trained ReLU weights with GELU: loss {gm['loss']:.2f} and accuracy "
                f"{100 * gm['batch_accuracy']:.0f}% on the batch, far from a minimum, so the Hessian's second-order "
                "term is large and no estimator is exact): ")
        if ref:
            line += (f"the {ref['per_run'][0].get('probes', doc['setup']['reference_probes_gelu'])}-probe "
                     f"reference agrees with itself at split-half Spearman {ref['split_half_spearman']:.4f} (50% "
                     f"overlap {ref['split_half_overlap50']:.3f}; median relative standard error of its traces "
                     f"{ref['rel_stderr_median']:.2f}), which bounds how well anything can be shown to agree with it. ")
        if "auto" in es:
            a = es["auto"]
            line += (f"`auto` switches to `{a['haprune_info']['auto']['chose']}` ({a['probes'][0]} probes, "
                     f"{a['cost_G']:.0f} G) and reaches Spearman {a['spearman']:.4f}; ")
        bits = [f"`{k}` {es[k]['spearman']:.3f}" for k in ("ggn", "fisher", "fisher_multinomial", "empirical_fisher",
                                                            "hutchinson_30",
                                                            "official_300") if k in es]
        line += ("the others: " + ", ".join(bits) + ". The GGN and both Fishers rank this Hessian poorly. The "
                 "max rel. diff column is dominated by the reference's own noise on near-zero traces here.")
        out.append(line)
    return out


def auto_cost(es: dict[str, Any]) -> float:
    return es["auto"]["cost_G"] if "auto" in es else float("nan")


def markdown(doc: dict[str, Any]) -> str:
    s = doc["setup"]
    lines = [
        "# Sensitivity estimators: cost and ranking quality against exact Hessian traces",
        "",
        f"Generated by `{s['command']}` (the full run; `--tables-only` rebuilds this page from "
        "`docs/results/hessian_speed.json` alone). `python benchmarks/hessian_speed.py --quick` is a < 1 minute "
        "smoke version (batch 32, ResNet-20 and its GELU variant, 3/30 probes) writing "
        "`docs/results/hessian_speed_quick.json`; it does not touch this page.",
        "",
        "Speed of the pruned models themselves (CPU latency in eager PyTorch and ONNX Runtime, dense vs pruned, "
        "with and without implants) is measured by `benchmarks/latency.py` on its own pages: "
        "[latency_quick.md](latency_quick.md) (`--quick`: ResNet-56, 50% of parameters removed, batch 64, "
        "2 threads, with its goals), [latency.md](latency.md) (the full matrix), "
        "[latency_round_to.md](latency_round_to.md) (`--round-to-study`) and [latency_profile.md](latency_profile.md) "
        "(`--profile`: where the time goes per stage); plans made against a measured latency table "
        "(`make_plan(budget=\"latency\")`) against parameter and FLOPs budgets, with their accuracy, by "
        "`benchmarks/latency_plan.py` on [latency_plan.md](latency_plan.md).",
        "",
        f"Setup: one calibration batch of {s['batch']} Fashion-MNIST training images (a seed-0 permutation of the "
        "training split), the same batch for every estimator; the project's trained checkpoints; eval mode; "
        f"CPU `{s['processor']}`, {s['threads']} threads (torch {s['torch']}, Python {s['python']}). "
        "Every curvature estimator uses the paper's score rule `hap` = Tr(H_s)/n_s * ||w_s||^2 (for "
        "`empirical_fisher` this is not its default `obd` rule, so that all rows rank the same quantity).",
        "",
        "How to read the columns:",
        "",
        "- **cost (G)**: median wall time of the estimator divided by G, the median time of one forward + backward "
        "pass (eval mode, cross-entropy, gradients of every parameter) of the same batch, measured 3 times right "
        "before and 3 times right after every estimator run in the same process. Estimators that take seconds ran "
        "up to 3 times (seeds 0, 1, 2; `[n runs]`), and their time and quality are medians over those runs.",
        "- **same run as `hutchinson`**: when the default Hutchinson used all of its max_probes = N probes, "
        "`hutchinson_N` with the same seed is the same computation (the same probes in the same order; only the "
        "stopping test differs), so it is not run twice.",
        "- **first call (G)**: the first of those runs alone, in a fresh process (one-time costs such as "
        "torch.func's first vmap are in it); `=` where there was only one run.",
        "- **Spearman** (scipy.stats.spearmanr) of the per-structure scores against the reference's scores (the "
        "same `hap` rule applied to the reference traces); **50% overlap**: the fraction of the lowest-scored half "
        "of all structures (what a 50% prune by count would remove, ranked globally) that the reference would "
        "also remove.",
        "- **max rel. diff of traces**: max over structures of |Tr_est - Tr_ref| / |Tr_ref| (haprune estimators "
        "only; the official recipe has no per-structure trace, see below).",
        "- **peak RSS**: `ru_maxrss` of the subprocess that ran just this estimator (whole process, including the "
        "Python interpreter, torch and the model); in brackets the same high-water mark right before the estimator "
        "started (after loading, building the structures and the warm-up passes).",
        "- **reference**: for the ReLU networks the exact traces, computed by a plain float64 loop in the benchmark "
        "(`model.double()`; for each sample n and class k the autograd gradient g of log p_k(x_n), accumulating "
        "p_nk * g^2 into the diagonal, divided by the batch size, then `StructureSet.reduce`). This is the "
        "Gauss-Newton diagonal, which equals the Hessian diagonal for networks piecewise linear in each parameter "
        "(ReLU, eval-mode BatchNorm). For the GELU network (every `nn.ReLU` module of the trained ResNet-20 "
        f"replaced by `nn.GELU`, same weights) a {s['reference_probes_gelu']}-probe Hutchinson run written in the "
        "benchmark (Rademacher over the structures' parameters, two independent halves of equal size, averaged).",
        "",
        "The official recipe (`official_N`) is the HAP authors' code path re-implemented in the benchmark "
        "(`official_hap`): as in `yaozhewei/HAP` (`pruner/hessian_pruner.py`, `pruner/hessian_fact.py`), only 2-D "
        "and 4-D weights (all convs and the classifier) require grad, one `loss.backward(create_graph=True)`, then "
        "per probe a Rademacher vector over those weights, `autograd.grad(grads, params, grad_outputs=v, "
        "retain_graph=True)`, and per output channel of every such weight a Python loop computing "
        "`Hv[c].flatten().dot(v[c].flatten()).item()`; a channel's trace is the mean over probes and its "
        "importance trace_c * ||w_c||^2 / numel(w_c) over that layer's own weight row (BatchNorm parameters and "
        "the consumers' input columns do not enter). To rank haprune's structures with it, the importances of all "
        "Conv2d output channels of a group are **summed** per structure: for every conv weight that the group "
        "slices along dim 0, channel `idxs[j]` adds to structure `root_idxs[j]` (a residual group thus sums the "
        "stem conv, every block's second conv and the shortcut convs of that stage). The first Spearman / overlap "
        "figure compares this with the exact haprune-structure scores; the figure in brackets compares it with the "
        "exact traces reduced the same conv-only way (each conv's own rows, the same importance formula, the same "
        "summation), i.e. the official estimator's noise alone, without the difference in structure definition.",
        "",
        f"The full run took {doc.get('wall_s_last_invocation', float('nan')) / 60:.0f} minutes (its last "
        "invocation), mostly the 300-probe and the GELU reference runs. Repeated long runs of the same computation "
        "(`auto` and `hutchinson (default)` on the GELU net are the same 300 probes) differ by about 15% in G: "
        "read costs as +-15%.",
        "",
        "## Goals",
        "",
        *goals(doc),
        "",
        "## What the numbers show",
        "",
        *findings(doc),
        "",
    ]
    for key, m in doc["models"].items():
        lines += [f"## {key}", ""]
        ref = m["entries"].get("exact_float64") or m["entries"].get("reference_hutchinson")
        head = (f"{m['parameters']:,} parameters, {m['groups']} prunable groups, {m['structures']} structures; "
                f"loss on the batch {m['loss']:.4f}, accuracy {100 * m['batch_accuracy']:.1f}%; "
                f"G = {1000 * m['G_s']:.1f} ms (median over the run).")
        if ref:
            head += f" Reference `{'exact_float64' if 'exact_float64' in m['entries'] else 'reference_hutchinson'}`" \
                    f" took {ref['seconds']:.0f} s ({ref['cost_G']:.0f} G)"
            if "split_half_spearman" in ref:
                head += (f"; split-half Spearman {ref['split_half_spearman']:.4f}, 50% overlap "
                         f"{ref['split_half_overlap50']:.3f}, relative standard error of its traces: median "
                         f"{ref['rel_stderr_median']:.3f}, max {ref['rel_stderr_max']:.2f}")
            head += "."
        lines += [head, "", *table(key, m), ""]
    lines += [
        "Raw data: `docs/results/hessian_speed.json` (per entry: all timings, G samples, per-run quality, peak "
        "RSS, load average when it ran). Per-structure vectors are cached under `runs/hessian_speed/` (not "
        "committed).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 32, ResNet-20 and its GELU variant, < 1 minute")
    ap.add_argument("--tables-only", action="store_true", help="rebuild performance.md from the JSON")
    ap.add_argument("--fresh", action="store_true", help="discard this mode's JSON and cached raw results first")
    ap.add_argument("--models", nargs="*", help=f"subset of {', '.join(MODELS)}")
    ap.add_argument("--max-wait", type=float, default=600.0,
                    help="seconds to wait for other heavy jobs (make demo, pytest, benchmarks) before an entry")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "ENTRY"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else args.mode
    global MAX_WAIT_S
    MAX_WAIT_S = args.max_wait
    if args.worker:
        key, entry = args.worker
        raw = measure(key, entry, CONFIGS[mode])
        atomic_write(CACHE / mode / f"{key}__{entry}.json", json.dumps(raw))
        return 0
    if args.fresh and not args.tables_only:
        CONFIGS[mode]["json"].unlink(missing_ok=True)
        for f in (CACHE / mode).glob("*.json"):
            f.unlink()
    if not args.tables_only:
        run_all(mode, args.models)
    if mode == "full":
        doc = json.loads(CONFIGS["full"]["json"].read_text())
        page = markdown(doc)
        if (RESULTS / "auto_choice.json").exists():  # keep benchmarks/auto_choice.py's section on the page
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import auto_choice

            page = auto_choice.with_section(page, auto_choice.section(auto_choice.load_result()))
        if (RESULTS / "scaling.json").exists():  # and benchmarks/scaling.py's (distributed scaling)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import scaling

            page = scaling.with_section(page, scaling.section(json.loads(scaling.OUT.read_text())))
        atomic_write(RESULTS / "performance.md", page)
        print(f"wrote {RESULTS / 'performance.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
