"""Where the prunable parts of a Hugging Face transformer are: attention blocks and feed-forward blocks.

Two families are recognised by their module attributes, not by class names, so that BERT, RoBERTa, MiniLM,
ELECTRA (BERT-style ``attention.self.{query,key,value}`` + ``attention.output.dense``) and Llama, Mistral, Qwen2
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) all work:

- an attention *unit* is one head (BERT) or one key/value group (Llama: a KV head and the query heads that
  share it; with plain multi-head attention, one head). Its structure is the unit's rows of Q, K and V (with
  biases) and its columns of the output projection.
- an FFN *unit* is one intermediate neuron: a row of the up (and gate) projection and a column of the down one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["AttentionBlock", "FfnBlock", "find_blocks", "UnsupportedTransformerError"]


class UnsupportedTransformerError(ValueError):
    """The model has no attention or feed-forward block that haprune recognises."""


@dataclass(frozen=True)
class AttentionBlock:
    name: str  # the module whose attributes describe the heads (BERT: ``...attention``; Llama: ``...self_attn``)
    family: str  # "bert" or "llama"
    q: str
    k: str
    v: str
    o: str
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int

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


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def find_blocks(model: nn.Module) -> tuple[list[AttentionBlock], list[FfnBlock]]:
    """The attention and FFN blocks of ``model``, in module order (names relative to ``model``)."""
    attn: list[AttentionBlock] = []
    ffn: list[FfnBlock] = []
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        # BERT family: <attention>.self.{query,key,value}, <attention>.output.dense
        sa = getattr(m, "self", None)
        if isinstance(sa, nn.Module) and all(_linear(m, f"self.{t}") for t in ("query", "key", "value")) \
                and _linear(m, "output.dense") is not None and hasattr(sa, "num_attention_heads"):
            kind = getattr(sa, "position_embedding_type", "absolute")
            if kind not in ("absolute", None):
                raise UnsupportedTransformerError(
                    f"{name}: relative position embeddings ({kind}) tie the head size; not supported")
            n, d = int(sa.num_attention_heads), int(sa.attention_head_size)
            attn.append(AttentionBlock(name, "bert", f"{p}self.query", f"{p}self.key", f"{p}self.value",
                                       f"{p}output.dense", n, n, d))
        # Llama family: {q,k,v,o}_proj with head_dim and num_key_value_groups
        elif all(_linear(m, t) is not None for t in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(m, "head_dim"):
            d = int(m.head_dim)
            n = m.q_proj.out_features // d
            kv = m.k_proj.out_features // d
            attn.append(AttentionBlock(name, "llama", f"{p}q_proj", f"{p}k_proj", f"{p}v_proj", f"{p}o_proj",
                                       n, kv, d))
        # FFN: BERT layer (intermediate.dense -> output.dense) or gated MLP (gate/up -> down)
        if _linear(m, "intermediate.dense") is not None and _linear(m, "output.dense") is not None \
                and hasattr(m, "attention"):
            ffn.append(FfnBlock(f"{p}intermediate", f"{p}intermediate.dense", f"{p}output.dense", None,
                                m.intermediate.dense.out_features))
        elif all(_linear(m, t) is not None for t in ("gate_proj", "up_proj", "down_proj")):
            ffn.append(FfnBlock(name, f"{p}up_proj", f"{p}down_proj", f"{p}gate_proj", m.up_proj.out_features))
    if not attn and not ffn:
        raise UnsupportedTransformerError(
            "no attention block (BERT-style query/key/value or Llama-style q_proj/k_proj/v_proj/o_proj) and no "
            "feed-forward block found; for CNNs and other models use haprune.build_structures")
    return attn, ffn
