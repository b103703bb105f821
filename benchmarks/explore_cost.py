"""What `haprune explore` costs next to one `haprune prune`, and the exploration of the project's ResNet-56.

Issue 17: exploring 5 targets from one sensitivity pass must cost less than 2x one `haprune prune
--finetune-epochs 0` (which computes the same pass for one target). Both run as fresh processes, interleaved
(prune, explore, prune, explore, ...), each on an emptied sensitivity cache (each computes its own pass), with the
same calibration, evaluation-size and latency settings; the load average is recorded before and after each run
(the machine is shared). After the first round, for the committed picture, the exploration is repeated with the L2
baseline on the same axes (its hap pass reused from the cache the timed exploration wrote: the cache at work on a
real model), and `prune --from-explore --pick` fine-tunes one point briefly for the report page's screenshot.

    python benchmarks/explore_cost.py             # docs/results/explore.json/.md, docs/images/explore_resnet56.png
    python benchmarks/explore_cost.py --table-only

Model: checkpoints/resnet56-fmnist.safetensors on Fashion-MNIST (Debian dataset-fashion-mnist). Calibration:
--calib-batches x --calib-batch-size images (default 2 x 128 = 256: fewer than the 512 of the other ResNet-56
benchmarks, to keep the run short on a loaded 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from haprune._fileio import atomic_write_json, atomic_write_text  # noqa: E402

OUT = ROOT / "docs" / "results" / "explore.json"
DOC = ROOT / "docs" / "results" / "explore.md"
PICTURE = ROOT / "docs" / "images" / "explore_resnet56.png"
RUNS = ROOT / "runs" / "explore_cost"
WEIGHTS = ROOT / "checkpoints" / "resnet56-fmnist.safetensors"
TARGETS = ("0.3", "0.4", "0.5", "0.6", "0.7")


def common(args) -> list[str]:
    return ["--model", "resnet56", "--weights", str(WEIGHTS), "--calib-batches", str(args.calib_batches),
            "--calib-batch-size", str(args.calib_batch_size), "--eval-limit", str(args.eval_limit),
            "--latency-batch", "64", "--latency-repeats", str(args.latency_repeats), "--seed", "0", "--quiet"]


def timed(cmd: list[str], cache: Path) -> dict:
    env = {**os.environ, "HAPRUNE_CACHE_DIR": str(cache)}
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "haprune.cli", *cmd], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {"command": "haprune " + " ".join(cmd), "seconds": round(seconds, 1),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "stderr_tail": proc.stderr.strip().splitlines()[-6:]}


def measure(args) -> dict:
    """The interleaved rounds; the picture run and the fine-tuned pick right after the first round (the record
    is written after every step, so an interrupted run keeps what it measured)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    cache = RUNS / "cache"
    record = {"model": "resnet56", "weights": str(WEIGHTS.relative_to(ROOT)), "dataset": "fashion-mnist",
              "targets": [float(t) for t in TARGETS], "calibration_images": args.calib_batches * args.calib_batch_size,
              "eval_images": args.eval_limit, "latency_repeats": args.latency_repeats, "cpu_count": os.cpu_count(),
              "rounds": []}

    def save():
        atomic_write_json(OUT, record)
        atomic_write_text(DOC, table(record))

    for r in range(args.rounds):
        shutil.rmtree(cache, ignore_errors=True)  # each run computes its own pass (and caches it)
        prune = timed(["prune", *common(args), "--target", "0.5", "--finetune-epochs", "0",
                       "--out", str(RUNS / f"prune-{r}")], cache)
        print(f"round {r}: prune {prune['seconds']} s (load {prune['load_before'][0]})", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        explore = timed(["explore", *common(args), "--targets", *TARGETS, "--out", str(RUNS / f"explore-{r}")], cache)
        print(f"round {r}: explore {explore['seconds']} s (load {explore['load_before'][0]})", flush=True)
        sens = json.loads((RUNS / f"explore-{r}" / "explore.json").read_text())["sensitivity"]
        prune_report = json.loads((RUNS / f"prune-{r}" / "report.json").read_text())
        assert not sens["reused"] and not prune_report["sensitivity"]["cache"]["reused"]
        record["rounds"].append({"prune": prune, "explore": explore,
                                 "ratio": round(explore["seconds"] / prune["seconds"], 3),
                                 "sensitivity_seconds": {"prune": prune_report["sensitivity"]["info"]["seconds"],
                                                         "explore": sens["seconds"]}})
        if r > 0:
            save()
            continue
        # the committed picture: the same 5 targets with the L2 baseline on the same axes; the hap pass is the one
        # the timed exploration just cached (said on the terminal), only L2 and the points are computed
        picture = timed(["explore", *common(args), "--targets", *TARGETS, "--baseline", "l2",
                         "--out", str(RUNS / "explore-l2")], cache)
        print(f"explore with the L2 baseline: {picture['seconds']} s", flush=True)
        record["picture_run"] = picture
        record["explore"] = json.loads((RUNS / "explore-l2" / "explore.json").read_text())
        PICTURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RUNS / "explore-l2" / "explore.png", PICTURE)
        save()
        if args.finetune_pick:
            ft = timed(["prune", "--from-explore", str(RUNS / "explore-l2"), "--pick", args.finetune_pick,
                        "--finetune-epochs", "1", "--train-limit", str(args.train_limit), "--eval-limit",
                        str(args.eval_limit), "--latency-repeats", str(args.latency_repeats), "--quiet",
                        "--out", str(RUNS / "prune-picked")], cache)
            print(f"prune --from-explore --pick {args.finetune_pick}: {ft['seconds']} s", flush=True)
            ft["report"] = {k: json.loads((RUNS / "prune-picked" / "report.json").read_text())[k]
                            for k in ("accuracy", "params", "flops", "latency")}
            record["finetune_run"] = ft
            save()
    return record


