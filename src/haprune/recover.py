"""Recovery after pruning: evaluation, BatchNorm re-estimation and (distilled) fine-tuning with resumable checkpoints.

The same :func:`finetune` trains baselines from scratch (``FinetuneConfig(epochs=30, lr=0.1)``).
Checkpoints hold no pickles: tensors go to safetensors files, everything else to JSON.

Distributed (``group``, see :mod:`haprune.distributed`; every rank passes the same model and data):
:func:`finetune` trains a ``DistributedDataParallel`` replica per rank on its share of each epoch's shuffled order
(``torch.utils.data.distributed.DistributedSampler``), validates on round-robin shards of the validation batches
with the sums all-reduced, and only rank 0 reads and writes checkpoints (atomically), broadcasting what it resumed
to the others, so a run resumes on any number of ranks; :func:`evaluate` and :func:`reestimate_batchnorm` reduce
their sums across the ranks the same way.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from ._fileio import PathLike, atomic_save_safetensors, atomic_write_json
from .data import Batches, as_image_dataset
from .data import batches as make_batches
from .graph import model_device, preserved_modes
from .outputs import logits_of

Batch = Tuple[torch.Tensor, torch.Tensor]
EvalData = Union[TensorDataset, Iterable[Batch]]
Device = Union[str, torch.device, None]

SCHEDULES = ("cosine", "step")
CHECKPOINT_FORMAT = "haprune.finetune/1"
CHECKPOINT_JSON = "checkpoint.json"
_FINITE_CHECK_INTERVAL = 25


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and BatchNorm re-estimation


def _eval_batches(data: EvalData, batch_size: int, device: torch.device) -> Iterable[Batch]:
    if isinstance(data, TensorDataset):
        return make_batches(data, batch_size, device=device)
    return data


@torch.no_grad()
def evaluate(model: nn.Module, data: EvalData, batch_size: int = 512, device: Device = None,
             group: distributed.Group = None) -> Dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` (a fraction) of ``model`` on ``data``.

    ``data`` is a ``TensorDataset`` of (images, labels) or an iterable of ``(x, y)`` batches. The model runs in
    eval mode without gradients and gets its modes back afterwards; with ``device`` it is moved there first.
    The model may return a tensor, a ``ModelOutput`` / dict with ``logits``, or a tuple (:func:`logits_of`).
    With ``group`` every rank (holding the same model and data) evaluates its round-robin share of the batches
    and the sums are all-reduced: every rank returns the result on all of ``data``.
    """
    if device is not None:
        model.to(device)
    target = model_device(model)
    total_loss, correct, count = 0.0, 0, 0
    with preserved_modes(model):
        model.eval()
        for x, y in distributed.shard(_eval_batches(data, batch_size, target), group):
            x, y = x.to(target), y.to(target)
            logits = logits_of(model(x)).float()
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += y.shape[0]
    sums = distributed.all_reduce(torch.tensor([total_loss, correct, count], dtype=torch.float64), group).tolist()
    total_loss, correct, count = sums[0], int(sums[1]), int(sums[2])
    if count == 0:
        raise ValueError("evaluate() got no samples: the data set (or batch iterable) is empty")
    return {"loss": total_loss / count, "accuracy": correct / count}


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _batchnorms(model: nn.Module) -> List[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _bn_snapshot(norms: List[_BatchNorm]) -> List[Dict[str, torch.Tensor]]:
    return [{name: getattr(m, name).clone() for name in _BN_BUFFERS} for m in norms]


def _bn_restore(norms: List[_BatchNorm], snapshot: List[Dict[str, torch.Tensor]]) -> None:
    for m, buffers in zip(norms, snapshot):
        for name, value in buffers.items():
            getattr(m, name).copy_(value)


@contextlib.contextmanager
def batchnorm_stats_restored(model: nn.Module) -> Iterator[None]:
    """Inside the block BatchNorm running statistics may change (e.g. by :func:`reestimate_batchnorm`); on leaving
    it, normally or by an error, every BatchNorm's running mean, variance and batch count are put back."""
    norms = _batchnorms(model)
    snapshot = _bn_snapshot(norms)
    try:
        yield
    finally:
        with torch.no_grad():
            _bn_restore(norms, snapshot)


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, batches: Iterable[Union[Batch, torch.Tensor]], num_batches: Optional[int] = None,
    group: distributed.Group = None,
) -> int:
    """Recompute every BatchNorm's running mean and variance from ``batches``; returns how many were used.

    Running stats are reset and accumulated as a cumulative (equal-weight per batch) average, i.e. with
    ``momentum=None``, by forward passes in train mode without gradients. Momenta and train/eval modes are
    restored afterwards. Essential after pruning: the old statistics no longer describe the pruned network.
    ``batches`` yields ``(x, y)`` pairs or bare inputs; ``num_batches`` caps how many are used. If no batch
    arrives or the forward fails, the previous statistics are put back before the error propagates.
    With ``group`` (every rank passing the same batches) each rank runs its round-robin share of the first
    ``num_batches`` and the per-batch sums are all-reduced: every rank ends with the statistics of all of them.
    """
    norms = _batchnorms(model)
    if not norms:
        return 0
    device = model_device(model)
    snapshot, momenta = _bn_snapshot(norms), [m.momentum for m in norms]
    used = 0
    try:
        with preserved_modes(model):
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for batch in distributed.shard(batches, group, limit=num_batches):
                model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
                used += 1
        if distributed.world(group) > 1:  # cumulative averages: weight each rank's by its batches, then add up
            mine = used
            sums = {}
            for i, m in enumerate(norms):
                sums[f"{i}/mean"] = m.running_mean.double() * mine
                sums[f"{i}/var"] = m.running_var.double() * mine
            used = int(distributed.all_reduce(torch.tensor([mine]), group))
            distributed.all_reduce_dict(sums, group)
            for i, m in enumerate(norms):
                if used:
                    m.running_mean.copy_(sums[f"{i}/mean"] / used)
                    m.running_var.copy_(sums[f"{i}/var"] / used)
                m.num_batches_tracked.fill_(used)
        if used == 0:
            raise ValueError("reestimate_batchnorm() got no batches; pass at least one batch of training inputs")
    except BaseException:
        _bn_restore(norms, snapshot)
        raise
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return used


