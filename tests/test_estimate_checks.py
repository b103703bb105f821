"""The estimators' shared checks (non-finite weights, loss and scores; saturated predictions) and models whose
output is a ModelOutput / dict / tuple."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from haprune.estimate import CalibrationDataError, ModelCheckError, estimate
from haprune.estimate.base import check_scores
from haprune.graph import build_structures
from nets import ResCNN, make_net, randomise_bn

ALL = ["auto", "hutchinson", "ggn", "fisher", "empirical_fisher", "l1", "l2", "taylor", "random"]
DATA_USING = ["auto", "hutchinson", "ggn", "fisher", "empirical_fisher", "taylor"]


def problem(seed=0, n=6):
    net = make_net(seed, widths=(3, 4), blocks=1, classes=3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return net, x, y, build_structures(net, x[:1])


class Counting:
    """Counts forward passes of a module (a hook; removed by close())."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        self.handle.remove()


def kw(criterion):
    return {"max_probes": 4} if criterion == "hutchinson" else {}


@pytest.mark.parametrize("criterion", ALL)
def test_nan_weight_is_named_before_any_forward_pass(criterion):
    net, x, y, S = problem()
    with torch.no_grad():
        net.layers[0].conv2.weight[1, 0, 0, 0] = float("nan")
    count = Counting(net)
    with pytest.raises(ModelCheckError, match=r"parameter layers\.0\.conv2\.weight \(1 of 81 values NaN or infinite\)"):
        estimate(net, S, [(x, y)] * 3, criterion, progress=False, **kw(criterion))
    assert count.calls == 0
    count.close()


def test_nan_buffer_is_named():
    net, x, y, S = problem()
    net.bn.running_var[0] = float("inf")
    with pytest.raises(ModelCheckError, match=r"buffer bn\.running_var"):
        estimate(net, S, [(x, y)], "ggn", progress=False)


@pytest.mark.parametrize("criterion", DATA_USING + ["l2"])
def test_infinite_output_is_refused_after_one_forward(criterion):
    net, x, y, S = problem()
    with torch.no_grad():
        net.stem.weight.mul_(1e20)  # finite weights; activations ~1e20, logits overflow to inf in float32
        net.fc.weight.mul_(1e20)
    count = Counting(net)
    with pytest.raises(ModelCheckError, match="NaN or infinite values although its weights are finite"):
        estimate(net, S, [(x, y)] * 3, criterion, progress=False, **kw(criterion))
    assert count.calls == 1  # the check's own forward pass, nothing more
    count.close()


@pytest.mark.parametrize("criterion", ["auto", "ggn", "fisher", "hutchinson"])
def test_huge_finite_loss_with_saturated_predictions_is_refused(criterion):
    net, x, y, S = problem()
    with torch.no_grad():
        net.fc.weight.mul_(1e7)
        net.fc.bias.zero_()
    with torch.no_grad():
        logits = net(x)
    loss = nn.functional.cross_entropy(logits, y)
    assert torch.isfinite(loss) and loss > 1e3  # finite but huge: the probabilities are exactly 0 or 1
    count = Counting(net)
    with pytest.raises(ModelCheckError, match=r"saturated \(loss .*every softmax probability is exactly 0 or 1"):
        estimate(net, S, [(x, y)] * 3, criterion, progress=False, **kw(criterion))
    assert count.calls == 1
    count.close()


def test_labels_out_of_range_are_refused():
    net, x, y, S = problem()
    with pytest.raises(CalibrationDataError, match=r"labels run from 0 to 7, but the model outputs 3 classes"):
        estimate(net, S, [(x, torch.full_like(y, 7).index_fill_(0, torch.tensor([0]), 0))], "fisher",
                 progress=False)


def test_nan_scores_from_a_later_batch_are_refused_with_the_groups():
    # the first batch is fine; the second overflows inside the net (finite inputs, float32): ggn has no loss to
    # check per batch, its scores come out NaN, and the shared check after the pass says which groups
    net, x, y, S = problem()
    with pytest.raises(ModelCheckError, match=r"ggn gave NaN or infinite scores for \d+ of \d+ structures \(groups"):
        estimate(net, S, [(x, y), (torch.full_like(x, 3e38), y)], "ggn", progress=False)