def table(record: dict) -> str:
    ex = record["explore"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [
        "# `haprune explore` on ResNet-56 (Fashion-MNIST)",
        "",
        "Generated by `python benchmarks/explore_cost.py` (`--table-only` rewrites this page from "
        "[explore.json](explore.json)). Model `checkpoints/resnet56-fmnist.safetensors`; "
        f"{record['calibration_images']} calibration images (fewer than the 512 of the other ResNet-56 pages, to keep "
        f"the run short on a loaded 2-core machine); one-shot accuracy on {record['eval_images']} images of the "
        "validation split; CPU latency at batch 64.",
        "",
        "## Cost: 5 targets from one sensitivity pass vs one `haprune prune --finetune-epochs 0`",
        "",
        "Fresh processes, interleaved, each on an emptied sensitivity cache (each computes its own sensitivity pass). "
        "Goal: the exploration costs less than 2x the single prune.",
        "",
        "| round | prune s | explore (5 targets) s | ratio | sensitivity s (prune / explore) | load average before "
        "(prune / explore) |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["rounds"]):
        lines.append(f"| {i} | {r['prune']['seconds']:.1f} | {r['explore']['seconds']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['sensitivity_seconds']['prune']:.1f} / {r['sensitivity_seconds']['explore']:.1f} | "
                     f"{r['prune']['load_before'][0]:.2f} / {r['explore']['load_before'][0]:.2f} |")
    ratios = [r["ratio"] for r in record["rounds"]]
    verdict = "met" if max(ratios) < 2 else "not met"
    lines += ["", f"Goal (< 2x): **{verdict}** (ratios {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"{record['cpu_count']} CPUs, load averages as recorded: the machine was shared).", "",
              "## The trade-off curve", "",
              "![accuracy against parameters, FLOPs and latency remaining](../images/explore_resnet56.png)", "",
              f"`haprune explore --model resnet56 --weights checkpoints/resnet56-fmnist.safetensors --targets "
              f"{' '.join(f'{t:g}' for t in record['targets'])} --baseline l2 --out runs/explore` "
              f"({record['picture_run']['seconds']:.0f} s, load average {record['picture_run']['load_before'][0]:.2f}; "
              f"its hap pass reused from the cache the timed exploration wrote: "
              f"{'said so' if record['explore']['sensitivity']['reused'] else 'NOT reused'}).", "",
              "| criterion | target % | val accuracy % | params left % | FLOPs left % | latency left % |",
              "|---|---|---|---|---|---|",
              f"| dense | 0 | {pct(ex['dense']['accuracy'])} | 100 | 100 | 100 |"]
    for p in ex["points"]:
        if p.get("error"):
            lines.append(f"| {p['label']} | {100 * p['target']:g} | unreachable | | | |")
            continue
        lines.append(f"| {p['label']} | {100 * p['target']:g} | {pct(p['accuracy'])} | {pct(p['params']['remaining'])} "
                     f"| {pct(p['flops']['remaining'])} | {pct((p.get('latency') or {}).get('remaining'))} |")
    lines += ["", "`ggn` is HAP's score on exact GGN Hessian traces (what `--criterion auto` chose), `l2` the "
              "magnitude baseline. One-shot: pruned and BatchNorm re-estimated, no fine-tuning. Latency: each point "
              f"timed against the dense model in {record['latency_repeats']} interleaved rounds at batch 64 "
              "(deployment form) on a shared machine, so the latency fractions are noisy (neighbouring points "
              "cross); the absolute milliseconds are in the JSON.", ""]
    ft = record.get("finetune_run")
    if ft:
        acc = ft["report"]["accuracy"]
        lines += ["## Fine-tuning a chosen point", "",
                  f"`{ft['command'].replace(str(ROOT) + '/', '')}`: the exploration's sensitivity pass and plan "
                  f"reused, {ft['seconds']:.0f} s (load average {ft['load_before'][0]:.2f}); test accuracy dense "
                  f"{pct(acc['before'])}%, one-shot {pct(acc['after_oneshot'])}%, after one short epoch "
                  f"{pct(acc['after_finetune'])}% (a demonstration of the path, not a fine-tuning budget).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--calib-batches", type=int, default=2)
    ap.add_argument("--calib-batch-size", type=int, default=128)
    ap.add_argument("--eval-limit", type=int, default=2000)
    ap.add_argument("--latency-repeats", type=int, default=10)
    ap.add_argument("--finetune-pick", default="0.5", help="fine-tune this explored point briefly ('' = skip)")
    ap.add_argument("--train-limit", type=int, default=2560)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    record = json.loads(OUT.read_text()) if args.table_only else measure(args)
    atomic_write_text(DOC, table(record))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
