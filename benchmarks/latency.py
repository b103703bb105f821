"""Does pruning make models faster? CPU latency of dense vs pruned models, eager PyTorch and ONNX Runtime.

    python benchmarks/latency.py            # full: ResNet-56 and VGG-16-BN, 28x28 and 32x32, all variants
    python benchmarks/latency.py --quick    # ResNet-56, 28x28, 50%, batch 64, 2 threads (about a minute)
    python benchmarks/latency.py --round-to-study   # which round_to to default to (about 5 minutes)
    python benchmarks/latency.py --profile  # ORT kernel time per stage, dense vs pruned (why latency lags FLOPs)

For each model and input size: the dense model and pruned variants at 30/50/70% of parameters removed
(removal only, 1x1 implants, separable implants, removal with widths rounded to 4, 8 and 16, 1x1 implants with
widths rounded to 4 as ``haprune prune`` does by default; ``-merged``: implanted layers merged into one k x k conv by
``haprune.merge_implants``, whose FLOPs column counts the k x k cost of the merged rows), planned with the ``l2``
criterion (latency does not depend on which criterion chose the channels, only on the widths). Every variant
of one setting (batch size, threads, runtime) is timed in interleaved rounds so machine noise hits all alike;
each row reports median and p10/p90, the speed-up over dense, the FLOPs reduction (dense FLOPs / pruned FLOPs)
and their ratio (1.0 = latency follows FLOPs). Results: ``docs/results/latency[_quick].json`` and
``docs/results/latency[_quick].md``, the Markdown generated from the JSON (``--tables-only`` rebuilds it).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from haprune import CostModel, apply_plan, build_structures, make_plan, merge_implants
from haprune.plan import BudgetError
from haprune._fileio import atomic_write_json, atomic_write_text
from haprune.estimate import estimate
from haprune.io import export_onnx
from haprune.models import create_model
from haprune.recover import load_checkpoint_weights
from haprune.report import measure_latency, model_costs

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# variant name -> make_plan options (besides the target)
VARIANTS = {
    "remove": {},
    "implant-1x1": {"implant_ratio": 0.1, "implant_kind": "1x1"},
    "implant-separable": {"implant_ratio": 0.1, "implant_kind": "separable"},
    "remove-round4": {"round_to": 4},
    "remove-round8": {"round_to": 8},
    "remove-round16": {"round_to": 16},
    "implant-1x1-round4": {"implant_ratio": 0.1, "implant_kind": "1x1", "round_to": 4},
    # "merge": the deployment form (haprune.merge_implants), what `haprune prune` times and exports by default
    "implant-1x1-merged": {"implant_ratio": 0.1, "implant_kind": "1x1", "merge": True},
    "implant-1x1-round4-merged": {"implant_ratio": 0.1, "implant_kind": "1x1", "round_to": 4, "merge": True},
}


class OrtModule(nn.Module):
    """An ONNX Runtime session behind an nn.Module call, so one timer interleaves both runtimes."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle sessions must not spin: the timer interleaves many sessions, and spinning threads steal the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def build_variants(name: str, size: int, targets: list[float], variants: list[str]) -> dict[str, nn.Module]:
    in_ch = 1 if size == 28 else 3
    model = create_model(name, in_channels=in_ch, num_classes=10).eval()
    ckpt = ROOT / "checkpoints" / f"{name}-fmnist.safetensors"
    if in_ch == 1 and (ckpt.exists() or list(ckpt.parent.glob(f"{ckpt.stem}-0*"))):
        load_checkpoint_weights(model, ckpt)
    x = torch.randn(1, in_ch, size, size)
    structures = build_structures(model, x)
    scores = estimate(model, structures, [(x, torch.zeros(1, dtype=torch.long))], "l2", progress=False).scores
    cost = CostModel(model, structures, x)
    out = {"dense": model}
    for t in targets:
        for v in variants:
            options = dict(VARIANTS[v])
            merge = options.pop("merge", False)
            try:
                plan = make_plan(structures, scores, cost, t, **options)
            except BudgetError as e:  # e.g. widths rounded to 16 too coarse for this target: say so, go on
                print(f"{name} {size} {v}@{t}: skipped ({e})", file=sys.stderr)
                continue
            pruned = apply_plan(model, plan, x, structures=structures).eval()
            out[f"{v}@{int(round(t * 100))}"] = merge_implants(pruned) if merge else pruned
    return out


