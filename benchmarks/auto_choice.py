"""Which curvature estimator should ``auto`` use on nets that are not piecewise linear? Pruning accuracy and time.

    python benchmarks/auto_choice.py                 # trains (or reloads) the nets, runs every ranking; resumes
    python benchmarks/auto_choice.py --tables-only   # rebuild the pages from docs/results/auto_choice.json
    python benchmarks/auto_choice.py --quick         # smoke run (20 steps, short probes) -> auto_choice_quick.json

On GELU and SiLU networks the GGN diagonal (``ggn``) and the sampled Fisher (``fisher``) are not the Hessian
diagonal, and Hutchinson's ranking needs hundreds of double-backward probes to stabilise. What matters for pruning
is not the rank correlation with the Hessian but the accuracy of the pruned model, so for each net this prunes
with every ranking and measures one-shot accuracy:

- nets: a small residual CNN (stem 8 channels, stages 8/16/32, one basic block each, BatchNorm; about 19 k
  parameters) with GELU, and the same with SiLU, trained from scratch on Fashion-MNIST for a fixed number of
  Adam steps (seed 0; a minute or two on a CPU), weights cached under ``runs/auto_choice/``;
- rankings, all from the same two calibration batches of 32 training images, ``hap`` score rule: ``auto``
  (whatever it chooses), ``ggn``, ``fisher`` (importance-sampled, seeds 0-2), ``hutchinson`` with haprune's
  defaults (split-half rank reliability 0.95, at most 300 probes), ``hutchinson_long`` (600 probes per batch:
  the reference ranking), and ``l2`` and ``random`` as floors;
- pruning: ``make_plan`` (parameters budget, 30% and 50% removed) + ``apply_plan`` + ``reestimate_batchnorm``
  (20 training batches of 128), then accuracy on the first 5000 test images (one-shot: no fine-tuning);
- time: wall-clock seconds of each ``estimate`` call (the machine is shared: read them as ratios), and Spearman /
  50% overlap against ``hutchinson_long``.

Outputs: ``docs/results/auto_choice.json`` (written after every step), ``docs/results/auto_choice.md`` and the
section "auto on nets that are not piecewise linear" of ``docs/results/performance.md`` (both from the JSON).
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from haprune import CostModel, apply_plan, make_plan
from haprune._fileio import atomic_save_safetensors, atomic_write_json, atomic_write_text
from haprune.data import batches, load_dataset
from haprune.estimate import estimate
from haprune.graph import build_structures
from haprune.recover import evaluate, reestimate_batchnorm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
OUT = RESULTS / "auto_choice.json"
MD = RESULTS / "auto_choice.md"
PERF = RESULTS / "performance.md"
RUNS = ROOT / "runs" / "auto_choice"
NETS = {"resnet-gelu": nn.GELU, "resnet-silu": nn.SiLU}
TRAIN_STEPS, TRAIN_BATCH, LR = 400, 128, 3e-3
CALIB_BATCHES, CALIB_BATCH = 2, 32
TEST_IMAGES = 5000
TARGETS = (0.3, 0.5)
# ranking name -> (criterion, options, seeds)
RANKINGS = {
    "auto": ("auto", {}, [0]),
    "ggn": ("ggn", {}, [0]),
    "fisher": ("fisher", {}, [0, 1, 2]),
    "l2": ("l2", {}, [0]),
    "random": ("random", {}, [0]),
    "hutchinson": ("hutchinson", {}, [0]),
    "hutchinson_long": ("hutchinson", {"min_probes": 600, "max_probes": 600}, [0]),
}
REFERENCE = "hutchinson_long"
SECTION_START, SECTION_END = "<!-- auto_choice:start -->", "<!-- auto_choice:end -->"


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = act()
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))) + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, act: type[nn.Module], widths=(8, 16, 32), classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.act = act()
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(Block(c, w, 1 if i == 0 else 2, act))
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layers(self.act(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_result() -> dict:
    if OUT.exists():
        import json

        return json.loads(OUT.read_text())
    return {"nets": {}}


def trained(name: str, data) -> tuple[nn.Module, dict]:
    """The net, trained for TRAIN_STEPS Adam steps (seed 0), from the cache when it is there."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = SmallResNet(NETS[name])
    path = RUNS / f"{name}.safetensors"
    if path.exists():
        net.load_state_dict(load_file(str(path)))
        return net.eval(), {"cached": True}
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=TRAIN_STEPS)
    net.train()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < TRAIN_STEPS:
        for x, y in batches(data.train, TRAIN_BATCH, shuffle=True, seed=100 + epoch, drop_last=True):
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log(f"{name}: step {step} loss {loss.item():.3f}")
            if step >= TRAIN_STEPS:
                break
        epoch += 1
    atomic_save_safetensors(net.state_dict(), path)
    return net.eval(), {"cached": False, "train_seconds": round(time.perf_counter() - start, 1)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy())[0])


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    half = len(a) // 2
    return len(set(a.argsort()[:half].tolist()) & set(b.argsort()[:half].tolist())) / half


