"""Attention-bias schemes: a term added to every attention score, from the query-key distance.

They override ``bias``, so the model takes its additive-bias path for them, and linear attention (which never
forms the scores) refuses them.

References
----------
* ALiBi: Press et al., "Train Short, Test Long" (ICLR 2022), section 3 and its slope recipe.
* T5: Raffel et al. (2020), bucketed relative attention bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from roformer.positional.base import PosConfig, PositionalScheme, register


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Press et al.: for n a power of two, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8).
    Otherwise take the slopes for the nearest lower power of two p, then every other slope of 2p's sequence."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_head & (n_head - 1) == 0:
        return torch.tensor(power_of_two(n_head))
    p = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(power_of_two(p) + power_of_two(2 * p)[0::2][: n_head - p])


@register("alibi")
class ALiBi(PositionalScheme):
    """Linear biases: score(m, n) -= slope_h * (m - n). The slopes follow from the head count."""

    options = frozenset({"randomized_max"})

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def bias(self, q, k, ctx, layer, q_idx):
        dist = (ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]).to(torch.float32)  # (t, S)
        return -(self.slopes[:, None, None] * dist).unsqueeze(0)  # (1, H, t, S)

    def score_mod(self, ctx, layer):
        q_pos, k_pos, slopes = ctx.q_pos, ctx.k_pos, self.slopes

        def alibi_score(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_pos[q_idx] - k_pos[kv_idx]).to(torch.float32)

        return alibi_score


def t5_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Causal T5 buckets for distances n = m - k >= 0: exact below num_buckets/2, log-spaced up to
    max_distance, and the last bucket beyond."""
    n = rel.clamp(min=0)
    exact = num_buckets // 2
    logb = (
        exact
        + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    )
    logb = logb.clamp(max=num_buckets - 1)
    return torch.where(n < exact, n, logb)


@register("t5")
class T5Bias(PositionalScheme):
    """T5 relative attention bias: a learned scalar per head and distance bucket, shared by all layers."""

    options = frozenset({"num_buckets", "max_distance", "randomized_max"})

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.buckets = nn.Embedding(cfg.num_buckets, n_head)
        nn.init.zeros_(self.buckets.weight)

    def bias(self, q, k, ctx, layer, q_idx):
        rel = ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]  # (t, S)
        b = self.buckets(t5_bucket(rel, self.cfg.num_buckets, self.cfg.max_distance))  # (t, S, H)
        return b.permute(2, 0, 1).unsqueeze(0)  # (1, H, t, S)

    def score_mod(self, ctx, layer):
        # the bias of every distance 0 .. n_pos-1 (no query sees a key further away), looked up once here, so a score
        # costs a few gathers; autograd carries FlexAttention's gradient of the table back to the buckets
        dist = torch.arange(ctx.n_pos, device=ctx.q_pos.device)
        table = self.buckets(t5_bucket(dist, self.cfg.num_buckets, self.cfg.max_distance))  # (n_pos, H)
        q_pos, k_pos, last = ctx.q_pos, ctx.k_pos, ctx.n_pos - 1

        def t5_score(score, b, h, q_idx, kv_idx):
            # masked keys after the query have negative distances: clamped to stay inside the table
            return score + table[(q_pos[q_idx] - k_pos[kv_idx]).clamp(0, last), h]

        return t5_score