# ----------------------------------------------------------------------------------------------------------------
# Losses and schedules


def distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T)``, batch-averaged.

    ``teacher_T`` and ``student_T`` are the softmaxes at temperature ``T``; the ``T^2`` factor keeps gradient
    magnitudes comparable across temperatures (Hinton et al. 2015). Without teacher logits it is plain CE.
    """
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (SGD; one learning rate per epoch from ``schedule``).

    ``schedule``: ``"cosine"`` (to zero over ``epochs``) or ``"step"`` (x0.1 at 50% and 75% of ``epochs``).
    ``distill_alpha`` > 0 with a teacher mixes in knowledge distillation at ``distill_temperature``.
    ``max_batches_per_epoch`` caps an epoch (None = the whole training set). ``select_best`` loads, at the
    end, the weights of the epoch with the best validation accuracy; with ``start_candidate`` the starting model
    competes too (its validation accuracy is measured before the first epoch, as epoch 0): when no epoch beats it,
    the starting weights and BatchNorm statistics come back unchanged, so fine-tuning never returns a model that
    validates worse than the one it was given (a compensated model is often already close to the dense one, and a
    short fine-tune at a high learning rate loses accuracy). ``bn_reestimate`` then recomputes the BatchNorm
    statistics of a trained epoch's weights from up to ``bn_reestimate_batches`` un-augmented training batches. ``amp`` runs
    forward passes under bfloat16 autocast (weights and optimizer state stay float32).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    nesterov: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    label_smoothing: float = 0.0
    seed: int = 0
    max_batches_per_epoch: Optional[int] = None
    augment: bool = True
    select_best: bool = True
    start_candidate: bool = True
    bn_reestimate: bool = True
    bn_reestimate_batches: Optional[int] = 100
    amp: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}"),
            (self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}"),
            (0.0 <= self.label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.max_batches_per_epoch is None or self.max_batches_per_epoch >= 1,
             f"max_batches_per_epoch must be >= 1 or None, got {self.max_batches_per_epoch}"),
            (self.bn_reestimate_batches is None or self.bn_reestimate_batches >= 1,
             f"bn_reestimate_batches must be >= 1 or None, got {self.bn_reestimate_batches}"),
            (not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> Dict[str, object]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def lr_at_epoch(config: FinetuneConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: cosine annealing to 0, or x0.1 steps at 50% and 75% of the epochs."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(config.epochs, 1)))
    milestones = (int(0.5 * config.epochs), int(0.75 * config.epochs))
    return config.lr * 0.1 ** sum(epoch >= m for m in milestones)


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch of :func:`finetune` did (``epoch`` counts from 1)."""

    epoch: int
    lr: float
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class FinetuneResult:
    """History and outcome of :func:`finetune`; ``final_val_*`` describe the returned model. ``best_epoch`` 0 means
    the starting model won (``config.start_candidate``); ``start_val_accuracy`` is its validation accuracy."""

    history: List[EpochRecord]
    best_epoch: Optional[int]
    best_val_accuracy: Optional[float]
    final_val_loss: float
    final_val_accuracy: float
    seconds: float
    resumed_from_epoch: int
    start_val_accuracy: Optional[float] = None

    def to_dict(self) -> Dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class _RunState:
    """The mutable progress of a run: what a checkpoint stores besides the model and optimizer."""

    history: List[EpochRecord] = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_val_accuracy: Optional[float] = None
    best_state: Optional[Dict[str, torch.Tensor]] = None
    start_val_accuracy: Optional[float] = None

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def record_start(self, val_accuracy: float, model: nn.Module) -> None:
        """The starting model as candidate "epoch 0" (an epoch must beat it strictly to replace it)."""
        self.start_val_accuracy = self.best_val_accuracy = val_accuracy
        self.best_epoch = 0
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def record(self, entry: EpochRecord, model: nn.Module) -> None:
        """Append ``entry``; keep a CPU copy of the weights when the validation accuracy is a new best."""
        self.history.append(entry)
        if self.best_val_accuracy is None or entry.val_accuracy > self.best_val_accuracy:
            self.best_epoch, self.best_val_accuracy = entry.epoch, entry.val_accuracy
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON, no pickle)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Split the optimizer's per-parameter state into tensors (``optimizer/<index>/<key>``) and JSON scalars."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, object] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, scalars


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, object]
) -> None:
    """Load per-parameter state saved by :func:`_flatten_optimizer`; hyper-parameters come from the config."""
    state: Dict[int, Dict[str, object]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in scalars.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _rng_tensors() -> Dict[str, torch.Tensor]:
    tensors = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _restore_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}