def run(nets: list[str] | None = None) -> dict:
    torch.set_num_threads(1)
    result = load_result()
    data = load_dataset("fashion-mnist")
    test = torch.utils.data.TensorDataset(*(t[:TEST_IMAGES] for t in data.test.tensors))
    calib = list(batches(data.train, CALIB_BATCH, shuffle=True, seed=0, limit=None))[:CALIB_BATCHES]
    bn_batches = list(batches(data.train, 128, shuffle=True, seed=1))[:20]
    for name in nets or list(NETS):
        entry = result["nets"].setdefault(name, {"rankings": {}})
        net, train_info = trained(name, data)
        example = calib[0][0][:1]
        structures = build_structures(net, example)
        cost = CostModel(net, structures, example)
        if "dense_accuracy" not in entry:
            entry.update(train_info if not train_info["cached"] else {})
            entry.update({"params": sum(p.numel() for p in net.parameters()), "structures": structures.num_structures,
                          "groups": len(list(structures)), "dense_accuracy": evaluate(net, test)["accuracy"],
                          "train_steps": TRAIN_STEPS})
            save(result, name)
        log(f"{name}: dense accuracy {entry['dense_accuracy']:.4f}, {structures.num_structures} structures")
        for rname, (criterion, options, seeds) in RANKINGS.items():
            for seed in seeds:
                key = f"{rname}/s{seed}"
                if key in entry["rankings"]:
                    continue
                t0 = time.perf_counter()
                sens = estimate(net, structures, calib, criterion, seed=seed, progress=False, **options)
                seconds = time.perf_counter() - t0
                rec = {"criterion": sens.criterion, "seconds": round(seconds, 3),
                       "scores": sens.scores.tolist(), "accuracy": {}}
                for k in ("probes_per_batch", "reliability_per_batch", "stopped_by", "gradients"):
                    if k in sens.info:
                        rec[k] = sens.info[k]
                if "auto" in sens.info:
                    rec["auto"] = {k: sens.info["auto"][k] for k in ("chose", "why", "double_backward")}
                for target in TARGETS:
                    plan = make_plan(structures, sens.scores, cost, target, criterion=sens.criterion, seed=seed)
                    pruned = apply_plan(net, plan, example, structures=structures)
                    reestimate_batchnorm(pruned, bn_batches)
                    rec["accuracy"][str(target)] = evaluate(pruned, test)["accuracy"]
                entry["rankings"][key] = rec
                log(f"{name} {key}: {sens.criterion} {seconds:.1f} s, one-shot {rec['accuracy']}")
                save(result, name)
    result["setup"] = {"train_steps": TRAIN_STEPS, "train_batch": TRAIN_BATCH, "lr": LR,
                       "calibration": f"{CALIB_BATCHES} x {CALIB_BATCH}", "targets": list(TARGETS),
                       "torch": torch.__version__, "python": platform.python_version(), "threads": 1}
    save(result)
    return result


def save(result: dict, net: str | None = None) -> None:
    """Write the JSON; with ``net``, only that net's entry changes (one process per net may run at once)."""
    if net is not None:
        current = load_result()
        current["nets"][net] = result["nets"][net]
        for k, v in result.items():
            if k != "nets":
                current[k] = v
        result = current
    atomic_write_json(OUT, result)


