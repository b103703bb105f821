"""Recovery for transformers: AdamW fine-tuning with linear warm-up and decay, optional distillation from the
dense model, evaluation. Small on purpose: the heavy lifting is Hugging Face's modules."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..graph import preserved_modes
from ..recover import NonFiniteLossError, distillation_loss, evaluate
from .text import TextData, text_batches

__all__ = ["TextFinetuneConfig", "finetune_text", "evaluate_text"]


@dataclass(frozen=True)
class TextFinetuneConfig:
    steps: int
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    distill_alpha: float = 0.0
    distill_temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"invalid fine-tuning config {self}")


def evaluate_text(model: nn.Module, data: TextData, batch_size: int = 128) -> dict[str, float]:
    """Mean cross-entropy and accuracy on ``data`` (:func:`haprune.recover.evaluate` over its batches)."""
    return evaluate(model, text_batches(data, batch_size))


def finetune_text(model: nn.Module, train: TextData, config: TextFinetuneConfig, *,
                  teacher: nn.Module | None = None, progress: bool = True, val: TextData | None = None,
                  eval_every: int | None = None) -> dict[str, Any]:
    """Train ``model`` (a ``model(x) -> logits`` module) in place for ``config.steps`` batches.

    With ``val``, the model is evaluated before the first step, every ``eval_every`` steps (default: only at the
    end) and after the last, and the best-validating weights are loaded at the end, the starting ones included
    (ties keep the earlier): fine-tuning never returns a model that validates worse than the one it was given
    (a compensated model is often closer to the dense one than a short fine-tune gets it). The result then has
    ``val_history`` ([step, accuracy] pairs), ``best_step`` (0 = the starting model) and ``best_val_accuracy``.
    """
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every}")
    torch.manual_seed(config.seed)
    history: list[list[float]] = []
    best: dict[str, Any] = {}

    def checkpoint(step_now: int) -> None:
        acc = evaluate_text(model, val)["accuracy"]
        history.append([step_now, acc])
        if not best or acc > best["accuracy"]:
            best.update(step=step_now, accuracy=acc,
                        state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

    if val is not None and config.steps > 0:
        checkpoint(0)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    warm = max(1, round(config.warmup_fraction * config.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (config.steps - s) / max(1, config.steps - warm))))
    use_teacher = teacher is not None and config.distill_alpha > 0
    if use_teacher:
        teacher.eval()
    start, step, epoch, total = time.perf_counter(), 0, 0, 0.0
    bar = tqdm(total=config.steps, desc="fine-tune", disable=None if progress else True, leave=False)
    with preserved_modes(model):
        model.train()
        while step < config.steps:
            for x, y in text_batches(train, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch):
                if step >= config.steps:
                    break
                logits = model(x).float()
                t_logits = None
                if use_teacher:
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                loss = distillation_loss(logits, y, t_logits, config.distill_alpha, config.distill_temperature, 0.0)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss became {loss.item()} at step {step}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
                step += 1
                bar.update(1)
                if val is not None and (step == config.steps or (eval_every and step % eval_every == 0)):
                    checkpoint(step)
            epoch += 1
    bar.close()
    out = {"steps": step, "mean_loss": total / max(1, step), "seconds": time.perf_counter() - start,
           "config": asdict(config)}
    if best:
        model.load_state_dict(best["state"])
        out.update(val_history=history, best_step=best["step"], best_val_accuracy=best["accuracy"])
    return out
