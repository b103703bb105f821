"""``auto`` on nets that are not piecewise linear: it always runs (double-backward trial first), runs fast
(bounded time), and says what it chose and why; Hutchinson under fused attention switches to eager and back."""
from __future__ import annotations

import logging
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from haprune.estimate import AUTO_TIME_BUDGET, ModelCheckError, estimate
from haprune.graph import build_structures
from nets import ResCNN, make_net, randomise_bn


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(pool(x))))), as in MobileNetV3: hardsigmoid has no second derivative."""

    def __init__(self, c, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16, 4)
        self.project = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.hardswish(self.bn(self.stem(x)))
        h = F.hardswish(self.bn1(self.expand(x)))
        h = self.se(F.hardswish(self.bn2(self.dw(h))))
        x = x + self.bn3(self.project(h))
        return self.fc(x.mean((2, 3)))


class ConvNeXtish(nn.Module):
    """Depthwise conv, channels-last LayerNorm, Linear-GELU-Linear MLP, residual."""

    def __init__(self, c=8, hidden=24):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, hidden)
        self.pw2 = nn.Linear(hidden, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.pw2(F.gelu(self.pw1(h))).permute(0, 3, 1, 2)
        return self.head((x + h).mean((2, 3)))


class ViTish(nn.Module):
    """Patch embedding, one pre-norm attention block with torch's fused attention (sdpa), SiLU MLP."""

    def __init__(self, d=16, heads=2, hidden=32):
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        b, n, d = t.shape
        h = self.norm1(t)
        q, k, v = (m(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        t = t + self.o(a)
        t = t + self.fc2(F.silu(self.fc1(self.norm2(t))))
        return self.head(t.mean(1))


def _seeded(cls, seed=0, **kw):
    torch.manual_seed(seed)
    net = cls(**kw)
    randomise_bn(net, torch.Generator().manual_seed(seed))
    return net.eval()


NETS = {
    "gelu": lambda: make_net(0, widths=(4, 6), blocks=1, classes=5, act=nn.GELU),
    "silu": lambda: make_net(1, widths=(4, 6), blocks=1, classes=5, act=nn.SiLU),
    "hardswish_se": lambda: _seeded(MobileNetish),
    "layernorm_gelu": lambda: _seeded(ConvNeXtish),
    "attention_sdpa": lambda: _seeded(ViTish),
}


def pass_time(net, batch):
    """Median seconds of one forward + backward pass of ``batch`` (eval mode, cross-entropy)."""
    x, y = batch
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        times.append(time.perf_counter() - t0)
    net.zero_grad(set_to_none=True)
    return sorted(times)[1]


def data(seed=0, n=16, batches=2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen))
            for _ in range(batches)]


