"""Compensation for transformers (output / down projections refitted after removal) and the structured OBS
saliency: exact against closed-form least squares and brute-force refits on tiny random BERT and Llama models."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from haprune.apply.regression import UndeterminedFitError  # noqa: E402
from haprune.hf import (TextClassifier, compensate_transformer, consumer_layers, obs_importance,  # noqa: E402
                        plan_transformer, prune_transformer, transformer_structures)
from haprune.hf.compensate import packed_token_mask, token_rows  # noqa: E402
from haprune.plan import GroupPlan, Plan  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


def tiny_bert(seed: int = 0) -> TextClassifier:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=12, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return TextClassifier(BertForSequenceClassification(cfg).eval())


def tiny_llama(seed: int = 0) -> TextClassifier:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=12, max_position_embeddings=32, num_labels=2,
                      pad_token_id=0)
    return TextClassifier(LlamaForSequenceClassification(cfg).eval())


def batches(seed: int = 0, n: int = 3, b: int = 6, length: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Packed (batch, 2, length) tokens, right-padded with varying lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (b, length), generator=g)
        lens = torch.randint(3, length + 1, (b,), generator=g)
        lens[0] = length
        mask = (torch.arange(length)[None] < lens[:, None]).long()
        ids = ids * mask
        out.append((torch.stack([ids, mask], 1), torch.randint(0, 2, (b,), generator=g)))
    return out


def rows(model: nn.Module, layer: str, data, *, output: bool) -> torch.Tensor:
    """The layer's input (or output) rows at non-padding tokens, float64, over all batches (independent of the
    library's own collection code)."""
    got = []

    def hook(mod, inp, out):
        got.append((out if output else inp[0]).detach())

    parts = []
    h = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x, _ in data:
                model(x)
                t = got.pop()
                m = x[:, 1, : t.shape[1]].bool()
                parts.append(t[m].double())
    finally:
        h.remove()
    return torch.cat(parts)


