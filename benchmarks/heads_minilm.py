"""Head pruning of a fine-tuned all-MiniLM-L6-v2 on Rotten Tomatoes: HAP vs Michel et al. vs magnitude vs random.

    python benchmarks/heads_minilm.py                  # the full run: 3 seeds x 4 targets x 13 criteria (CPU, hours)
    python benchmarks/heads_minilm.py --smoke          # 1 seed, 1 target, tiny budgets (~3 min), to runs/ only
    python benchmarks/heads_minilm.py --tables-only    # rebuild docs/results/heads_minilm/README.md (+ plot)
    python benchmarks/heads_minilm.py --diagnose --seeds 0   # rank correlations between criteria (after a run)

Per seed: a seeded 80/10/10 split of the 12,808 snippets (haprune.hf.rotten_tomatoes), MiniLM with a fresh
classification head fine-tuned on the training split (``--dense-steps`` AdamW steps); then for every target
fraction of heads and criterion, one-shot test accuracy and test accuracy after ``--ft-steps`` steps of
fine-tuning (same seed, same batches for every criterion). All criteria see the same calibration batches
(``--calib-batches`` x 32 training snippets).

    python benchmarks/heads_minilm.py --dense-only     # only the dense fine-tunes (cached under runs/, keyed)
    python benchmarks/heads_minilm.py --seeds 0 --targets 0.6 --oneshot-only --criteria hap-obs+comp michel+comp

Criteria: ``hap`` (Hutchinson head traces, Tr(H_s)/n_s * ||w_s||^2, global ranking), ``hap+implant`` (the same
scores; the band just above the removal threshold keeps rank head_dim/4 low-rank heads, the budget counting an
implanted head as 3/4 removed, so the attention parameter count matches plain removal), ``hap-ggn`` (the
same score on exact Gauss-Newton block traces, p0 p1 ||grad_s (z0 - z1)||^2 per sample: positive semi-definite,
where the Hessian of a transformer is not), ``michel`` (expected
|dL/d gate|, layer-normalised, Michel et al. 2019), ``magnitude`` (squared L2 norm of each head's weights),
``random``, ``obs`` / ``hap-obs`` (structured OBS saliency of the output projection, unweighted / weighted per
output by the loss's curvature, see haprune.hf.obs_importance); a ``+comp`` suffix refits the output projections
after removal (haprune.hf.compensate_transformer). Every model keeps at least one head per layer.

Resumable: one JSON per finished run under docs/results/heads_minilm/runs/ (a one-shot-only record is completed by
a later run with fine-tuning); dense models under runs/heads_minilm/dense-s<seed>-<hash of everything that
determines them>, head scores under runs/heads_minilm/scores/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from haprune._fileio import atomic_write_json  # noqa: E402
from haprune.hf import (TextClassifier, TextFinetuneConfig, compensate_transformer, evaluate_text,  # noqa: E402
                        finetune_text, from_pretrained, minilm_path, plan_transformer, prune_transformer, rotten_tomatoes, save_pretrained,
                        text_batches, tokenize, transformer_structures, unit_importance)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "heads_minilm"
RUNS = ROOT / "runs" / "heads_minilm"
BASE_CRITERIA = ("hap", "hap+implant", "hap-ggn", "michel", "magnitude", "random", "obs", "hap-obs")
COMPENSATED = ("hap", "hap-obs", "obs", "michel", "hap+implant")  # each also run with "+comp"
CRITERIA = BASE_CRITERIA + tuple(f"{c}+comp" for c in COMPENSATED)
PRIORITY = ("hap-obs+comp", "michel", "michel+comp", "hap+comp", "hap", "obs+comp", "hap-obs")  # run first
TARGETS = (0.6, 0.2, 0.4, 0.8)  # 60% first: the table the issue asks for
IMPLANT_RATIO = 0.2
IMPLANT_RANK = 8  # head_dim 32 / 4


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def load_split(seed: int, max_length: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    parts = rotten_tomatoes(seed)
    return {k: tokenize(tok, *v, max_length=max_length) for k, v in parts.items()}


def dense_key(seed: int, args) -> str:
    """Everything that determines a dense fine-tuned model: seed (split, head init, batch order), steps, lr,
    sequence length, the base model and the torch / transformers versions. A short hash names its folder."""
    import hashlib

    import transformers

    what = {"seed": seed, "steps": args.dense_steps, "lr": args.dense_lr, "max_length": args.max_length,
            "base": Path(minilm_path()).name, "torch": torch.__version__, "transformers": transformers.__version__,
            "smoke": bool(args.smoke)}
    return f"s{seed}-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def dense_model(seed: int, data, args, out: Path) -> tuple[TextClassifier, dict]:
    from transformers import AutoModelForSequenceClassification

    key = dense_key(seed, args)
    folder, meta_path = out / f"dense-{key}", out / f"dense-{key}.json"
    if meta_path.is_file() and folder.is_dir():
        meta = json.loads(meta_path.read_text())
        return TextClassifier(from_pretrained(folder, attn_implementation="eager")).eval(), meta
    torch.manual_seed(seed)
    hf = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, attn_implementation="eager")
    net = TextClassifier(hf)
    log(f"seed {seed}: fine-tuning dense MiniLM for {args.dense_steps} steps")
    ft = finetune_text(net, data["train"], TextFinetuneConfig(args.dense_steps, lr=args.dense_lr, seed=seed),
                       progress=False)
    acc = evaluate_text(net, data["test"])["accuracy"]
    save_pretrained(net, folder)
    meta = {"seed": seed, "steps": args.dense_steps, "lr": args.dense_lr, "max_length": args.max_length,
            "key": key, "test_accuracy": acc, "seconds": round(ft["seconds"], 1)}
    atomic_write_json(meta_path, meta)
    log(f"seed {seed}: dense test accuracy {acc:.4f} ({ft['seconds']:.0f} s)")
    return net.eval(), meta


def score_key(criterion: str) -> str:
    base = criterion.removesuffix("+comp")
    return "hap" if base in ("hap", "hap+implant") else base


def scores_for(net, structures, calib, criterion: str, seed: int, args, cache: dict, dense_meta: dict
               ) -> tuple[torch.Tensor, dict]:
    """A criterion's head scores on this seed's dense model, cached in memory and under runs/ (keyed by the dense
    model, the calibration batches and the estimator's settings)."""
    key = score_key(criterion)
    if key in cache:
        return cache[key]
    path = RUNS / "scores" / f"{dense_meta.get('key', seed)}-{key}-c{args.calib_batches}-p{args.probes}.pt"
    if path.is_file():
        cache[key] = tuple(torch.load(path, weights_only=False))
        return cache[key]
    start = time.perf_counter()
    sens = unit_importance(net, structures, calib, key, seed=seed, probes=args.probes)
    info = {"seconds": round(time.perf_counter() - start, 1), **{k: v for k, v in sens.info.items()
                                                                 if isinstance(v, (int, float, str, bool))}}
    cache[key] = (sens.scores, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([sens.scores, info], tmp)
    os.replace(tmp, path)
    return cache[key]


def diagnose(seeds: list[int], args, results: Path, out: Path) -> dict:
    """How the head rankings relate: Hutchinson's noise (split-half reliability, negative traces) and rank
    correlations between criteria, on each seed's dense model and calibration batches. -> diagnostics.json"""
    from scipy.stats import spearmanr

    report = {}
    for seed in seeds:
        data = load_split(seed, args.max_length)
        net, meta = dense_model(seed, data, args, out)
        structures = transformer_structures(net, heads=True)
        calib = list(text_batches(data["train"], 32, shuffle=True, seed=10_000 + seed))[: args.calib_batches]
        hut, again, ggn, mic, mag = (
            unit_importance(net, structures, calib, c, seed=sd, probes=args.probes)
            for c, sd in (("hap", seed), ("hap", seed + 100), ("hap-ggn", seed), ("michel", seed),
                          ("magnitude", seed)))  # the second "hap": independent probes, same budget
        rho = lambda a, b: round(float(spearmanr(a.numpy(), b.numpy())[0]), 4)  # noqa: E731
        report[str(seed)] = {
            "heads": structures.num_structures,
            "hutchinson_probes_per_batch": args.probes, "batches": len(calib),
            "hutchinson_negative_traces": int((hut.trace < 0).sum()),
            "hutchinson_split_half_reliability_per_batch": hut.info.get("reliability_per_batch"),
            "spearman": {"hap_vs_hap_other_probes": rho(hut.scores, again.scores),
                         "hap_vs_hap_ggn": rho(hut.scores, ggn.scores),
                         "hap_vs_michel": rho(hut.scores, mic.scores),
                         "hap_ggn_vs_michel": rho(ggn.scores, mic.scores),
                         "magnitude_vs_michel": rho(mag.scores, mic.scores)},
            "ggn_trace_relative_stderr_of_hutchinson_median": round(float(
                (hut.stderr / ggn.trace.abs().clamp_min(1e-30)).median()), 3),
        }
        log(f"seed {seed}: {report[str(seed)]}")
    atomic_write_json(results / "diagnostics.json", report)
    return report


FT_EVAL_EVERY = 10
FT_SELECT = f"best validation accuracy of the start and every {FT_EVAL_EVERY} steps"


def finetuned(row: dict, args) -> bool:
    """The record's fine-tuned accuracy exists and was made with this script's fine-tuning protocol (the model
    selected on the validation split, the starting one included); older records get their fine-tune redone."""
    ft = row.get("finetune") or {}
    return "accuracy_finetuned" in row and ft.get("select") == FT_SELECT and ft.get("steps") == args.ft_steps


def run_one(net, dense_meta, data, calib, structures, criterion, target, seed, args, cache, path: Path) -> dict:
    """One pruned model: plan, prune (+ compensation), one-shot accuracy; then, unless ``--oneshot-only``, the
    short fine-tune. A record with the one-shot part only is completed (not recomputed) by a later run."""
    row: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    want_ft = not args.oneshot_only
    if row and (finetuned(row, args) or not want_ft):
        return row
    scores, est_info = scores_for(net, structures, calib, criterion, seed, args, cache, dense_meta)
    implant = criterion.startswith("hap+implant")
    comp = criterion.endswith("+comp")
    plan = plan_transformer(net, structures, scores, target, budget="units",
                            implant_ratio=IMPLANT_RATIO if implant else 0.0, implant_rank=IMPLANT_RANK)
    t = time.perf_counter()
    pruned = prune_transformer(net, plan)
    comp_info = None
    if comp:
        rep = compensate_transformer(net, pruned, calib, ridge=args.ridge)
        comp_info = {"ridge": args.ridge, "seconds": round(time.perf_counter() - t, 1),
                     "layers": len(rep), "rows": max(r["rows"] for r in rep.values()),
                     "sse_before": sum(r["sse_before"] for r in rep.values()),
                     "sse_after": sum(r["sse_after"] for r in rep.values())}
    attn_params = lambda m: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                                if ".attention.self." in n or ".attention.output.dense" in n)
    if not row:
        row = {
            "seed": seed, "criterion": criterion, "target": target, "counts": plan.counts(),
            "units_removed_fraction": plan.achieved["removed_fraction"],
            "params": sum(p.numel() for p in pruned.parameters()),
            "params_dense": sum(p.numel() for p in net.parameters()),
            "attention_params": attn_params(pruned), "attention_params_dense": attn_params(net),
            "dense_accuracy": dense_meta["test_accuracy"], "dense_key": dense_meta.get("key"), "estimate": est_info,
            "compensation": comp_info, "calib_batches": args.calib_batches,
        }
        row["accuracy_oneshot"] = evaluate_text(pruned, data["test"])["accuracy"]
        row["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
        atomic_write_json(path, row)
    if want_ft:
        t = time.perf_counter()
        ft = finetune_text(pruned, data["train"], TextFinetuneConfig(args.ft_steps, lr=args.ft_lr, seed=seed),
                           progress=False, val=data["val"], eval_every=FT_EVAL_EVERY)
        row["accuracy_finetuned"] = evaluate_text(pruned, data["test"])["accuracy"]
        row["finetune"] = {"steps": args.ft_steps, "lr": args.ft_lr, "seconds": round(ft["seconds"], 1),
                           "select": FT_SELECT, "best_step": ft["best_step"], "val_history": ft["val_history"]}
        row["seconds"] = round(time.perf_counter() - t, 1)
        atomic_write_json(path, row)
    return row


def plots(results: Path, rows: list[dict], dense: dict[int, float]) -> list[str]:
    """Accuracy vs fraction of heads pruned, one line per criterion (mean ± std over seeds); SVG files."""
    from haprune.plots import line_plot, save_figure

    names = []
    hline = ("dense", 100 * statistics.fmean(dense.values())) if dense else None
    for key, label in (("accuracy_finetuned", "after fine-tuning"), ("accuracy_oneshot", "one-shot")):
        series = {}
        for c in CRITERIA:
            pts = []
            for t in sorted({r["target"] for r in rows}):
                vals = [100 * r[key] for r in rows if r["criterion"] == c and r["target"] == t and key in r]
                if vals:
                    pts.append((100 * t, statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
            if pts:
                series[c] = pts
        name = f"{key}.svg"
        save_figure(line_plot(series, title=f"MiniLM on Rotten Tomatoes: test accuracy {label}",
                              xlabel="heads pruned (%)", ylabel="test accuracy (%)", hline=hline), results / name)
        names.append(name)
    return names


PAIRS = (("hap-obs+comp", "michel"), ("hap-obs+comp", "michel+comp"), ("hap+comp", "michel"),
         ("hap+comp", "michel+comp"), ("hap", "michel"), ("hap-obs+comp", "hap+comp"), ("hap-obs+comp", "obs+comp"),
         ("hap-obs", "hap-obs+comp"), ("michel+comp", "michel"), ("hap+comp", "hap"))


def paired(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences (n - 1 degrees of freedom)."""
    if not diffs:
        return "-"
    m = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{m:+.2f} (n=1, no interval)"
    from scipy.stats import t as student

    half = float(student.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}] (n={len(diffs)})"


def tables(results: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    dense, dense_full = {}, {}
    for p in sorted((results / "runs").glob("dense-s*.json")):
        d = json.loads(p.read_text())
        dense[d["seed"]] = dense_full[d["seed"]] = d["test_accuracy"]
    rows = [r for r in rows if "criterion" in r]
    stale = [r for r in rows if r["seed"] in dense_full and r.get("dense_accuracy") != dense_full[r["seed"]]]
    rows = [r for r in rows if r not in stale]  # a row counts only with the seed's current dense model
    if not rows:
        return "no runs yet\n"
    old_ft = 0
    for r in rows:  # fine-tuned accuracies of the older protocol (the last step's model, no validation) are left out
        if "accuracy_finetuned" in r and (r.get("finetune") or {}).get("select") != FT_SELECT:
            r.pop("accuracy_finetuned")
            old_ft += 1

    def ms(vals: list[float]) -> str:
        if not vals:
            return "-"
        m = 100 * statistics.fmean(vals)
        s = 100 * statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{m:.2f} ± {s:.2f} (n={len(vals)})"

    lines = ["# Head pruning: all-MiniLM-L6-v2 on Rotten Tomatoes", "",
             "Generated by `python benchmarks/heads_minilm.py --tables-only` from the JSON files in `runs/`; "
             "regenerate the runs with `python benchmarks/heads_minilm.py` (CPU). Test accuracy (%), mean ± std "
             "over seeds; each seed has its own split, dense fine-tune, calibration batches and fine-tuning "
             "order. Target = fraction of the 72 heads removed (an implanted head counts as 3/4 removed). "
             f"Fine-tuning: {FT_SELECT} (validation split of the seed), so it never returns a model that "
             f"validates worse than the pruned one; {old_ft} older fine-tuned figures (the last step's model) "
             "are left out until rerun.", "",
             "Criteria: `hap` (Hutchinson head traces x squared weights), `hap-ggn` (exact Gauss-Newton traces), "
             "`michel` (Michel et al. 2019, expected |dL/d gate|, layer-normalised), `magnitude`, `random`, "
             "`obs` (structured OBS: the increase of the output projection's squared reconstruction error when the "
             "head goes and the other heads' columns and the bias are refitted, scored in the greedy order of an "
             "OBS surgeon) and `hap-obs` (the same, each output of the projection weighted by the loss's curvature "
             "with respect to it: the diagonal empirical Fisher of the attention block's output). `+comp`: after "
             "removal, every output projection that lost heads is refitted in forward order to the dense model's "
             "output on the pruned model's own inputs (ridge least squares over the calibration tokens, padding "
             "excluded; `haprune.hf.compensate_transformer`, `prune_transformer(..., compensate=batches)`), on the "
             "same calibration batches the scores used. `-` in the fine-tuned column: that row has been run "
             "one-shot only (`--oneshot-only`).", "",
             f"Dense: {ms(list(dense.values()))}", ""]
    figures = plots(results, rows, dense)
    lines += [f"![{f}]({f})" for f in figures] + [""]
    targets = sorted({r["target"] for r in rows}, key=lambda t: (t != 0.6, t))
    for t in targets:
        sub = [r for r in rows if r["target"] == t]
        lines += [f"## {t:.0%} of heads pruned", "",
                  "| criterion | one-shot | after fine-tuning | heads removed / implanted | attention params kept |",
                  "|---|---|---|---|---|"]
        for c in CRITERIA:
            rs = [r for r in sub if r["criterion"] == c]
            if not rs:
                continue
            counts = rs[0]["counts"]
            kept = rs[0]["attention_params"] / rs[0]["attention_params_dense"]
            lines.append(f"| {c} | {ms([r['accuracy_oneshot'] for r in rs])} | "
                         f"{ms([r['accuracy_finetuned'] for r in rs if 'accuracy_finetuned' in r])} | {counts['removed']} / {counts['implanted']} "
                         f"| {kept:.1%} |")
        pairs = [(a, b) for a, b in PAIRS if any(r["criterion"] == a for r in sub)
                 and any(r["criterion"] == b for r in sub)]
        if pairs:
            lines += ["", "Paired by seed (same dense model, calibration batches and fine-tuning order), difference in "
                      "pp, mean and 95% t-interval:", "",
                      "| comparison | one-shot | after fine-tuning |", "|---|---|---|"]
            for a, b in pairs:
                ra = {r["seed"]: r for r in sub if r["criterion"] == a}
                rb = {r["seed"]: r for r in sub if r["criterion"] == b}
                cells = []
                for key in ("accuracy_oneshot", "accuracy_finetuned"):
                    both = sorted(s for s in set(ra) & set(rb) if key in ra[s] and key in rb[s])
                    cells.append(paired([100 * (ra[s][key] - rb[s][key]) for s in both]))
                lines.append(f"| {a} − {b} | {cells[0]} | {cells[1]} |")
        lines.append("")
    diag_path = results / "diagnostics.json"
    if diag_path.is_file():  # written by --diagnose
        lines += ["## Why the rankings differ (`--diagnose`)", "",
                  "Spearman correlations between criteria on each seed's dense model and calibration batches; "
                  "Hutchinson's split-half reliability per batch (8 probes each) and its negative head traces.", ""]
        for seed, d in json.loads(diag_path.read_text()).items():
            pairs = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in d["spearman"].items())
            lines.append(f"- seed {seed}: {pairs}; negative Hutchinson traces {d['hutchinson_negative_traces']} "
                         f"of {d['heads']}; split-half reliability per batch "
                         f"{', '.join(f'{r:.2f}' for r in d['hutchinson_split_half_reliability_per_batch'])}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    ap.add_argument("--dense-steps", type=int, default=320)
    ap.add_argument("--dense-lr", type=float, default=8e-5)
    ap.add_argument("--ft-steps", type=int, default=50)
    ap.add_argument("--ft-lr", type=float, default=5e-5)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--probes", type=int, default=8, help="Hutchinson probes per calibration batch")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ridge", type=float, default=1e-4, help="relative ridge of compensation")
    ap.add_argument("--oneshot-only", action="store_true",
                    help="prune (+ compensate) and evaluate only; a later run without it adds the fine-tune")
    ap.add_argument("--smoke", action="store_true", help="tiny budgets; results to runs/heads_minilm_smoke")
    ap.add_argument("--tables-only", action="store_true")
    ap.add_argument("--dense-only", action="store_true", help="only fine-tune (and cache) the dense models")
    ap.add_argument("--diagnose", action="store_true",
                    help="rank correlations between criteria and Hutchinson's noise -> diagnostics.json")
    args = ap.parse_args(argv)
    results, out = RESULTS, RUNS
    if args.smoke:
        results, out = RUNS.with_name("heads_minilm_smoke"), RUNS.with_name("heads_minilm_smoke")
        args.seeds, args.targets = args.seeds[:1], [0.6]
        args.dense_steps, args.ft_steps, args.calib_batches, args.probes = 20, 5, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dense_only:  # the dense fine-tunes do not depend on any criterion: start them first
        for seed in args.seeds:
            dense_model(seed, load_split(seed, args.max_length), args, out)
        return 0
    if args.diagnose:
        diagnose(args.seeds, args, results, out)
        return 0
    if not args.tables_only:
        (results / "runs").mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            data = load_split(seed, args.max_length)
            if args.smoke:
                data["test"] = data["test"].subset(256)
            net, meta = dense_model(seed, data, args, out)
            atomic_write_json(results / "runs" / f"dense-s{seed}.json", meta)
            structures = transformer_structures(net, heads=True)
            calib = list(text_batches(data["train"], 32, shuffle=True, seed=10_000 + seed))[: args.calib_batches]
            cache: dict = {}
            for target in args.targets:
                for criterion in sorted(args.criteria, key=lambda c: (c not in PRIORITY,
                                                                      PRIORITY.index(c) if c in PRIORITY else 0)):
                    path = results / "runs" / f"s{seed}-{criterion}-{round(100 * target)}.json"
                    if path.is_file():
                        old = json.loads(path.read_text())
                        if old.get("dense_accuracy") != meta["test_accuracy"]:  # made from another dense model
                            log(f"{path.name}: made from another dense model; redone")
                            path.unlink()
                        elif finetuned(old, args) or args.oneshot_only:
                            continue
                    row = run_one(net, meta, data, calib, structures, criterion, target, seed, args, cache, path)
                    log(f"seed {seed} {criterion:14s} {target:.0%}: one-shot {row['accuracy_oneshot']:.4f} "
                        f"fine-tuned {row.get('accuracy_finetuned', float('nan')):.4f}")
    text = tables(results)
    if not args.smoke:
        (results / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
