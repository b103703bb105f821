"""``haprune prune-hf``: prune the heads (and optionally FFN neurons) of a Hugging Face sequence classifier.

    haprune prune-hf path/to/classifier --target 0.6 --out runs/pruned                 # Rotten Tomatoes
    haprune prune-hf path/to/classifier --data my.csv --text-column review --label-column stars --target 0.4 ...
    haprune prune-hf $(python -c 'import haprune.hf as h; print(h.minilm_path())') --dense-steps 320 ...

Writes ``--out/model`` (reload with ``haprune.hf.from_pretrained``, or plain ``from_pretrained`` where the
stock config can describe the result; the tokenizer is saved beside it), ``plan.json`` and ``report.json``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._fileio import atomic_write_json, atomic_write_text
from .importance import UNIT_CRITERIA


class _UsageError(ValueError):
    pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune-hf", help="prune attention heads / FFN neurons of a Hugging Face classifier",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Hugging Face model folder (sequence classifier, or a base model with "
                                 "--dense-steps)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", type=float, required=True, help="fraction of the budget to remove, in (0, 1)")
    p.add_argument("--budget", choices=["units", "params"], default="units",
                   help="units: fraction of heads (+ FFN neurons); params: of their parameters (default: %(default)s)")
    p.add_argument("--ffn", action="store_true", help="prune FFN neurons too (default: heads only)")
    p.add_argument("--criterion", choices=list(UNIT_CRITERIA), default="hap", help="(default: %(default)s)")
    p.add_argument("--implant-ratio", type=float, default=0.0,
                   help="low-rank implanted heads per removed unit, e.g. 0.2 (default: none)")
    p.add_argument("--implant-rank", type=int, default=None, help="implanted head dimension (default: head_dim/4)")
    p.add_argument("--data", default="rotten-tomatoes", help="rotten-tomatoes, or a CSV file (default: %(default)s)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: %(default)s)")
    p.add_argument("--calib-batches", type=int, default=8, help="32-text calibration batches (default: %(default)s)")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch (default: %(default)s)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="fine-tune the dense model first (needed when the folder has no trained classifier)")
    p.add_argument("--finetune-steps", type=int, default=100, help="after pruning (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-5, help="(default: %(default)s)")
    p.add_argument("--distill", type=float, default=0.0, help="distillation weight from the dense model")
    p.add_argument("--eval-limit", type=int, default=None, help="test texts to evaluate (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prune_hf)


def _read_csv(path: Path, text_col: str, label_col: str, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (use rotten-tomatoes or a CSV file)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or text_col not in rows[0] or label_col not in rows[0]:
        cols = list(rows[0]) if rows else []
        raise _UsageError(f"{path} needs columns {text_col!r} and {label_col!r} (--text-column/--label-column); "
                          f"it has {cols}")
    raw = [r[label_col] for r in rows]
    if all(v.strip().lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
    elif set(raw) <= set(label2id):
        labels = [label2id[v] for v in raw]
    else:
        names = sorted(set(raw))
        labels = [names.index(v) for v in raw]
    return [r[text_col] for r in rows], labels


def _splits(args: argparse.Namespace, label2id: dict[str, int]) -> dict[str, tuple[list[str], list[int]]]:
    from .text import rotten_tomatoes

    if args.data == "rotten-tomatoes":
        return rotten_tomatoes(args.seed)
    texts, labels = _read_csv(Path(args.data), args.text_column, args.label_column, label2id)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n = max(1, len(order) // 10)
    idx = {"test": order[:n], "val": order[n:2 * n], "train": order[2 * n:]}
    return {k: ([texts[i] for i in v], [labels[i] for i in v]) for k, v in idx.items()}


def cmd_prune_hf(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _UsageError as e:
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        raise _UsageError("prune-hf needs transformers: pip install 'haprune[hf]'") from e
    from . import (TextClassifier, TextFinetuneConfig, evaluate_text, finetune_text, plan_transformer,
                   prune_transformer, save_pretrained, text_batches, tokenize, transformer_structures,
                   unit_importance)

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not 0 < args.target < 1:
        raise _UsageError(f"--target must be in (0, 1), got {args.target}")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(folder)
    hf, info = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager",
                                                                  output_loading_info=True)
    fresh_head = [k for k in info.get("missing_keys", []) if "classifier" in k or "score" in k]
    if fresh_head and args.dense_steps == 0:
        raise _UsageError(f"{folder} has no trained classification head ({fresh_head[0]} is new); fine-tune it "
                          "first, or pass --dense-steps N to fine-tune the dense model here")
    parts = _splits(args, hf.config.label2id)
    n_labels = max(max(v[1]) for v in parts.values()) + 1
    if n_labels > hf.config.num_labels:
        raise _UsageError(f"the data has {n_labels} labels, the model {hf.config.num_labels}")
    data = {k: tokenize(tok, *v, max_length=args.max_length) for k, v in parts.items()}
    if args.eval_limit:
        data["test"] = data["test"].subset(args.eval_limit)
    net = TextClassifier(hf)
    if args.dense_steps:
        _log(f"fine-tuning the dense model for {args.dense_steps} steps")
        finetune_text(net, data["train"], TextFinetuneConfig(args.dense_steps, lr=args.lr, seed=args.seed))
    net.eval()
    dense = evaluate_text(net, data["test"])
    _log(f"dense test accuracy {dense['accuracy']:.4f}")
    structures = transformer_structures(net, heads=True, ffn=args.ffn)
    calib = list(text_batches(data["train"], 32, shuffle=True, seed=args.seed))[: args.calib_batches]
    start = time.perf_counter()
    sens = unit_importance(net, structures, calib, args.criterion, seed=args.seed, probes=args.probes,
                           progress=True)
    est_seconds = time.perf_counter() - start
    plan = plan_transformer(net, structures, sens, args.target, budget=args.budget,
                            implant_ratio=args.implant_ratio, implant_rank=args.implant_rank)
    pruned = prune_transformer(net, plan)
    oneshot = evaluate_text(pruned, data["test"])
    _log(f"one-shot test accuracy {oneshot['accuracy']:.4f}; fine-tuning {args.finetune_steps} steps")
    if args.finetune_steps:
        finetune_text(pruned, data["train"], TextFinetuneConfig(args.finetune_steps, lr=args.lr, seed=args.seed,
                                                                distill_alpha=args.distill),
                      teacher=net if args.distill > 0 else None)
    final = evaluate_text(pruned, data["test"])
    out = Path(args.out)
    save_pretrained(pruned, out / "model")
    tok.save_pretrained(out / "model")
    atomic_write_text(out / "plan.json", plan.to_json())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"model": str(folder), "criterion": args.criterion, "target": args.target, "budget": args.budget,
              "counts": plan.counts(), "achieved": plan.achieved,
              "params": {"before": count(net), "after": count(pruned)},
              "accuracy": {"dense": dense["accuracy"], "oneshot": oneshot["accuracy"], "finetuned": final["accuracy"]},
              "estimate_seconds": round(est_seconds, 2), "test_texts": len(data["test"])}
    atomic_write_json(out / "report.json", report)
    c = plan.counts()
    print(f"units removed {c['removed']}, implanted {c['implanted']}, kept {c['kept']}; "
          f"params {report['params']['before']:,} -> {report['params']['after']:,}")
    print(f"test accuracy: dense {dense['accuracy']:.4f}, one-shot {oneshot['accuracy']:.4f}, "
          f"fine-tuned {final['accuracy']:.4f}; wrote {out}/model, plan.json, report.json")
    return 0
