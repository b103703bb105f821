"""Where the prunable parts of a Hugging Face transformer are: attention blocks and feed-forward blocks.

Blocks are recognised by their module attributes, not by class names, from one table of attention layouts
(:data:`ATTENTION_LAYOUTS`) and one of feed-forward layouts (:data:`FFN_LAYOUTS`):

======================  ==========================================================  ==============================
layout                  attention projections (relative to the block)               models (4.57 / 5.x names)
======================  ==========================================================  ==============================
``bert``                ``self.{query,key,value}``, ``output.dense``                BERT, RoBERTa, XLM-R, ELECTRA,
                                                                                    MiniLM
``vit``                 ``attention.{query,key,value}``, ``output.dense``           ViT, DeiT (4.57)
``deberta-v2``          ``self.{query,key,value}_proj``, ``output.dense``           DeBERTa-v2/v3 (shared
                                                                                    positional keys)
``distilbert``          ``{q,k,v,out}_lin``                                         DistilBERT
``opt``                 ``{q,k,v,out}_proj`` with ``num_heads``                     OPT
``llama``               ``{q,k,v,o}_proj`` with ``head_dim``                        Llama, Mistral, Qwen2/3, Gemma,
                                                                                    ViT / DeiT (5.x)
======================  ==========================================================  ==============================

- an attention *unit* is one head (BERT) or one key/value group (Llama: a KV head and the query heads that
  share it; with plain multi-head attention, one head). Its structure is the unit's rows of Q, K and V (with
  biases) and its columns of the output projection.
- an FFN *unit* is one intermediate neuron: a row of the up (and gate) projection and a column of the down one
  (``intermediate.dense`` -> ``output.dense``, ``{gate,up}_proj`` -> ``down_proj``, ``fc1`` -> ``fc2``,
  ``lin1`` -> ``lin2``).

Each :class:`AttentionBlock` says which module holds the head count that the model reads in its forward pass
(``heads_module``) and which attributes to rewrite when heads go (``count_attrs``; :func:`set_head_count`).
Layouts haprune cannot prune exactly (fused query/key/value projections, GPT-2's ``Conv1D``, ALBERT's one layer
shared by every depth, relative-position attention with separate positional projections) are named by
:func:`unsupported_parts`, and every refusal says which one it met.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["AttentionBlock", "FfnBlock", "find_blocks", "unsupported_parts", "set_head_count",
           "UnsupportedTransformerError", "ATTENTION_LAYOUTS", "FFN_LAYOUTS"]


class UnsupportedTransformerError(ValueError):
    """The model has no attention or feed-forward block that haprune recognises (the message says why)."""


@dataclass(frozen=True)
class AttentionBlock:
    name: str  # the block module (BERT: ``...attention``; Llama: ``...self_attn``); also the group name
    family: str  # how a config describes pruned heads: "bert" (config.pruned_heads) or "llama" (head counts)
    q: str
    k: str
    v: str
    o: str
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    layout: str = ""  # a key of ATTENTION_LAYOUTS
    heads_module: str = ""  # the module whose attributes hold the head count ("" when the forward infers it)
    count_attrs: tuple[tuple[str, str], ...] = ()  # (attribute, "heads" | "width") on heads_module
    implants: bool = False  # a BERT-style self-attention call (hidden_states, mask, ...): low-rank implants fit

    @property
    def group_size(self) -> int:
        """Query heads per unit (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_units(self) -> int:
        return self.num_kv_heads


@dataclass(frozen=True)
class FfnBlock:
    name: str
    up: str
    down: str
    gate: str | None
    size: int


@dataclass(frozen=True)
class _AttentionLayout:
    family: str
    heads: str  # relative path of the module holding the head-count attributes ("" = the block itself)
    q: str
    k: str
    v: str
    o: str
    heads_attr: str | None  # attribute with the number of query heads (None: q rows / head_dim)
    dim_attr: str  # attribute with the head dimension
    count_attrs: tuple[tuple[str, str], ...]
    implants: bool


_BERT_COUNTS = (("num_attention_heads", "heads"), ("all_head_size", "width"))

ATTENTION_LAYOUTS: dict[str, _AttentionLayout] = {
    "bert": _AttentionLayout("bert", "self", "self.query", "self.key", "self.value", "output.dense",
                             "num_attention_heads", "attention_head_size", _BERT_COUNTS, True),
    "vit": _AttentionLayout("bert", "attention", "attention.query", "attention.key", "attention.value",
                            "output.dense", "num_attention_heads", "attention_head_size", _BERT_COUNTS, True),
    "deberta-v2": _AttentionLayout("bert", "self", "self.query_proj", "self.key_proj", "self.value_proj",
                                   "output.dense", "num_attention_heads", "attention_head_size", _BERT_COUNTS,
                                   False),
    "distilbert": _AttentionLayout("bert", "", "q_lin", "k_lin", "v_lin", "out_lin", "n_heads",
                                   "attention_head_size", (("n_heads", "heads"), ("dim", "width")), False),
    "opt": _AttentionLayout("llama", "", "q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim",
                            (("num_heads", "heads"),), False),
    "llama": _AttentionLayout("llama", "", "q_proj", "k_proj", "v_proj", "o_proj", None, "head_dim", (), False),
}

# (up, down, gate, needs an ``attention`` sibling): the BERT pair intermediate.dense / output.dense sits in the
# layer beside ``attention``, and ``output.dense`` alone also names BERT's attention output projection.
FFN_LAYOUTS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("intermediate.dense", "output.dense", None, True),
    ("up_proj", "down_proj", "gate_proj", False),
    ("fc1", "fc2", None, False),
    ("lin1", "lin2", None, False),
)

