"""Process-group helpers for running haprune on several processes (``torchrun``), built on ``torch.distributed``.

Every function takes a ``group`` (a ``torch.distributed`` process group, e.g. the one :func:`init_from_env`
returns); ``group=None`` means *this process alone*, even where a default process group exists (unlike
``torch.distributed``'s own convention), so that nothing is spread over processes unless asked. Then the world
has one process, reductions return their input, broadcasts return the object, and :func:`shard` yields
everything. The core (estimate, apply, recover)
takes an optional ``group`` argument and calls these helpers; this module imports nothing of haprune but the
atomic file writers.

The contract of the distributed pipeline: every rank is handed the *same* data (the full calibration set, the
full training set) and the same model; each rank works on its round-robin :func:`shard` (item ``i`` goes to
rank ``i % world``), and sums are all-reduced before dividing by the global count, so that N ranks give the
single-process result on the same data (up to floating-point summation order).

Launch (one machine, 2 processes): ``torchrun --nproc-per-node 2 -m haprune.cli prune ...``; several machines:
the same command on each with ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port`` (torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` for each process; :func:`init_from_env`
reads them).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "world", "rank", "is_main", "init_from_env", "env_group", "shutdown", "shard", "shard_indices",
           "all_reduce", "all_reduce_dict", "all_reduce_max", "all_reduce_min", "broadcast_json", "all_gather_json",
           "broadcast_state", "broadcast_tensors", "barrier", "raise_together", "check_identical", "module_digests",
           "ReplicaMismatchError", "on_main", "write_json_on_main", "scratch_run_folder", "ENV_VARS", "default_backend", "comm_device"]

T = TypeVar("T")
Group = Any  # a torch.distributed ProcessGroup, or None for this process alone

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ReplicaMismatchError(RuntimeError):
    """The ranks hold different models (or states) where they must hold identical ones."""


def is_initialized() -> bool:
    """Whether a default process group exists (``torch.distributed`` available and initialised)."""
    return dist.is_available() and dist.is_initialized()


def world(group: Group = None) -> int:
    """Processes in ``group`` (1 for None or without torch.distributed initialised)."""
    return dist.get_world_size(group) if group is not None and is_initialized() else 1


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 for None or without torch.distributed initialised)."""
    return dist.get_rank(group) if group is not None and is_initialized() else 0


def is_main(group: Group = None) -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank(group) == 0


def _active(group: Group) -> bool:
    return group is not None and is_initialized() and dist.get_world_size(group) > 1


def default_backend() -> str:
    """``nccl`` where CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> Group:
    """Initialise the default process group from torchrun's environment variables (once) and return it.

    Returns the world group when this process is one of several (``WORLD_SIZE`` > 1), None in a plain single
    process (no ``WORLD_SIZE``, or 1): then nothing is initialised and every helper here acts on a world of one.
    With CUDA (``nccl``), each process takes the GPU ``LOCAL_RANK``. Incomplete variables are refused with the
    list of what torchrun sets.
    """
    if is_initialized():
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    size = os.environ.get("WORLD_SIZE")
    if size is None or int(size) <= 1:
        return None
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} is set but {', '.join(missing)} are not: launch with torchrun "
                           f"(it sets {', '.join(ENV_VARS)}), or unset WORLD_SIZE to run one process")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def env_group() -> Group:
    """The group of every process when torch.distributed is initialised with more than one (as
    :func:`init_from_env` leaves it under torchrun), else None: what a command passes as ``group``."""
    return dist.group.WORLD if is_initialized() and dist.get_world_size() > 1 else None


def shutdown() -> None:
    """Destroy the default process group (if any)."""
    if is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ sharding

def shard_indices(count: int, group: Group = None) -> list[int]:
    """The indices ``i < count`` with ``i % world == rank``: this rank's round-robin share."""
    return list(range(rank(group), count, world(group)))


def shard(items: Iterable[T], group: Group = None, *, limit: int | None = None,
          with_index: bool = False) -> Iterator[Any]:
    """This rank's round-robin share of ``items`` (the first ``limit`` of them, all when None): item ``i`` goes to
    rank ``i % world``. With ``with_index`` yields ``(i, item)`` (``i`` the global position, e.g. to seed a
    per-item random stream that does not depend on the number of ranks). Items of other ranks are passed over
    without being touched."""
    r, n = rank(group), world(group)
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            break
        if i % n == r:
            yield (i, item) if with_index else item


