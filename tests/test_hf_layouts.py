"""haprune.hf on architectures beyond BERT and Llama, built from tiny random configs (float64, CPU, seconds):
ViT and DeiT (4.57: ``attention.attention.query``; 5.x: ``q_proj`` + ``mlp.fc1``), DeBERTa-v2 (shared
positional keys), DistilBERT (``q_lin`` ... ``lin1/lin2``) and OPT (``out_proj`` + ``fc1/fc2``): pruning equals
zeroing the removed units, parameter counts fall by exactly the removed structures, outputs stay finite, and a
reload is exact. Fused, Conv1D and shared layouts (GPT-2, Phi-3, ALBERT) are refused naming the layout."""
from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from haprune.graph import NothingPrunableError  # noqa: E402
from haprune.hf import (UnsupportedTransformerError, find_blocks, from_pretrained, prune_transformer,  # noqa: E402
                        save_pretrained, transformer_structures)
from haprune.hf.layout import AttentionBlock, unsupported_parts  # noqa: E402
from haprune.hf.structures import block_index  # noqa: E402
from haprune.plan import GroupPlan, Plan  # noqa: E402

F64 = torch.float64
# ViT/DeiT (4.57), DistilBERT and OPT keep their head count in attributes that surgery rewrites through
# haprune.hf.layout.set_head_count; until haprune.hf.surgery calls it, pruning them must fail (strict xfail)
import haprune.hf.surgery as _surgery  # noqa: E402

_V5 = int(transformers.__version__.split(".")[0]) >= 5
_COUNTED = {"opt", "distilbert"} | (set() if _V5 else {"vit", "deit"})  # 5.x ViT: Llama-style, count inferred
_NEEDS_SURGERY = not hasattr(_surgery, "set_head_count")


def _kinds(kinds):
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason="haprune.hf.surgery does not call "
                                                    "layout.set_head_count yet"))
            if k in _COUNTED and _NEEDS_SURGERY else k for k in kinds]
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=12)
IMAGE = dict(image_size=8, patch_size=4, num_channels=1)