def reference(entry: dict) -> str | None:
    """The reference ranking: ``hutchinson_long`` when it ran, else the default ``hutchinson`` (rank stop)."""
    for name in (REFERENCE, "hutchinson"):
        if f"{name}/s0" in entry["rankings"]:
            return name
    return None


def summary(entry: dict) -> dict[str, dict]:
    """Per ranking: median seconds, median accuracy per target (and range over seeds), quality vs reference."""
    ref = entry["rankings"].get(f"{reference(entry)}/s0")
    ref_scores = torch.tensor(ref["scores"]) if ref else None
    rows: dict[str, dict] = {}
    for rname in RANKINGS:
        recs = [r for k, r in entry["rankings"].items() if k.split("/")[0] == rname]
        if not recs:
            continue
        row = {"criterion": recs[0]["criterion"], "runs": len(recs),
               "seconds": statistics.median(r["seconds"] for r in recs), "accuracy": {}}
        for t in TARGETS:
            accs = [r["accuracy"][str(t)] for r in recs]
            row["accuracy"][str(t)] = (statistics.median(accs), min(accs), max(accs))
        if ref_scores is not None and recs[0] is not ref:
            row["spearman"] = statistics.median(spearman(torch.tensor(r["scores"]), ref_scores) for r in recs)
            row["overlap"] = statistics.median(overlap(torch.tensor(r["scores"]), ref_scores) for r in recs)
        for k in ("probes_per_batch", "stopped_by", "auto"):
            if k in recs[0]:
                row[k] = recs[0][k]
        rows[rname] = row
    return rows


def _acc(a: tuple[float, float, float], runs: int) -> str:
    med, lo, hi = a
    return f"{100 * med:.1f}" + (f" ({100 * lo:.1f}-{100 * hi:.1f})" if runs > 1 else "")


