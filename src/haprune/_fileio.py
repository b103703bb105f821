"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn write.

Every writer puts the bytes into a temporary file in the destination's own directory (so the final rename
stays on one file system), flushes and fsyncs it, then ``os.replace``-s it over the destination.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:  # torch is imported only by the function that needs it: the CLI answers --help without it
    import torch


PathLike = Union[str, "os.PathLike[str]"]
_FILE_MODE = 0o644  # mkstemp creates 0o600; written files should be as readable as ones made by open()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating missing parent directories."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON (indent 2, keys in insertion order, trailing newline) to ``path`` atomically.

    ``allow_nan=False`` raises ValueError instead of writing ``NaN`` / ``Infinity`` tokens (not valid JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=allow_nan) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None
) -> None:
    """Save ``tensors`` as a safetensors file at ``path`` atomically.

    Tensors are detached, moved to the CPU and made contiguous first; ``metadata`` values must be strings.
    """
    from safetensors.torch import save as _safetensors_bytes

    plain: Dict[str, "torch.Tensor"] = {
        name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()
    }
    atomic_write_bytes(path, _safetensors_bytes(plain, metadata=dict(metadata) if metadata else None))


def read_safetensors_header(path: PathLike) -> Dict[str, Any]:
    """The JSON header of a safetensors file, checked to describe the whole file, without importing torch.

    Returns ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``. Raises ValueError, naming the
    file, when it is empty, truncated, padded, or not safetensors at all (the cheap check the command line runs
    before the seconds of importing torch)."""
    target = Path(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{target} is not a readable safetensors file ({why}); pass the .safetensors file of the "
                          "trained model, or re-save it")

    size = target.stat().st_size
    if size < 8:
        raise bad("empty" if size == 0 else f"only {size} bytes")
    with open(target, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        if n > size - 8 or n > 100_000_000:
            raise bad(f"header length {n} does not fit a file of {size} bytes: truncated or not safetensors")
        raw = handle.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or not isinstance(entry.get("dtype"), str)):
            raise bad(f"malformed entry for tensor {name!r}")
        end = max(end, offsets[1])
    if end != size - 8 - n:
        raise bad(f"the header describes {end} bytes of tensor data but {size - 8 - n} follow: truncated or damaged")
    return header


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on file systems that need the directory fsynced (best effort: not all platforms can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- run folders

RUN_FILE = "run.json"  # written into every run folder by run_folder: its run id and when it was completed
_WORK_SUFFIX = ".haprune"  # the hidden sibling ``.<name>.haprune`` of a run folder: lock, staging, checkpoints
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


class RunFolderError(Exception):
    """A run folder cannot be written (not a folder, not writable, locked by another process, not a run)."""


def work_dir(out: PathLike) -> Path:
    """The hidden sibling ``.<name>.haprune`` of run folder ``out`` (lock, staging folders, checkpoints)."""
    final = Path(os.path.abspath(out))
    return final.parent / f".{final.name}{_WORK_SUFFIX}"


def new_run_id() -> str:
    """A fresh run id: UTC time plus 8 random hex digits, e.g. ``20261202T0901-3fa2c1d0``."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


class RunFolder:
    """What :func:`run_folder` yields: write the run into :attr:`path`; it becomes :attr:`final` on success.

    Attributes:
        path: the staging folder (a fresh, empty folder beside the final one) to write every file into.
        final: the run folder the caller asked for (``--out``).
        run_id: this run's id; stamp it into the files that must be read together (the library writes it to
            ``run.json`` itself).
        work: the hidden sibling holding the lock, staging folders and checkpoints.
    """

    def __init__(self, path: Path, final: Path, run_id: str, work: Path) -> None:
        self.path, self.final, self.run_id, self.work = path, final, run_id, work

    def checkpoint_dir(self, key: str) -> Path:
        """A folder for resumable checkpoints of the run keyed ``key`` (e.g. a hash of every setting that
        determines it). It lives outside the staging folder, so it survives an interrupted run, and is removed
        when a run completes."""
        if not key or any(c in key for c in "/\\.") or len(key) > 128:
            raise ValueError(f"checkpoint key must be a short name without '/', '\\\\' or '.', got {key!r}")
        return self.work / f"checkpoint-{key}"

    def __repr__(self) -> str:
        return f"RunFolder(final={str(self.final)!r}, run_id={self.run_id!r})"


def looks_like_run(folder: Path, markers: Sequence[str]) -> bool:
    """Whether ``folder`` holds one of the ``markers`` (files a run writes), i.e. may be replaced by a new run."""
    return any((folder / m).exists() for m in markers)


@contextmanager
def run_folder(out: PathLike, *, markers: Sequence[str] = (RUN_FILE, "report.json", "plan.json"),
               keep_checkpoints: bool = False) -> Iterator[RunFolder]:
    """Write a run folder as a unit: the files appear together, or not at all.

    Inside the block, write into ``rf.path``, a fresh staging folder in ``.<name>.haprune/`` beside ``out``.
    When the block ends normally the staging folder replaces ``out`` in one rename (Linux: an atomic exchange;
    elsewhere two renames, undone on the next call if interrupted between them) and the previous run is deleted
    only then; ``run.json`` (run id, completion time) is written last into the staging folder. When the block
    raises (or the process dies), ``out`` is left as it was: the complete previous run, or nothing.

    Checked before the caller does any work (so call this first):
    ``out`` must not be a file, must be a previous run (holding one of ``markers``) or an empty or missing
    folder, and its parent must be writable. A lock on ``out`` (``flock`` on ``.<name>.haprune/lock``) makes a
    second writer fail at once with :class:`RunFolderError`; staging folders left by killed runs are removed.
    Checkpoint folders (:meth:`RunFolder.checkpoint_dir`) survive a failed run, for resuming, and are removed
    after a successful one unless ``keep_checkpoints``.
    """
    final = Path(os.path.abspath(out))
    if final.exists() and not final.is_dir():
        raise RunFolderError(f"--out {out} is an existing file, not a folder; choose a new folder name")
    if final.is_dir() and any(final.iterdir()) and not looks_like_run(final, markers):
        raise RunFolderError(f"--out {out} is a folder with other files in it (not a haprune run: no "
                             f"{' or '.join(markers)}); haprune replaces its --out as a whole, so choose a new or "
                             "empty folder")
    work = work_dir(final)
    try:
        lock_fd = _acquire_lock(work, out)
    except PermissionError as e:
        raise RunFolderError(f"cannot write --out {out}: permission denied ({e.filename}); choose a folder you "
                             "can write to") from None
    except OSError as e:
        if isinstance(e, RunFolderError):
            raise
        raise RunFolderError(f"cannot write --out {out}: {e.strerror or e} ({e.filename or work}); choose "
                             "another folder") from None
    staging = None
    try:
        _recover_interrupted_swap(work, final)
        for orphan in list(work.glob("tmp-*")) + list(work.glob("old-*")):
            shutil.rmtree(orphan, ignore_errors=True)
        run_id = new_run_id()
        staging = work / f"tmp-{run_id}"
        staging.mkdir()
        rf = RunFolder(staging, final, run_id, work)
        yield rf
        atomic_write_json(staging / RUN_FILE, {"run_id": run_id, "completed_at":
                                               time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _swap_into_place(staging, final, work / f"old-{run_id}")
        staging = None
        if not keep_checkpoints:
            for ckpt in work.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _release_lock(lock_fd, work)


def _acquire_lock(work: Path, shown: PathLike) -> int:
    """Open and lock ``work/lock`` (creating ``work``); raise RunFolderError when another process holds it."""
    for _ in range(20):
        work.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the holder removed the folder between our mkdir and open: try again
            continue
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(f"another haprune process ({holder}) is writing --out {shown}; wait for it to "
                                 "finish, or choose another --out")
        try:  # the holder may have unlinked the lock file just before we locked it: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(work / "lock").st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S', time.gmtime())} UTC".encode())
            return fd
        os.close(fd)
    raise RunFolderError(f"could not take the lock on --out {shown}; try again")


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
    except (OSError, AttributeError):
        return "pid unknown"


def _release_lock(fd: int, work: Path) -> None:
    """Remove the work folder when only the lock is left in it (while still holding the lock), then unlock."""
    try:
        if [p.name for p in work.iterdir()] == ["lock"]:
            (work / "lock").unlink()
            work.rmdir()
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_into_place(staging: Path, final: Path, old: Path) -> None:
    """Put the complete ``staging`` folder at ``final``; the previous ``final`` is deleted only afterwards."""
    if final.is_dir():
        if _exchange(staging, final):  # now staging holds the previous run
            _fsync_directory(final.parent)
            shutil.rmtree(staging, ignore_errors=True)
            return
        os.replace(final, old)  # interrupted here: _recover_interrupted_swap puts ``old`` back
    os.replace(staging, final)
    _fsync_directory(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_swap(work: Path, final: Path) -> None:
    """After a kill between the two renames of :func:`_swap_into_place`, put the previous run back in place."""
    olds = sorted(work.glob("old-*"))
    if olds and not final.exists():
        os.replace(olds[-1], final)


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
           "read_safetensors_header", "RUN_FILE",
           "RunFolder", "RunFolderError", "looks_like_run", "new_run_id", "run_folder", "work_dir"]
