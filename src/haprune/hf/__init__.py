"""haprune for Hugging Face transformers: attention-head and FFN-neuron pruning with low-rank head implants.

The same estimate -> plan -> apply -> recover -> report shape as for CNNs:

>>> from haprune import estimate
>>> from haprune.hf import TextClassifier, transformer_structures, plan_transformer, prune_transformer
>>> net = TextClassifier(AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager"))
>>> structures = transformer_structures(net, heads=True)            # heads (KV groups under GQA)
>>> sens = estimate(net, structures, batches, "hutchinson")         # Tr(H_s)/n_s * ||w_s||^2 per head
>>> plan = plan_transformer(net, structures, sens, 0.6, budget="units", implant_ratio=0.1)
>>> pruned = prune_transformer(net, plan)                           # a smaller copy; config rewritten
>>> pruned = prune_transformer(net, plan, compensate=batches)       # ... with output/down projections refitted
>>> haprune.hf.save_pretrained(pruned, "out/")                      # reload: haprune.hf.from_pretrained

Needs ``transformers`` (tested on the version pinned in requirements/env.txt, 4.57; no use of ``prune_heads`` or
``head_mask``). Michel et al.'s head importance is :func:`michel_importance`; the structured OBS saliency
(optionally weighted by the loss curvature of the block output) is :func:`obs_importance`; compensation (the
consumer layers refitted to the dense outputs) is :func:`compensate_transformer`.
"""
from __future__ import annotations

from ..lazy import lazy_attributes

# name -> submodule: imported on first use, so that `import haprune.hf.cli` (and `haprune prune-hf --help`)
# does not pay for torch
_LAZY = {'compensate_transformer': 'compensate', 'consumer_layers': 'compensate', 'UNIT_CRITERIA': 'importance', 'michel_importance': 'importance', 'obs_importance': 'importance', 'unit_importance': 'importance', 'from_pretrained': 'io', 'save_pretrained': 'io', 'AttentionBlock': 'layout', 'FfnBlock': 'layout', 'UnsupportedTransformerError': 'layout', 'find_blocks': 'layout', 'BUDGETS': 'plan', 'plan_transformer': 'plan', 'TextFinetuneConfig': 'recover', 'evaluate_text': 'recover', 'finetune_text': 'recover', 'transformer_structures': 'structures', 'prune_transformer': 'surgery', 'TextClassifier': 'text', 'TextData': 'text', 'minilm_path': 'text', 'rotten_tomatoes': 'text', 'text_batches': 'text', 'tokenize': 'text'}

__all__ = [
    "AttentionBlock", "FfnBlock", "UnsupportedTransformerError", "find_blocks", "transformer_structures",
    "plan_transformer", "BUDGETS", "prune_transformer", "save_pretrained", "from_pretrained", "michel_importance",
    "unit_importance", "UNIT_CRITERIA", "obs_importance", "compensate_transformer", "consumer_layers",
    "TextClassifier", "TextData", "rotten_tomatoes", "tokenize", "text_batches", "minilm_path",
    "TextFinetuneConfig", "finetune_text", "evaluate_text",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, __all__)