def tables(result: dict) -> str:
    lines = []
    for name, entry in result["nets"].items():
        rows = summary(entry)
        if not rows:
            continue
        lines += [f"### {name}", "",
                  f"{entry['params']:,} parameters, {entry['groups']} groups, {entry['structures']} structures; "
                  f"dense test accuracy {100 * entry['dense_accuracy']:.2f}% after {entry['train_steps']} Adam steps.",
                  "", "| ranking | what ran | seconds | x fisher time | one-shot acc. 30% removed | one-shot acc. 50% "
                  f"removed | Spearman vs `{reference(entry)}` | 50% overlap |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        base = rows.get("fisher", {}).get("seconds")
        for rname, row in rows.items():
            what = row["criterion"]
            if "probes_per_batch" in row:
                what += f", probes {row['probes_per_batch']}"
                if "stopped_by" in row:
                    what += f" ({', '.join(sorted(set(row['stopped_by'])))})"
            if row["runs"] > 1:
                what += f", {row['runs']} seeds"
            ratio = f"{row['seconds'] / base:.1f}" if base else "-"
            sp = f"{row['spearman']:.3f}" if "spearman" in row else "-"
            ov = f"{row['overlap']:.3f}" if "overlap" in row else "-"
            lines.append(f"| `{rname}` | {what} | {row['seconds']:.2f} | {ratio} | "
                         f"{_acc(row['accuracy']['0.3'], row['runs'])} | {_acc(row['accuracy']['0.5'], row['runs'])} "
                         f"| {sp} | {ov} |")
        lines.append("")
    return "\n".join(lines)


def findings(result: dict) -> list[str]:
    """Plain statements computed from the numbers (no hand-written claims)."""
    out = []
    for name, entry in result["nets"].items():
        rows = summary(entry)
        if not {"fisher", "ggn", "hutchinson"} <= set(rows):
            continue
        f, g, h = rows["fisher"], rows["ggn"], rows["hutchinson"]
        hl = rows.get(REFERENCE)
        for t in ("0.3", "0.5"):
            long = f", hutchinson_long {100 * hl['accuracy'][t][0]:.1f}% ({hl['seconds']:.0f} s)" if hl else ""
            out.append(
                f"- **{name}, {int(float(t) * 100)}% of parameters removed**: one-shot accuracy fisher "
                f"{100 * f['accuracy'][t][0]:.1f}% (seeds {100 * f['accuracy'][t][1]:.1f}-{100 * f['accuracy'][t][2]:.1f}) "
                f"in {f['seconds']:.1f} s, ggn {100 * g['accuracy'][t][0]:.1f}% in {g['seconds']:.1f} s, hutchinson "
                f"(default rank stop, probes {h.get('probes_per_batch')}) {100 * h['accuracy'][t][0]:.1f}% in "
                f"{h['seconds']:.0f} s ({h['seconds'] / f['seconds']:.0f}x fisher's time){long}.")
        if "auto" in rows:
            out.append(f"- **{name}**: `auto` chose `{rows['auto']['criterion']}` "
                       f"({rows['auto'].get('auto', {}).get('why', '')}) in {rows['auto']['seconds']:.1f} s.")
    return out


def section(result: dict) -> str:
    setup = result.get("setup", {})
    return "\n".join([
        SECTION_START,
        "## auto on nets that are not piecewise linear: pruning accuracy per second",
        "",
        "Generated by `python benchmarks/auto_choice.py` (`--tables-only` rebuilds it from "
        "`docs/results/auto_choice.json`). Where a net has GELU / SiLU (or any op not piecewise linear in each "
        "parameter) the GGN diagonal is not the Hessian diagonal, and `auto` used to run Hutchinson there (up to "
        "300 double-backward probes per batch, minutes on small nets). This measures what matters for pruning: "
        "one-shot test accuracy (after `make_plan` + `apply_plan` + `reestimate_batchnorm`, no fine-tuning) of "
        "nets pruned with each ranking, and the time of each ranking. Nets trained here from scratch on "
        f"Fashion-MNIST ({setup.get('train_steps', TRAIN_STEPS)} Adam steps, seed 0), calibration "
        f"{setup.get('calibration', f'{CALIB_BATCHES} x {CALIB_BATCH}')} training images, parameters budget, 1 thread on a shared 2-core machine "
        "(read times as ratios), accuracy on the first 5000 test images. The rank columns compare with "
        "`hutchinson_long` (600 probes per batch) where it ran, else with the default `hutchinson` run.",
        "",
        *findings(result),
        *[f"- **{n}**: not measured yet (`python benchmarks/auto_choice.py --nets {n}` adds it; resumes)."
          for n in NETS if not result["nets"].get(n, {}).get("rankings")],
        "",
        tables(result),
        "The `auto` rows of the GELU ResNet-20 table above predate this change (then `auto` ran Hutchinson there); "
        "`auto` now chooses the importance-sampled Fisher on such nets, bounded by `AUTO_TIME_BUDGET` (300 s), "
        "and Hutchinson only for a custom loss, after a one-sample double-backward trial.",
        SECTION_END,
        "",
    ])


def write_pages(result: dict) -> None:
    atomic_write_text(MD, "# auto on nets that are not piecewise linear\n\n" + section(result))
    if PERF.exists():
        atomic_write_text(PERF, with_section(PERF.read_text(), section(result)))


def with_section(text: str, block: str) -> str:
    """``text`` with the auto_choice block replaced (or appended)."""
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block


def main() -> None:
    global OUT, RUNS, TRAIN_STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables-only", action="store_true", help="rebuild the pages from the JSON")
    ap.add_argument("--nets", nargs="+", choices=list(NETS), help="only these nets (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 training steps, 24-probe reference, "
                    "writes docs/results/auto_choice_quick.json only")
    args = ap.parse_args()
    if args.quick:
        OUT, RUNS, TRAIN_STEPS = RESULTS / "auto_choice_quick.json", RUNS / "quick", 20
        RANKINGS["hutchinson"] = ("hutchinson", {"max_probes": 24}, [0])
        RANKINGS[REFERENCE] = ("hutchinson", {"min_probes": 24, "max_probes": 24}, [0])
        del RANKINGS["fisher"]
        result = run(args.nets)
        print(tables(result))
        return
    if not args.tables_only:
        run(args.nets)
    result = load_result()
    write_pages(result)
    print(f"wrote {MD} and the auto_choice section of {PERF}")


if __name__ == "__main__":
    main()