def _unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in tensors.items() if name.startswith(prefix + "/")}


def _save_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: FinetuneConfig, run: _RunState,
    run_key: Optional[str] = None,
) -> None:
    """Write ``state-<epoch>.safetensors``, then commit it by atomically replacing ``checkpoint.json``."""
    optimizer_tensors, optimizer_scalars = _flatten_optimizer(optimizer)
    tensors = {**_prefixed("model", model.state_dict()), **optimizer_tensors, **_rng_tensors()}
    if run.best_state is not None:
        tensors.update(_prefixed("best", run.best_state))
    tensor_file = f"state-{run.epochs_done:04d}.safetensors"
    atomic_save_safetensors(tensors, directory / tensor_file, metadata={"format": CHECKPOINT_FORMAT})
    atomic_write_json(directory / CHECKPOINT_JSON, {
        "format": CHECKPOINT_FORMAT,
        "run_key": run_key,
        "epochs_done": run.epochs_done,
        "tensors": tensor_file,
        "config": config.to_dict(),
        "history": [asdict(entry) for entry in run.history],
        "best_epoch": run.best_epoch,
        "best_val_accuracy": run.best_val_accuracy,
        "start_val_accuracy": run.start_val_accuracy,
        "optimizer_scalars": optimizer_scalars,
    })
    for stale in directory.glob("state-*.safetensors"):
        if stale.name != tensor_file:
            stale.unlink(missing_ok=True)


def checkpoint_progress(checkpoint_dir: PathLike) -> Optional[Dict[str, object]]:
    """``{"epochs_done", "run_key", "config"}`` of the run saved in ``checkpoint_dir`` by :func:`finetune`, or
    None if it holds none (say "resuming from epoch k of run <key>" before calling finetune)."""
    path = Path(checkpoint_dir) / CHECKPOINT_JSON
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {"epochs_done": meta.get("epochs_done"), "run_key": meta.get("run_key"), "config": meta.get("config")}