def bench(name: str, size: int, targets: list[float], variants: list[str], batches: list[int], threads: list[int],
          runtimes: list[str], repeats: int, done: dict) -> None:
    models = build_variants(name, size, targets, variants)
    in_ch = 1 if size == 28 else 3
    flops = {k: model_costs(m, torch.randn(1, in_ch, size, size))["flops"] for k, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        if "onnx" in runtimes:
            for k, m in models.items():
                paths[k] = export_onnx(m, torch.randn(1, in_ch, size, size), Path(tmp) / f"{k}.onnx")
        for runtime in runtimes:
            for b in batches:
                for th in threads:
                    key = f"{name}/{size}/{runtime}/b{b}/t{th}"
                    if key in done:
                        continue
                    timed = models if runtime == "eager" else {k: OrtModule(p, th) for k, p in paths.items()}
                    x = torch.randn(b, in_ch, size, size)
                    lat = measure_latency(timed, x, threads=th, repeats=repeats, warmup=3)
                    rows = []
                    for k, r in lat.items():
                        speed = lat["dense"]["median_ms"] / r["median_ms"]
                        red = flops["dense"] / flops[k]
                        rows.append({"variant": k, **r, "speedup": speed, "flops_reduction": red,
                                     "speedup_over_flops_reduction": speed / red})
                    done[key] = {"model": name, "size": size, "runtime": runtime, "batch": b, "threads": th,
                                 "rows": rows}
                    print(f"{key}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x/{r['flops_reduction']:.2f}x"
                                                 for r in rows), flush=True)
                    yield


def _stage(name: str) -> str:
    """``layer2.3.conv1`` / ``/layer2/layer2.3/relu/...`` -> ``layer2``; anything else (stem, head) -> ``stem+head``."""
    first = name.strip("/").split("/")[0].split(".")[0]
    return first if first.startswith("layer") else "stem+head"


