"""Train a baseline CNN on Fashion-MNIST with haprune's data and fine-tuning code, and save it for pruning.

    python benchmarks/train_baselines.py --model resnet56 --epochs 40 --device cuda --out checkpoints

writes ``<out>/<model>-fmnist.safetensors`` (float32; float16 for vgg16_bn, split into shards of at most
``--max-shard-mb`` MiB when larger) and ``<out>/<model>-fmnist.json`` (recipe, per-epoch log, validation and
test accuracy of the saved file, timing, device, torch version). Training is resumable: run the same command
again and it continues from ``--checkpoint-dir``. Load the result with
``haprune.recover.load_checkpoint_weights(create_model(name, in_channels=1, num_classes=10), path)``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from haprune._fileio import atomic_write_json
from haprune.data import DatasetSplits, load_dataset
from haprune.models import create_model, list_models
from haprune.recover import (
    EpochRecord,
    FinetuneConfig,
    evaluate,
    finetune,
    checkpoint_config,
    load_checkpoint_weights,
    save_weights,
)

DATASET = "fashion-mnist"
SUFFIX = "fmnist"
SPLIT_SEED = 0
HALF_PRECISION_MODELS = ("vgg16_bn",)
_PROBE_WARMUP_BATCHES = 10
_PROBE_BATCHES = 40


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=list_models())
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--schedule", choices=("cosine", "step"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward passes")
    parser.add_argument("--out", type=Path, default=Path("checkpoints"), help="folder for the weights and JSON")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="resumable training state (default: runs/baselines/<model>-fmnist)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with the Fashion-MNIST .gz files (default: $HAPRUNE_DATA_DIR or the Debian path)")
    parser.add_argument("--weights-dtype", choices=("auto", "float32", "float16"), default="auto",
                        help="dtype of the saved weights; auto = float16 for vgg16_bn, else float32")
    parser.add_argument("--max-shard-mb", type=float, default=15.0, help="largest weight file, in MiB")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training allowed: a fresh run does fewer epochs if a timed probe says "
                             "--epochs would not fit (the schedule is fitted to the smaller count); a resumed "
                             "run keeps the epoch count of its checkpoint")
    parser.add_argument("--max-batches-per-epoch", type=int, default=None, help="cap epochs (smoke tests)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser.parse_args(argv)


def weights_dtype(args: argparse.Namespace) -> torch.dtype:
    """The dtype the weights are stored in."""
    if args.weights_dtype == "auto":
        return torch.float16 if args.model in HALF_PRECISION_MODELS else torch.float32
    return getattr(torch, args.weights_dtype)


def make_config(args: argparse.Namespace, epochs: int) -> FinetuneConfig:
    """The training recipe of the command line, for ``epochs`` epochs."""
    return FinetuneConfig(epochs=epochs, lr=args.lr, weight_decay=args.wd, batch_size=args.batch_size,
                          schedule=args.schedule, seed=args.seed, amp=args.amp,
                          max_batches_per_epoch=args.max_batches_per_epoch)


def new_model(name: str, splits: DatasetSplits) -> nn.Module:
    """A freshly initialised ``name`` for the channels and classes of ``splits``."""
    return create_model(name, in_channels=splits.in_channels, num_classes=splits.num_classes)


def affordable_epochs(args: argparse.Namespace, splits: DatasetSplits) -> int:
    """``--epochs``, or fewer if a short timed probe projects more than ``--time-budget`` seconds of training."""
    if args.time_budget is None:
        return args.epochs

    def probe_seconds(num_batches: int) -> float:
        config = FinetuneConfig(**{**make_config(args, 1).to_dict(), "max_batches_per_epoch": num_batches,
                                   "select_best": False, "bn_reestimate": False})
        result = finetune(new_model(args.model, splits), splits.train, splits.val, config, device=args.device,
                          progress=False)
        return result.history[0].seconds

    warm = probe_seconds(_PROBE_WARMUP_BATCHES)
    per_batch = max(probe_seconds(_PROBE_BATCHES) - warm, 1e-9) / (_PROBE_BATCHES - _PROBE_WARMUP_BATCHES)
    eval_seconds = max(warm - _PROBE_WARMUP_BATCHES * per_batch, 0.0)
    batches_per_epoch = -(-len(splits.train) // args.batch_size)
    epoch_seconds = per_batch * batches_per_epoch + eval_seconds
    fitting = max(1, int(args.time_budget // epoch_seconds))
    print(f"[{args.model}] probe: {epoch_seconds:.2f} s/epoch projected; budget {args.time_budget:.0f} s "
          f"-> {min(fitting, args.epochs)} of {args.epochs} epochs", flush=True)
    return min(fitting, args.epochs)


def device_name(device: str) -> str:
    """A human-readable name of ``device`` for the report."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def log_epoch(model: str, total_epochs: int) -> Callable[[EpochRecord], None]:
    """A ``log_fn`` for :func:`finetune` that prints one line per epoch."""
    def log(entry: EpochRecord) -> None:
        print(f"[{model}] epoch {entry.epoch}/{total_epochs} lr {entry.lr:.4f} train_loss {entry.train_loss:.4f} "
              f"val_acc {entry.val_accuracy:.4f} ({entry.seconds:.1f} s)", flush=True)
    return log


def train_baseline(args: argparse.Namespace) -> Dict[str, object]:
    """Train, save the weights, re-load them and measure them; returns the JSON report (also written)."""
    started = time.perf_counter()
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = load_dataset(DATASET, root=args.data_dir, split_seed=SPLIT_SEED)
    checkpoint_dir = args.checkpoint_dir or Path("runs") / "baselines" / f"{args.model}-{SUFFIX}"
    saved = checkpoint_config(checkpoint_dir)
    epochs = saved.epochs if saved is not None else affordable_epochs(args, splits)
    config = make_config(args, epochs)
    torch.manual_seed(args.seed)
    model = new_model(args.model, splits)
    result = finetune(model, splits.train, splits.val, config, checkpoint_dir=checkpoint_dir, device=args.device,
                      progress=not args.no_progress, log_fn=log_epoch(args.model, epochs))
    stem = f"{args.model}-{SUFFIX}"
    dtype = weights_dtype(args)
    files = save_weights(model, args.out / f"{stem}.safetensors", dtype=dtype,
                         max_shard_bytes=int(args.max_shard_mb * 2**20),
                         metadata={"model": args.model, "dataset": DATASET, "in_channels": str(splits.in_channels),
                                   "num_classes": str(splits.num_classes)})
    reloaded = load_checkpoint_weights(new_model(args.model, splits), args.out / f"{stem}.safetensors")
    val = evaluate(reloaded, splits.val, device=args.device)
    test = evaluate(reloaded, splits.test, device=args.device)
    report: Dict[str, object] = {
        "model": args.model,
        "dataset": DATASET,
        "weights": [f.name for f in files],
        "weights_dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {**config.to_dict(), "optimizer": "SGD", "requested_epochs": args.epochs,
                   "split_seed": SPLIT_SEED, "val_size": len(splits.val)},
        "data": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                 "mean": list(splits.mean), "std": list(splits.std), "image_size": splits.image_size},
        "history": [asdict(entry) for entry in result.history],
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_seconds": result.seconds,
        "total_seconds": time.perf_counter() - started,
        "device": device_name(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
    }
    atomic_write_json(args.out / f"{stem}.json", report)
    return report


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report = train_baseline(args)
    print(f"[{args.model}] test accuracy {report['test_accuracy']:.4f} (val {report['val_accuracy']:.4f}), "
          f"{report['total_seconds']:.0f} s on {report['device']}; wrote {', '.join(report['weights'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