class Logits(nn.Module):
    """``model(x) -> logits`` for a Hugging Face classifier taking ``pixel_values`` or ``input_ids``."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def _build(config_cls: str, model_cls: str, **kw) -> nn.Module:
    cfg = getattr(transformers, config_cls)(num_labels=3, attn_implementation="eager", **kw)
    model = getattr(transformers, model_cls)(cfg).double().eval()
    with torch.no_grad():  # random biases, so that bias handling is exercised
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


ZOO = {
    "vit": lambda: Logits(_build("ViTConfig", "ViTForImageClassification", **SMALL, **IMAGE), "pixel_values"),
    "deit": lambda: Logits(_build("DeiTConfig", "DeiTForImageClassification", **SMALL, **IMAGE), "pixel_values"),
    "deberta-v2": lambda: Logits(_build("DebertaV2Config", "DebertaV2ForSequenceClassification", **SMALL,
                                        vocab_size=40, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                        share_att_key=True, max_relative_positions=8, position_buckets=4),
                                 "input_ids"),
    "distilbert": lambda: Logits(_build("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=40,
                                        dim=16, n_layers=2, n_heads=4, hidden_dim=12), "input_ids"),
    "opt": lambda: Logits(_build("OPTConfig", "OPTForSequenceClassification", vocab_size=40, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=4, ffn_dim=12, word_embed_proj_dim=16,
                                 pad_token_id=1, max_position_embeddings=32), "input_ids"),
}


def inputs(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind in ("vit", "deit"):
        return torch.randn(3, 1, 8, 8, generator=g, dtype=F64)
    return torch.randint(2, 40, (3, 7), generator=g)


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[kind]()


def random_plan(structures, seed: int) -> Plan:
    g = torch.Generator().manual_seed(seed)
    groups = {}
    for grp in structures:
        perm = torch.randperm(grp.size, generator=g).tolist()
        n_rm = int(torch.randint(1, grp.size, (1,), generator=g))
        groups[grp.name] = GroupPlan(grp.size, sorted(perm[:n_rm]))
    return Plan(groups)


@torch.no_grad()
def masked_reference(net: nn.Module, plan: Plan) -> nn.Module:
    """The dense model with removed units' output columns zeroed (removed heads' constant W_o b_v in the bias)."""
    ref = copy.deepcopy(net)
    blocks = block_index(net)
    for name, gp in plan.groups.items():
        b = blocks[name]
        if isinstance(b, AttentionBlock):
            o, v, d = ref.get_submodule(b.o), ref.get_submodule(b.v), b.head_dim
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


@pytest.mark.parametrize("kind", list(ZOO))
def test_every_layer_has_its_attention_and_ffn_block(kind):
    net = make(kind)
    attn, ffn = find_blocks(net)
    assert len(attn) == 2 and len(ffn) == 2
    for b in attn:
        assert (b.num_heads, b.num_kv_heads, b.head_dim) == (4, 4, 4)
        for proj in (b.q, b.k, b.v, b.o):
            assert isinstance(net.get_submodule(proj), nn.Linear)
    assert all(b.size == 12 for b in ffn)
    s = transformer_structures(net, heads=True, ffn=True)
    assert s.num_structures == 2 * 4 + 2 * 12
    # every unit owns its Q/K/V rows (with biases) and output columns: 4 * d * hidden + 3 * d (+ no o bias)
    numel = s.split(s.numel())
    for b in attn:
        per_head = 4 * 4 * 16 + sum(4 for p in (b.q, b.k, b.v) if net.get_submodule(p).bias is not None)
        assert numel[b.name].tolist() == [per_head] * 4


@pytest.mark.parametrize("kind", _kinds(ZOO))
@pytest.mark.parametrize("seed", range(2))
def test_pruning_equals_zeroing_and_reloads_exactly(kind, seed, tmp_path):
    net = make(kind, seed)
    s = transformer_structures(net, heads=True, ffn=True)
    plan = random_plan(s, seed)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned = prune_transformer(net, plan)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the input model is untouched
    x = inputs(kind, seed)
    with torch.no_grad():
        out = pruned(x)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, masked_reference(net, plan)(x), atol=1e-10, rtol=0)
    removed = sum(s.split(s.numel())[n][gp.remove].sum().item() for n, gp in plan.groups.items())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(net) - count(pruned) == removed
    save_pretrained(pruned, tmp_path / kind)
    reloaded = Logits(from_pretrained(tmp_path / kind, attn_implementation="eager", dtype=F64), net.key)
    assert count(reloaded) == count(pruned)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", _kinds(["vit", "deit"]))
def test_vision_transformers_prune_heads_not_only_the_ffn(kind):
    net = make(kind)
    s = transformer_structures(net, heads=True, ffn=True)
    attn = [g.name for g in s if isinstance(block_index(net)[g.name], AttentionBlock)]
    assert len(attn) == 2
    plan = Plan({g.name: GroupPlan(g.size, [0]) for g in s})
    pruned = prune_transformer(net, plan)
    for name in attn:
        b = block_index(pruned)[name]
        assert (b.num_heads, pruned.get_submodule(b.q).out_features) == (3, 12)


@pytest.mark.xfail(_NEEDS_SURGERY and not _V5, strict=True, reason="ViT 4.57 needs surgery to call "
                   "layout.set_head_count")
def test_vit_implants_at_full_rank_equal_removal_on_4x_and_are_refused_on_5x():
    net = make("vit", 1)
    s = transformer_structures(net, heads=True)
    plan = Plan({g.name: GroupPlan(g.size, [0], [2]) for g in s})
    removal = Plan({g.name: GroupPlan(g.size, [0, 2]) for g in s})
    if _V5:  # ViT 5.x is Llama-style attention: implants are refused, not mis-applied
        with pytest.raises(NotImplementedError, match="implant"):
            prune_transformer(net, plan, implant_rank=4)
        return
    x = inputs("vit", 1)
    implanted = prune_transformer(net, plan, implant_rank=4)  # head_dim 4: the implant is exact
    with torch.no_grad():
        # the implanted head keeps its contribution: equal to removing only head 0
        only0 = prune_transformer(net, Plan({g.name: GroupPlan(g.size, [0]) for g in s}))
        assert torch.allclose(implanted(x), only0(x), atol=1e-10, rtol=0)
        assert not torch.allclose(implanted(x), prune_transformer(net, removal)(x), atol=1e-6)


def _gpt2():
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=4, num_labels=3, bos_token_id=0, eos_token_id=0))


def _phi3():
    return transformers.Phi3ForSequenceClassification(transformers.Phi3Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=12, num_labels=3, pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _albert():
    return transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        vocab_size=40, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=12, num_labels=3))


@pytest.mark.parametrize("build,says", [
    (_gpt2, ["Conv1D", "c_attn", "c_fc"]),
    (_phi3, ["fused", "qkv_proj", "gate_up_proj"]),
    (_albert, ["shared by every depth", "ALBERT"]),
], ids=["gpt2", "phi3", "albert"])
def test_unsupported_layouts_are_named(build, says):
    model = build()
    for call in (lambda: find_blocks(model), lambda: transformer_structures(model, heads=True, ffn=True)):
        with pytest.raises(UnsupportedTransformerError) as e:
            call()
        for word in says:
            assert word in str(e.value)


def test_deberta_with_separate_positional_projections_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = _build("DebertaV2Config", "DebertaV2ForSequenceClassification", **SMALL, vocab_size=40,
                   relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=False)
    with pytest.raises(UnsupportedTransformerError, match="share_att_key"):
        transformer_structures(model, heads=True)


class _FusedAttentionWithMlp(nn.Module):
    """An FFN haprune knows (fc1/fc2) beside an attention it does not (one fused qkv projection)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(8, 24)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(8, 6), nn.Linear(6, 8)


