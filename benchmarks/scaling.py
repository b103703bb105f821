"""How the cost of the sensitivity pass and of fine-tuning grows with calibration samples and with processes.

    python benchmarks/scaling.py               # measure (about 5-10 min on 2 loaded CPU cores), write the JSON + table
    python benchmarks/scaling.py --tables-only # rebuild the section of docs/results/performance.md from the JSON

One run of two gloo processes (torch.multiprocessing) does every measurement, interleaved round by round, so
that the machine's load changes hit every configuration alike:

- ``1 proc x 1 thread``: rank 0 alone (``group=None``, torch.set_num_threads(1)), rank 1 idle at a barrier;
- ``1 proc x 2 threads``: rank 0 alone with 2 threads (what one process gets from this machine's 2 cores);
- ``2 procs x 1 thread``: both ranks, ``group`` = the world (haprune.distributed: shards + all-reduce; DDP).

Work: ResNet-20 (haprune.models, random weights, seed 0) on random 1 x 28 x 28 inputs with random labels of 10
classes (cost does not depend on what the weights learned); the sensitivity pass (``ggn`` exact, ``fisher``
importance-sampled) on 32 / 64 / 128 calibration samples in batches of 16; fine-tuning one epoch of
``haprune.recover.finetune`` over 256 samples (batch 32; DDP: 16 per process), no augmentation. Time is wall-clock
between barriers on rank 0 (the slower of the ranks sets it), after one unrecorded warm-up of every
configuration. ``os.getloadavg()`` and ``os.cpu_count()`` are
recorded beside every time. Results: docs/results/scaling.json; the table and paragraph: the ``scaling`` section
of docs/results/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
OUT = RESULTS / "scaling.json"
PAGE = RESULTS / "performance.md"
START, END = "<!-- scaling:start -->", "<!-- scaling:end -->"
CONFIGS = [("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1)]  # name, processes, threads per process
SENS = [("ggn", 32), ("ggn", 64), ("fisher", 32), ("fisher", 64), ("fisher", 128)]
FT_SAMPLES = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(samples: int):
    from haprune.graph import build_structures
    from haprune.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet20", in_channels=1, num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (samples,), generator=gen)
    return net, x, y, build_structures(net, x[:1])


def _measure(fn, group) -> float:
    from haprune import distributed

    distributed.barrier(group)
    start = time.perf_counter()
    fn()
    distributed.barrier(group)
    return time.perf_counter() - start


def _worker(rank: int, port: int, rounds: int, path: str) -> None:
    import torch.distributed as dist

    from haprune import distributed
    from haprune.estimate import estimate
    from haprune.recover import FinetuneConfig, finetune
    from torch.utils.data import TensorDataset

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=1800))
    world = dist.group.WORLD
    problems = {n: _problem(n) for n in sorted({s for _, s in SENS} | {FT_SAMPLES})}
    records = []
    for name, procs, threads in CONFIGS:  # warm-up, not recorded: first calls of vmap, DDP, the allocator
        group = world if procs == 2 else None
        torch.set_num_threads(threads)
        net, x, y, structures = problems[32]
        if procs == 2 or rank == 0:
            for kind in ("ggn", "fisher"):
                estimate(net, structures, [(x[:16], y[:16])] * procs, kind, progress=False, group=group)
            finetune(_problem(32)[0], TensorDataset(x, y), TensorDataset(x, y),
                     FinetuneConfig(epochs=1, lr=0.01, batch_size=16, augment=False, select_best=False,
                                    bn_reestimate=False), progress=False, group=group)
        dist.barrier()
    for r in range(rounds):
        for kind, samples in [*SENS, ("finetune", FT_SAMPLES)]:
            for name, procs, threads in CONFIGS:
                group = world if procs == 2 else None
                torch.set_num_threads(threads)
                net, x, y, structures = problems[samples]
                if kind == "finetune":
                    model = _problem(samples)[0]
                    config = FinetuneConfig(epochs=1, lr=0.01, batch_size=32, augment=False, select_best=False,
                                            bn_reestimate=False)
                    data, val = TensorDataset(x, y), TensorDataset(x[:32], y[:32])

                    def job(model=model, data=data, val=val, config=config, group=group):
                        finetune(model, data, val, config, progress=False, group=group)
                else:
                    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, samples, 16)]

                    def job(net=net, structures=structures, batches=batches, kind=kind, group=group):
                        estimate(net, structures, batches, kind, progress=False, group=group)
                load = os.getloadavg()
                if procs == 2 or rank == 0:
                    seconds = _measure(job, group)
                dist.barrier()
                if rank == 0:
                    records.append({"round": r, "work": kind, "samples": samples, "config": name,
                                    "processes": procs, "threads_per_process": threads, "seconds": round(seconds, 3),
                                    "samples_per_second": round(samples / seconds, 2),
                                    "loadavg_before": [round(v, 2) for v in load],
                                    "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                                    "cpu_count": os.cpu_count()})
                    print(json.dumps(records[-1]), flush=True)
    if rank == 0:
        doc = {"benchmark": "benchmarks/scaling.py", "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "model": "resnet20 (random weights), 1x28x28 inputs, 10 classes", "rounds": rounds,
               "records": records}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    dist.destroy_process_group()


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def section(doc: dict) -> str:
    rows = {}
    for rec in doc["records"]:
        rows.setdefault((rec["work"], rec["samples"]), {}).setdefault(rec["config"], []).append(rec)
    loads = [rec["loadavg_before"][0] for rec in doc["records"]]
    lines = [START, "## Distributed scaling", "",
             f"`benchmarks/scaling.py` ({doc['model']}; {doc['rounds']} interleaved rounds, medians; "
             f"{doc['cpu_count']} CPU cores, 1-minute load average {min(loads):.1f} to {max(loads):.1f} during the "
             "run, other benchmarks sharing the machine). Seconds per pass; `2 procs` is torchrun's layout (gloo, "
             "shards + all-reduce, DDP for fine-tuning); its speed relative to one process with one thread and with two "
             "(above 1: faster).",
             "", "| work | samples | 1 proc x 1 thread (s) | 1 proc x 2 threads (s) | 2 procs x 1 thread (s) | "
             "speed of 2 procs / 1x1 | speed of 2 procs / 1x2 | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
    for (work, samples), by in rows.items():
        med = {k: _median([r["seconds"] for r in v]) for k, v in by.items()}
        load = _median([r["loadavg_before"][0] for v in by.values() for r in v])
        lines.append(f"| {work} | {samples} | {med['1x1']:.2f} | {med['1x2']:.2f} | {med['2x1']:.2f} | "
                     f"{med['1x1'] / med['2x1']:.2f}x | {med['1x2'] / med['2x1']:.2f}x | {load:.1f} |")
    per, vs1, vs2 = {}, [], []
    for (work, samples), by in rows.items():
        med = {k: _median([r["seconds"] for r in v]) for k, v in by.items()}
        vs1.append(med["1x1"] / med["2x1"])
        vs2.append(med["1x2"] / med["1x1"])
        if work != "finetune":
            per.setdefault(work, []).append((samples, med["1x1"]))
    growth = "; ".join(f"{w}: " + ", ".join(f"{s} samples {t:.2f} s" for s, t in sorted(v)) for w, v in per.items())
    lines += ["", "How the cost grows. With the calibration samples: the sensitivity pass is a sum over samples, so "
              f"its time grows about linearly with them, plus a fixed cost per pass (checks, the first batch's "
              f"forward, the per-structure reduction): one process, one thread: {growth}. With processes: each takes "
              "its shard of the batches (rank r: batches r, r + N, ...) and the pass adds one all-reduce of the "
              "per-structure sums (a few hundred kilobytes for ResNet-20; DDP adds a gradient all-reduce per step), "
              "so N processes can approach N times one process only where each has an idle core (or GPU). This "
              f"machine had none: with the load at {min(loads):.1f}-{max(loads):.1f} on {doc['cpu_count']} cores, "
              f"2 processes ran at {min(vs1):.2f}x-{max(vs1):.2f}x the speed of one single-threaded process (no "
              "gain: the second process only shares the same oversubscribed cores), and one process with 2 threads "
              f"was {min(vs2):.1f}x-{max(vs2):.1f}x slower than with one (OpenMP threads wait on each other when the "
              "cores are oversubscribed; torchrun sets OMP_NUM_THREADS=1 per process for this reason). These "
              "figures therefore show the cost side only; the "
              "speed-up of idle cores or GPUs is not measured here (no GPU was lent to this task). The ratios within "
              "a row were measured interleaved, round by round.", END]
    return "\n".join(lines) + "\n"


def with_section(page: str, text: str) -> str:
    if START in page and END in page:
        head, rest = page.split(START, 1)
        return head + text.rstrip("\n") + rest.split(END, 1)[1]
    return page.rstrip("\n") + "\n\n" + text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tables-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.tables_only:
        import torch.multiprocessing as mp

        tmp = OUT.with_suffix(".json.tmp")
        mp.spawn(_worker, args=(_free_port(), args.rounds, str(tmp)), nprocs=2, join=True)
        os.replace(tmp, OUT)
    doc = json.loads(OUT.read_text())
    page = PAGE.read_text() if PAGE.exists() else ""
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(with_section(page, section(doc)))
    os.replace(tmp, PAGE)
    print(f"wrote {OUT} and the scaling section of {PAGE}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
