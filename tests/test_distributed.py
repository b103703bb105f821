"""Distributed (torch.distributed, gloo, 2 CPU processes): sensitivity on N ranks equals the single-process result
on the same batches, for every estimator, for a CNN and a tiny Hugging Face model; surgery gives bit-identical
models on every rank; a DDP fine-tune is killed and resumed on one process."""
from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file, save_file

from haprune import distributed
from haprune.estimate import estimate
from haprune.graph import build_structures
from haprune.threads import num_threads
from nets import make_net

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job: str, kwargs: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=timedelta(seconds=120))
    try:
        tensors, meta = JOBS[job](dist.group.WORLD, **kwargs)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out) / f"rank{rank}.safetensors"))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(meta))
    finally:
        dist.destroy_process_group()


def spawn(job: str, out: Path, world: int = WORLD, **kwargs) -> list[tuple[dict, dict]]:
    """Run ``JOBS[job](group, **kwargs)`` on ``world`` gloo processes; each rank's (tensors, json) result."""
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, free_port(), job, kwargs, str(out)), nprocs=world, join=True)
    return [(load_file(str(out / f"rank{r}.safetensors")), json.loads((out / f"rank{r}.json").read_text()))
            for r in range(world)]


# ---------------------------------------------------------------------------------------------- the problems

CNN_CRITERIA = {  # name -> options (kept small: every estimator runs twice, on 1 and on 2 processes)
    "auto": {}, "ggn": {}, "fisher": {}, "empirical_fisher": {}, "taylor": {}, "obs": {}, "obs-ggn": {},
    "hutchinson": {"min_probes": 8, "max_probes": 32, "check_every": 8},
    "fisher-multinomial": {"sampling": "multinomial", "samples_per_input": 2},
}


def cnn_problem():
    net = make_net(3, torch.float64, widths=(3, 4), blocks=1, classes=3)
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=gen)) for n in (6, 5, 6, 4, 6)]  # 5 batches: shards 3 + 2
    structures = build_structures(net, batches[0][0][:1])
    return net, structures, batches


def _criterion(name: str) -> tuple[str, dict]:
    return ("fisher", CNN_CRITERIA[name]) if name == "fisher-multinomial" else (name, CNN_CRITERIA[name])


def cnn_scores(group) -> tuple[dict, dict]:
    net, structures, batches = cnn_problem()
    tensors, meta = {}, {}
    for name in CNN_CRITERIA:
        crit, opts = _criterion(name)
        s = estimate(net, structures, batches, crit, seed=5, progress=False, group=group, **opts)
        tensors[f"{name}/scores"] = s.scores
        for k in ("trace", "stderr"):
            if getattr(s, k) is not None:
                tensors[f"{name}/{k}"] = getattr(s, k).double()
        meta[name] = {k: v for k, v in s.info.items() if k not in ("seconds", "first_batch", "processes")}
    return tensors, meta


HF_CRITERIA = {"auto": {}, "ggn": {}, "fisher": {}, "empirical_fisher": {}, "taylor": {},
               "hutchinson": {"min_probes": 4, "max_probes": 8, "check_every": 4}}


def hf_problem():
    from test_hf import bert, tokens

    from haprune.hf import transformer_structures

    net = bert(4)
    structures = transformer_structures(net, heads=True)
    batches = [(tokens(i, n=4), torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(i)))
               for i in range(3)]
    return net, structures, batches


def hf_scores(group) -> tuple[dict, dict]:
    from haprune.hf import michel_importance, obs_importance

    net, structures, batches = hf_problem()
    tensors, meta = {}, {}
    for name, opts in HF_CRITERIA.items():
        s = estimate(net, structures, batches, name, seed=2, progress=False, group=group, **opts)
        tensors[f"{name}/scores"] = s.scores
        meta[name] = {k: v for k, v in s.info.items() if k not in ("seconds", "first_batch", "processes")}
    tensors["michel/scores"] = michel_importance(net, structures, batches, group=group).scores
    tensors["hap-obs/scores"] = obs_importance(net, structures, batches, curvature="fisher", group=group).scores
    return tensors, meta


JOBS = {"cnn_scores": cnn_scores, "hf_scores": hf_scores}


# ---------------------------------------------------------------------------------------------- the tests

def _compare(dist_results, single, rtol=1e-9):
    (t0, m0), (t1, m1) = dist_results
    tensors, meta = single
    assert set(t0) == set(tensors) == set(t1)
    for k, ref in tensors.items():
        assert torch.equal(t0[k], t1[k]), f"{k}: the ranks disagree"
        assert torch.allclose(t0[k], ref, rtol=rtol, atol=1e-12 * float(ref.abs().max())), \
            f"{k}: 2 processes {t0[k][:4].tolist()} vs 1 process {ref[:4].tolist()}"
    assert m0 == m1 == json.loads(json.dumps(meta))  # probes per batch, stopping, samples: as in one process


def test_cnn_sensitivity_on_two_processes_equals_one_process(tmp_path):
    results = spawn("cnn_scores", tmp_path)
    with num_threads(1):
        single = cnn_scores(None)
    _compare(results, single)
    assert single[1]["auto"]["auto"]["chose"] == "ggn"
    assert single[1]["hutchinson"]["probes_per_batch"] and len(single[1]["hutchinson"]["probes_per_batch"]) == 5


def test_hf_sensitivity_on_two_processes_equals_one_process(tmp_path):
    pytest.importorskip("transformers")
    results = spawn("hf_scores", tmp_path)
    with num_threads(1):
        single = hf_scores(None)
    _compare(results, single, rtol=1e-8)
