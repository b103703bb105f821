"""haprune.hf: transformer structures, surgery, implants, plans, Michel importance and reloading, on tiny
randomly initialised BERT and Llama models (float64, exact references) and on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, BertConfig, BertForSequenceClassification, LlamaConfig,  # noqa: E402
                          LlamaForSequenceClassification)

from haprune.estimate import estimate  # noqa: E402
from haprune.hf import (TextClassifier, from_pretrained, michel_importance, plan_transformer,  # noqa: E402
                        prune_transformer, save_pretrained, transformer_structures)
from haprune.hf.implant import fit_lowrank_head  # noqa: E402
from haprune.plan import GroupPlan, Plan  # noqa: E402

F64 = torch.float64
V5 = int(transformers.__version__.split(".")[0]) >= 5


def bert(seed=0, heads=4, hidden=16, layers=2, ffn=12):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=24, num_labels=3, attn_implementation="eager")
    model = BertForSequenceClassification(cfg).double().eval()
    with torch.no_grad():  # random biases, so that bias handling is exercised
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return TextClassifier(model)


def llama(seed=0, heads=4, kv=2, hidden=16, layers=2, ffn=12, bias=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=ffn, num_labels=3, pad_token_id=0,
                      attention_bias=bias, attn_implementation="eager")
    return TextClassifier(LlamaForSequenceClassification(cfg).double().eval())


def tokens(seed=0, n=6, length=9, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad:
        mask[: n // 2, length - 3:] = 0
    return torch.stack([ids * mask, mask], 1)


def random_plan(structures, seed, implant=False):
    g = torch.Generator().manual_seed(seed)
    groups = {}
    for grp in structures:
        perm = torch.randperm(grp.size, generator=g).tolist()
        n_rm = int(torch.randint(0, grp.size - 1, (1,), generator=g))
        n_im = int(torch.randint(0, grp.size - n_rm, (1,), generator=g)) if implant and "attention" in grp.name else 0
        groups[grp.name] = GroupPlan(grp.size, sorted(perm[:n_rm]), sorted(perm[n_rm:n_rm + n_im]))
    return Plan(groups)


@torch.no_grad()
def masked_reference(net, plan, blocks):
    """The dense model with removed units' output columns zeroed (and their constant W_o b_v moved to the bias)."""
    import copy

    ref = copy.deepcopy(net)
    for name, gp in plan.groups.items():
        b = blocks[name]
        if hasattr(b, "head_dim"):
            o = ref.get_submodule(b.o)
            v = ref.get_submodule(b.v)
            d = b.head_dim
            for u in gp.remove:
                for h in range(u * b.group_size, (u + 1) * b.group_size):
                    cols = slice(h * d, (h + 1) * d)
                    if o.bias is not None and v.bias is not None:
                        kv = h // b.group_size
                        o.bias += o.weight[:, cols] @ v.bias[kv * d:(kv + 1) * d]
                    o.weight[:, cols] = 0
        else:
            ref.get_submodule(b.down).weight[:, gp.remove] = 0
    return ref


@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama-gqa"])
def test_structures_count_every_unit_parameter(make):
    net = make()
    s = transformer_structures(net, heads=True, ffn=True)
    hidden, d = 16, 4
    per_unit = {"bert": 4 * d * hidden + 3 * d, "llama": 2 * (2 * d * hidden) + 2 * d * hidden + 2 * d + 2 * d}
    numel = s.split(s.numel())
    kind = "bert" if make is bert else "llama"
    attn = [n for n in numel if n.endswith(("attention", "self_attn"))]
    ffn = [n for n in numel if n not in attn]
    assert len(attn) == 2 and len(ffn) == 2
    for n in attn:
        assert numel[n].tolist() == [per_unit[kind]] * s[n].size
    per_neuron = 2 * hidden + 1 if kind == "bert" else 3 * hidden
    for n in ffn:
        assert numel[n].tolist() == [per_neuron] * 12


