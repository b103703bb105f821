"""``haprune prune-hf``: prune the heads (and optionally FFN neurons) of a Hugging Face text classifier.

    haprune prune-hf path/to/classifier --target 0.6 --out runs/pruned                 # Rotten Tomatoes
    haprune prune-hf path/to/classifier --data my.csv --text-column review --label-column stars --target 0.4 ...
    haprune prune-hf $(python -c 'import haprune.hf as h; print(h.minilm_path())') --dense-steps 320 ...

The folder holds a text model (a sequence classifier, or a base / causal language model with --dense-steps)
and its tokenizer. Image classifiers (ViT, DeiT, ...) go through `haprune prune --hf-vision PATH`.

Writes ``--out/model`` (reload with ``haprune.hf.from_pretrained``, or plain ``from_pretrained`` where the
stock config can describe the result; the tokenizer is saved beside it), ``plan.json``, ``report.json`` and
``run.json``, as a unit: the folder appears complete or not at all (a previous run there stays until then).
Every option is checked, and the model's layout read, before any fine-tuning or estimation starts.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any

# Nothing heavy at import time: `haprune --help` and argument errors must not pay for torch / transformers.

# the names of haprune.hf.importance.UNIT_CRITERIA (kept here so that building the parser imports no torch;
# tests/test_hf_cli_errors.py checks that the two agree)
CRITERIA = ("hap", "hap-ggn", "michel", "magnitude", "random", "obs", "hap-obs")
COMPENSATION = ("auto", "none", "sequential", "dense-inputs")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")


class _UsageError(ValueError):
    pass


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks
        return
    print(msg, file=sys.stderr, flush=True)


def add_parser(sub: Any) -> None:
    """Register ``prune-hf`` on an argparse subparsers object (cheap: imports neither torch nor transformers)."""
    p = sub.add_parser("prune-hf", help="prune attention heads / FFN neurons of a Hugging Face text classifier",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Hugging Face text model folder with its tokenizer (sequence classifier, or a "
                                 "base / causal language model with --dense-steps)")
    p.add_argument("--out", required=True, help="output folder (replaced as a unit when the run completes)")
    p.add_argument("--target", type=float, required=True, help="fraction of the budget to remove, in (0, 1)")
    p.add_argument("--budget", choices=["units", "params"], default="units",
                   help="units: fraction of heads (+ FFN neurons); params: of their parameters (default: %(default)s)")
    p.add_argument("--ffn", action="store_true", help="prune FFN neurons too (default: heads only)")
    p.add_argument("--criterion", choices=list(CRITERIA), default="hap", help="(default: %(default)s)")
    p.add_argument("--implant-ratio", type=float, default=0.0,
                   help="low-rank implanted heads per removed unit, e.g. 0.2; BERT-style attention only "
                        "(default: %(default)s, none)")
    p.add_argument("--implant-rank", type=int, default=None,
                   help="implanted head dimension, at most the model's head dimension (default: head_dim/4)")
    p.add_argument("--compensate", choices=list(COMPENSATION), default="auto",
                   help="after removal, refit the output / down projections that lost inputs to the dense model's "
                        "outputs on the calibration batches: sequential (on the pruned model's own inputs, in "
                        "forward order), dense-inputs (on the dense model's inputs), none; auto = sequential, or none "
                        "with a warning when the calibration tokens cannot determine a refit (default: %(default)s)")
    p.add_argument("--data", default="rotten-tomatoes", help="rotten-tomatoes, or a CSV file (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="CSV column with the texts (default: %(default)s)")
    p.add_argument("--label-column", default="label",
                   help="CSV column with the labels: integers, or names (default: %(default)s)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes of the data when the model's head has another number: a new head of this size "
                        "is trained by --dense-steps (default: the model's own)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: %(default)s)")
    p.add_argument("--calib-batches", type=int, default=8, help="32-text calibration batches (default: %(default)s)")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch (default: %(default)s)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="fine-tune the dense model first; needed when the folder has no trained classification "
                        "head (default: %(default)s)")
    p.add_argument("--finetune-steps", type=int, default=100, help="after pruning (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate (default: %(default)s)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="distillation weight from the dense model, in [0, 1] (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=None, help="test texts to evaluate (default: all)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.set_defaults(func=cmd_prune_hf)


# ------------------------------------------------------------------------------------------------ checks


def _check_options(args: argparse.Namespace) -> None:
    """Every option on its own, before anything is loaded."""
    if not 0 < args.target < 1:
        raise _UsageError(f"--target must be in (0, 1), got {args.target}")
    for name, low in (("implant_ratio", 0.0), ("dense_steps", 0), ("finetune_steps", 0)):
        if getattr(args, name) < low:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("calib_batches", "probes", "eval_limit", "implant_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_length < 2:
        raise _UsageError(f"--max-length must be >= 2 (room for the special tokens), got {args.max_length}")
    if args.num_labels is not None and args.num_labels < 2:
        raise _UsageError(f"--num-labels must be >= 2, got {args.num_labels}")
    if not args.lr > 0:
        raise _UsageError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.distill <= 1:
        raise _UsageError(f"--distill must be in [0, 1], got {args.distill}")
    if args.implant_rank is not None and args.implant_ratio == 0:
        raise _UsageError("--implant-rank has no effect without --implant-ratio (e.g. --implant-ratio 0.2)")


def _read_config(folder: Path) -> Any:
    """The folder's config, after checking that it is a text model prune-hf can load as a classifier."""
    if not (folder / "config.json").is_file():
        raise _UsageError(f"{folder} is not a Hugging Face model folder (no config.json)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise _UsageError(f"{folder}/config.json cannot be read by this transformers: "
                          f"{str(e).splitlines()[0][:300]}") from None
    kind = getattr(config, "model_type", "?")
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    vision = any(a.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))
                 for a in getattr(config, "architectures", None) or []) or \
        (hasattr(config, "image_size") and hasattr(config, "num_channels"))
    if vision:
        raise _UsageError(f"{folder} holds an image model ({kind}: {archs}); prune-hf takes Hugging Face text "
                          f"models with a tokenizer. For image classifiers use: haprune prune --hf-vision {folder}")
    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise _UsageError(f"{folder} holds a {kind} model ({archs}), which transformers has no sequence "
                          "classifier for; prune-hf takes text models with a sequence-classification class "
                          "(BERT, RoBERTa, DeBERTa-v2, DistilBERT, OPT, Llama, Mistral, Qwen2, ...)")
    return config


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise _UsageError(f"{folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:4])}, ...); save it "
                          "beside the model: AutoTokenizer.from_pretrained(original).save_pretrained(folder)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (TypeError, ValueError, OSError) as e:
        raise _UsageError(f"{folder}: its tokenizer cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}); save a complete tokenizer beside the model") from None
    if tok.pad_token is None:  # causal LMs: pad with the end-of-sequence token
        if tok.eos_token is None:
            raise _UsageError(f"{folder}: the tokenizer has neither a padding nor an end-of-sequence token; set "
                              "tokenizer.pad_token and save it")
        tok.pad_token = tok.eos_token
    return tok


def _read_csv(path: Path, text_col: str, label_col: str, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise _UsageError(f"--data {path}: no such file (use rotten-tomatoes or a CSV file)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise _UsageError(f"--data {path} is not a UTF-8 CSV file ({e})") from None
    if not rows or text_col not in rows[0] or label_col not in rows[0]:
        cols = list(rows[0]) if rows else []
        raise _UsageError(f"{path} needs columns {text_col!r} and {label_col!r} (--text-column/--label-column); "
                          f"it has {cols}")
    raw = [(r[label_col] or "").strip() for r in rows]
    if any(not v for v in raw):
        raise _UsageError(f"{path}: row {raw.index('') + 2} has an empty {label_col!r}")
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
        if min(labels) < 0:
            raise _UsageError(f"{path}: integer labels must be 0, 1, ...; found {min(labels)}")
    elif set(raw) <= set(label2id):
        labels = [label2id[v] for v in raw]
    else:
        names = sorted(set(raw))
        labels = [names.index(v) for v in raw]
    return [r[text_col] or "" for r in rows], labels


def _splits(args: argparse.Namespace, label2id: dict[str, int]) -> dict[str, tuple[list[str], list[int]]]:
    import torch

    from .text import rotten_tomatoes

    if args.data == "rotten-tomatoes":
        return rotten_tomatoes(args.seed)
    texts, labels = _read_csv(Path(args.data), args.text_column, args.label_column, label2id)
    if len(texts) < 30:
        raise _UsageError(f"--data {args.data} has {len(texts)} rows; at least 30 are needed (10% test, 10% "
                          "validation, the rest for calibration and fine-tuning)")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    n = max(1, len(order) // 10)
    idx = {"test": order[:n], "val": order[n:2 * n], "train": order[2 * n:]}
    return {k: ([texts[i] for i in v], [labels[i] for i in v]) for k, v in idx.items()}


def _check_labels(parts: dict[str, tuple[list[str], list[int]]], head: int, args: argparse.Namespace) -> int:
    """The number of classes of the classifier to build: the model's head, or --num-labels."""
    n_data = max(max(v[1]) for v in parts.values()) + 1
    if n_data < 2:
        raise _UsageError("the data has one class only; a classifier needs at least two")
    want = args.num_labels or head
    if n_data > want:
        hint = (f"pass --num-labels {n_data} --dense-steps N to train a new {n_data}-way head"
                if args.num_labels is None else f"raise --num-labels to {n_data}")
        raise _UsageError(f"the data has {n_data} classes (labels 0..{n_data - 1}), the model's head "
                          f"{want}; {hint}")
    if args.num_labels is not None and args.num_labels != head and args.dense_steps == 0:
        raise _UsageError(f"--num-labels {args.num_labels} replaces the model's {head}-way head with an untrained "
                          "one; pass --dense-steps N to train it")
    return want


def _check_model(net: Any, args: argparse.Namespace) -> Any:
    """The structures to score, after checking implants against the model's attention (no work done yet)."""
    from .structures import block_index, transformer_structures

    structures = transformer_structures(net, heads=True, ffn=args.ffn)
    if args.implant_ratio > 0:
        attn = [b for b in block_index(net).values() if hasattr(b, "head_dim")]
        unfit = [b for b in attn if not b.implants or b.group_size != 1]
        if unfit:
            b = unfit[0]
            why = ("rotary position embeddings (RoPE) do not commute with a low-rank query/key map"
                   if b.family == "llama" else f"implants are implemented for BERT-style self-attention, not the "
                   f"{b.layout} layout")
            raise _UsageError(f"--implant-ratio: {b.name} cannot take implanted heads ({why}); drop --implant-ratio")
        dims = {b.head_dim for b in attn}
        if args.implant_rank is not None and args.implant_rank > min(dims):
            raise _UsageError(f"--implant-rank {args.implant_rank} is larger than the model's head dimension "
                              f"{min(dims)}; pass at most {min(dims)} (default: head_dim/4 = {max(1, min(dims) // 4)})")
    if args.compensate == "dense-inputs" and args.implant_ratio > 0:
        raise _UsageError("--compensate dense-inputs cannot fit implanted heads (they have no dense input); use "
                          "--compensate sequential with --implant-ratio")
    return structures


def _majority_rate(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels) if labels else 0.0


def _degenerate(accuracy: dict[str, float], majority: float, n: int) -> list[str]:
    """Warnings for every accuracy at or below predicting the majority class (within half a test example)."""
    return [f"{stage} accuracy {acc:.4f} is at or below the majority-class rate {majority:.4f}: the model "
            "predicts (nearly) one class; fine-tune longer (--dense-steps, --finetune-steps) or check the labels"
            for stage, acc in accuracy.items() if acc <= majority + 0.5 / max(1, n)]


# ------------------------------------------------------------------------------------------------ the run


def cmd_prune_hf(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _UsageError as e:
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2


def _compensate(net: Any, pruned: Any, plan: Any, calib: list, mode: str) -> dict[str, Any]:
    """``--compensate dense-inputs``: :func:`haprune.apply.compensate.compensate` on the consumer layers, with the
    dense input columns each one kept."""
    from ..apply.compensate import compensate
    from .structures import block_index

    blocks = block_index(net)
    layers, kept = [], {}
    for name, gp in plan.groups.items():
        b = blocks[name]
        if not gp.remove:
            continue
        if hasattr(b, "head_dim"):
            per = b.group_size * b.head_dim
            layer, cols = b.o, [u * per + j for u in gp.keep for j in range(per)]
        else:
            layer, cols = b.down, list(gp.keep)
        layers.append(layer)
        kept[layer] = cols
    if not layers:
        return {"mode": mode, "layers": []}
    result = compensate(net, pruned, calib, mode=mode, layers=layers, kept_inputs=kept)
    return result.to_dict()


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _check_options(args)
    folder = Path(args.model)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise _UsageError("prune-hf needs transformers: pip install 'haprune[hf]'") from e
    config = _read_config(folder)
    tok = _load_tokenizer(folder)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    parts = _splits(args, label2id)
    num_labels = _check_labels(parts, int(getattr(config, "num_labels", 2)), args)

    from .. import distributed
    from .._fileio import run_folder

    # under torchrun every rank runs the steps (the sensitivity pass on its shard of the calibration batches, the
    # rest replicated and checked identical); rank 0 alone writes --out and prints
    group = distributed.init_from_env()
    folder_of = run_folder(args.out) if distributed.is_main(group) else distributed.scratch_run_folder(group)
    with folder_of as rf:  # --out checked (file? foreign folder? locked?) before any work
        return _prune(args, folder, config, tok, parts, num_labels, rf.path, args.out, group)


def _prune(args: argparse.Namespace, folder: Path, config: Any, tok: Any, parts: dict, num_labels: int,
           out: Path, shown_out: str, group: Any = None) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification

    from .. import distributed
    from .._fileio import atomic_write_json, atomic_write_text
    from . import (TextClassifier, TextFinetuneConfig, evaluate_text, finetune_text, plan_transformer,
                   prune_transformer, save_pretrained, text_batches, tokenize, unit_importance)

    torch.manual_seed(args.seed)
    extra: dict[str, Any] = {}
    if num_labels != config.num_labels:
        extra.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    if getattr(config, "pad_token_id", None) is None:
        extra["pad_token_id"] = tok.pad_token_id  # batches of more than one text need it (causal LMs)
    try:
        hf, info = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager",
                                                                      output_loading_info=True, **extra)
    except (ValueError, OSError) as e:
        raise _UsageError(f"{folder}: transformers cannot load it as a sequence classifier "
                          f"({str(e).splitlines()[0][:300]})") from None
    new = [k for k in info.get("missing_keys", []) if "classifier" in k or "score" in k]
    new += [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    if new and args.dense_steps == 0:
        raise _UsageError(f"{folder} has no trained classification head ({sorted(new)[0]} is new); fine-tune it "
                          "first, or pass --dense-steps N to fine-tune the dense model here")
    net = TextClassifier(hf)
    structures = _check_model(net, args)  # layout, implants, implant rank: before any fine-tuning or estimation
    data = {k: tokenize(tok, *v, max_length=args.max_length) for k, v in parts.items()}
    if args.eval_limit:
        data["test"] = data["test"].subset(args.eval_limit)
    majority = _majority_rate(data["test"].y.tolist())
    if args.dense_steps:
        _log(f"fine-tuning the dense model for {args.dense_steps} steps")
        finetune_text(net, data["train"], TextFinetuneConfig(args.dense_steps, lr=args.lr, seed=args.seed))
    net.eval()
    dense = evaluate_text(net, data["test"])
    _log(f"dense test accuracy {dense['accuracy']:.4f} (majority class {majority:.4f})")
    calib = list(text_batches(data["train"], 32, shuffle=True, seed=args.seed))[: args.calib_batches]
    start = time.perf_counter()
    sens = unit_importance(net, structures, calib, args.criterion, seed=args.seed, probes=args.probes,
                           progress=distributed.is_main(group), group=group)
    est_seconds = time.perf_counter() - start
    plan = plan_transformer(net, structures, sens, args.target, budget=args.budget,
                            implant_ratio=args.implant_ratio, implant_rank=args.implant_rank)
    plan = type(plan).from_dict(distributed.broadcast_json(plan.to_dict(), group))  # rank 0's, on every rank
    compensation: dict[str, Any] | None = None
    requested = args.compensate
    if requested == "auto":
        args.compensate = "sequential"
    pruned = None
    from ..apply.regression import UndeterminedFitError

    if args.compensate == "sequential":
        _log("compensating: refitting the projections that lost inputs (sequential)")
        try:
            pruned = prune_transformer(net, plan, compensate=calib, progress=True)
        except UndeterminedFitError as e:
            if requested != "auto":
                raise _UsageError(f"--compensate sequential: {e}; pass more --calib-batches") from None
            _log(f"compensation off: {e} (pass more --calib-batches, or --compensate none to silence this)")
            args.compensate = "none"
        else:
            from .surgery import RECORD_KEY, find_pretrained

            compensation = dict(getattr(find_pretrained(pruned)[1].config, RECORD_KEY).get("compensation") or {})
    if pruned is None:
        pruned = prune_transformer(net, plan)
        if args.compensate == "dense-inputs":
            _log("compensating: refitting the projections that lost inputs (dense-inputs)")
            compensation = _compensate(net, pruned, plan, calib, "dense-inputs")
    distributed.check_identical(pruned, group, "pruned model")
    oneshot = evaluate_text(pruned, data["test"])
    _log(f"one-shot test accuracy {oneshot['accuracy']:.4f}; fine-tuning {args.finetune_steps} steps")
    if args.finetune_steps:
        finetune_text(pruned, data["train"], TextFinetuneConfig(args.finetune_steps, lr=args.lr, seed=args.seed,
                                                                distill_alpha=args.distill),
                      teacher=net if args.distill > 0 else None)
    final = evaluate_text(pruned, data["test"])
    if not distributed.is_main(group):
        return 0
    accuracy = {"dense": dense["accuracy"], "oneshot": oneshot["accuracy"], "finetuned": final["accuracy"]}
    warnings = _degenerate(accuracy, majority, len(data["test"]))
    save_pretrained(pruned, out / "model")
    tok.save_pretrained(out / "model")
    atomic_write_text(out / "plan.json", plan.to_json())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"model": str(folder), "criterion": args.criterion, "target": args.target, "budget": args.budget,
              "counts": plan.counts(), "achieved": plan.achieved,
              "params": {"before": count(net), "after": count(pruned)},
              "accuracy": accuracy, "majority_class_rate": majority, "warnings": warnings,
              "compensation": compensation, "compensate": {"requested": requested, "used": args.compensate},
              "num_labels": num_labels,
              "estimate_seconds": round(est_seconds, 2), "test_texts": len(data["test"])}
    atomic_write_json(out / "report.json", report)
    c = plan.counts()
    print(f"units removed {c['removed']}, implanted {c['implanted']}, kept {c['kept']}; "
          f"params {report['params']['before']:,} -> {report['params']['after']:,}")
    print(f"test accuracy: dense {dense['accuracy']:.4f}, one-shot {oneshot['accuracy']:.4f}, "
          f"fine-tuned {final['accuracy']:.4f}; wrote {shown_out}/model, plan.json, report.json")
    for w in warnings:
        print(f"WARNING: {w}")
        _log(f"haprune: warning: {w}")
    return 0
