"""Contextual position encoding (CoPE): positions counted by the content, not by the token index.

Golovneva, Wang, Weston and Sukhbaatar, "Contextual Position Encoding: Learning to Count What's Important"
(arXiv 2405.18719, 2024), section 3. For query i and an earlier key j, a gate g_ij = sigmoid(q_i . k_j / sqrt(d))
says whether key j counts; the contextual position of j seen from i is the number of counted keys from j to i,
p_ij = sum_{t=j..i} g_it, a real number. It is capped at ``pos.cope_max`` - 1, and its embedding is interpolated
between the two learned embeddings e[floor(p)] and e[ceil(p)]. The score becomes q_i . k_j + q_i . e[p_ij]: computed
as z_i[p] = q_i . e[p] at the integer positions, then interpolated (eq. 4-5), so the cost is (t, cope_max) products
per query instead of (t, S) embeddings.

Following the official code (facebookresearch/RAM, ``projects/cope``): one table of embeddings per layer, shared
by the heads, of shape (head_dim, cope_max), initialised to zeros (so a fresh model is NoPE); the gates read the
scaled scores q . k / sqrt(d) of the same layer's keys; the position term is added before the 1/sqrt(d) scaling,
so as a bias after it, it is q . e[p] / sqrt(d).

CoPE reads no position index at all: the causal mask is all it takes from the order, so its scores are unchanged
when every position is shifted (tests/test_zoo.py). Its bias depends on the keys' content, so it has no
FlexAttention ``score_mod`` and takes the additive path, in blocks of queries: each block materialises its
(B, H, t, S) gates in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from roformer.positional.base import PosConfig, PositionalScheme, register


@register("cope")
class CoPE(PositionalScheme):
    """Contextual positions from sigmoid gates on the scores, with interpolated learned embeddings per layer."""

    options = frozenset({"cope_max"})

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.pos_emb = nn.Parameter(torch.zeros(n_layer, self.head_dim, cfg.cope_max))

    def bias(self, q, k, ctx, layer, q_idx):
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf = q.float()
            scores = qf @ k.float().transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, t, S)
            future = ctx.k_pos[None, :] > ctx.q_pos[q_idx, None]  # (t, S): keys a query does not see
            gates = torch.sigmoid(scores).masked_fill(future, 0.0)
            p = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.cfg.cope_max - 1)  # p_ij = sum_{t >= j} g_it
            z = qf @ self.pos_emb[layer].float() / math.sqrt(self.head_dim)  # (B, H, t, cope_max)
            lo = p.floor()
            w = p - lo
            lo = lo.long()
            hi = (lo + 1).clamp(max=self.cfg.cope_max - 1)
            return z.gather(-1, hi) * w + z.gather(-1, lo) * (1 - w)  # (B, H, t, S)