# ------------------------------------------------------------------------------------------------------ reductions

def comm_device(group: Group = None) -> torch.device:
    """Where ``group``'s collectives take tensors: the current CUDA device for nccl, else the CPU."""
    if _active(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: torch.Tensor, op, group: Group) -> torch.Tensor:
    if not _active(group):
        return t
    dev = comm_device(group)
    buf = t.detach().to(dev).contiguous().clone()
    dist.all_reduce(buf, op=op, group=group)
    with torch.no_grad():
        t.copy_(buf.to(t.device))
    return t


def all_reduce(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (and returned). Without a group: ``t`` unchanged."""
    return _reduce(t, dist.ReduceOp.SUM if dist.is_available() else None, group)


def all_reduce_max(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Elementwise maximum over the ranks, in place."""
    return _reduce(t, dist.ReduceOp.MAX if dist.is_available() else None, group)


def all_reduce_min(t: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Elementwise minimum over the ranks, in place."""
    return _reduce(t, dist.ReduceOp.MIN if dist.is_available() else None, group)


def all_reduce_dict(tensors: Mapping[str, torch.Tensor], group: Group = None) -> Mapping[str, torch.Tensor]:
    """Sum every tensor of ``tensors`` over the ranks, in place, in one collective per dtype (the keys, their
    shapes and dtypes must be the same on every rank; they are taken in sorted key order)."""
    if not _active(group) or not tensors:
        return tensors
    dev = comm_device(group)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k in sorted(tensors):
        by_dtype.setdefault(tensors[k].dtype, []).append(k)
    for dtype in sorted(by_dtype, key=str):
        keys = by_dtype[dtype]
        flat = torch.cat([tensors[k].detach().reshape(-1).to(dev) for k in keys])
        dist.all_reduce(flat, group=group)
        start = 0
        with torch.no_grad():
            for k in keys:
                t = tensors[k]
                t.copy_(flat[start:start + t.numel()].view(t.shape).to(t.device))
                start += t.numel()
    return tensors


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def broadcast_json(obj: Any, group: Group = None, src: int = 0) -> Any:
    """``obj`` of rank ``src`` (a JSON-able value: a plan's ``to_dict()``) on every rank, sent as JSON bytes (no
    pickle). Other ranks may pass None. Without a group: ``obj`` itself."""
    if not _active(group):
        return obj
    dev = comm_device(group)
    payload = json.dumps(obj).encode() if rank(group) == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=dist.get_global_rank(group, src), group=group)
    buf = _bytes_tensor(payload).to(dev) if rank(group) == src else torch.empty(int(size), dtype=torch.uint8,
                                                                                 device=dev)
    dist.broadcast(buf, src=dist.get_global_rank(group, src), group=group)
    return json.loads(buf.cpu().numpy().tobytes().decode()) if rank(group) != src else obj


def all_gather_json(obj: Any, group: Group = None) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order (``[obj]`` without a group)."""
    if not _active(group):
        return [obj]
    dev = comm_device(group)
    payload = json.dumps(obj).encode()
    n = world(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64, device=dev), group=group)
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=dev)
    mine[:len(payload)] = _bytes_tensor(payload).to(dev)
    bufs = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
    dist.all_gather(bufs, mine, group=group)
    return [json.loads(b[:int(s)].cpu().numpy().tobytes().decode()) for b, s in zip(bufs, sizes)]


