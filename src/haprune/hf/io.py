"""Save and reload pruned Hugging Face models.

:func:`save_pretrained` writes the model with Hugging Face's own ``save_pretrained`` (safetensors) into a
temporary folder that replaces ``path`` only when complete. :func:`from_pretrained` reloads any model that
haprune pruned, on any transformers version: it builds the model from its config at the original sizes, applies
the recorded shapes (``config.haprune``), and loads the weights. Models whose pruning a stock config can
describe also load with plain ``AutoModel...from_pretrained`` (see :mod:`haprune.hf.surgery`).
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..plan import GroupPlan, Plan
from .layout import AttentionBlock, FfnBlock
from .surgery import RECORD_KEY, find_pretrained, prune_transformer

__all__ = ["save_pretrained", "from_pretrained"]


def save_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the Hugging Face model inside ``model`` to the folder ``path`` (replaced atomically)."""
    _, hf = find_pretrained(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        return model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}; save the model with haprune.hf.save_pretrained")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _align(recorded: list[str], present: list[str], path: Path) -> dict[str, str]:
    """Recorded block name -> block name in the rebuilt model. Names match on the transformers version that
    pruned the model; across versions that renamed modules (ViT: ``encoder.layer.0.attention`` in 4.57,
    ``layers.0.attention`` in 5.x) the blocks are matched in layer order."""
    if set(recorded) <= set(present):
        return {n: n for n in recorded}
    if len(recorded) != len(present):
        raise ValueError(f"{path}: the pruning record names {len(recorded)} blocks (e.g. {recorded[:1]}) and this "
                         f"transformers version's model has {len(present)} (e.g. {present[:1]}); reload with the "
                         "transformers version that pruned it")
    return dict(zip(sorted(recorded, key=_natural), sorted(present, key=_natural)))


def _checkpoint_to_model_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the (Hugging Face) ``model``'s own through the model's key mapping:
    transformers 5.x saves some models (ViT, DeiT, ...) under their 4.x key names and renames them on load;
    4.x has no mapping."""
    own = model.state_dict()
    if set(tensors) <= set(own):
        return tensors
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: keys are saved as the modules name them
        return tensors
    saved = revert_weight_conversion(model, dict(own))  # model key -> checkpoint key, as save_pretrained does
    by_id = {id(t): k for k, t in own.items()}
    rename = {}
    for ck, t in saved.items():
        k = by_id.get(id(t[0] if isinstance(t, list) else t))
        if k is not None and ck != k:
            rename[ck] = k
    return {rename.get(k, k): v for k, v in tensors.items()}


def from_pretrained(path: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a (possibly haprune-pruned) Hugging Face model folder.

    ``model_class``: e.g. ``transformers.AutoModelForSequenceClassification`` or a concrete class; default: the
    class named in the config's ``architectures``. ``kwargs`` go to ``from_config`` / ``from_pretrained``
    (e.g. ``attn_implementation="eager"``). Returns the model in eval mode.
    """
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    cls = _model_class(config, model_class)
    if not record:
        return cls.from_pretrained(path, **kwargs).eval()
    skeleton = copy.deepcopy(config)
    for k, v in record["original"].items():
        if v is not None:
            setattr(skeleton, k, v)
    skeleton.pruned_heads = {}
    delattr(skeleton, RECORD_KEY)
    model = cls.from_config(skeleton, **kwargs) if hasattr(cls, "from_config") else cls._from_config(skeleton, **kwargs)
    groups: dict[str, GroupPlan] = {}
    rank = 0
    from .structures import block_index

    blocks = block_index(model)
    attn_names = _align(list(record["attention"]), [n for n, b in blocks.items() if isinstance(b, AttentionBlock)],
                        path)
    ffn_names = _align(list(record["ffn"]), [n for n, b in blocks.items() if isinstance(b, FfnBlock)], path)
    for rel, entry in record["attention"].items():
        name = attn_names[rel]
        n = blocks[name].num_units
        keep, m = entry["units"], entry.get("implanted", 0)
        groups[name] = GroupPlan(n, remove=list(range(keep + m, n)), implant=list(range(keep, keep + m)))
        rank = max(rank, entry.get("rank", 0))
    for rel, size in record["ffn"].items():
        name = ffn_names[rel]
        groups[name] = GroupPlan(blocks[name].size, remove=list(range(size, blocks[name].size)))

    model = prune_transformer(model, Plan(groups, implant_kind="lowrank", implant_rank=rank), implant_rank=rank or None)
    config._attn_implementation = model.config._attn_implementation  # the modules were built for it
    model.config = config
    tensors = _read_weights(path)
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    if not set(tensors) & set(own) and prefix:  # weights saved from the bare base model
        tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
    tensors = _checkpoint_to_model_keys(model, tensors)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight") or "decoder.weight" in k}
    bad = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if bad or unexpected:
        raise ValueError(f"weights in {path} do not fit the recorded shapes: missing {bad[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()
