"""haprune.hf fine-tuning keeps the best-validating weights, the starting ones included."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from haprune.hf import TextFinetuneConfig, evaluate_text, finetune_text  # noqa: E402
from haprune.hf.text import TextData  # noqa: E402

from test_hf import bert, tokens  # noqa: E402


def own_labels(net, x):
    with torch.no_grad():
        return net(x).argmax(-1)


def test_a_start_that_validates_best_comes_back_unchanged():
    net = bert(seed=1)
    x = tokens(seed=2, n=12)
    val = TextData(x, own_labels(net, x))  # the starting model is right on every validation example
    train = TextData(tokens(seed=3, n=24), (own_labels(net, tokens(seed=3, n=24)) + 1) % 3)  # wrong labels
    start = {k: v.clone() for k, v in net.state_dict().items()}
    out = finetune_text(net, train, TextFinetuneConfig(6, lr=5e-2, batch_size=8, warmup_fraction=0.0), val=val,
                        eval_every=2, progress=False)
    assert [s for s, _ in out["val_history"]] == [0, 2, 4, 6]
    assert out["val_history"][0][1] == 1.0 and min(a for _, a in out["val_history"][1:]) < 1.0  # training hurt
    assert out["best_step"] == 0 and out["best_val_accuracy"] == 1.0
    for name, value in net.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert evaluate_text(net, val)["accuracy"] == 1.0


def test_the_best_validating_step_is_loaded_and_without_val_nothing_is_evaluated():
    net = bert(seed=4)
    x = tokens(seed=5, n=24)
    y = torch.arange(24) % 3
    data = TextData(x, y)
    out = finetune_text(net, data, TextFinetuneConfig(8, lr=1e-2, batch_size=8), val=data, eval_every=3,
                        progress=False)
    steps = [s for s, _ in out["val_history"]]
    assert steps == [0, 3, 6, 8]
    assert out["best_val_accuracy"] == max(a for _, a in out["val_history"])
    assert out["best_step"] == steps[[a for _, a in out["val_history"]].index(out["best_val_accuracy"])]
    assert evaluate_text(net, data)["accuracy"] == out["best_val_accuracy"]
    plain = finetune_text(bert(seed=4), data, TextFinetuneConfig(8, lr=1e-2, batch_size=8), progress=False)
    assert "val_history" not in plain and plain["steps"] == 8
    with pytest.raises(ValueError, match="eval_every"):
        finetune_text(bert(seed=4), data, TextFinetuneConfig(2), val=data, eval_every=0, progress=False)