@pytest.mark.parametrize("name", list(NETS))
def test_auto_completes_fast_on_non_piecewise_linear_nets_and_says_why(name, caplog):
    net = NETS[name]()
    batches = data()
    S = build_structures(net, batches[0][0][:1])
    assert S.num_structures > 0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = pass_time(net, batches[0])
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="haprune.estimate"):
        s = estimate(net, S, batches, "auto", progress=False)
    elapsed = time.perf_counter() - t0
    assert s.criterion == "fisher" and s.info["auto"]["chose"] == "fisher"
    assert "not piecewise linear" in s.info["auto"]["why"] and s.info["auto"]["non_piecewise_linear_ops"]
    assert s.info["time_budget"] == AUTO_TIME_BUDGET
    assert any("auto chose fisher" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(s.scores).all() and (s.scores > 0).any()
    # bounded work: at most one gradient per calibration sample, and a time measured in forward + backward passes
    # of a batch (G, timed just before; robust to a loaded machine): Hutchinson's default would spend up to 300
    # double-backward probes per batch, over 1000 G here
    assert s.info["gradients"] <= s.info["samples"] == 32
    assert elapsed < 300 * g, (elapsed, g)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_double_backward_trial_finds_hardsigmoid_and_fused_attention():
    from haprune.estimate.base import default_loss, double_backward_error

    net = NETS["hardswish_se"]()
    batches = data()
    S = build_structures(net, batches[0][0][:1])
    s = estimate(net, S, batches, "auto", progress=False)
    db = s.info["auto"]["double_backward"]
    assert db.startswith("unsupported: ") and "hardsigmoid" in db, db
    # asked for explicitly, Hutchinson refuses before any probe, with the alternatives
    with pytest.raises(ModelCheckError, match="hutchinson needs a second derivative.*use criterion 'fisher'"):
        estimate(net, S, batches, "hutchinson", progress=False, max_probes=4)
    # with a custom loss, auto has nothing that can run and says what to use
    with pytest.raises(ModelCheckError, match="custom loss only Hutchinson applies.*'taylor'"):
        estimate(net, S, batches, "auto", progress=False, loss_fn=F.cross_entropy)

    # torch's fused attention has no second derivative either; the trial differentiates with respect to the
    # structures' parameters only, as Hutchinson does: here the prunable group is the MLP after the attention, whose
    # Hessian needs no derivative through it, so Hutchinson runs
    net = NETS["attention_sdpa"]()
    assert "attention" in double_backward_error(net, batches[0], list(net.parameters()), default_loss)
    S = build_structures(net, batches[0][0][:1])
    assert estimate(net, S, batches, "auto", progress=False).info["auto"]["double_backward"] == "supported"
    h = estimate(net, S, batches, "hutchinson", progress=False, max_probes=4, min_probes=4)
    assert torch.isfinite(h.scores).all()

    net = NETS["gelu"]()
    S = build_structures(net, data()[0][0][:1])
    assert estimate(net, S, data(), "auto", progress=False).info["auto"]["double_backward"] == "supported"


def test_hutchinson_time_budget_ends_an_unreachable_run_and_reports_reliability():
    net = NETS["gelu"]()
    batches = data()
    S = build_structures(net, batches[0][0][:1])
    t0 = time.perf_counter()
    s = estimate(net, S, batches, "hutchinson", progress=False, max_probes=100_000, reliability=0.99999,
                 time_budget=1.0)
    elapsed = time.perf_counter() - t0
    assert s.info["stopped_by"] == ["time_budget", "time_budget"]
    assert all(n < 100_000 and n % 2 == 0 for n in s.info["probes_per_batch"])
    # the reliability reached is reported: Spearman-Brown 2r / (1 + r) of the halves' correlation r, at most 1 (and
    # below -1 for a negative r, as two probes can give); the budget ended the run before the rule's first check
    assert len(s.info["reliability_per_batch"]) == 2 and all(r <= 1 for r in s.info["reliability_per_batch"])
    assert elapsed < 60, elapsed  # about 1 s of probing, plus the passes; generous for a loaded machine
    # without a budget the cap or the rule ends it, and says which
    s = estimate(net, S, batches, "hutchinson", progress=False, max_probes=8, min_probes=8)
    assert s.info["stopped_by"] == ["max_probes", "max_probes"] and s.info["time_budget"] is None
    s = estimate(net, S, batches, "hutchinson", progress=False, max_probes=400, reliability=-1.0, check_every=4)
    # the rule must hold at two checks in a row: min_probes 16, then the next check at 20
    assert s.info["stopped_by"] == ["reliability", "reliability"] and s.info["probes_per_batch"] == [20, 20]


@pytest.mark.parametrize("criterion", ["ggn", "fisher"])
def test_ggn_and_fisher_time_budget_uses_the_batches_done(criterion):
    net = NETS["silu"]()
    batches = data(batches=6)
    S = build_structures(net, batches[0][0][:1])
    first = estimate(net, S, batches[:1], criterion, progress=False)
    s = estimate(net, S, batches, criterion, progress=False, time_budget=1e-9)
    assert s.info["batches_used"] == 1 and s.info["samples"] == 16
    assert torch.allclose(s.trace, first.trace, rtol=1e-6)  # the mean over the batch used, not diluted
    full = estimate(net, S, batches, criterion, progress=False)
    assert "batches_used" not in full.info
    with pytest.raises(ValueError, match="time_budget must be a positive number"):
        estimate(net, S, batches, criterion, progress=False, time_budget=0)


def test_unknown_options_are_refused_before_work():
    net = NETS["gelu"]()
    S = build_structures(net, data()[0][0][:1])
    with pytest.raises(TypeError, match="criterion 'l2' takes no option 'max_probes'"):
        estimate(net, S, data(), "l2", progress=False, max_probes=3)
    with pytest.raises(TypeError, match="'fisher' takes no option 'max_probe'"):
        estimate(net, S, data(), "fisher", progress=False, max_probe=3)
    with pytest.raises(ValueError, match="unknown score rule"):
        estimate(net, S, data(), "ggn", progress=False, score="hap2")


# ---------------------------------------------------------------- Hugging Face models with sdpa attention

transformers = pytest.importorskip("transformers")


class HFLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x)  # an ImageClassifierOutput: estimate reads its logits


def tiny_vit(impl="sdpa"):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=24, num_labels=5, attn_implementation=impl)
    return HFLogits(ViTForImageClassification(cfg).eval())


def test_hf_vit_with_sdpa_hutchinson_switches_to_eager_and_restores():
    net = tiny_vit("sdpa")
    assert net.model.config._attn_implementation == "sdpa"
    batches = data()
    S = _structures(net, batches)
    s = estimate(net, S, batches, "hutchinson", progress=False, max_probes=4, min_probes=4)
    assert "sdpa -> eager" in s.info["attention"]
    assert net.model.config._attn_implementation == "sdpa"  # restored
    assert torch.isfinite(s.scores).all()
    # the same scores as a model loaded with eager attention (the switch changes nothing but the kernel)
    ref = estimate(tiny_vit("eager"), S, batches, "hutchinson", progress=False, max_probes=4, min_probes=4)
    assert "attention" not in ref.info
    assert torch.allclose(s.scores, ref.scores, rtol=1e-4)
    a = estimate(net, S, batches, "auto", progress=False)
    assert a.criterion == "fisher" and "(with eager attention)" in a.info["auto"]["double_backward"]
    assert net.model.config._attn_implementation == "sdpa"


def _structures(net, batches):
    """Structures of the wrapped HF model, built on a tensor-returning view with the same parameter names."""

    class View(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model

        def forward(self, x):
            return self.model(pixel_values=x).logits

    return build_structures(View(net), batches[0][0][:1])
