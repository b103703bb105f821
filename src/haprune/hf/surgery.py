"""Apply a :class:`haprune.plan.Plan` to a transformer: physically smaller projections, implants, and a config
that describes the result.

Removal keeps the remaining heads (or key/value groups) and FFN neurons in their original order, so the result
has exactly the shapes Hugging Face's own head pruning would give. A removed head's constant contribution
(W_o b_v: value bias through the output projection) moves into the output projection's bias, so removal changes
the output only by the head's input-dependent part.

The config is rewritten so that the pruned model reloads:

- ``config.haprune``: a record of every block's new size (read by :func:`haprune.hf.from_pretrained`, which
  works on any transformers version);
- where a stock config can describe the result, its own fields too, so plain ``from_pretrained`` works:
  BERT-family models with head removal only and equal FFN widths (``pruned_heads``, ``intermediate_size``; the
  transformers 4.x mechanism), Llama-family models with the same widths in every layer (``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim``, ``intermediate_size``). Otherwise the stock fields are left unpruned, so
  a plain ``from_pretrained`` fails loudly with a size mismatch instead of loading wrong weights.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.nn as nn

from ..apply import PlanMismatchError, set_submodule as _set
from ..plan import Plan
from .implant import ImplantedSelfAttention, LowRankHeads, fit_lowrank_head
from .layout import AttentionBlock, FfnBlock, set_head_count
from .structures import block_index

__all__ = ["prune_transformer", "find_pretrained", "RECORD_KEY"]

RECORD_KEY = "haprune"
RECORD_VERSION = 1


def find_pretrained(model: nn.Module) -> tuple[str, nn.Module]:
    """The Hugging Face ``PreTrainedModel`` in ``model`` (itself or a submodule) and its name prefix."""
    for name, m in model.named_modules():
        if hasattr(m, "config") and hasattr(m, "save_pretrained"):
            return (f"{name}." if name else ""), m
    raise ValueError("no Hugging Face PreTrainedModel (a module with .config and .save_pretrained) in this model")


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new.train(old.training)


def _rows(unit_list: list[int], per_unit: int) -> torch.Tensor:
    return torch.tensor([u * per_unit + j for u in unit_list for j in range(per_unit)], dtype=torch.long)


@torch.no_grad()
def _prune_attention(model: nn.Module, b: AttentionBlock, keep: list[int], implant: list[int], remove: list[int],
                     rank: int) -> None:
    q, k, v, o = (model.get_submodule(n) for n in (b.q, b.k, b.v, b.o))
    d, per_q = b.head_dim, b.group_size * b.head_dim
    q_rows, kv_rows = _rows(keep, per_q), _rows(keep, d)
    o_bias = None if o.bias is None else o.bias.detach().clone()
    if o_bias is not None and v.bias is not None:  # constant part of every head that leaves the full form
        for u in [*implant, *remove]:
            for head in range(u * b.group_size, (u + 1) * b.group_size):
                kv = head // b.group_size
                o_bias += o.weight[:, head * d:(head + 1) * d] @ v.bias[kv * d:(kv + 1) * d]
    o_cols = [o.weight[:, q_rows]]
    implant_module = None
    if implant:
        if not b.implants or b.group_size != 1:
            raise NotImplementedError(
                f"{b.name}: attention implants are implemented for BERT-style self-attention (absolute positions, "
                f"one key/value per head), not for the {b.layout} layout"
                + ("; rotary embeddings do not commute with a low-rank query/key map" if b.family == "llama" else ""))
        sa = model.get_submodule(b.heads_module)
        hidden = q.in_features
        implant_module = LowRankHeads(hidden, len(implant), rank, float(getattr(getattr(sa, "dropout", None), "p", getattr(sa, "dropout_prob", 0.0)))) \
            .to(device=q.weight.device, dtype=q.weight.dtype)
        fits = [fit_lowrank_head(q.weight[h * d:(h + 1) * d], None if q.bias is None else q.bias[h * d:(h + 1) * d],
                                 k.weight[h * d:(h + 1) * d], v.weight[h * d:(h + 1) * d],
                                 o.weight[:, h * d:(h + 1) * d], rank) for h in implant]
        implant_module.query.weight.copy_(torch.cat([f["q_weight"] for f in fits]))
        implant_module.query.bias.copy_(torch.cat([f["q_bias"] for f in fits]))
        implant_module.key.weight.copy_(torch.cat([f["k_weight"] for f in fits]))
        implant_module.value.weight.copy_(torch.cat([f["v_weight"] for f in fits]))
        o_cols.append(torch.cat([f["o_weight"] for f in fits], dim=1).to(o.weight.dtype))
    _set(model, b.q, _new_linear(q, q.weight[q_rows], None if q.bias is None else q.bias[q_rows]))
    _set(model, b.k, _new_linear(k, k.weight[kv_rows], None if k.bias is None else k.bias[kv_rows]))
    _set(model, b.v, _new_linear(v, v.weight[kv_rows], None if v.bias is None else v.bias[kv_rows]))
    _set(model, b.o, _new_linear(o, torch.cat(o_cols, dim=1), o_bias))
    set_head_count(model, b, len(keep))
    if implant_module is not None:
        sa = model.get_submodule(b.heads_module)
        _set(model, b.heads_module, ImplantedSelfAttention(sa, implant_module).train(sa.training))


@torch.no_grad()
def _prune_ffn(model: nn.Module, b: FfnBlock, keep: list[int]) -> None:
    idx = torch.tensor(keep, dtype=torch.long)
    for name in [b.up] + ([b.gate] if b.gate else []):
        lin = model.get_submodule(name)
        _set(model, name, _new_linear(lin, lin.weight[idx], None if lin.bias is None else lin.bias[idx]))
    down = model.get_submodule(b.down)
    _set(model, b.down, _new_linear(down, down.weight[:, idx], down.bias))


def _layer_index(name: str) -> int:
    found = re.findall(r"\.(\d+)\.", f".{name}.")
    if not found:
        raise ValueError(f"cannot tell the layer index of block {name!r}")
    return int(found[-1])


def prune_transformer(model: nn.Module, plan: Plan, *, implant_rank: int | None = None,
                      compensate: Any = None, ridge: float = 1e-4, mask_fn: Any = None,
                      progress: bool = False) -> nn.Module:
    """A pruned copy of ``model`` (never modified) following ``plan`` (groups named as by
    :func:`haprune.hf.transformer_structures` on the same ``model``).

    ``implant_rank``: head dimension of implanted heads (default: ``plan.implant_rank``, else head_dim // 4).
    ``compensate``: calibration batches (what ``model`` accepts, e.g. :func:`haprune.hf.text_batches` output);
    when given, the output and down projections that lost inputs are refitted to the dense model's outputs
    (:func:`haprune.hf.compensate_transformer`, ``ridge``, ``mask_fn``), and ``config.haprune["compensation"]``
    records it.
    """
    blocks = block_index(model)
    unknown = [n for n in plan.groups if n not in blocks]
    if unknown:
        raise PlanMismatchError(f"plan names block(s) {unknown[:3]} that this model does not have; was the plan "
                                "made for another model (or for the model wrapped differently)?")
    for name, gp in plan.groups.items():
        b = blocks[name]
        size = b.num_units if isinstance(b, AttentionBlock) else b.size
        if gp.size != size:
            raise PlanMismatchError(f"{name}: the plan has {gp.size} units, the model {size}")
        if not gp.keep:
            raise PlanMismatchError(f"{name}: the plan removes every unit; keep at least one")
        if gp.implant and not isinstance(b, AttentionBlock):
            raise PlanMismatchError(f"{name}: implants are for attention blocks only")
    rank = implant_rank or getattr(plan, "implant_rank", 0) or None
    prefix, hf = find_pretrained(model)
    original = copy.deepcopy(hf.config)
    pruned = copy.deepcopy(model)
    for name, gp in plan.groups.items():
        b = blocks[name]
        if isinstance(b, AttentionBlock):
            if gp.implant and rank is None:
                rank = max(1, b.head_dim // 4)
            _prune_attention(pruned, b, gp.keep, sorted(gp.implant), sorted(gp.remove), rank or 0)
        elif gp.remove:
            _prune_ffn(pruned, b, gp.keep)
    _write_config(pruned, prefix, original, plan, blocks, rank or 0)
    if compensate is not None:
        from .compensate import compensate_transformer

        report = compensate_transformer(model, pruned, compensate, ridge=ridge, mask_fn=mask_fn, progress=progress)
        record = getattr(find_pretrained(pruned)[1].config, RECORD_KEY)
        record["compensation"] = {
            "ridge": ridge, "mode": "sequential", "rows": max((r["rows"] for r in report.values()), default=0),
            "layers": {n[len(prefix):] if n.startswith(prefix) else n:
                       {"sse_before": r["sse_before"], "sse_after": r["sse_after"]} for n, r in report.items()}}
    return pruned


def _write_config(model: nn.Module, prefix: str, original: Any, plan: Plan, blocks: dict, rank: int) -> None:
    _, hf = find_pretrained(model)
    config = hf.config
    record = copy.deepcopy(getattr(original, RECORD_KEY, None)) or {
        "version": RECORD_VERSION,
        "original": {k: getattr(original, k, None) for k in
                     ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")},
        "pruned_heads": {str(k): sorted(v) for k, v in (getattr(original, "pruned_heads", None) or {}).items()},
        "attention": {}, "ffn": {},
    }
    for name, gp in plan.groups.items():
        b = blocks[name]
        rel = name[len(prefix):] if name.startswith(prefix) else name
        if isinstance(b, AttentionBlock):
            entry = record["attention"].get(rel, {"implanted": 0, "rank": 0})
            if entry["implanted"] and (gp.remove or gp.implant):
                raise NotImplementedError(f"{name} already holds implants; prune the dense model instead")
            entry["units"] = len(gp.keep)
            if gp.implant:
                entry.update(implanted=len(gp.implant), rank=rank)
            record["attention"][rel] = entry
            if b.family == "bert":  # original head indices, for stock pruned_heads
                layer = str(_layer_index(rel))
                before = set(record["pruned_heads"].get(layer, []))
                alive = [h for h in range(record["original"]["num_attention_heads"]) if h not in before]
                gone = {alive[u] for u in [*gp.remove, *gp.implant]}
                record["pruned_heads"][layer] = sorted(before | gone)
                # keep HF's own bookkeeping consistent (BertAttention.pruned_heads) where it exists
                mod = model.get_submodule(name)
                if hasattr(mod, "pruned_heads"):
                    mod.pruned_heads = set(record["pruned_heads"][layer])
        else:
            record["ffn"][rel] = len(gp.keep)
    setattr(config, RECORD_KEY, record)
    _stock_fields(config, record, blocks)


def _stock_fields(config: Any, record: dict, blocks: dict) -> None:
    """Set the stock config fields where they can describe the pruned model (see the module docstring)."""
    orig = record["original"]
    families = {b.family for b in blocks.values() if isinstance(b, AttentionBlock)}
    implants = any(e.get("implanted") for e in record["attention"].values())
    n_ffn = sum(isinstance(b, FfnBlock) for b in blocks.values())
    widths = set(record["ffn"].values())
    ffn_uniform = not record["ffn"] or (len(record["ffn"]) == n_ffn and len(widths) == 1)
    expressible = not implants and ffn_uniform
    if families == {"llama"} or (not families and n_ffn):
        units = {e["units"] for e in record["attention"].values()}
        n_attn = sum(isinstance(b, AttentionBlock) for b in blocks.values())
        attn_uniform = not record["attention"] or (len(record["attention"]) == n_attn and len(units) == 1)
        if expressible and attn_uniform and orig["num_attention_heads"]:
            if record["attention"]:
                kv = units.pop()
                group = orig["num_attention_heads"] // (orig["num_key_value_heads"] or orig["num_attention_heads"])
                config.head_dim = orig["head_dim"] or config.hidden_size // orig["num_attention_heads"]
                config.num_attention_heads, config.num_key_value_heads = kv * group, kv
            if record["ffn"]:
                config.intermediate_size = widths.pop()
        else:
            for k, v in orig.items():
                if v is not None:
                    setattr(config, k, v)
    elif families == {"bert"}:
        if expressible:
            config.pruned_heads = {int(k): list(v) for k, v in record["pruned_heads"].items() if v}
            if record["ffn"]:
                config.intermediate_size = widths.pop()
        else:
            config.pruned_heads = {}
            config.intermediate_size = orig["intermediate_size"]