# fused or shared layouts: attribute name -> what it is (for the refusal message)
_FUSED = {
    "c_attn": "fused query/key/value in one Conv1D (GPT-2 style c_attn)",
    "qkv_proj": "fused query/key/value projection qkv_proj (Phi-3 style)",
    "query_key_value": "fused query/key/value projection query_key_value (Falcon / BLOOM / GPT-NeoX style)",
    "Wqkv": "fused query/key/value projection Wqkv (MPT / ModernBERT style)",
    "qkv": "fused query/key/value projection qkv",
    "in_proj_weight": "torch.nn.MultiheadAttention (fused in_proj_weight)",
    "gate_up_proj": "fused gate/up projection gate_up_proj (Phi-3 style FFN)",
    "c_fc": "GPT-2 style Conv1D feed-forward (c_fc / c_proj)",
}


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}{rel}" if rel else prefix.rstrip(".")


def _attention(name: str, m: nn.Module) -> AttentionBlock | None:
    p = f"{name}." if name else ""
    for key, lay in ATTENTION_LAYOUTS.items():
        if any(_linear(m, t) is None for t in (lay.q, lay.k, lay.v, lay.o)):
            continue
        holder = m.get_submodule(lay.heads) if lay.heads else m
        if not hasattr(holder, lay.dim_attr) or (lay.heads_attr and not hasattr(holder, lay.heads_attr)):
            continue
        if key == "bert":
            kind = getattr(holder, "position_embedding_type", "absolute")
            if kind not in ("absolute", None):
                raise UnsupportedTransformerError(
                    f"{name}: relative position embeddings ({kind}) add a per-head term that haprune does not "
                    "slice; not supported (absolute position embeddings are)")
        if key == "deberta-v2":
            extra = [t for t in ("pos_key_proj", "pos_query_proj") if hasattr(holder, t)]
            if extra:
                raise UnsupportedTransformerError(
                    f"{name}: DeBERTa relative-position attention with separate positional projections "
                    f"({', '.join(extra)}; config.share_att_key=False) needs their rows pruned with each head, "
                    "which haprune does not do; DeBERTa-v2/v3 with share_att_key=True (the released models) are "
                    "supported")
        d = int(getattr(holder, lay.dim_attr))
        q = m.get_submodule(lay.q)
        n = int(getattr(holder, lay.heads_attr)) if lay.heads_attr else q.out_features // d
        kv = m.get_submodule(lay.k).out_features // d
        if d < 1 or n * d != q.out_features or kv < 1 or n % kv:
            raise UnsupportedTransformerError(
                f"{name}: {key}-style attention whose sizes do not fit ({n} heads x {d} != {q.out_features} query "
                f"rows, or {kv} key/value heads); not supported")
        return AttentionBlock(name, lay.family, p + lay.q, p + lay.k, p + lay.v, p + lay.o, n, kv, d, key,
                              _join(p, lay.heads), lay.count_attrs, lay.implants)
    return None


def _ffn(name: str, m: nn.Module) -> FfnBlock | None:
    p = f"{name}." if name else ""
    for up, down, gate, beside_attention in FFN_LAYOUTS:
        u, dn = _linear(m, up), _linear(m, down)
        if u is None or dn is None or (beside_attention and not hasattr(m, "attention")):
            continue
        if gate is not None and _linear(m, gate) is None:
            continue
        if u.out_features != dn.in_features:
            continue
        return FfnBlock(_join(p, "intermediate") if up == "intermediate.dense" else name, p + up, p + down,
                        p + gate if gate else None, u.out_features)
    return None


def unsupported_parts(model: nn.Module) -> list[str]:
    """Fused, shared or otherwise unsupported attention / FFN layouts in ``model``, one line per kind, naming
    the first module of each (empty when there are none)."""
    seen: dict[str, str] = {}
    for name, m in model.named_modules():
        for attr, what in _FUSED.items():
            if what not in seen and isinstance(getattr(m, attr, None), (nn.Module, nn.Parameter)):
                seen[what] = f"{name}.{attr}" if name else attr
        if hasattr(m, "albert_layer_groups") and "shared" not in seen:
            seen["shared"] = (f"{name}.albert_layer_groups: one transformer layer shared by every depth (ALBERT); "
                              "pruning a head would prune it at every depth at once")
    return [f"{what} at {where}" if what != "shared" else where for what, where in seen.items()]


def find_blocks(model: nn.Module) -> tuple[list[AttentionBlock], list[FfnBlock]]:
    """The attention and FFN blocks of ``model``, in module order (names relative to ``model``)."""
    attn: list[AttentionBlock] = []
    ffn: list[FfnBlock] = []
    for name, m in model.named_modules():
        a = _attention(name, m)
        if a is not None:
            attn.append(a)
        f = _ffn(name, m)
        if f is not None:
            ffn.append(f)
    if not attn and not ffn:
        found = unsupported_parts(model)
        why = ("found instead: " + "; ".join(found)) if found else \
            "no module has query/key/value and output projections under the names haprune knows"
        raise UnsupportedTransformerError(
            f"no attention or feed-forward block that haprune can prune ({why}). Supported layouts: "
            f"{', '.join(ATTENTION_LAYOUTS)} attention; intermediate/output, gate/up/down, fc1/fc2, lin1/lin2 "
            "feed-forward. For CNNs and other models use haprune.build_structures")
    return attn, ffn


def set_head_count(model: nn.Module, block: AttentionBlock, units: int) -> None:
    """Rewrite the head-count attributes the forward pass reads (``block.count_attrs`` on
    ``block.heads_module``) for ``units`` kept attention units (heads, or key/value groups under GQA)."""
    if not block.count_attrs:
        return
    holder = model.get_submodule(block.heads_module)
    heads = units * block.group_size
    for attr, what in block.count_attrs:
        setattr(holder, attr, heads if what == "heads" else heads * block.head_dim)