def checkpoint_config(checkpoint_dir: PathLike) -> Optional[FinetuneConfig]:
    """The config of the run saved in ``checkpoint_dir`` by :func:`finetune`, or None if it holds none."""
    path = Path(checkpoint_dir) / CHECKPOINT_JSON
    if not path.is_file():
        return None
    return FinetuneConfig(**json.loads(path.read_text())["config"])


def _load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: FinetuneConfig,
    run_key: Optional[str] = None,
) -> _RunState:
    """Restore model, optimizer, RNG and run state from ``directory``; the config (and the run key, when one is
    given) must match the saved ones."""
    meta = json.loads((directory / CHECKPOINT_JSON).read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory / CHECKPOINT_JSON} is not a {CHECKPOINT_FORMAT} checkpoint")
    if run_key is not None and meta.get("run_key") != run_key:
        raise ValueError(
            f"checkpoint_dir {directory} holds fine-tuning of run {meta.get('run_key')!r}, not of run {run_key!r} "
            "(another plan, implant init, compensation, starting weights or setting); resuming it would give the "
            "other run's weights. Use a new checkpoint_dir, or delete this one to start over"
        )
    changed = {k: (v, getattr(config, k, None)) for k, v in meta["config"].items() if getattr(config, k, None) != v}
    if changed:
        details = ", ".join(f"{k}: saved {old!r} != now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"checkpoint_dir {directory} holds a run with a different config ({details}); "
            "use a new checkpoint_dir, or delete this one to start over"
        )
    tensors = load_file(str(directory / meta["tensors"]))
    try:
        model.load_state_dict(_unprefixed("model", tensors))
    except RuntimeError as error:
        raise ValueError(f"checkpoint_dir {directory} holds weights of a different model: {error}") from None
    _restore_optimizer(optimizer, tensors, meta["optimizer_scalars"])
    _restore_rng(tensors)
    best = _unprefixed("best", tensors)
    return _RunState(
        history=[EpochRecord(**entry) for entry in meta["history"]],
        best_epoch=meta["best_epoch"],
        best_val_accuracy=meta["best_val_accuracy"],
        best_state=best or None,
        start_val_accuracy=meta.get("start_val_accuracy"),
    )


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning


def _epoch_seed(seed: int, epoch: int) -> int:
    """Distinct shuffling/augmentation seed for each (seed, epoch) pair."""
    return seed * 1_000_003 + epoch


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, lr: float) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise NonFiniteLossError(
            f"training loss became {float(loss_sum)} in epoch {epoch} by batch {step} (lr={lr:g}): "
            "lower the learning rate, check the inputs for NaN/Inf, or turn off amp"
        )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Batches,
    config: FinetuneConfig,
    teacher: Optional[nn.Module],
    epoch: int,
    progress: bool,
    group: distributed.Group = None,
) -> float:
    """One pass of SGD over ``loader``; returns the mean training loss (distillation loss if a teacher is used).
    ``model`` may be a ``DistributedDataParallel`` wrapper; the loss is then averaged over every rank's samples
    (and checked for NaN on all of them together)."""
    device = model_device(model)
    lr = optimizer.param_groups[0]["lr"]
    total = min(len(loader), config.max_batches_per_epoch or len(loader))
    loss_sum = torch.zeros((), device=device)
    seen = 0
    model.train()
    bar = tqdm(itertools.islice(loader, total), total=total, desc=f"epoch {epoch}", leave=False,
               disable=None if progress else True)
    for step, (x, y) in enumerate(bar, start=1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp):
            logits = logits_of(model(x))
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = logits_of(teacher(x)).float()
        loss = distillation_loss(logits.float(), y, teacher_logits, config.distill_alpha,
                                 config.distill_temperature, config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * y.shape[0]
        seen += y.shape[0]
        if step % _FINITE_CHECK_INTERVAL == 0:
            _check_finite(distributed.all_reduce(loss_sum.detach().clone(), group), epoch, step, lr)
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}")
    sums = distributed.all_reduce(torch.stack([loss_sum.double(), torch.tensor(float(seen), device=device,
                                                                                  dtype=torch.float64)]), group)
    _check_finite(sums[0], epoch, total, lr)
    return float(sums[0]) / max(float(sums[1]), 1.0)


