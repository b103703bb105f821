"""Distributed (torch.distributed, gloo, 2 CPU processes): sensitivity on N ranks equals the single-process result
on the same batches, for every estimator, for a CNN and a tiny Hugging Face model; surgery gives bit-identical
models on every rank; a DDP fine-tune is killed and resumed on one process."""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from haprune import distributed
from haprune.estimate import estimate
from haprune.graph import build_structures
from haprune.recover import FinetuneConfig, checkpoint_progress, finetune
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


def ft_problem():
    """A BatchNorm-free net (DDP then equals one process exactly) and 48 + 16 samples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 4, 4, generator=gen)
    y = (x.flatten(1)[:, :3].argmax(1) + (x.flatten(1)[:, 3] > 1).long()) % 3
    train, val = TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])
    return net, train, val


def ft_config(epochs: int) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs, lr=0.05, batch_size=8, augment=False, select_best=False,
                          bn_reestimate=False, seed=3)


def ddp_finetune(group, epochs: int, ckpt: str | None = None, kill_after: int | None = None) -> tuple[dict, dict]:
    net, train, val = ft_problem()

    def log(entry):
        if kill_after is not None and entry.epoch == kill_after:
            os._exit(3)  # killed right after the epoch's checkpoint was written (rank 0 logs; spawn ends the rest)

    result = finetune(net, train, val, ft_config(epochs), checkpoint_dir=ckpt, progress=False, log_fn=log,
                      group=group)
    return dict(net.state_dict()), result.to_dict()


def surgery(group) -> tuple[dict, dict]:
    """Scores on the ranks, the plan made once (rank 0) and broadcast, then the same surgery everywhere: least-squares
    implants (their choice by output similarity after BatchNorm re-estimation), sequential compensation, BatchNorm
    re-estimation; each checked identical across the ranks."""
    from haprune.apply import apply_plan
    from haprune.plan import CostModel, Plan, make_plan
    from haprune.recover import reestimate_batchnorm

    net = make_net(4, torch.float64, widths=(4, 8), blocks=2)
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randn(8, 1, 10, 10, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
             for _ in range(4)]
    x = calib[0][0][:1]
    structures = build_structures(net, x)
    sens = estimate(net, structures, calib, "ggn", progress=False, group=group)
    plan = None
    if distributed.is_main(group):
        plan = make_plan(structures, sens.scores, CostModel(net, structures, x), 0.4, implant_ratio=0.3).to_dict()
    plan = Plan.from_dict(distributed.broadcast_json(plan, group))
    implanted = apply_plan(net, plan, x, structures=structures, implant_init="lstsq", calibration=calib, group=group)
    reestimate_batchnorm(implanted, calib, group=group)
    compensated = apply_plan(net, plan, x, structures=structures, calibration=calib, compensate="sequential",
                             group=group)
    for m in (implanted, compensated):
        distributed.check_identical(m, group)
    tensors = {f"implanted/{k}": v for k, v in implanted.state_dict().items() if v.is_floating_point()}
    tensors.update({f"compensated/{k}": v for k, v in compensated.state_dict().items() if v.is_floating_point()})
    info = compensated.haprune_compensation
    return tensors, {"plan": plan.to_dict(), "layers": info["layers"], "samples": info["samples"],
                     "skipped": sorted(info.get("skipped", {}))}


def mismatch(group) -> tuple[dict, dict]:
    net = make_net(0, widths=(3, 4), blocks=1)
    if distributed.rank(group) == 1:
        with torch.no_grad():
            net.fc.bias[0] += 1e-6
    distributed.check_identical(net, group)
    return {}, {}


JOBS = {"cnn_scores": cnn_scores, "hf_scores": hf_scores, "ddp_finetune": ddp_finetune, "surgery": surgery,
        "mismatch": mismatch}


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


def test_ddp_finetune_equals_one_process_and_resumes_on_one_process_after_a_kill(tmp_path):
    # 2 processes, 2 epochs, uninterrupted: both replicas end identical, and equal to one process (no BatchNorm,
    # no augmentation, 2 divides the batch of 8 and 8 the 48 samples: each DDP step sees one single-process batch)
    (w0, r0), (w1, r1) = spawn("ddp_finetune", tmp_path / "full", epochs=2)
    with num_threads(1):
        w, r = ddp_finetune(None, epochs=2)
    for k in w:
        assert torch.equal(w0[k], w1[k]), f"{k}: the DDP replicas differ"
        assert torch.allclose(w0[k], w[k], rtol=1e-5, atol=1e-6), f"{k}: DDP differs from one process"
    assert [e["val_accuracy"] for e in r0["history"]] == pytest.approx([e["val_accuracy"] for e in r["history"]])
    assert r0["history"][0]["train_loss"] == pytest.approx(r["history"][0]["train_loss"], rel=1e-5)
    assert r0["final_val_accuracy"] == r1["final_val_accuracy"]

    # 2 processes, killed right after epoch 1's checkpoint; resumed on 1 process: it picks up after epoch 1 and
    # ends where the uninterrupted runs end
    ckpt = tmp_path / "ckpt"
    with pytest.raises(mp.ProcessExitedException):
        spawn("ddp_finetune", tmp_path / "killed", epochs=2, ckpt=str(ckpt), kill_after=1)
    assert checkpoint_progress(ckpt)["epochs_done"] == 1
    with num_threads(1):
        w2, r2 = ddp_finetune(None, epochs=2, ckpt=str(ckpt))
    assert r2["resumed_from_epoch"] == 1 and len(r2["history"]) == 2
    first = {k: v for k, v in r2["history"][0].items() if k != "seconds"}  # epoch 1 as the 2 processes ran it
    assert first == {k: v for k, v in r0["history"][0].items() if k != "seconds"}
    for k in w:
        assert torch.allclose(w2[k], w[k], rtol=1e-5, atol=1e-6), f"{k}: the resumed run ends elsewhere"


def test_surgery_gives_identical_models_on_every_rank_equal_to_one_process(tmp_path):
    results = spawn("surgery", tmp_path)
    with num_threads(1):
        single = surgery(None)
    _compare(results, single, rtol=1e-7)
    assert single[1]["layers"] and single[1]["samples"] == 32
    assert any(k.startswith("implanted/") and ".implant" in k for k in single[0])  # implants were fitted


def test_check_identical_names_the_differing_tensors(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="ReplicaMismatchError.*fc.bias"):
        spawn("mismatch", tmp_path)