def profile_stages(name: str = "resnet56", size: int = 28, variant: str = "remove-round4", target: float = 0.5,
                   batch: int = 64, threads: int = 2, runs: int = 20) -> dict:
    """Where the time goes in ONNX Runtime, per stage, dense vs pruned: the ORT profiler's kernel times next to
    each stage's multiply-accumulates and conv input + output elements (the memory traffic a conv cannot avoid)."""
    import onnxruntime as ort
    from haprune.plan import layer_macs

    models = build_variants(name, size, [target], [variant])
    in_ch = 1 if size == 28 else 3
    x = torch.randn(batch, in_ch, size, size)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in models.items():
            macs: dict[str, int] = {}
            elems: dict[str, int] = {}

            def hook(mod, inputs, y, n=None):
                macs[n] = macs.get(n, 0) + layer_macs(mod, inputs[0], y) // batch
                elems[n] = elems.get(n, 0) + (inputs[0].numel() + y.numel()) // batch

            hooks = [m.register_forward_hook(functools.partial(hook, n=_stage(n)))
                     for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            with torch.no_grad():
                model(x)
            for h in hooks:
                h.remove()
            path = export_onnx(model, x[:1], Path(tmp) / f"{key}.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / key)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: x.numpy()}
            for _ in range(3):  # warm-up runs: their events are the first 3 "model_run" spans, dropped below
                sess.run(None, feed)
            for _ in range(runs):
                sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
            ms: dict[str, float] = {}
            for e in (e for e in events if e["ts"] >= starts[3]):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    st = _stage(e["name"])
                    ms[st] = ms.get(st, 0.0) + e["dur"] / 1000 / runs
            out[key] = {st: {"ms": ms.get(st, 0.0), "macs": macs.get(st, 0), "conv_elements": elems.get(st, 0)}
                        for st in sorted(set(ms) | set(macs))}
    return {"model": name, "size": size, "variant": f"{variant}@{int(round(target * 100))}", "batch": batch,
            "threads": threads, "runs": runs, "stages": out}


def profile_table(prof: dict) -> str:
    dense, pruned = prof["stages"]["dense"], prof["stages"][prof["variant"]]
    out = ["# Where the time goes: ONNX Runtime kernel time per stage, dense vs pruned", "",
           f"Generated by `python benchmarks/latency.py --profile` (Markdown from the JSON beside it): "
           f"{prof['model']}, {prof['size']}x{prof['size']}, batch {prof['batch']}, {prof['threads']} threads, "
           f"ORT profiler kernel times summed per stage, mean of {prof['runs']} runs; pruned = `{prof['variant']}`. "
           "MACs per sample; conv elements = input + output elements of the stage's convs per sample (the memory "
           "traffic a conv cannot avoid). ORT nodes whose names carry no stage (the stem conv, pooling, the classifier and "
           "the layout conversions `ReorderOutput` that ORT inserts into the optimised graph) count under stem+head.", "",
           "| stage | dense ms | pruned ms | time reduction | MACs reduction | conv-elements reduction | "
           "share of dense time |", "|---|---|---|---|---|---|---|"]
    total = sum(v["ms"] for v in dense.values())
    rows = list(dense) + ["total"]
    for st in rows:
        if st == "total":
            d = {k: sum(v[k] for v in dense.values()) for k in ("ms", "macs", "conv_elements")}
            q = {k: sum(v[k] for v in pruned.values()) for k in ("ms", "macs", "conv_elements")}
        else:
            d, q = dense[st], pruned.get(st, {"ms": 0.0, "macs": 0, "conv_elements": 0})
        ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"  # noqa: E731
        out.append(f"| {st} | {d['ms']:.2f} | {q['ms']:.2f} | {ratio(d['ms'], q['ms'])} | "
                   f"{ratio(d['macs'], q['macs'])} | {ratio(d['conv_elements'], q['conv_elements'])} | "
                   f"{100 * d['ms'] / total:.0f}% |")
    return "\n".join(out + [""])


def tables(results: dict, meta: dict) -> str:
    out = ["# CPU latency of pruned models", "",
           f"Generated by `python benchmarks/latency.py{' --quick' if meta.get('quick') else ''}` "
           f"(Markdown from the JSON beside it). Machine: {meta.get('machine')}, torch {meta.get('torch')}.",
           "Speed-up = dense median / pruned median; FLOPs reduction = dense FLOPs / pruned FLOPs; ratio = "
           "speed-up / FLOPs reduction (1.0: latency follows FLOPs). Variants `kind@P`: P% of parameters removed; "
           "`roundN`: widths multiples of N; `-merged`: each implanted layer merged into one k x k conv "
           "(`haprune.merge_implants`, the form `haprune prune` times and exports), its FLOPs counting the merged rows "
           "at k x k cost.",
           ""]
    for key, entry in results.items():
        out += [f"## {entry['model']}, {entry['size']}x{entry['size']}, {entry['runtime']}, batch {entry['batch']}, "
                f"{entry['threads']} thread(s)", "",
                "| variant | median ms | p10-p90 ms | speed-up | FLOPs reduction | ratio |", "|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            out.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['p10_ms']:.2f}-{r['p90_ms']:.2f} | "
                       f"{r['speedup']:.2f}x | {r['flops_reduction']:.2f}x | {r['speedup_over_flops_reduction']:.2f} |")
        out.append("")
    return "\n".join(out)


def goals(results: dict) -> str:
    """Issue #8's goals on the --quick table (ResNet-56, 50% of parameters removed, batch 64, 2 threads), per runtime:
    speed-up >= 0.8 x FLOPs reduction for the default plan (widths multiples of 4), and implanted models (merged, as
    deployed) no slower than removal-only models planned for the same parameter budget."""
    out = ["## Goals", ""]
    for entry in results.values():
        rows = {r["variant"]: r for r in entry["rows"]}
        rem, imp = rows.get("remove-round4@50"), rows.get("implant-1x1-round4-merged@50")
        split = rows.get("implant-1x1-round4@50")
        if rem is None or imp is None:
            continue
        where = f"{entry['model']} {entry['runtime']}, batch {entry['batch']}, {entry['threads']} threads"
        ratio = rem["speedup_over_flops_reduction"]
        out.append(f"- **{where}: speed-up >= 0.8 x FLOPs reduction** (`remove-round4@50`): {rem['speedup']:.2f}x for "
                   f"{rem['flops_reduction']:.2f}x, ratio {ratio:.2f} ({'met' if ratio >= 0.8 else 'not met'}).")
        slower = imp["median_ms"] / rem["median_ms"]
        overlap = imp["p10_ms"] <= rem["p90_ms"] and rem["p10_ms"] <= imp["p90_ms"]
        verdict = "met" if slower <= 1.0 else "met within the p10-p90 spread" if overlap else "not met"
        line = (f"- **{where}: implanted no slower than removal-only**: merged implants {imp['median_ms']:.2f} ms vs "
                f"removal {rem['median_ms']:.2f} ms ({slower:.3f}x; {verdict})")
        if split:
            line += (f"; FLOPs as trained {split['flops_reduction']:.2f}x vs {rem['flops_reduction']:.2f}x; unmerged "
                     f"(k x k + 1 x 1 + concat) {split['median_ms']:.2f} ms ({split['median_ms'] / rem['median_ms']:.3f}x)")
        out.append(line + ".")
    return "\n".join(out + [""]) if len(out) > 2 else ""


def round_to_summary(results: dict) -> str:
    """Per round_to: geometric means over the settings of the speed-up over dense, the FLOPs reduction, and the
    speed-up over the unrounded plan (``remove``) at the same parameter budget, by runtime and batch."""
    rows: dict[tuple[str, int, int], list[tuple[float, float, float]]] = {}
    for entry in results.values():
        by_variant = {r["variant"]: r for r in entry["rows"]}
        for name, r in by_variant.items():
            base = by_variant.get(name.replace(name.split("@")[0], "remove"))
            if name == "dense" or base is None:
                continue
            step = VARIANTS[name.split("@")[0]].get("round_to", 1)
            key = (entry["runtime"], entry["batch"], step)
            rows.setdefault(key, []).append((r["speedup"], r["flops_reduction"], base["median_ms"] / r["median_ms"]))

    def gmean(xs: list[float]) -> float:
        return float(np.exp(np.mean(np.log(xs))))

    out = ["## Summary: geometric means over models", "",
           "| runtime | batch | round_to | speed-up over dense | FLOPs reduction | ratio | speed-up over round_to 1 | n |",
           "|---|---|---|---|---|---|---|---|"]
    for (runtime, batch, step), vals in sorted(rows.items()):
        sp, fr, rel = (gmean([v[i] for v in vals]) for i in range(3))
        out.append(f"| {runtime} | {batch} | {step} | {sp:.2f}x | {fr:.2f}x | {sp / fr:.2f} | {rel:.2f}x | {len(vals)} |")
    return "\n".join(out + [""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--round-to-study", action="store_true",
                   help="ResNet-56 and VGG-16-BN at 50%% removed, widths rounded to 1/4/8/16, batch 1 and 64, 2 threads")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--profile", action="store_true",
                   help="ORT kernel time per stage, dense vs pruned ResNet-56 at 50%%, batch 64, 2 threads")
    a = p.parse_args(argv)
    if a.profile:
        path = RESULTS / "latency_profile.json"
        if not a.tables_only:
            atomic_write_json(path, profile_stages(runs=a.repeats or 20))
        atomic_write_text(RESULTS / "latency_profile.md", profile_table(json.loads(path.read_text())))
        print((RESULTS / "latency_profile.md").read_text())
        return 0
    stem = "latency_round_to" if a.round_to_study else "latency_quick" if a.quick else "latency"
    path = RESULTS / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    meta = data.setdefault("meta", {"quick": a.quick, "machine": f"{platform.machine()}, {torch.get_num_threads()} "
                                    "torch threads available", "torch": torch.__version__})
    results = data.setdefault("results", {})
    if not a.tables_only:
        if a.round_to_study:
            plan = [(m, 28, [0.5], ["remove", "remove-round4", "remove-round8", "remove-round16"], [1, 64], [2],
                     ["eager", "onnx"], a.repeats or 20) for m in ("resnet56", "vgg16_bn")]
        elif a.quick:
            plan = [("resnet56", 28, [0.5], ["remove", "implant-1x1", "implant-1x1-merged", "remove-round4",
                                             "implant-1x1-round4", "implant-1x1-round4-merged"], [64], [2],
                     ["eager", "onnx"], a.repeats or 20)]
        else:
            plan = [(m, s, [0.3, 0.5, 0.7], list(VARIANTS), [1, 64], [1, 2], ["eager", "onnx"], a.repeats or 10)
                    for m in ("resnet56", "vgg16_bn") for s in (28, 32)]
        for args in plan:
            for _ in bench(*args, done=results):
                atomic_write_json(path, data)  # resumable: finished settings are skipped next time
    text = tables(results, meta)
    if a.round_to_study:
        text = text.replace("# CPU latency of pruned models", "# CPU latency of pruned models: which `round_to`?", 1)
        text = text.replace("`python benchmarks/latency.py`", "`python benchmarks/latency.py --round-to-study`", 1)
        text += "\n" + round_to_summary(results)
    elif a.quick:
        text += "\n" + goals(results)
    atomic_write_text(RESULTS / f"{stem}.md", text)
    print((RESULTS / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
