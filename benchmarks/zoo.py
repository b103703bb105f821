"""The model zoo benchmark (issue #19): 15 CNN and vision-transformer models nobody here wrote, haprune and
Torch-Pruning side by side, written to docs/results/zoo.json and docs/results/zoo.md.

    nice -n 10 .venv/bin/python benchmarks/zoo.py                 # every model not yet in zoo.json, then the table
    nice -n 10 .venv/bin/python benchmarks/zoo.py --force --models hf_vit,densenet121
    .venv/bin/python benchmarks/zoo.py --table                    # only rewrite zoo.md from zoo.json

Offline stand-ins: the Hugging Face models are built from configs of the installed transformers (random weights,
eager attention), the torchvision ones by hand from tests/zoo.py's blocks (torchvision does not import here);
widths and depths are recorded per model (``config``), several scaled down so that the CPU run ends. Every model
has realistic BatchNorm statistics (tests/zoo.py ``calibrate_bn``), input 3 x 32 x 32, 10 classes.

Per model, each step in its own try block (the error is recorded, the next step runs where it can), in a
subprocess with a timeout (resumable per model: a finished model is skipped unless ``--force``):

* haprune: ``build_structures`` (groups, structures, refused groups and why); ``estimate(..., "auto")`` on two
  random batches of 16 with ``time_budget`` (the criterion it chose, why, its time; in a subprocess of its own
  with a hard timeout); ``make_plan`` at 50% of the parameters with ``implant_ratio=0.1`` (auto's scores, or L2
  magnitude when auto failed); the plan's parameters / FLOPs removed against the pruned model's measured ones;
  the output spread over 8 random inputs (pruned / dense: a collapsed output is ~0); ``merge_implants`` (max
  output difference, implanted layers left unmerged); ``save_pruned`` / ``load_pruned`` (max output difference);
  ONNX export of the merged model checked with onnxruntime; the user's model bit-identical afterwards.
* Torch-Pruning 1.6: ``MetaPruner`` with ``GroupMagnitudeImportance`` (L2), ``pruning_ratio`` = 1 - sqrt(0.5)
  per layer (about half the parameters of a conv net), the classifier ignored; parameters / FLOPs removed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT_JSON = ROOT / "docs" / "results" / "zoo.json"
OUT_MD = ROOT / "docs" / "results" / "zoo.md"
IMAGE = 32
TARGET = 0.5
IMPLANT_RATIO = 0.1
TP_RATIO = 1 - math.sqrt(0.5)


# ------------------------------------------------------------------------------------------------ models

def _models() -> dict[str, tuple[str, Callable[[], Any], dict[str, Any]]]:
    """name -> (what it stands for, builder, config recorded in the results)."""
    import torch.nn as nn
    import transformers as T

    import zoo

    def hf(cls, cfg_cls, **cfg):
        def build():
            return zoo.Logits(cls(cfg_cls(num_labels=10, num_channels=3, **cfg)))
        return build

    m: dict[str, tuple[str, Callable[[], Any], dict[str, Any]]] = {}

    def add(name, stands_for, build, config):
        m[name] = (stands_for, build, config)

    c = dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], layer_type="basic")
    add("hf_resnet", "Hugging Face ResNet (resnet-18 layout, half width)",
        hf(T.ResNetForImageClassification, T.ResNetConfig, **c), c)
    c = dict(hidden_sizes=[24, 48, 96, 192], depths=[2, 2, 6, 2], patch_size=2, num_stages=4,
             layer_scale_init_value=0.5)
    add("hf_convnext", "Hugging Face ConvNeXt (tiny layout, 1/4 width, 6 blocks in stage 3)",
        hf(T.ConvNextForImageClassification, T.ConvNextConfig, **c), c)
    c = dict(depth_multiplier=0.35, image_size=IMAGE)
    add("hf_mobilenet_v2", "Hugging Face MobileNetV2 (x0.35)",
        hf(T.MobileNetV2ForImageClassification, T.MobileNetV2Config, **c), c)
    c = dict(embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8, layer_type="y")
    add("hf_regnet", "Hugging Face RegNet (regnet-y-200mf layout)",
        hf(T.RegNetForImageClassification, T.RegNetConfig, **c), c)
    c = dict(image_size=IMAGE, width_coefficient=0.5, depth_coefficient=0.5, hidden_dim=640)
    add("hf_efficientnet", "Hugging Face EfficientNet (b0 layout, width 0.5, depth 0.5)",
        hf(T.EfficientNetForImageClassification, T.EfficientNetConfig, **c), c)
    c = dict(image_size=IMAGE, patch_size=4, hidden_size=96, num_hidden_layers=6, num_attention_heads=3,
             intermediate_size=384, attn_implementation="eager")
    add("hf_vit", "Hugging Face ViT (ti layout, 6 layers, dim 96)", hf(T.ViTForImageClassification, T.ViTConfig, **c), c)
    add("hf_deit", "Hugging Face DeiT (ti layout, 6 layers, dim 96)",
        hf(T.DeiTForImageClassification, T.DeiTConfig, **c), c)
    c = dict(image_size=IMAGE, patch_size=2, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=4,
             attn_implementation="eager")
    add("hf_swin", "Hugging Face Swin (tiny layout, 3 stages, dim 48)",
        hf(T.SwinForImageClassification, T.SwinConfig, **c), c)

    c = dict(widths=[32, 64, 128, 256], depths=[2, 2, 2, 2])
    add("resnet18", "torchvision resnet18 (half width, 3x3 stem)",
        lambda c=c: zoo.ResNet(tuple(c["widths"]), tuple(c["depths"])), c)
    v3 = [(1, 16, 2, 3, 0.25), (4.5, 24, 2, 3, 0), (88 / 24, 24, 1, 3, 0), (4, 40, 2, 5, 0.25), (6, 40, 1, 5, 0.25),
          (6, 40, 1, 5, 0.25), (3, 48, 1, 5, 0.25), (3, 48, 1, 5, 0.25), (6, 96, 2, 5, 0.25), (6, 96, 1, 5, 0.25),
          (6, 96, 1, 5, 0.25)]
    c = dict(blocks=[list(b) for b in v3], stem=16, head=576, hidden_fc=1024, act="Hardswish", se_gate="Hardsigmoid")
    add("mobilenet_v3_small", "torchvision mobilenet_v3_small (its block table; hardswish everywhere)",
        lambda v3=v3: zoo.MobileNet(v3, stem=16, head=576, act=nn.Hardswish, se_gate=nn.Hardsigmoid, hidden_fc=1024), c)
    b0 = [(1, 16, 1, 3)] + [(6, 24, 2 if i == 0 else 1, 3) for i in range(2)] + \
         [(6, 40, 2 if i == 0 else 1, 5) for i in range(2)] + [(6, 80, 2 if i == 0 else 1, 3) for i in range(3)] + \
         [(6, 112, 1, 5) for _ in range(3)] + [(6, 192, 2 if i == 0 else 1, 5) for i in range(4)] + [(6, 320, 1, 3)]
    b0 = [(e, o, s, k, 0.25 / e) for e, o, s, k in b0]  # SE squeeze = input channels / 4
    c = dict(blocks=[list(b) for b in b0], stem=32, head=1280, act="SiLU")
    add("efficientnet_b0", "torchvision efficientnet_b0 (its block table)",
        lambda b0=b0: zoo.MobileNet(b0, stem=32, head=1280, act=nn.SiLU, se_act=nn.SiLU), c)
    c = dict(growth=16, blocks=[6, 12, 24, 16], stem=32, bn_size=4)
    add("densenet121", "torchvision densenet121 (its 6-12-24-16 blocks, growth 16, stem 32)",
        lambda: zoo.DenseNet(16, (6, 12, 24, 16), 32, 4), c)
    c = dict(widths=[48, 104, 208, 440], depths=[1, 3, 6, 6], group_width=8, stem=32)
    add("regnet_y_400mf", "torchvision regnet_y_400mf (its widths, depths, group width 8, SE)",
        lambda: zoo.RegNetY((48, 104, 208, 440), (1, 3, 6, 6), group_width=8, stem=32), c)
    c = dict(dims=[48, 96, 192, 384], depths=[2, 2, 6, 2], patch=2)
    add("convnext_tiny", "torchvision convnext_tiny (half width, 6 blocks in stage 3)",
        lambda: zoo.ConvNeXt((48, 96, 192, 384), (2, 2, 6, 2), patch=2), c)
    c = dict(widths=[48, 96, 192], repeats=[4, 8, 4], stem=24, head=1024)
    add("shufflenet_v2", "torchvision shufflenet_v2_x0_5 (its widths and repeats)",
        lambda: zoo.ShuffleNetV2((48, 96, 192), (4, 8, 4), stem=24, head=1024), c)
    return m


MODEL_NAMES = ["hf_resnet", "hf_convnext", "hf_mobilenet_v2", "hf_regnet", "hf_efficientnet", "hf_vit", "hf_deit",
               "hf_swin", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "regnet_y_400mf",
               "convnext_tiny", "shufflenet_v2"]


def build(name: str, seed: int = 0):
    import torch

    import zoo

    stands_for, factory, config = _models()[name]
    torch.manual_seed(seed)
    model = factory()
    zoo.calibrate_bn(model, (1, 3, IMAGE, IMAGE), seed)
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed + 7))
    return model.eval(), x, stands_for, config


# ------------------------------------------------------------------------------------------------ one model

def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _calibration(seed: int = 5):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]


class _Timeout(Exception):
    pass


def run_auto(model, s, budget: float, hard_limit: float) -> tuple[dict[str, Any], Any]:
    """``estimate(..., "auto")``: chosen criterion, why, wall and CPU seconds (the machine is shared: wall time
    runs several times the CPU time); interrupted after ``hard_limit`` seconds. Returns (record, scores or None)."""
    import signal

    from haprune.estimate import estimate

    rec: dict[str, Any] = {"time_budget": budget}
    t, c = time.perf_counter(), time.process_time()

    def stop(signum, frame):
        raise _Timeout(f"still running after {hard_limit:.0f} s wall (hard limit of this benchmark)")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(hard_limit))
    scores = None
    try:
        sens = estimate(model, s, _calibration(), "auto", time_budget=budget, progress=False)
        auto = sens.info.get("auto", {})
        rec["chose"] = auto.get("chose", sens.criterion)
        rec["why"] = auto.get("why", "")
        rec["info"] = {k: v for k, v in sens.info.items() if k not in ("auto", "first_batch")}
        scores = sens.scores
    except BaseException as e:  # noqa: BLE001 - recorded (a timeout included)
        rec["error"] = _err(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    rec["seconds"] = round(time.perf_counter() - t, 2)
    rec["cpu_seconds"] = round(time.process_time() - c, 2)
    return rec, scores


def run_prune(name: str, budget: float, hard_limit: float) -> dict[str, Any]:
    import torch

    import haprune
    from haprune.graph import UnsupportedModelError, build_structures
    from haprune.io import export_onnx, load_pruned, onnx_matches, save_pruned
    from haprune.plan import CostModel, make_plan
    from haprune.report import count_flops, count_params

    model, x, stands_for, config = build(name)
    rec: dict[str, Any] = {"stands_for": stands_for, "config": config}
    dense_p, dense_f = count_params(model), count_flops(model, x)
    rec["dense"] = {"params": dense_p, "flops": dense_f}
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    xs = torch.randn(8, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense_out = model(xs)
    hp: dict[str, Any] = {}
    rec["haprune"] = hp
    t = time.perf_counter()
    try:
        s = build_structures(model, x)
        hp["structures"] = {"seconds": round(time.perf_counter() - t, 2), "groups": len(s),
                            "structures": s.num_structures, "refused": len(s.refused),
                            "grouped_groups": sum(g.channel_groups > 1 for g in s),
                            "bare_parameter_groups": sum(bool(g.bare_params) for g in s),
                            "refusals": _summarise_refusals(s.refused)}
    except UnsupportedModelError as e:
        hp["structures"] = {"seconds": round(time.perf_counter() - t, 2), "refused_model": str(e)}
        s = None
    except Exception as e:  # noqa: BLE001
        hp["structures"] = {"error": _err(e)}
        s = None
    if s is not None:
        hp["auto"], scores = run_auto(model, s, budget, hard_limit)
        _haprune_steps(hp, model, x, xs, s, scores, dense_p, dense_f, dense_out)
    hp["model_untouched"] = all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    rec["torch_pruning"] = _torch_pruning(name, x, xs, dense_p, dense_f)
    return rec


def _summarise_refusals(refused: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, why in refused:
        key = why.split("(")[0].strip()[:90]
        out[key] = out.get(key, 0) + 1
    return out


def _spread(y) -> float:
    return float(y.double().std(0).mean())


def _haprune_steps(hp, model, x, xs, s, scores, dense_p, dense_f, dense_out) -> None:
    import torch

    import haprune
    from haprune.io import export_onnx, load_pruned, onnx_matches, save_pruned
    from haprune.plan import CostModel, make_plan
    from haprune.report import count_flops, count_params

    source = "auto"
    if scores is None:
        from haprune.estimate import estimate

        scores, source = estimate(model, s, _calibration(), "l2", progress=False).scores, "l2 (auto failed)"
    plan_rec: dict[str, Any] = {"scores": source, "target": TARGET, "implant_ratio": IMPLANT_RATIO}
    hp["plan"] = plan_rec
    try:
        t = time.perf_counter()
        cost = CostModel(model, s, x)
        plan = make_plan(s, scores, cost, TARGET, implant_ratio=IMPLANT_RATIO, criterion=source)
        planned = cost.count_plan(plan)
        plan_rec.update(seconds=round(time.perf_counter() - t, 2),
                        params_removed=1 - planned[0] / dense_p, flops_removed=1 - planned[1] / dense_f,
                        implanted=sum(len(g.implant) for g in plan.groups.values()),
                        removed=sum(len(g.remove) for g in plan.groups.values()),
                        zero_kept_groups=sum(1 for g in plan.groups.values() if g.implant and not g.keep),
                        notes=list(getattr(plan, "notes", []) or []))
    except Exception as e:  # noqa: BLE001
        plan_rec["error"] = _err(e)
        return
    ap: dict[str, Any] = {}
    hp["apply"] = ap
    try:
        t = time.perf_counter()
        pruned = haprune.apply_plan(model, plan, x, structures=s).eval()
        ap["seconds"] = round(time.perf_counter() - t, 2)
        ap["params_removed"] = 1 - count_params(pruned) / dense_p
        ap["flops_removed"] = 1 - count_flops(pruned, x) / dense_f
        with torch.no_grad():
            out = pruned(xs)
        ap["output_spread_ratio"] = _spread(out) / _spread(dense_out)
    except Exception as e:  # noqa: BLE001
        ap["error"] = _err(e)
        return
    merged = pruned
    try:
        merged = haprune.merge_implants(pruned).eval()
        with torch.no_grad():
            hp["merge"] = {"max_diff": float((merged(xs) - out).abs().max()),
                           "unmerged": sum(isinstance(m, haprune.ImplantConv2d) for m in merged.modules())}
    except Exception as e:  # noqa: BLE001
        hp["merge"] = {"error": _err(e)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_pruned(Path(tmp) / "run", pruned, plan)
            loaded = load_pruned(Path(tmp) / "run", model, x).eval()
            with torch.no_grad():
                hp["save_load"] = {"max_diff": float((loaded(xs) - out).abs().max())}
        except Exception as e:  # noqa: BLE001
            hp["save_load"] = {"error": _err(e)}
        try:
            path = export_onnx(merged, x, Path(tmp) / "model.onnx")
            hp["onnx"] = {"max_diff": onnx_matches(merged, path, xs, atol=1e-4)}
        except Exception as e:  # noqa: BLE001
            hp["onnx"] = {"error": _err(e)}


def _torch_pruning(name: str, x, xs, dense_p: int, dense_f: int) -> dict[str, Any]:
    import torch
    import torch_pruning as tp

    from haprune.graph import default_ignored_layers
    from haprune.report import count_flops, count_params

    model, _, _, _ = build(name)
    rec: dict[str, Any] = {"version": tp.__version__, "pruning_ratio": round(TP_RATIO, 4)}
    t = time.perf_counter()
    try:
        ignored = [model.get_submodule(n) for n in default_ignored_layers(model, x)]
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=TP_RATIO, ignored_layers=ignored)
        pruner.step()
        model.eval()
        with torch.no_grad():
            out = model(xs)
        if out.shape != (8, 10):
            raise RuntimeError(f"output shape {tuple(out.shape)}")
        rec.update(seconds=round(time.perf_counter() - t, 2), params_removed=1 - count_params(model) / dense_p,
                   flops_removed=1 - count_flops(model, x) / dense_f)
    except Exception as e:  # noqa: BLE001
        rec.update(seconds=round(time.perf_counter() - t, 2), error=_err(e))
    return rec


# ------------------------------------------------------------------------------------------------ driver

def _child(args) -> None:
    import torch

    torch.set_num_threads(1)
    out = Path(args.child_out)
    try:
        rec = run_prune(args.one, args.auto_budget, args.auto_timeout)
    except Exception as e:  # noqa: BLE001
        rec = {"error": _err(e), "traceback": traceback.format_exc()[-2000:]}
    out.write_text(json.dumps(rec, default=str))


class _Child:
    """One model's run in a subprocess (one torch thread), with a wall-clock limit."""

    def __init__(self, name: str, timeout: float, budget: float, auto_timeout: float):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            self.out = Path(f.name)
        self.name, self.timeout, self.start = name, timeout, time.perf_counter()
        cmd = [sys.executable, __file__, "--one", name, "--child-out", str(self.out), "--auto-budget", str(budget),
               "--auto-timeout", str(auto_timeout)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def result(self) -> dict[str, Any] | None:
        """The record once the run ended (or was killed at its limit), else None."""
        elapsed = time.perf_counter() - self.start
        if self.proc.poll() is None:
            if elapsed < self.timeout:
                return None
            self.proc.kill()
            self.proc.wait()
            rec = {"error": f"timed out after {self.timeout:.0f} s wall (hard limit of this benchmark)"}
        else:
            text = self.out.read_text() if self.out.is_file() else ""
            rec = json.loads(text) if text.strip() else {"error": f"the run wrote no result (exit {self.proc.returncode})"}
        self.out.unlink(missing_ok=True)
        rec.setdefault("wall_seconds", round(elapsed, 1))
        return rec


def _load() -> dict[str, Any]:
    if OUT_JSON.is_file():
        return json.loads(OUT_JSON.read_text())
    return {"models": {}}


def _save(data: dict[str, Any]) -> None:
    from haprune._fileio import atomic_write_text

    atomic_write_text(OUT_JSON, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated names (default: all 15)")
    p.add_argument("--force", action="store_true", help="re-run models already in zoo.json")
    p.add_argument("--table", action="store_true", help="only rewrite zoo.md from zoo.json")
    p.add_argument("--auto-budget", type=float, default=60.0, help="time_budget of estimate(..., 'auto'), seconds")
    p.add_argument("--auto-timeout", type=float, default=600.0,
                   help="hard limit (wall) of the auto step, seconds; it is interrupted then")
    p.add_argument("--timeout", type=float, default=1800.0, help="hard limit (wall) per model, seconds")
    p.add_argument("--jobs", type=int, default=3, help="models run at once (one torch thread each)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _child(args)
        return
    data = _load()
    if not args.table:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODEL_NAMES]
        if unknown:
            p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}")
        todo = [n for n in names if args.force or n not in data["models"]]
        for name in sorted(set(names) - set(todo)):
            print(f"{name}: done already (--force to re-run)", flush=True)
        running: list[_Child] = []
        while todo or running:
            while todo and len(running) < args.jobs:
                name = todo.pop(0)
                print(f"{name}: running", flush=True)
                running.append(_Child(name, args.timeout, args.auto_budget, args.auto_timeout))
            time.sleep(2)
            for child in list(running):
                rec = child.result()
                if rec is None:
                    continue
                running.remove(child)
                rec["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                data["models"][child.name] = rec
                data["settings"] = {"image": IMAGE, "target": TARGET, "implant_ratio": IMPLANT_RATIO,
                                    "auto_budget_s": args.auto_budget, "auto_hard_limit_s": args.auto_timeout,
                                    "tp_pruning_ratio": round(TP_RATIO, 4), "torch_threads": 1,
                                    "command": "nice -n 10 .venv/bin/python benchmarks/zoo.py"}
                _save(data)
                write_table(data)
                print(f"{child.name}: {json.dumps(_row(child.name, rec))}", flush=True)
    write_table(data)


# ------------------------------------------------------------------------------------------------ table

def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-"


def _row(name: str, r: dict[str, Any]) -> dict[str, str]:
    hp = r.get("haprune", {})
    st = hp.get("structures", {})
    if "refused_model" in st:
        groups = "refused (model)"
    elif "error" in st:
        groups = "error"
    else:
        groups = f"{st.get('groups', '-')} / {st.get('refused', '-')}"
    auto = hp.get("auto", {})
    est = (f"{auto['chose']} {auto.get('cpu_seconds', 0):.0f} s" if "chose" in auto
           else ("error" if "error" in auto else "-"))
    plan, ap = hp.get("plan", {}), hp.get("apply", {})

    def ok(step: dict[str, Any] | None, key: str = "max_diff", tol: float = 1e-3) -> str:
        if not step:
            return "-"
        if "error" in step:
            return "error"
        d = step.get(key)
        unmerged = step.get("unmerged", 0)
        return ("ok" if d is not None and d <= tol else f"diff {d:.1e}") + (f", {unmerged} unmerged" if unmerged else "")

    tp_ = r.get("torch_pruning", {})
    return {
        "model": name,
        "haprune groups / refused": groups,
        "auto": est,
        "params removed plan / measured": f"{_pct(plan.get('params_removed'))} / {_pct(ap.get('params_removed'))}",
        "FLOPs removed plan / measured": f"{_pct(plan.get('flops_removed'))} / {_pct(ap.get('flops_removed'))}",
        "spread": f"{ap['output_spread_ratio']:.2g}" if "output_spread_ratio" in ap else "-",
        "merge": ok(hp.get("merge")),
        "save/load": ok(hp.get("save_load"), tol=0.0),
        "ONNX": ok(hp.get("onnx")),
        "untouched": {True: "yes", False: "NO"}.get(hp.get("model_untouched"), "-"),
        "TP params / FLOPs removed": ("error" if "error" in tp_ else
                                      f"{_pct(tp_.get('params_removed'))} / {_pct(tp_.get('flops_removed'))}"),
    }


def _errors(name: str, r: dict[str, Any]) -> list[str]:
    out = []
    if "error" in r:
        out.append(f"benchmark step: {r['error']}")
    hp = r.get("haprune", {})
    for step in ("structures", "auto", "plan", "apply", "merge", "save_load", "onnx"):
        e = hp.get(step, {}).get("error") if isinstance(hp.get(step), dict) else None
        if e:
            out.append(f"haprune {step}: {e}")
    st = hp.get("structures", {})
    if "refused_model" in st:
        out.append(f"haprune refuses the model: {st['refused_model']}")
    for why, n in st.get("refusals", {}).items():
        out.append(f"haprune refused {n} group(s): {why}")
    notes = hp.get("plan", {}).get("notes") or []
    out += [f"plan note: {n}" for n in notes]
    if hp.get("plan", {}).get("zero_kept_groups"):
        out.append(f"plan: {hp['plan']['zero_kept_groups']} group(s) keep no channel, only implants")
    tp_ = r.get("torch_pruning", {})
    if "error" in tp_:
        out.append(f"Torch-Pruning: {tp_['error']}")
    return out


def write_table(data: dict[str, Any]) -> None:
    from haprune._fileio import atomic_write_text

    models = data.get("models", {})
    cols = ["model", "haprune groups / refused", "auto", "params removed plan / measured",
            "FLOPs removed plan / measured", "spread", "merge", "save/load", "ONNX", "untouched",
            "TP params / FLOPs removed"]
    rows = [_row(n, models[n]) for n in MODEL_NAMES if n in models]
    st = data.get("settings", {})
    lines = [
        "# The model zoo: haprune and Torch-Pruning on 15 models nobody here wrote",
        "",
        "Generated by `nice -n 10 .venv/bin/python benchmarks/zoo.py` (resumable per model; `--force` re-runs, "
        "`--table` rewrites this page from [zoo.json](zoo.json)). Issue #19's list, as offline stand-ins: Hugging "
        "Face models from configs of the installed transformers (random weights, eager attention), torchvision "
        "models rebuilt by hand from tests/zoo.py's blocks (torchvision does not import here), several scaled down "
        "so the CPU run ends (the layout of each is in the second table and in zoo.json). Random weights with "
        f"realistic BatchNorm statistics, input 3 x {st.get('image', IMAGE)} x {st.get('image', IMAGE)}, "
        f"10 classes.",
        "",
        f"haprune: `build_structures`, `estimate(..., \"auto\")` with `time_budget={st.get('auto_budget_s', '?')}` s "
        "on two random batches of 16 (the plan uses its scores, L2 where it failed), "
        f"`make_plan(target={st.get('target', TARGET)}, implant_ratio={st.get('implant_ratio', IMPLANT_RATIO)})` "
        "(parameters), `apply_plan`, `merge_implants`, `save_pruned`/`load_pruned`, ONNX export of the merged model "
        "checked with onnxruntime (atol 1e-4). Torch-Pruning "
        f"{next((r.get('torch_pruning', {}).get('version') for r in models.values()), '')}: `MetaPruner` with "
        f"`GroupMagnitudeImportance(p=2)`, `pruning_ratio={st.get('tp_pruning_ratio', round(TP_RATIO, 4))}` per layer "
        "(1 - sqrt(0.5): about half the parameters of a conv net; Torch-Pruning has no parameter budget), the "
        "classifier ignored.",
        "",
        "Columns: groups / refused groups; the criterion `auto` chose and its CPU time (the machine is shared by "
        "several jobs: wall time ran several times longer, both are in zoo.json; `time_budget` bounds wall time); the fraction of parameters and "
        "FLOPs removed as the plan counts it (`CostModel`) and as measured on the pruned model; spread: the output "
        "spread over 8 random inputs of the pruned model divided by the dense model's (near 0: the output no longer "
        "depends on the input); merge / save-load / ONNX: the largest output difference within tolerance (ok) or "
        "not; untouched: the user's model bit-identical afterwards.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    lines += ["", "## Models", "", "| model | stands for | parameters | MFLOPs (MACs) | config |", "|---|---|---|---|---|"]
    for n in MODEL_NAMES:
        if n in models:
            r = models[n]
            d = r.get("dense", {})
            cfg = json.dumps(r.get("config", {}), separators=(",", ":"))
            cfg = cfg if len(cfg) < 160 else cfg[:157] + "..."
            params = f"{d['params']:,}" if "params" in d else "-"
            flops = f"{d['flops'] / 1e6:.1f}" if "flops" in d else "-"
            lines.append(f"| {n} | {r.get('stands_for', '')} | {params} | {flops} | `{cfg}` |")
    lines += ["", "## Errors, refusals and notes", ""]
    for n in MODEL_NAMES:
        if n in models:
            errs = _errors(n, models[n])
            if errs:
                lines.append(f"- **{n}**: " + "; ".join(e.replace("|", "/") for e in errs))
    missing = [n for n in MODEL_NAMES if n not in models]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    atomic_write_text(OUT_MD, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
