"""Run folders written as a unit (haprune._fileio.run_folder): interrupted writes, concurrent writers, orphans."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from haprune import _fileio
from haprune._fileio import RUN_FILE, RunFolderError, atomic_write_json, atomic_write_text, run_folder, work_dir

FILES = ("plan.json", "model.safetensors", "model.json", "report.json")


def _write_run(rf, tag: str, fail_at: int | None = None) -> None:
    """Write the four files of a fake run, each holding ``tag`` and the run id; fail before file ``fail_at``."""
    for i, name in enumerate(FILES):
        if fail_at == i:
            raise OSError(f"simulated kill before writing {name}")
        atomic_write_text(rf.path / name, json.dumps({"tag": tag, "run_id": rf.run_id}))


def _read_run(folder: Path) -> tuple[str, str]:
    """(tag, run id) of a complete run folder; asserts every file belongs to the same run."""
    assert folder.is_dir()
    stamps = {json.loads((folder / n).read_text())["run_id"] for n in FILES}
    tags = {json.loads((folder / n).read_text())["tag"] for n in FILES}
    run = json.loads((folder / RUN_FILE).read_text())
    assert len(stamps) == 1 and len(tags) == 1 and run["run_id"] in stamps, (stamps, tags, run)
    return tags.pop(), stamps.pop()


def test_a_run_appears_as_a_unit_and_replaces_the_previous_one(tmp_path):
    out = tmp_path / "run"
    with run_folder(out) as rf:
        _write_run(rf, "first")
        assert not out.exists()  # nothing visible until the block completes
    assert _read_run(out)[0] == "first"
    first_id = _read_run(out)[1]
    with run_folder(out) as rf:
        _write_run(rf, "second")
        assert _read_run(out) == ("first", first_id)  # the previous run stays complete while the new one is written
    assert _read_run(out)[0] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, staging or old folder left behind


@pytest.mark.parametrize("fail_at", range(len(FILES) + 1))
@pytest.mark.parametrize("exchange", [True, False])
def test_a_failure_at_any_write_step_leaves_the_complete_old_run(tmp_path, monkeypatch, fail_at, exchange):
    if not exchange:  # the portable two-rename path (macOS, Windows, file systems without RENAME_EXCHANGE)
        monkeypatch.setattr(_fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    with run_folder(out) as rf:
        _write_run(rf, "old")
    old = _read_run(out)
    if fail_at < len(FILES):
        with pytest.raises(OSError, match="simulated kill"):
            with run_folder(out) as rf:
                _write_run(rf, "new", fail_at=fail_at)
    else:  # the last write (run.json) fails
        def failing(path, obj, **kw):
            raise OSError("simulated kill writing run.json")
        monkeypatch.setattr(_fileio, "atomic_write_json", failing)
        with pytest.raises(OSError, match="simulated kill"):
            with run_folder(out) as rf:
                _write_run(rf, "new")
    assert _read_run(out) == old
    assert not list(work_dir(out).glob("tmp-*")) if work_dir(out).exists() else True


def test_a_kill_between_the_two_renames_is_undone_by_the_next_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(_fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    with run_folder(out) as rf:
        _write_run(rf, "old")
    old = _read_run(out)
    real_replace = os.replace

    def replace(a, b):  # the first rename (run -> old-*) happens, the second (staging -> run) is "killed"
        if Path(a).name.startswith("tmp-"):
            raise KeyboardInterrupt("simulated kill between the renames")
        return real_replace(a, b)

    monkeypatch.setattr(_fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with run_folder(out) as rf:
            _write_run(rf, "new")
    monkeypatch.setattr(_fileio.os, "replace", real_replace)
    assert not out.exists()  # the state a kill -9 at that instant leaves (the old run waits in .run.haprune/old-*)
    with run_folder(out) as rf:  # the next writer puts the old run back before anything else
        assert _read_run(out) == old
        _write_run(rf, "newer")
    assert _read_run(out)[0] == "newer"


def test_orphaned_staging_folders_are_cleaned(tmp_path):
    out = tmp_path / "run"
    orphan = work_dir(out) / "tmp-20260101T000000-deadbeef"
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half written")
    with run_folder(out) as rf:
        assert not orphan.exists()
        _write_run(rf, "x")
    assert not work_dir(out).exists()


def test_checkpoints_survive_a_failed_run_and_go_with_a_successful_one(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with run_folder(out) as rf:
            ckpt = rf.checkpoint_dir("abc123")
            ckpt.mkdir()
            raise RuntimeError("interrupted")
    assert ckpt.is_dir() and not out.exists()
    with run_folder(out) as rf:
        assert rf.checkpoint_dir("abc123") == ckpt and ckpt.is_dir()
        _write_run(rf, "x")
    assert not ckpt.exists()
    with pytest.raises(ValueError, match="checkpoint key"):
        rf.checkpoint_dir("../escape")


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    with run_folder(out) as rf:
        with pytest.raises(RunFolderError, match=r"another haprune process \(pid \d+"):
            with run_folder(out):
                pass
        _write_run(rf, "first")
    assert _read_run(out)[0] == "first"


def test_two_concurrent_processes_cannot_both_succeed(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, sys, time
        from haprune._fileio import run_folder, RunFolderError, atomic_write_text
        try:
            with run_folder({str(out)!r}) as rf:
                print("locked", flush=True)
                time.sleep(1.5)
                atomic_write_text(rf.path / "report.json", json.dumps({{"tag": sys.argv[1]}}))
        except RunFolderError as e:
            print("refused:", e); sys.exit(3)
    """)
    first = subprocess.Popen([sys.executable, "-c", script, "a"], stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, "-c", script, "b"], capture_output=True, text=True)
    assert first.wait() == 0
    assert second.returncode == 3 and "another haprune process" in second.stdout
    assert json.loads((out / "report.json").read_text())["tag"] == "a"


def test_bad_out_paths_are_refused_before_any_work(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(RunFolderError, match="existing file"):
        with run_folder(a_file):
            pass
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="other files in it"):
        with run_folder(home):
            pass
    assert (home / "thesis.tex").read_text() == "precious"
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(RunFolderError, match="permission denied"):
                with run_folder(locked / "run"):
                    pass
        finally:
            locked.chmod(0o700)


def test_atomic_write_json_can_refuse_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")}, allow_nan=False)
    assert not (tmp_path / "x.json").exists()


def test_read_safetensors_header_checks_the_whole_file_without_torch(tmp_path):
    import torch
    from safetensors.torch import save_file

    from haprune._fileio import read_safetensors_header

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(4, dtype=torch.int32)}, path, metadata={"k": "v"})
    header = read_safetensors_header(path)
    assert header["a"]["dtype"] == "F32" and header["b"]["shape"] == [4] and header["__metadata__"] == {"k": "v"}
    raw = path.read_bytes()
    for damaged, why in ((b"", "empty"), (raw[:-4], "truncated"), (raw + b"\0" * 8, "truncated or damaged"),
                         (b"\x10" + b"\0" * 7 + b"not json at all!", "not JSON"), (raw[:6], "only 6 bytes")):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"w.safetensors is not a readable safetensors file.*{why}"):
            read_safetensors_header(path)