def test_heads_requested_never_prunes_only_the_ffn():
    model = _FusedAttentionWithMlp()
    with pytest.raises(UnsupportedTransformerError, match="heads requested.*qkv.*heads=False, ffn=True"):
        transformer_structures(model, heads=True, ffn=True)
    s = transformer_structures(model, heads=False, ffn=True)  # asked for explicitly: the FFN alone
    assert [g.name for g in s] == ["mlp"] and s["mlp"].size == 6
    assert unsupported_parts(model) == ["fused query/key/value projection qkv at attn.qkv"]


def test_nothing_left_to_prune_says_why():
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=12, num_labels=3, pad_token_id=0))
    with pytest.raises(NothingPrunableError, match="only one attention unit.*ffn=True"):
        transformer_structures(model, heads=True)


_OTHER = os.environ.get("HAPRUNE_HF_OTHER_PYTHON")  # another venv's python with another transformers (make test-hf5)
_SAVE_AND_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_hf_layouts import make, inputs, transformer_structures, random_plan, prune_transformer, save_pretrained
net = make("vit", 3)
pruned = prune_transformer(net, random_plan(transformer_structures(net, heads=True, ffn=True), 3))
save_pretrained(pruned, sys.argv[2])
with torch.no_grad():
    torch.save(pruned(inputs("vit", 3)), sys.argv[2] + "/expected.pt")
"""
_LOAD_AND_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_hf_layouts import Logits, inputs, F64
from haprune.hf import from_pretrained
model = Logits(from_pretrained(sys.argv[2], attn_implementation="eager", dtype=F64), "pixel_values")
with torch.no_grad():
    assert torch.equal(model(inputs("vit", 3)), torch.load(sys.argv[2] + "/expected.pt")), "outputs differ"
"""


@pytest.mark.skipif(not _OTHER, reason="set HAPRUNE_HF_OTHER_PYTHON to a python with another transformers "
                                       "version (make test-hf5 does)")
@pytest.mark.xfail(_NEEDS_SURGERY, strict=True, reason="ViT 4.57 needs surgery to call layout.set_head_count")
def test_vit_reloads_exactly_across_transformers_versions(tmp_path):
    """ViT's modules and keys are renamed between 4.57 and 5.x: a model pruned and saved on one version reloads
    with bit-identical outputs on the other (module names aligned by layer, keys through the model's mapping)."""
    tests = str(Path(__file__).parent)

    def other(script: str, folder: Path) -> None:
        done = subprocess.run([_OTHER, "-c", script, tests, str(folder)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    net = make("vit", 3)
    pruned = prune_transformer(net, random_plan(transformer_structures(net, heads=True, ffn=True), 3))
    save_pretrained(pruned, tmp_path / "here")
    with torch.no_grad():
        torch.save(pruned(inputs("vit", 3)), tmp_path / "here" / "expected.pt")
    other(_LOAD_AND_CHECK, tmp_path / "here")  # saved here, loaded there
    other(_SAVE_AND_RUN, tmp_path / "there")  # saved there, loaded here
    model = Logits(from_pretrained(tmp_path / "there", attn_implementation="eager", dtype=F64), "pixel_values")
    with torch.no_grad():
        assert torch.equal(model(inputs("vit", 3)), torch.load(tmp_path / "there" / "expected.pt"))