def lstsq(x: torch.Tensor, y: torch.Tensor, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if intercept else x
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution
    return (sol[:-1].T, sol[-1]) if intercept else (sol.T, None)


def make_plan(net, removes: dict[str, list[int]], heads=True, ffn=True) -> Plan:
    s = transformer_structures(net, heads=heads, ffn=ffn)
    return Plan({g.name: GroupPlan(g.size, sorted(removes.get(g.name, []))) for g in s}, implant_kind="lowrank")


def first_names(net):
    s = transformer_structures(net, heads=True, ffn=True)
    return [g.name for g in s]


@pytest.mark.parametrize("factory,intercept", [(tiny_bert, True), (tiny_llama, False)])
def test_compensated_layers_are_least_squares_solutions(factory, intercept):
    dense = factory()
    names = first_names(dense)
    removes = {n: [0, 2] if "attention" in n or "self_attn" in n else [1, 4, 5, 9] for n in names}
    pruned = prune_transformer(dense, make_plan(dense, removes))
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    data = batches(1, n=4)
    report = compensate_transformer(dense, pruned, data, ridge=1e-12)
    assert set(report) == {n for _, n in consumer_layers(dense)}  # every consumer shrank
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes  # shapes unchanged
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # dense untouched
    for layer in report:  # forward order: each layer's fit is on the final model's own inputs
        x = rows(pruned, layer, data, output=False)
        y = rows(dense, layer, data, output=True)
        w, b = lstsq(x, y, intercept)
        mod = pruned.get_submodule(layer)
        assert (mod.bias is not None) == intercept
        torch.testing.assert_close(mod.weight.double(), w, rtol=1e-4, atol=1e-5)
        if intercept:
            torch.testing.assert_close(mod.bias.double(), b, rtol=1e-4, atol=1e-5)
        assert report[layer]["sse_after"] <= report[layer]["sse_before"] + 1e-9
        assert report[layer]["rows"] == len(x)


def test_padding_is_excluded():
    """Garbage at padded positions (other ids) changes nothing: the fit sees only real tokens."""
    dense = tiny_bert(3)
    removes = {n: [1] for n in first_names(dense)}
    plan = make_plan(dense, removes)
    data = batches(2)
    noisy = []
    for x, y in data:
        x = x.clone()
        pad = x[:, 1] == 0
        x[:, 0][pad] = 7
        noisy.append((x, y))
    a, b = prune_transformer(dense, plan), prune_transformer(dense, plan)
    compensate_transformer(dense, a, data)
    compensate_transformer(dense, b, noisy)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_removing_nothing_changes_nothing():
    dense = tiny_bert(1)
    pruned = prune_transformer(dense, make_plan(dense, {}))
    assert compensate_transformer(dense, pruned, batches()) == {}
    for (k, a), b in zip(dense.state_dict().items(), pruned.state_dict().values()):
        assert torch.equal(a, b), k
    # refitting a full-width layer recovers its own weights (the dense output is exactly linear in its input)
    layer = consumer_layers(dense)[0][1]
    compensate_transformer(dense, pruned, batches(n=6), layers=[layer], ridge=0.0)
    torch.testing.assert_close(pruned.get_submodule(layer).weight, dense.get_submodule(layer).weight,
                               rtol=1e-3, atol=1e-4)


def test_undetermined_fit_raises_before_changing_anything():
    dense = tiny_bert(2)
    pruned = prune_transformer(dense, make_plan(dense, {n: [0] for n in first_names(dense)}))
    snapshot = copy.deepcopy(pruned.state_dict())
    few = batches(n=1, b=1, length=4)  # 4 tokens, 12+ regressors
    with pytest.raises(UndeterminedFitError, match="calibration tokens"):
        compensate_transformer(dense, pruned, few)
    assert all(torch.equal(v, snapshot[k]) for k, v in pruned.state_dict().items())
    with pytest.raises(ValueError, match="not an output or down projection"):
        compensate_transformer(dense, pruned, batches(), layers=["model.classifier"])


_ROWS: dict = {}


def dense_rows(model, layer, data):
    """(x, y) rows of an unchanging model's layer, computed once per test."""
    key = (id(model), layer, id(data))
    if key not in _ROWS:
        _ROWS[key] = (rows(model, layer, data, output=False), rows(model, layer, data, output=True))
    return _ROWS[key]


def brute_force_removal_error(dense, group: str, layer: str, units_cols: list[list[int]], data, intercept: bool,
                              row_weight: torch.Tensor | None = None) -> float:
    """Error increase (weighted per output) of removing the given columns and refitting the rest by lstsq."""
    x, y = dense_rows(dense, layer, data)
    drop = {c for cols in units_cols for c in cols}
    keep = [c for c in range(x.shape[1]) if c not in drop]
    w, b = lstsq(x[:, keep], y, intercept)
    pred = x[:, keep] @ w.T + (b if b is not None else 0)
    per_out = (y - pred).square().sum(0)
    w0, b0 = lstsq(x, y, intercept)  # the full fit: zero error up to rounding
    base = (y - x @ w0.T - (b0 if b0 is not None else 0)).square().sum(0)
    rw = torch.ones_like(per_out) if row_weight is None else row_weight
    return float(((per_out - base) * rw).sum())


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_obs_saliency_equals_brute_force_refit(factory):
    net = factory(4)
    s = transformer_structures(net, heads=True, ffn=True)
    data = batches(5, n=5)
    sens = obs_importance(net, s, data, ridge=1e-13, sequential=False)
    intercept = factory is tiny_bert
    for g in s:
        sl = [t for t in g.param_slices if t.dim == 1][0]
        layer = sl.tensor[: -len(".weight")]
        for u in range(g.size):
            cols = sl.idxs[sl.root_idxs == u].tolist()
            ref = brute_force_removal_error(net, g.name, layer, [cols], data, intercept)
            got = float(sens.scores[s.offsets[g.name] + u])
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-8), (g.name, u)