def _rank_loader(train_set: TensorDataset, config: FinetuneConfig, epoch: int, group: distributed.Group) -> Batches:
    """This rank's mini-batches of ``epoch``: the epoch's shuffled order is the one a single process uses (the same
    seeded permutation), cut by a ``DistributedSampler`` (position i to rank i % world, padded so every rank takes
    the same number of steps) into batches of ``batch_size / world``, so that one step of all the ranks together
    sees the samples of one single-process batch (exactly so when ``world`` divides ``batch_size`` and
    ``batch_size`` the data set); augmented with a stream of its own."""
    ranks, me = distributed.world(group), distributed.rank(group)
    images, labels = train_set.tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_epoch_seed(config.seed, epoch)))
    sampler = DistributedSampler(range(len(labels)), num_replicas=ranks, rank=me, shuffle=False)
    idx = order[torch.as_tensor(list(sampler), dtype=torch.long)].to(labels.device)
    return make_batches(TensorDataset(images[idx], labels[idx]), max(1, math.ceil(config.batch_size / ranks)),
                        shuffle=False, seed=_epoch_seed(config.seed, epoch) * 1_009 + me, augment=config.augment)


def _broadcast_run(run: _RunState, model: nn.Module, optimizer: torch.optim.Optimizer,
                   group: distributed.Group) -> _RunState:
    """Rank 0's resumed state (weights, optimizer state, history, best weights) on every rank."""
    distributed.broadcast_state(model.state_dict(), group)
    tensors, scalars = _flatten_optimizer(optimizer) if distributed.is_main(group) else (None, None)
    tensors = distributed.broadcast_tensors(tensors, group)
    scalars = distributed.broadcast_json(scalars, group)
    if not distributed.is_main(group) and (tensors or scalars):
        device = model_device(model)
        _restore_optimizer(optimizer, {k: v.to(device) for k, v in tensors.items()}, scalars)
    meta = distributed.broadcast_json({"history": [asdict(e) for e in run.history], "best_epoch": run.best_epoch,
                                       "best_val_accuracy": run.best_val_accuracy,
                                       "start_val_accuracy": run.start_val_accuracy}, group)
    best = distributed.broadcast_tensors(run.best_state if distributed.is_main(group) else None, group)
    return _RunState([EpochRecord(**e) for e in meta["history"]], meta["best_epoch"], meta["best_val_accuracy"],
                     best or None, meta["start_val_accuracy"])


