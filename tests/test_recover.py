"""Tests of haprune.recover: evaluation, BatchNorm re-estimation, distillation loss, resumable fine-tuning."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from haprune.data import ImageDataset, batches
from haprune.models import create_model
from haprune.recover import (
    EpochRecord,
    FinetuneConfig,
    NonFiniteLossError,
    batchnorm_stats_restored,
    checkpoint_config,
    distillation_loss,
    evaluate,
    finetune,
    load_checkpoint_weights,
    lr_at_epoch,
    reestimate_batchnorm,
    save_weights,
)

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def toy_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def toy_data(n: int = 48, seed: int = 0) -> ImageDataset:
    """Three classes told apart by the mean brightness of 6x6 images."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 1, 6, 6, generator=gen) + labels.view(-1, 1, 1, 1).float()
    return ImageDataset(images, labels)


class Interrupted(Exception):
    pass


def test_reestimate_batchnorm_gives_the_cumulative_batch_statistics() -> None:
    model = toy_net().eval()
    inputs: Dict[nn.Module, List[torch.Tensor]] = {}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.setdefault(mod, []).append(args[0])) for m in norms]
    data = [torch.randn(16, 1, 6, 6) * 3 + 2 for _ in range(4)]
    assert reestimate_batchnorm(model, data) == 4
    for hook in hooks:
        hook.remove()
    for norm in norms:
        seen = inputs[norm]
        expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
        expected_var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen]).mean(0)
        assert torch.allclose(norm.running_mean, expected_mean, atol=1e-5)
        assert torch.allclose(norm.running_var, expected_var, atol=1e-4)
        assert norm.momentum == 0.1
    assert torch.allclose(norms[0].running_mean, torch.cat(data).mean(dim=(0, 2, 3)), atol=1e-5)
    assert not model.training


def test_reestimate_batchnorm_with_one_batch_and_a_cap() -> None:
    model = toy_net().train()
    x = torch.randn(32, 1, 6, 6) + 5
    assert reestimate_batchnorm(model, [(x, None), (x + 100, None)], num_batches=1) == 1
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[0].running_var, x.var().view(1), atol=1e-4)
    assert model.training


def test_reestimate_batchnorm_without_batches_keeps_the_old_statistics() -> None:
    model = toy_net()
    model[0].running_mean.fill_(7.0)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(model, [])
    assert model[0].running_mean.item() == 7.0 and model[0].momentum == 0.1


