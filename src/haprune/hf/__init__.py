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
from .compensate import compensate_transformer, consumer_layers
from .importance import UNIT_CRITERIA, michel_importance, obs_importance, unit_importance
from .io import from_pretrained, save_pretrained
from .layout import AttentionBlock, FfnBlock, UnsupportedTransformerError, find_blocks
from .plan import BUDGETS, plan_transformer
from .recover import TextFinetuneConfig, evaluate_text, finetune_text
from .structures import transformer_structures
from .surgery import prune_transformer
from .text import TextClassifier, TextData, minilm_path, rotten_tomatoes, text_batches, tokenize

__all__ = [
    "AttentionBlock", "FfnBlock", "UnsupportedTransformerError", "find_blocks", "transformer_structures",
    "plan_transformer", "BUDGETS", "prune_transformer", "save_pretrained", "from_pretrained", "michel_importance",
    "unit_importance", "UNIT_CRITERIA", "obs_importance", "compensate_transformer", "consumer_layers",
    "TextClassifier", "TextData", "rotten_tomatoes", "tokenize", "text_batches", "minilm_path",
    "TextFinetuneConfig", "finetune_text", "evaluate_text",
]
