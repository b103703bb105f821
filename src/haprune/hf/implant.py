"""Neural Implant for attention (our extension of the paper): a moderately sensitive head keeps a reduced head
dimension instead of being removed.

For a head h with query/key/value rows W_q, W_k, W_v (and biases) and output-projection columns W_o, attention
depends on the weights only through two maps of rank <= head_dim:

- scores:  (W_q x + b_q) . (W_k y) / sqrt(d)  =  [x; 1]^T A y,  A = [W_q b_q]^T W_k / sqrt(d)
  (the b_k terms are constant over keys and cancel in the softmax), and
- values:  W_o (W_v y + b_v) = B y + W_o b_v,  B = W_o W_v  (the W_o b_v term is constant, because attention
  probabilities sum to one, and moves into the output projection's bias).

An implant of rank r replaces them by their best rank-r approximations (truncated SVD, Eckart-Young): r query and
key rows (scaling folded in), r value rows and r output columns. At r = head_dim it is exact; at r = head_dim / 4
it costs about a quarter of the head. Implanted heads run in :class:`LowRankHeads`, beside the kept full heads,
and their context is concatenated after the kept heads' (no scatter), matching the reordered output columns.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LowRankHeads", "ImplantedSelfAttention", "fit_lowrank_head"]


class LowRankHeads(nn.Module):
    """``num_heads`` attention heads of dimension ``rank`` (the 1/sqrt(d) scale is folded into ``query``)."""

    def __init__(self, hidden_size: int, num_heads: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.rank, self.dropout = num_heads, rank, dropout
        self.query = nn.Linear(hidden_size, num_heads * rank)
        self.key = nn.Linear(hidden_size, num_heads * rank, bias=False)
        self.value = nn.Linear(hidden_size, num_heads * rank, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n = hidden_states.shape[:2]
        shape = (b, n, self.num_heads, self.rank)
        q, k, v = (m(hidden_states).view(shape).transpose(1, 2) for m in (self.query, self.key, self.value))
        mask = attention_mask.to(q.dtype) if attention_mask is not None and not attention_mask.dtype == torch.bool \
            else attention_mask
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                             dropout_p=self.dropout if self.training else 0.0)
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.rank)


class ImplantedSelfAttention(nn.Module):
    """A BERT-style self-attention (the kept full heads) with implanted low-rank heads beside it.

    Returns what the wrapped module returns, with the implants' context appended to the first output; the
    output projection's columns are ordered [kept heads | implanted heads] to match.
    """

    def __init__(self, main: nn.Module, implant: LowRankHeads):
        super().__init__()
        self.main = main
        self.implant = implant

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        out = self.main(hidden_states, attention_mask, *args, **kwargs)
        extra = self.implant(hidden_states, attention_mask)
        first = out[0] if isinstance(out, tuple) else out
        merged = torch.cat([first, extra.to(first.dtype)], dim=-1)
        return (merged, *out[1:]) if isinstance(out, tuple) else merged


@torch.no_grad()
def fit_lowrank_head(wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor, wv: torch.Tensor,
                     wo: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """Rank-``rank`` query/key/value rows and output columns for one head (see the module docstring).

    Shapes: ``wq``, ``wk``, ``wv``: (d, hidden); ``bq``: (d,); ``wo``: (hidden, d). Returns float64 tensors
    ``q_weight`` (r, hidden), ``q_bias`` (r,), ``k_weight``, ``v_weight`` (r, hidden), ``o_weight`` (hidden, r).
    """
    d = wq.shape[0]
    if not 1 <= rank <= d:
        raise ValueError(f"implant rank must be in [1, head_dim={d}], got {rank}")
    wq, wk, wv, wo = (t.double() for t in (wq, wk, wv, wo))
    bq = torch.zeros(d, dtype=torch.float64, device=wq.device) if bq is None else bq.double()
    a = torch.cat([wq, bq[:, None]], dim=1).T @ wk / math.sqrt(d)  # (hidden + 1, hidden)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    qa = (u[:, :rank] * root).T  # (r, hidden + 1)
    kb = root[:, None] * vh[:rank]
    p, s2, qh = torch.linalg.svd(wo @ wv, full_matrices=False)
    root2 = s2[:rank].sqrt()
    return {"q_weight": qa[:, :-1], "q_bias": qa[:, -1], "k_weight": kb,
            "v_weight": root2[:, None] * qh[:rank], "o_weight": p[:, :rank] * root2}
