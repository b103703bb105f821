"""How fast `haprune` answers `--help`, an argument error, and every bad argument of `haprune prune`.

Issue 15.11: `haprune --help` and an argument error must answer in under 1 s (torch is imported only when a command
runs). Issue 18.7: every bad argument of `haprune prune` must fail in under 2 s of work, before any sensitivity
pass. Each case runs `python -m haprune.cli ...` in a fresh process (best of --repeats) and records its exit code,
the first line of its message, its wall-clock time and its CPU time (user + system of the child: "work", which on
a shared machine is steadier than wall-clock time). Uses checkpoints/resnet20-fmnist.safetensors and the installed
Fashion-MNIST (Debian dataset-fashion-mnist).

    python benchmarks/cli_startup.py              # writes docs/results/cli_startup.json, the table in docs/reliability.md
    python benchmarks/cli_startup.py --table-only # only rewrites the table from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from haprune._fileio import atomic_write_json  # noqa: E402

OUT = ROOT / "docs" / "results" / "cli_startup.json"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- cli_startup table: benchmarks/cli_startup.py -->", "<!-- end cli_startup table -->"
WEIGHTS = ROOT / "checkpoints" / "resnet20-fmnist.safetensors"
WEIGHTS56 = ROOT / "checkpoints" / "resnet56-fmnist.safetensors"


def cases(tmp: Path) -> list[tuple[str, list[str], float]]:
    """(name, arguments, limit in CPU seconds)."""
    (tmp / "a_file").write_text("x")
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "truncated.safetensors").write_bytes(WEIGHTS.read_bytes()[:4096])
    good = ["--model", "resnet20", "--weights", str(WEIGHTS), "--out", str(tmp / "run"), "--target", "0.5",
            "--quiet"]

    def prune(*change: str) -> list[str]:
        args = list(good)
        for flag, value in zip(change[::2], change[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        return ["prune", *args]

    return [
        ("baseline: python -c 'import torch' (no haprune)", ["-c", "import torch"], 99.0),
        ("--help", ["--help"], 1.0),
        ("prune --help", ["prune", "--help"], 1.0),
        ("argument error (--target x)", prune("--target", "x"), 1.0),
        ("unknown model", prune("--model", "resnet99"), 1.0),
        ("--target 1.5", prune("--target", "1.5"), 2.0),
        ("--implant-ratio 2", prune("--implant-ratio", "2"), 2.0),
        ("--max-layer-ratio 0", prune("--max-layer-ratio", "0"), 2.0),
        ("--calib-batches 0", prune("--calib-batches", "0"), 2.0),
        ("--lr -1", prune("--lr", "-1"), 2.0),
        ("--tol with --reliability", prune("--tol", "0.1", "--reliability", "0.9"), 2.0),
        ("--latency-table without --budget latency", prune("--latency-table", "t.json"), 2.0),
        ("--out is a file", prune("--out", str(tmp / "a_file")), 2.0),
        ("--out not writable", prune("--out", "/proc/haprune-run"), 2.0),
        ("weights missing", prune("--weights", str(tmp / "none.safetensors")), 2.0),
        ("weights empty", prune("--weights", str(tmp / "empty.safetensors")), 2.0),
        ("weights truncated", prune("--weights", str(tmp / "truncated.safetensors")), 2.0),
        ("resnet56 weights as resnet20", prune("--weights", str(WEIGHTS56)), 2.0),
        ("--ignore names no layer", prune("--ignore", "layer9.conv"), 2.0),
        ("--model-file not a file", ["prune", "--model-file", "nowhere.py:make", *good[2:]], 2.0),
    ]


def time_one(args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, *args] if args[:1] == ["-c"] else [sys.executable, "-m", "haprune.cli", *args]
    res = subprocess.run(command, capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    message = next((ln for ln in lines if "error:" in ln), lines[0] if lines else "")
    return {"exit": res.returncode, "message": message[:200], "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "traceback": "Traceback" in res.stderr}


def markdown(result: dict) -> str:
    """The table of docs/reliability.md, from the JSON."""
    lines = [f"Measured {result.get('measured_at', '?')} on {result['cpu_count']} cores at load average "
             f"{result['load_average'][0]:.1f} (other jobs running), best of {result['repeats']} runs per case. "
             "CPU = user + system seconds of the `haprune` process; wall time on this shared machine is dominated "
             "by waiting for a core.", "",
             "| Case | Exit | CPU s | Wall s | Within limit (CPU) | Message |", "|---|---|---|---|---|---|"]
    for r in result["cases"]:
        msg = r["message"].replace("|", "\\|")
        for tmp in {a for a in r["args"] if a.startswith("/tmp/")}:
            msg = msg.replace(str(Path(tmp).parent), "<tmp>")
        limit = "-" if r["limit_cpu_s"] >= 99 else f"{'yes' if r['ok'] else 'NO'} (< {r['limit_cpu_s']:g} s)"
        lines.append(f"| {r['case']} | {r['exit']} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {limit} | {msg[:110]} |")
    lines.append("")
    over = [r["case"] for r in result["cases"] if not r["ok"]]
    lines.append(f"All cases within their limits: {'yes' if not over else 'no, over: ' + '; '.join(over)}.")
    return "\n".join(lines)


def write_table(result: dict) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC} has no {BEGIN} ... {END} block; table not written")
        return
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    from haprune._fileio import atomic_write_text

    atomic_write_text(DOC, f"{head}{BEGIN}\n{markdown(result)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the fastest is kept")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table of docs/reliability.md from "
                        "the JSON without measuring")
    a = parser.parse_args()
    if a.table_only:
        write_table(json.loads(a.out.read_text()))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, limit in cases(Path(tmp)):
            runs = [time_one(args) for _ in range(a.repeats)]
            best = min(runs, key=lambda r: r["cpu_s"])
            row = {"case": name, "args": args, "limit_cpu_s": limit, **best,
                   "wall_s_all": [r["wall_s"] for r in runs], "cpu_s_all": [r["cpu_s"] for r in runs],
                   "ok": best["cpu_s"] < limit and not best["traceback"]
                   and (best["exit"] == 0 if "help" in name or args[:1] == ["-c"] else best["exit"] == 2)}
            rows.append(row)
            print(f"{name:45s} exit {row['exit']}  cpu {row['cpu_s']:.2f} s  wall {row['wall_s']:.2f} s  "
                  f"{'ok' if row['ok'] else 'OVER'}  {row['message'][:90]}")
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
              "load_average": list(os.getloadavg()), "repeats": a.repeats, "cases": rows,
              "all_ok": all(r["ok"] for r in rows)}
    atomic_write_json(a.out, result)
    write_table(result)
    print(f"all within their limits: {result['all_ok']} -> {a.out}, {DOC}")


if __name__ == "__main__":
    main()