def test_batchnorm_stats_restored_puts_every_buffer_back_also_after_an_error() -> None:
    model = toy_net()
    model[0].running_mean.fill_(7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with batchnorm_stats_restored(model):
        reestimate_batchnorm(model, [torch.randn(8, 1, 6, 6) * 5 + 2])
        assert model[0].running_mean.abs().max() < 7.0  # changed inside
    with pytest.raises(RuntimeError, match="inside"):
        with batchnorm_stats_restored(model):
            model[0].running_var.fill_(-1.0)
            model[0].num_batches_tracked.fill_(99)
            raise RuntimeError("inside")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distillation_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    targets = torch.randint(0, 5, (8,), generator=gen)
    ce = F.cross_entropy(student, targets)
    assert torch.allclose(distillation_loss(student, targets, teacher, alpha=0.0), ce)
    assert torch.allclose(distillation_loss(student, targets), ce)
    t = 3.0
    p_teacher = F.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    assert torch.allclose(distillation_loss(student, targets, teacher, alpha=1.0, temperature=t), t * t * kl)
    mixed = distillation_loss(student, targets, teacher, alpha=0.25, temperature=t)
    assert torch.allclose(mixed, 0.75 * ce + 0.25 * t * t * kl)
    assert distillation_loss(student, targets, student.clone(), alpha=1.0).abs() < 1e-6


def test_evaluate_gives_the_exact_accuracy_and_loss() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    model = nn.Flatten().train()
    data = ImageDataset(logits.view(4, 1, 1, 3), labels)
    result = evaluate(model, data, batch_size=3)
    assert result["accuracy"] == 0.5
    assert math.isclose(result["loss"], F.cross_entropy(logits, labels).item(), rel_tol=1e-6)
    assert model.training
    assert evaluate(model, list(batches(data, 2)))["accuracy"] == 0.5


def test_lr_schedules() -> None:
    cosine = FinetuneConfig(epochs=4, lr=0.1)
    assert [round(lr_at_epoch(cosine, e), 6) for e in range(4)] == [0.1, 0.085355, 0.05, 0.014645]
    step = FinetuneConfig(epochs=8, lr=1.0, schedule="step")
    assert [lr_at_epoch(step, e) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        FinetuneConfig(epochs=1, lr=0.1, schedule="linear")


def small_config(**changes: object) -> FinetuneConfig:
    return FinetuneConfig(**{**dict(epochs=3, lr=0.05, batch_size=16, seed=1, bn_reestimate_batches=2), **changes})


def run(checkpoint_dir: Path, model_seed: int = 0, log_fn=None, **changes: object):
    model = toy_net(model_seed)
    data = toy_data()
    result = finetune(model, data, toy_data(24, seed=1), small_config(**changes), checkpoint_dir=checkpoint_dir,
                      progress=False, log_fn=log_fn)
    return model, result


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, reference_result = run(tmp_path / "straight")

    def stop_after_two(entry: EpochRecord) -> None:
        if entry.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", log_fn=stop_after_two)
    resumed, resumed_result = run(tmp_path / "resumed", model_seed=123)
    assert resumed_result.resumed_from_epoch == 2 and len(resumed_result.history) == 3
    for (name, want), got in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(want.float(), got.float(), atol=1e-6), name
    strip = lambda history: [(e.epoch, e.lr, e.train_loss, e.val_accuracy) for e in history]  # noqa: E731
    assert strip(resumed_result.history) == strip(reference_result.history)
    assert resumed_result.best_epoch == reference_result.best_epoch


def test_checkpoint_files_are_safetensors_and_json_not_pickles(tmp_path: Path) -> None:
    run(tmp_path, epochs=2, select_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "state-0002.safetensors"]
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    assert meta["epochs_done"] == 2 and len(meta["history"]) == 2
    raw = (tmp_path / "state-0002.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"
    with safe_open(str(tmp_path / "state-0002.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert {"model/1.weight", "best/1.weight", "rng/cpu"} <= names
    assert any(n.startswith("optimizer/") and n.endswith("/momentum_buffer") for n in names)
    assert checkpoint_config(tmp_path) == small_config(epochs=2)


def test_select_best_loads_the_best_epoch_weights(tmp_path: Path) -> None:
    model, result = run(tmp_path, bn_reestimate=False)
    assert result.best_val_accuracy == max(e.val_accuracy for e in result.history)
    with safe_open(str(tmp_path / "state-0003.safetensors"), framework="pt") as handle:
        for name, value in model.state_dict().items():
            assert torch.equal(handle.get_tensor(f"best/{name}"), value), name
    assert result.final_val_accuracy == result.best_val_accuracy


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    run(tmp_path, epochs=1)
    with pytest.raises(ValueError, match="different config.*lr"):
        run(tmp_path, epochs=1, lr=0.5)


def test_non_finite_loss_raises_a_clear_error() -> None:
    data = toy_data()
    data.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        finetune(toy_net(), data, toy_data(24), small_config(epochs=1), progress=False)


def test_distillation_from_a_teacher_runs(tmp_path: Path) -> None:
    teacher = toy_net(5)
    model = toy_net()
    result = finetune(model, toy_data(), toy_data(24, seed=1), small_config(epochs=1, distill_alpha=0.5),
                      teacher=teacher, progress=False)
    assert math.isfinite(result.history[0].train_loss) and not teacher.training


def test_save_and_load_weights_half_precision_and_sharded(tmp_path: Path) -> None:
    model = toy_net()
    files = save_weights(model, tmp_path / "w.safetensors", dtype=torch.float16, max_shard_bytes=128)
    assert len(files) > 1 and all(f.name.startswith("w-0000") for f in files)
    loaded = load_checkpoint_weights(toy_net(seed=9), tmp_path / "w.safetensors")
    for want, got in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert got.dtype == want.dtype and torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-3)
    assert save_weights(model, tmp_path / "w.safetensors") == [tmp_path / "w.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_checkpoint_weights(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16_bn"])
def test_committed_baselines_load(name: str) -> None:
    report_path = CHECKPOINTS / f"{name}-fmnist.json"
    if not report_path.is_file():
        pytest.skip(f"no baseline {report_path}")
    report = json.loads(report_path.read_text())
    model = create_model(name, in_channels=1, num_classes=10)
    load_checkpoint_weights(model, CHECKPOINTS / f"{name}-fmnist.safetensors")
    assert report["test_accuracy"] > 0.9 and report["recipe"]["select_best"]


def test_a_checkpoint_of_another_run_key_is_refused_not_resumed(tmp_path: Path) -> None:
    from haprune.recover import checkpoint_progress

    model = toy_net()
    finetune(model, toy_data(), toy_data(24, seed=1), small_config(epochs=1), checkpoint_dir=tmp_path,
             progress=False, run_key="lstsq-run")
    assert checkpoint_progress(tmp_path) == {"epochs_done": 1, "run_key": "lstsq-run",
                                             "config": small_config(epochs=1).to_dict()}
    with pytest.raises(ValueError, match="run 'lstsq-run', not of run 'zeros-run'.*other run's weights"):
        finetune(toy_net(), toy_data(), toy_data(24, seed=1), small_config(epochs=1), checkpoint_dir=tmp_path,
                 progress=False, run_key="zeros-run")
    resumed = toy_net(seed=5)  # the same key resumes: all epochs done, so the saved weights come back
    result = finetune(resumed, toy_data(), toy_data(24, seed=1), small_config(epochs=1), checkpoint_dir=tmp_path,
                      progress=False, run_key="lstsq-run")
    assert result.resumed_from_epoch == 1
    assert checkpoint_progress(tmp_path / "none") is None


class DictOutput(nn.Module):
    """A model returning a Hugging Face-style mapping with ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = toy_net()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"logits": self.net(x), "hidden": x}


def test_evaluate_and_finetune_take_models_returning_a_mapping_or_tuple(tmp_path: Path) -> None:
    wrapped = DictOutput()
    plain = wrapped.net
    assert evaluate(wrapped, toy_data()) == evaluate(plain, toy_data())

    class TupleOutput(DictOutput):
        def forward(self, x):
            return (self.net(x), x)

    a, b = DictOutput(), TupleOutput()
    ra = finetune(a, toy_data(), toy_data(24, seed=1), small_config(epochs=1), progress=False)
    rb = finetune(b, toy_data(), toy_data(24, seed=1), small_config(epochs=1), progress=False)
    assert ra.history[0].train_loss == rb.history[0].train_loss
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_load_checkpoint_weights_moved_to_io_and_still_importable_from_recover() -> None:
    import haprune.io
    import haprune.recover

    assert haprune.recover.load_checkpoint_weights is haprune.io.load_checkpoint_weights
    assert haprune.recover.save_weights is haprune.io.save_weights


def test_the_starting_model_is_kept_when_no_epoch_validates_better(tmp_path: Path) -> None:
    """A model that already validates well, fine-tuned on wrong labels at a high learning rate:
    every epoch validates worse, so select_best returns the starting weights and BatchNorm statistics untouched."""
    torch.manual_seed(0)
    model = toy_net()
    val = toy_data(24, seed=1)
    # train it to tell the classes apart (the starting model of the run under test)
    finetune(model, toy_data(240, seed=2), val, small_config(epochs=6, lr=0.1, start_candidate=False),
             progress=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    start_acc = evaluate(model, val)["accuracy"]
    clean = toy_data()
    wrong = ImageDataset(clean.images, (clean.labels + 1) % 3)  # systematically wrong labels
    result = finetune(model, wrong, val, small_config(epochs=2, lr=0.5), checkpoint_dir=tmp_path, progress=False)
    assert result.start_val_accuracy == start_acc
    assert all(e.val_accuracy < start_acc for e in result.history)  # the premise: training only made it worse
    assert result.best_epoch == 0 and result.best_val_accuracy == start_acc == result.final_val_accuracy
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name  # weights and BatchNorm statistics (no re-estimation)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["start_val_accuracy"] == start_acc


def test_an_epoch_that_validates_better_than_the_start_replaces_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = finetune(toy_net(), toy_data(240, seed=2), toy_data(24, seed=1), small_config(epochs=6, lr=0.1),
                      checkpoint_dir=tmp_path, progress=False)
    assert result.start_val_accuracy is not None
    assert result.best_val_accuracy == max([result.start_val_accuracy] + [e.val_accuracy for e in result.history])
    assert result.best_epoch >= 1 and result.best_val_accuracy > result.start_val_accuracy
    _, without = run(tmp_path / "off", start_candidate=False)
    assert without.start_val_accuracy is None and without.best_epoch >= 1  # the old rule: best of the epochs
