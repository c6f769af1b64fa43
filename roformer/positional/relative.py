"""Relative position representations: a trainable vector per clipped query-key distance.

Reference: Shaw et al., "Self-Attention with Relative Position Representations" (2018), eq. (4)-(5).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from roformer.positional.base import PosConfig, PositionalScheme, register


@register("relative")
class RelativeShaw(PositionalScheme):
    """Shaw et al.: a trainable vector a_r per clipped distance r = clip(m - n, -K, K), one table per layer
    shared by the heads, added on the key side: score(m, n) = q_m . (k_n + a_{r(m,n)}) / sqrt(d)."""

    options = frozenset({"clip", "randomized_max"})

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.tables = nn.Parameter(torch.randn(n_layer, 2 * cfg.clip + 1, self.head_dim) * 0.02)

    def bias(self, q, k, ctx, layer, q_idx):
        K = self.cfg.clip
        rel = (ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]).clamp(-K, K) + K  # (t, S) in [0, 2K]
        qa = torch.einsum("bhtd,rd->bhtr", q, self.tables[layer].to(q.dtype))  # (B, H, t, 2K+1)
        idx = rel.unsqueeze(0).unsqueeze(0).expand(q.shape[0], q.shape[1], -1, -1)
        return torch.gather(qa, -1, idx) / math.sqrt(self.head_dim)  # (B, H, t, S)
