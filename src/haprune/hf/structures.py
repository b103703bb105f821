"""Transformer structures as a :class:`haprune.graph.StructureSet`, so that every estimate criterion works.

One group per attention block (its units: heads, or key/value groups under GQA) and, optionally, one per FFN
block (its units: intermediate neurons). Group names are the block module names (``...attention`` for BERT,
``...self_attn`` / ``...mlp`` for Llama, ``...intermediate`` for a BERT FFN).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..graph import Group, NothingPrunableError, StructureSet, TensorSlice
from .layout import AttentionBlock, FfnBlock, UnsupportedTransformerError, find_blocks, unsupported_parts

__all__ = ["transformer_structures", "block_index"]


def _rows(tensor: str, n: int, per_unit: int, dim: int = 0) -> TensorSlice:
    idx = torch.arange(n, dtype=torch.long)
    return TensorSlice(tensor, dim, idx, idx // per_unit, True)


def _attention_group(model: nn.Module, b: AttentionBlock) -> Group:
    slices = []
    q_rows = b.num_heads * b.head_dim
    kv_rows = b.num_kv_heads * b.head_dim
    per_q = b.group_size * b.head_dim
    for mod, rows, per in ((b.q, q_rows, per_q), (b.k, kv_rows, b.head_dim), (b.v, kv_rows, b.head_dim)):
        slices.append(_rows(f"{mod}.weight", rows, per))
        if model.get_submodule(mod).bias is not None:
            slices.append(_rows(f"{mod}.bias", rows, per))
    slices.append(_rows(f"{b.o}.weight", q_rows, per_q, dim=1))
    return Group(b.name, b.num_units, slices, [b.q, b.k, b.v], [b.o])


def _ffn_group(model: nn.Module, b: FfnBlock) -> Group:
    slices = []
    outs = [b.up] + ([b.gate] if b.gate else [])
    for mod in outs:
        slices.append(_rows(f"{mod}.weight", b.size, 1))
        if model.get_submodule(mod).bias is not None:
            slices.append(_rows(f"{mod}.bias", b.size, 1))
    slices.append(_rows(f"{b.down}.weight", b.size, 1, dim=1))
    return Group(b.name, b.size, slices, outs, [b.down])


def block_index(model: nn.Module) -> dict[str, AttentionBlock | FfnBlock]:
    """Group name -> block description, for every attention and FFN block of ``model``."""
    attn, ffn = find_blocks(model)
    return {b.name: b for b in [*attn, *ffn]}


def transformer_structures(model: nn.Module, *, heads: bool = True, ffn: bool = False,
                           ignored: list[str] | None = None) -> StructureSet:
    """The attention units (``heads``) and FFN neurons (``ffn``) of ``model`` as a StructureSet.

    ``ignored``: block names (as in :func:`haprune.hf.layout.find_blocks`) to leave whole. Blocks with a single
    unit are refused (removing it would delete the block; haprune keeps at least one unit per block).
    """
    if not heads and not ffn:
        raise ValueError("nothing to prune: pass heads=True and/or ffn=True")
    attn_blocks, ffn_blocks = find_blocks(model)
    if heads and not attn_blocks:  # never prune only the FFN when heads were asked for
        found = unsupported_parts(model)
        raise UnsupportedTransformerError(
            "heads requested, but no attention block that haprune can prune was found ("
            + ("found instead: " + "; ".join(found) if found else
               "no module has query/key/value and output projections under the names haprune knows")
            + (f"); {len(ffn_blocks)} feed-forward block(s) were found: pass heads=False, ffn=True to prune only "
               "those" if ffn_blocks else ")"))
    if ffn and not ffn_blocks:
        found = unsupported_parts(model)
        raise UnsupportedTransformerError(
            "FFN neurons requested, but no feed-forward block that haprune can prune was found"
            + (" (found instead: " + "; ".join(found) + ")" if found else "")
            + (f"; {len(attn_blocks)} attention block(s) were found: pass ffn=False to prune only heads"
               if attn_blocks else ""))
    ignored = list(ignored or [])
    unknown = set(ignored) - {b.name for b in [*attn_blocks, *ffn_blocks]}
    if unknown:
        raise ValueError(f"ignored block(s) {sorted(unknown)} not found; block names look like "
                         f"{(attn_blocks or ffn_blocks)[0].name!r}")
    groups, refused = [], []
    for b in (attn_blocks if heads else []):
        if b.name in ignored:
            continue
        if b.num_units < 2:
            refused.append((b.name, "only one attention unit (one key/value head); removing it would remove the block"))
            continue
        groups.append(_attention_group(model, b))
    for b in (ffn_blocks if ffn else []):
        if b.name not in ignored:
            groups.append(_ffn_group(model, b))
    if not groups:
        why = "; ".join(f"{n}: {r}" for n, r in refused) or "none"
        raise NothingPrunableError(
            f"no attention or FFN block left to prune: {len(attn_blocks)} attention and {len(ffn_blocks)} FFN "
            f"block(s) found, refused: {why}; ignored: {', '.join(ignored) or 'none'}"
            + ("" if ffn else "; pass ffn=True to prune FFN neurons too"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return StructureSet(groups, refused, ignored, shapes)