def finetune(
    model: nn.Module,
    train_data: TensorDataset,
    val_data: TensorDataset,
    config: FinetuneConfig,
    teacher: Optional[nn.Module] = None,
    checkpoint_dir: Optional[PathLike] = None,
    device: Device = None,
    progress: bool = True,
    log_fn: Optional[Callable[[EpochRecord], None]] = None,
    run_key: Optional[str] = None,
    group: distributed.Group = None,
) -> FinetuneResult:
    """Train ``model`` in place with SGD (plus distillation from ``teacher``) and return the run's history.

    Each epoch: set the learning rate from ``config.schedule``, one pass over shuffled (optionally augmented)
    ``train_data``, evaluate on ``val_data``, write a checkpoint to ``checkpoint_dir`` (if given), call
    ``log_fn(record)``. A later call with the same ``checkpoint_dir`` and config resumes after the last
    completed epoch and ends with the same weights as an uninterrupted run. At the end, the best-validation
    weights are loaded (``select_best``) and BatchNorm statistics re-estimated (``bn_reestimate``).
    A fresh run seeds torch's global RNG with ``config.seed``. The model, teacher (put in eval mode) and data
    are moved to ``device`` (default: the model's device). Raises :class:`NonFiniteLossError` if the loss diverges.

    ``run_key`` names what the config cannot see: a hash of everything that determined the starting model (plan,
    implant init, compensation, starting weights, data). It is saved with each checkpoint, and a checkpoint of
    another key is refused instead of resumed (the config alone cannot tell two such runs apart).

    With ``group`` (every rank passing the same model, data and config; see :mod:`haprune.distributed`): the ranks
    must hold bit-identical models (checked first); each trains a ``DistributedDataParallel`` replica on its
    ``DistributedSampler`` share of every epoch, in batches of ``batch_size / world``; validation is sharded and
    all-reduced; only rank 0 reads and writes ``checkpoint_dir`` and broadcasts what it resumed, so a run killed on
    N processes resumes on M (the checkpoint does not depend on N). ``log_fn`` is called on rank 0 only. Every rank
    returns the same weights and result.
    """
    target = torch.device(device) if device is not None else model_device(model)
    model.to(target)
    train_set, val_set = as_image_dataset(train_data).to(target), as_image_dataset(val_data).to(target)
    use_teacher = teacher is not None and config.distill_alpha > 0
    if use_teacher:
        teacher.to(target).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.nesterov)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    main = distributed.is_main(group)
    ranks = distributed.world(group)
    resume = distributed.broadcast_json(directory is not None and (directory / CHECKPOINT_JSON).is_file()
                                        if main else None, group)
    if resume:
        run = distributed.raise_together(
            lambda: _load_checkpoint(directory, model, optimizer, config, run_key) if main else _RunState(), group)
    else:
        torch.manual_seed(config.seed)
        run = _RunState()
    net: nn.Module = model
    if ranks > 1:
        run = _broadcast_run(run, model, optimizer, group)
        torch.manual_seed(config.seed * 1_009 + distributed.rank(group) + 7_919 * run.epochs_done)
        distributed.check_identical(model, group, "model to fine-tune")
        net = DistributedDataParallel(model, process_group=group)
    resumed_from = run.epochs_done
    started = time.perf_counter()
    if run.epochs_done == 0 and config.epochs > 0 and config.select_best and config.start_candidate:
        run.record_start(evaluate(model, val_set, group=group)["accuracy"], model)
    for epoch in range(run.epochs_done, config.epochs):
        epoch_start = time.perf_counter()
        lr = lr_at_epoch(config, epoch)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if ranks > 1:
            loader = _rank_loader(train_set, config, epoch, group)
        else:
            loader = make_batches(train_set, config.batch_size, shuffle=True, seed=_epoch_seed(config.seed, epoch),
                                  augment=config.augment)
        train_loss = _train_epoch(net, optimizer, loader, config, teacher if use_teacher else None,
                                  epoch + 1, progress and main, group)
        val = evaluate(model, val_set, group=group)
        seconds = time.perf_counter() - epoch_start
        if ranks > 1:  # the slowest rank's time, the same figure on every rank
            seconds = float(distributed.all_reduce_max(torch.tensor([seconds], dtype=torch.float64), group))
        entry = EpochRecord(epoch + 1, lr, train_loss, val["loss"], val["accuracy"], seconds)
        run.record(entry, model)
        if directory is not None:
            distributed.on_main(lambda: _save_checkpoint(directory, model, optimizer, config, run, run_key), group)
        if log_fn is not None and main:
            log_fn(entry)
    if config.select_best and run.best_state is not None:
        model.load_state_dict(run.best_state)
    kept_start = config.select_best and run.best_epoch == 0
    if config.bn_reestimate and not kept_start:
        bn_batches = make_batches(train_set, config.batch_size, shuffle=True, seed=config.seed)
        reestimate_batchnorm(model, bn_batches, config.bn_reestimate_batches, group=group)
    final = evaluate(model, val_set, group=group)
    previous_seconds = sum(entry.seconds for entry in run.history[:resumed_from])
    return FinetuneResult(
        history=list(run.history),
        best_epoch=run.best_epoch,
        best_val_accuracy=run.best_val_accuracy,
        final_val_loss=final["loss"],
        final_val_accuracy=final["accuracy"],
        seconds=previous_seconds + time.perf_counter() - started,
        resumed_from_epoch=resumed_from,
        start_val_accuracy=run.start_val_accuracy,
    )


# ----------------------------------------------------------------------------------------------------------------
# Weight files: :func:`save_weights` and :func:`load_checkpoint_weights` live in :mod:`haprune.io` (with every other
# file format) and are re-exported here, imported on first use (io imports apply, which imports this module).

_MOVED_TO_IO = ("save_weights", "load_checkpoint_weights")


def __getattr__(name: str):
    if name in _MOVED_TO_IO:
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EpochRecord",
    "checkpoint_config",
    "checkpoint_progress",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "distillation_loss",
    "evaluate",
    "finetune",
    "load_checkpoint_weights",
    "lr_at_epoch",
    "model_device",
    "preserved_modes",
    "reestimate_batchnorm",
    "save_weights",
]