@pytest.mark.parametrize("criterion", ["l1", "ggn", "taylor"])
def test_all_zero_scores_are_refused(criterion):
    net, x, y, S = problem()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in S.param_names():
                p.zero_()
        net.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))  # finite, unsaturated output from the bias alone
    with pytest.raises(ModelCheckError, match="score of exactly zero to every structure"):
        estimate(net, S, [(x, y)], criterion, progress=False)


def test_check_scores_passes_ordinary_scores():
    net, x, y, S = problem()
    check_scores(torch.rand(S.num_structures, dtype=torch.float64), "x", S)
    bad = torch.rand(S.num_structures, dtype=torch.float64)
    bad[-1] = float("nan")
    last = list(S.split(bad))[-1]
    with pytest.raises(ModelCheckError, match=f"groups {last}"):
        check_scores(bad, "x", S)


def test_a_failed_check_leaves_the_model_untouched():
    net, x, y, S = problem()
    net.train()
    with torch.no_grad():
        net.fc.weight.mul_(1e38)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ModelCheckError):
        estimate(net, S, [(x, y)], "ggn", progress=False)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- models returning more than a tensor


class Returning(ResCNN):
    """ResCNN whose forward returns its logits wrapped as ``kind`` says (same parameter names)."""

    kind = "tensor"

    def forward(self, x):
        z = super().forward(x)
        if self.kind == "model_output":
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=z)
        if self.kind == "dict":
            return {"logits": z, "aux": z.detach()}
        if self.kind == "tuple":
            return (z, z.detach().sum())
        if self.kind == "custom":
            return {"scores": z}
        return z


def returning_problem():
    torch.manual_seed(3)
    net = Returning(widths=(3, 4), blocks=1, classes=3, act=nn.GELU)
    randomise_bn(net, torch.Generator().manual_seed(3))
    net.eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    return net, x, y, build_structures(net, x[:1])


@pytest.mark.parametrize("kind", ["model_output", "dict", "tuple"])
@pytest.mark.parametrize("criterion", ["auto", "ggn", "fisher", "empirical_fisher", "hutchinson", "taylor"])
def test_model_output_dict_and_tuple_give_the_tensor_models_scores(kind, criterion):
    net, x, y, S = returning_problem()
    ref = estimate(net, S, [(x, y)], criterion, progress=False, seed=1, **kw(criterion))
    net.kind = kind
    got = estimate(net, S, [(x, y)], criterion, progress=False, seed=1, **kw(criterion))
    assert got.criterion == ref.criterion
    assert torch.allclose(got.scores, ref.scores, rtol=1e-5, atol=0), (got.scores - ref.scores).abs().max()


def test_per_sample_paths_read_model_outputs_through_vmap_and_the_loop():
    # ggn's cross-entropy path (vmap of per-sample gradients, in chunks), its mse path (vmap of jacrev), and the
    # per-sample loop taken where vmap cannot trace the model: all unwrap the output
    net, x, y, S = returning_problem()
    ref = estimate(net, S, [(x, y)], "ggn", progress=False).trace
    ref_mse = estimate(net, S, [(x, y)], "ggn", progress=False, loss="mse").trace
    net.kind = "model_output"
    assert torch.allclose(estimate(net, S, [(x, y)], "ggn", progress=False, chunk_size=2).trace, ref, rtol=1e-5)
    assert torch.allclose(estimate(net, S, [(x, y)], "ggn", progress=False, loss="mse").trace, ref_mse, rtol=1e-5)
    from haprune.estimate import curvature

    original = curvature.vmap

    def refusing_vmap(*a, **k):
        def fn(*args, **kwargs):
            raise RuntimeError("vmap: data-dependent control flow is not supported")
        return fn

    curvature.vmap = refusing_vmap
    try:
        assert torch.allclose(estimate(net, S, [(x, y)], "ggn", progress=False).trace, ref, rtol=1e-5)
    finally:
        curvature.vmap = original


def test_output_fn_reads_any_other_convention():
    net, x, y, S = returning_problem()
    ref = estimate(net, S, [(x, y)], "fisher", progress=False)
    net.kind = "custom"
    with pytest.raises(TypeError, match="output_fn"):
        estimate(net, S, [(x, y)], "fisher", progress=False)
    got = estimate(net, S, [(x, y)], "fisher", progress=False, output_fn=lambda out: out["scores"])
    assert torch.allclose(got.scores, ref.scores, rtol=1e-5)