@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama-gqa"])
@pytest.mark.parametrize("seed", range(4))
def test_removal_equals_zeroing_the_units(make, seed):
    net = make(seed)
    s = transformer_structures(net, heads=True, ffn=True)
    plan = random_plan(s, seed)
    pruned = prune_transformer(net, plan)
    from haprune.hf.structures import block_index

    ref = masked_reference(net, plan, block_index(net))
    x = tokens(seed)
    with torch.no_grad():
        assert torch.allclose(pruned(x), ref(x), atol=1e-10, rtol=0)
    removed = sum(s.split(s.numel())[n][gp.remove].sum().item() for n, gp in plan.groups.items())
    assert sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in pruned.parameters()) == removed


def test_removal_leaves_the_input_model_alone():
    net = bert()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = transformer_structures(net, heads=True, ffn=True)
    prune_transformer(net, random_plan(s, 1))
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("seed", range(3))
def test_full_rank_implants_are_exact(seed):
    net = bert(seed)
    s = transformer_structures(net, heads=True)
    plan = random_plan(s, seed, implant=True)
    assert any(gp.implant for gp in plan.groups.values())
    implanted = prune_transformer(net, plan, implant_rank=4)  # head_dim = 4: exact
    removal_only = prune_transformer(net, Plan({n: GroupPlan(gp.size, gp.remove) for n, gp in plan.groups.items()}))
    x = tokens(seed)
    with torch.no_grad():
        assert torch.allclose(implanted(x), removal_only(x), atol=1e-10, rtol=0)


def test_lowrank_fit_is_the_best_rank_r_map():
    g = torch.Generator().manual_seed(0)
    d, h = 6, 10
    wq, wk, wv = (torch.randn(d, h, generator=g, dtype=torch.float64) for _ in range(3))
    bq = torch.randn(d, generator=g, dtype=torch.float64)
    wo = torch.randn(h, d, generator=g, dtype=torch.float64)
    a = torch.cat([wq, bq[:, None]], 1).T @ wk / math.sqrt(d)
    s_a = torch.linalg.svdvals(a)
    errors = []
    for r in range(1, d + 1):
        f = fit_lowrank_head(wq, bq, wk, wv, wo, r)
        approx = torch.cat([f["q_weight"], f["q_bias"][:, None]], 1).T @ f["k_weight"]
        err = torch.linalg.matrix_norm(a - approx) ** 2
        assert err == pytest.approx(float((s_a[r:] ** 2).sum()), abs=1e-9)  # Eckart-Young optimum
        vo = f["o_weight"] @ f["v_weight"]
        assert torch.linalg.matrix_rank(vo) == r
        errors.append(float(err))
    assert errors[-1] < 1e-18 and errors == sorted(errors, reverse=True)
    with pytest.raises(ValueError, match="implant rank"):
        fit_lowrank_head(wq, bq, wk, wv, wo, d + 1)


def test_implants_refused_where_rotary_embeddings_break_them():
    net = llama(kv=4)
    s = transformer_structures(net, heads=True)
    plan = Plan({g.name: GroupPlan(g.size, [0], [1]) for g in s})
    with pytest.raises(NotImplementedError, match="rotary"):
        prune_transformer(net, plan)