def test_sequential_obs_scores_are_joint_refit_errors():
    """The greedy surgeon's score of the k-th removal is the exact error of removing the first k units together
    (summed over blocks), and its order is a global ranking."""
    net = tiny_bert(6)
    s = transformer_structures(net, heads=True, ffn=True)
    data = batches(7, n=5)
    seq = obs_importance(net, s, data, ridge=1e-13, sequential=True).scores
    order = sorted(range(len(seq)), key=lambda i: float(seq[i]))
    by_flat = {}
    for g in s:
        sl = [t for t in g.param_slices if t.dim == 1][0]
        for u in range(g.size):
            by_flat[s.offsets[g.name] + u] = (g.name, sl.tensor[: -len(".weight")], sl.idxs[sl.root_idxs == u].tolist())
    removed: dict[str, list[list[int]]] = {}
    layer_of = {}
    for k, i in enumerate(order[:10]):
        name, layer, cols = by_flat[i]
        removed.setdefault(name, []).append(cols)
        layer_of[name] = layer
        ref = sum(brute_force_removal_error(net, n, layer_of[n], c, data, True) for n, c in removed.items())
        assert float(seq[i]) == pytest.approx(ref, rel=1e-5, abs=1e-8), k


def test_fisher_weighted_obs_weights_each_output_by_its_loss_curvature():
    net = tiny_bert(8)
    s = transformer_structures(net, heads=True, ffn=False)
    data = batches(9, n=4)
    sens = obs_importance(net, s, data, ridge=1e-13, sequential=False, curvature="fisher")
    assert sens.criterion == "hap-obs"
    for g in s:
        layer = [t for t in g.param_slices if t.dim == 1][0].tensor[: -len(".weight")]
        # reference Fisher: (dL/dy)^2 per output, summed over real tokens, by autograd on a hooked output
        fisher, tokens = torch.zeros(16, dtype=torch.float64), 0
        for x, y in data:
            keep = {}
            h = net.get_submodule(layer).register_forward_hook(lambda m, i, o: keep.setdefault("y", o))
            out = net(x)
            h.remove()
            grad, = torch.autograd.grad(nn.functional.cross_entropy(out, y), keep["y"])
            r = token_rows(grad, packed_token_mask(x)).double()
            fisher += r.square().sum(0)
            tokens += len(r)
        sl = [t for t in g.param_slices if t.dim == 1][0]
        for u in range(g.size):
            cols = sl.idxs[sl.root_idxs == u].tolist()
            ref = brute_force_removal_error(net, g.name, layer, [cols], data, True, fisher / tokens)
            assert float(sens.scores[s.offsets[g.name] + u]) == pytest.approx(ref, rel=1e-4, abs=1e-12)


@settings(deadline=None, max_examples=8)
@given(seed=st.integers(0, 10_000), target=st.sampled_from([0.25, 0.5, 0.75]))
def test_compensation_never_worsens_a_layer_and_keeps_shapes(seed, target):
    dense = tiny_bert(seed % 5)
    s = transformer_structures(dense, heads=True, ffn=True)
    scores = torch.rand(s.num_structures, generator=torch.Generator().manual_seed(seed))
    plan = plan_transformer(dense, s, scores, target, budget="units")
    pruned = prune_transformer(dense, plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    rep = compensate_transformer(dense, pruned, batches(seed, n=4), ridge=1e-6)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    for r in rep.values():
        assert r["sse_after"] <= r["sse_before"] * (1 + 1e-9) + 1e-9


def test_compensation_through_prune_transformer_is_recorded():
    dense = tiny_bert(2)
    plan = make_plan(dense, {n: [3] for n in first_names(dense)})
    data = batches(3)
    a = prune_transformer(dense, plan, compensate=data)
    b = prune_transformer(dense, plan)
    compensate_transformer(dense, b, data)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    record = a.model.config.haprune["compensation"]
    assert record["ridge"] == 1e-4
    assert set(record["layers"]) == {n[len("model."):] for _, n in consumer_layers(dense)}  # relative names


def test_llama_implants_refused_at_plan_time():
    net = tiny_llama()
    s = transformer_structures(net, heads=True)
    with pytest.raises(ValueError, match="rotary"):
        plan_transformer(net, s, torch.rand(s.num_structures), 0.5, budget="units", implant_ratio=0.2)
    plan_transformer(net, s, torch.rand(s.num_structures), 0.5, budget="units")  # without implants: fine