def broadcast_state(tensors: Mapping[str, torch.Tensor], group: Group = None, src: int = 0) -> None:
    """Copy rank ``src``'s tensors into every rank's same-named tensors, in place (e.g. a model's state dict)."""
    if not _active(group):
        return
    dev = comm_device(group)
    s = dist.get_global_rank(group, src)
    for k in sorted(tensors):
        t = tensors[k]
        buf = t.detach().to(dev).contiguous().clone()
        dist.broadcast(buf, src=s, group=group)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def broadcast_tensors(tensors: Mapping[str, torch.Tensor] | None, group: Group = None,
                      src: int = 0) -> dict[str, torch.Tensor]:
    """Rank ``src``'s named tensors on every rank (the others pass None and receive new CPU tensors of the same
    names, shapes and dtypes). Without a group: ``tensors`` itself (as a dict)."""
    if not _active(group):
        return dict(tensors or {})
    mine = rank(group) == src
    spec = broadcast_json({k: [list(t.shape), str(t.dtype).replace("torch.", "")] for k, t in (tensors or {}).items()}
                          if mine else None, group, src)
    out = {k: tensors[k].detach().cpu().clone() if mine else torch.empty(shape, dtype=getattr(torch, dtype))
           for k, (shape, dtype) in spec.items()}
    broadcast_state(out, group, src)
    return out


def barrier(group: Group = None) -> None:
    """Wait for every rank (no-op without a group)."""
    if _active(group):
        dist.barrier(group=group)


def raise_together(fn: Callable[[], T], group: Group = None) -> T:
    """Run ``fn`` (checks, loading) on every rank; if it raises on any rank, raise on every rank, so that no rank
    is left waiting in a later collective: the failing rank raises its own error, the others a RuntimeError
    naming the rank and its message. Without a group: ``fn()``."""
    if not _active(group):
        return fn()
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    messages = all_gather_json(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise RuntimeError(f"rank {r} of {len(messages)} failed: {m}")
    return result  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ replicas

def module_digests(module: torch.nn.Module) -> dict[str, str]:
    """A BLAKE2 digest of every parameter's and buffer's exact bytes (name -> hex), plus its shape and dtype."""
    out = {}
    for kind, items in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in items:
            raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            h = hashlib.blake2b(raw, digest_size=16)
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            out[f"{kind}:{name}"] = h.hexdigest()
    return out


def check_identical(module: torch.nn.Module, group: Group = None, what: str = "model") -> None:
    """Refuse (on every rank) unless every rank holds bit-identical parameters and buffers in ``module``.

    One all-gather of a 16-byte digest per rank; only on a mismatch are the per-tensor digests gathered to name
    the first tensors that differ. Call it before training replicas (DDP assumes identical starting models)."""
    if not _active(group):
        return
    digests = module_digests(module)
    total = hashlib.blake2b(json.dumps(digests, sort_keys=True).encode(), digest_size=16).hexdigest()
    everyone = all_gather_json(total, group)
    if len(set(everyone)) == 1:
        return
    tables = all_gather_json(digests, group)
    names = sorted(set().union(*tables))
    differ = [n for n in names if len({t.get(n) for t in tables}) > 1]
    raise ReplicaMismatchError(
        f"the ranks hold different {what}s ({len(differ)} tensors differ, e.g. {', '.join(differ[:3])}): every "
        "rank must start from the same weights and apply the same plan; check that every process loads the same "
        "weights file and data")


def on_main(fn: Callable[[], T], group: Group = None) -> T | None:
    """Run ``fn`` on rank 0 only (e.g. an atomic file write), then wait for every rank; the errors of ``fn`` are
    raised on every rank (:func:`raise_together`). Returns ``fn()`` on rank 0, None elsewhere."""
    return raise_together(lambda: fn() if is_main(group) else None, group)


@contextlib.contextmanager
def scratch_run_folder(group: Group = None) -> Iterator[Any]:
    """For the ranks other than 0 of a pipeline whose rank 0 writes a run folder
    (:func:`haprune._fileio.run_folder`): a throwaway folder of the same shape (``path``, ``work``,
    ``checkpoint_dir``, ``run_id``), removed afterwards. These ranks run every collective step but publish nothing
    (:func:`haprune.recover.finetune` reads and writes checkpoints on rank 0 only)."""
    from ._fileio import RunFolder

    with tempfile.TemporaryDirectory(prefix=f"haprune-rank{rank(group)}-") as tmp:
        (Path(tmp) / "run").mkdir()
        yield RunFolder(Path(tmp) / "run", Path(tmp) / "run", f"rank{rank(group)}", Path(tmp))


def write_json_on_main(path: Any, obj: Any, group: Group = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically on rank 0 only (every rank waits for it, and sees its error)."""
    from ._fileio import atomic_write_json

    on_main(lambda: atomic_write_json(path, obj), group)