@pytest.mark.parametrize("budget", ["params", "units"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_plan_meets_budget_least_important_first(budget, target, ratio):
    net = bert(heads=8, hidden=32, layers=3)
    s = transformer_structures(net, heads=True)
    scores = torch.rand(s.num_structures, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan = plan_transformer(net, s, scores, target, budget=budget, implant_ratio=ratio)
    assert plan.achieved["removed_fraction"] >= target
    n_removed = plan.counts()["removed"]
    assert plan.counts()["implanted"] == round(ratio * n_removed)
    per = s.split(scores)
    removed = torch.cat([per[n][gp.remove] for n, gp in plan.groups.items()])
    implanted = torch.cat([per[n][gp.implant] for n, gp in plan.groups.items() if gp.implant] or [torch.zeros(0)])
    kept = torch.cat([per[n][gp.keep] for n, gp in plan.groups.items()])
    for gp in plan.groups.values():
        assert len(gp.keep) >= 1
    if all(len(gp.keep) > 1 for gp in plan.groups.values()):  # no block at its minimum: strict order
        assert removed.max() <= min(kept.min(), implanted.min() if len(implanted) else math.inf)
    if ratio == 0:  # one fewer removal would miss the target: the plan is the smallest that meets it
        unit = 1 / s.num_structures if budget == "units" else float(s.numel()[0] / s.numel().sum())
        assert plan.achieved["removed_fraction"] - unit < target
    pruned = prune_transformer(net, plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())


def test_plan_refuses_impossible_budgets():
    net = bert()
    s = transformer_structures(net, heads=True)
    from haprune.plan import BudgetError

    with pytest.raises(BudgetError, match="min_units"):
        plan_transformer(net, s, torch.rand(s.num_structures), 0.9, budget="units")
    with pytest.raises(ValueError, match="one per structure"):
        plan_transformer(net, s, torch.rand(3), 0.5)


def test_michel_importance_is_the_gate_gradient():
    net = bert(2)
    s = transformer_structures(net, heads=True)
    batches = [(tokens(i), torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(i))) for i in range(2)]
    got = michel_importance(net, s, batches, normalize_layers=False).scores
    from haprune.hf.structures import block_index

    blocks = block_index(net)
    expected = []
    for g in s:  # reference: an explicit gate on the output projection's input, differentiated by autograd
        b = blocks[g.name]
        o = net.get_submodule(b.o)
        total = torch.zeros(g.size, dtype=torch.float64)
        for x, y in batches:
            gate = torch.ones(g.size, dtype=torch.float64, requires_grad=True)
            hook = o.register_forward_pre_hook(
                lambda m, inp: (inp[0] * gate.repeat_interleave(b.head_dim * b.group_size),))
            loss = torch.nn.functional.cross_entropy(net(x), y)
            hook.remove()
            (grad,) = torch.autograd.grad(loss, gate)
            total += grad.abs()
        expected.append(total)
    assert torch.allclose(got, torch.cat(expected), rtol=1e-9, atol=1e-14)
    normed = michel_importance(net, s, batches).per_group(s)
    for v in normed.values():
        assert sum(t * t for t in v) == pytest.approx(1.0)


def test_hutchinson_head_traces_match_the_exact_hessian_diagonal():
    net = bert(1)
    s = transformer_structures(net, heads=True)
    x, y = tokens(1), torch.tensor([0, 1, 2, 0, 1, 2])
    sens = estimate(net, s, [(x, y)], "hutchinson", max_probes=300, tol=0.0, progress=False)
    assert sens.scores.shape == (s.num_structures,) and torch.isfinite(sens.scores).all()
    # exact: per tensor, the diagonal of its own Hessian block (enough for a block trace)
    from torch.func import functional_call

    params = {n: p.detach() for n, p in net.named_parameters()}
    diag = {}
    for name in s.param_names():
        def loss_of(w, name=name):
            return torch.nn.functional.cross_entropy(functional_call(net, {**params, name: w}, (x,)), y)

        w0 = params[name]
        hess = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
        diag[name] = hess.diagonal().reshape(w0.shape)
    exact = s.reduce(diag)
    z = (sens.trace - exact).abs() / sens.stderr
    assert (z < 4.5).all(), f"Hutchinson off by {z.max():.1f} standard errors"
    assert exact.abs().min() > 0 and (sens.stderr > 0).all()


def test_text_classifier_trims_padding_without_changing_logits():
    net = bert(0)
    x = tokens(0, pad=False)
    x[:, 1, 6:] = 0
    x[:, 0, 6:] = 0
    with torch.no_grad():
        trimmed = net(x)
        full = net.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
    assert torch.allclose(trimmed, full, atol=1e-10)
    with pytest.raises(ValueError, match="packed tokens"):
        net(x[:, 0])


def test_reload_round_trips(tmp_path):
    # heads only (stock pruned_heads): plain from_pretrained and haprune's loader both give identical outputs
    net = bert(4)
    s = transformer_structures(net, heads=True)
    plan = random_plan(s, 4)
    pruned = prune_transformer(net, plan)
    save_pretrained(pruned, tmp_path / "heads")
    x = tokens(4)
    ours = TextClassifier(from_pretrained(tmp_path / "heads", attn_implementation="eager", dtype=F64))
    with torch.no_grad():
        # float64 rounding only (the loaded modules take other matmul paths): 1e-12 is ~1e11 times tighter
        # than any pruning effect
        assert torch.allclose(ours(x), pruned(x), atol=1e-12, rtol=0)
    if V5:  # transformers 5 dropped config.pruned_heads: a plain load fails loudly instead of loading wrong shapes
        with pytest.raises(Exception, match="mismatch"):
            BertForSequenceClassification.from_pretrained(tmp_path / "heads")
    else:
        plain = TextClassifier(BertForSequenceClassification.from_pretrained(
            tmp_path / "heads", attn_implementation="eager", dtype=F64).eval())
        with torch.no_grad():
            assert torch.allclose(plain(x), pruned(x), atol=1e-12, rtol=0)
    # implants and uneven FFN widths: haprune's loader; a plain load fails loudly instead of loading wrong shapes
    s2 = transformer_structures(net, heads=True, ffn=True)
    plan2 = random_plan(s2, 5, implant=True)
    pruned2 = prune_transformer(net, plan2, implant_rank=2)
    save_pretrained(pruned2, tmp_path / "implants")
    with torch.no_grad():
        assert torch.allclose(TextClassifier(from_pretrained(tmp_path / "implants", attn_implementation="eager",
                                                             dtype=F64))(x), pruned2(x), atol=1e-12, rtol=0)
    with pytest.raises(Exception, match="size mismatch|mismatched_sizes"):  # 4.x / 5.x wording
        BertForSequenceClassification.from_pretrained(tmp_path / "implants")
    # Llama with the same number of KV groups and FFN width in every layer: a stock config describes it
    lnet = llama(6)
    ls = transformer_structures(lnet, heads=True, ffn=True)
    lplan = Plan({g.name: GroupPlan(g.size, [1] if "attn" in g.name else [0, 5, 7]) for g in ls})
    lpruned = prune_transformer(lnet, lplan)
    save_pretrained(lpruned, tmp_path / "llama")
    lx = tokens(6, pad=False)
    stock = TextClassifier(LlamaForSequenceClassification.from_pretrained(tmp_path / "llama",
                                                                           attn_implementation="eager", dtype=F64))
    with torch.no_grad():
        assert torch.allclose(stock(lx), lpruned(lx), atol=1e-12, rtol=0)
    assert lpruned.model.config.num_key_value_heads == 1 and lpruned.model.config.intermediate_size == 9


def test_minilm_heads_pruned_reload_with_plain_automodel(tmp_path):
    try:
        from haprune.hf import minilm_path

        path = minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):  # any model(x) wrapper works; here mean-pooled embeddings
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state[:, 0]

    net = Pooled(model)
    s = transformer_structures(net, heads=True)
    assert s.num_structures == 72
    scores = torch.rand(72, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = plan_transformer(net, s, scores, 0.6, budget="units")
    assert plan.counts()["removed"] == round(0.6 * 72 + 0.49)
    pruned = prune_transformer(net, plan)
    save_pretrained(pruned, tmp_path / "minilm")
    if V5:  # transformers 5 dropped config.pruned_heads: only haprune's loader describes the pruned model
        with pytest.raises(Exception, match="mismatch"):
            AutoModel.from_pretrained(tmp_path / "minilm")
        reloaded = from_pretrained(tmp_path / "minilm", AutoModel, attn_implementation="eager")
    else:
        reloaded = AutoModel.from_pretrained(tmp_path / "minilm", attn_implementation="eager").eval()
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = pruned.m(input_ids=ids).last_hidden_state
        b = reloaded(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in model.parameters())
