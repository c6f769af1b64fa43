"""Absolute schemes: a vector per position added once to the token embeddings.

References
----------
* Sinusoidal: Vaswani et al., "Attention Is All You Need" (2017), section 3.5.
* Learned absolute: Radford et al., GPT-2 (2019).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from roformer.positional.base import PosConfig, PositionalScheme, PositionOutOfRange, register


def sinusoid_table(positions: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)); float32, (T, dim)."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    ang = positions.double()[:, None] * inv_freq[None, :]
    pe = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)
    return pe[:, :dim].float()


@register("sinusoidal")
class Sinusoidal(PositionalScheme):
    """Vaswani et al. fixed sin/cos added to the embeddings; defined for any position.

    By default the table is scaled by d_model^-0.5 so its per-dimension size (~0.04 at d=256) matches the
    0.02-std token embeddings instead of drowning them. ``pos.scale_embeddings=true`` is fairseq's form (and so
    the ALiBi paper's): the embeddings are multiplied by sqrt(d_model) and the table is added unscaled.
    """

    options = frozenset({"base", "scale_embeddings", "randomized_max"})
    relative = False  # added to the token embeddings at their absolute positions
    supports_linear = True

    def embed(self, x, ctx):
        pe = sinusoid_table(ctx.q_pos, self.d_model, self.cfg.base)
        if self.cfg.scale_embeddings:
            return x * self.d_model**0.5 + pe.to(x.dtype)
        return x + (pe * self.d_model**-0.5).to(x.dtype)


@register("learned")
class LearnedAbsolute(PositionalScheme):
    """GPT-2-style trainable table of ``pos.max_len`` positions; beyond it the model has nothing to say."""

    options = frozenset({"max_len", "randomized_max"})
    relative = False
    supports_linear = True

    @classmethod
    def max_positions(cls, cfg: PosConfig) -> int | None:
        return cfg.randomized_max or cfg.max_len

    @classmethod
    def check(cls, cfg: PosConfig, *, d_model: int, n_head: int) -> None:
        if cfg.randomized_max > cfg.max_len:
            raise ValueError(f"pos.randomized_max={cfg.randomized_max} draws positions beyond the learned table "
                             f"(pos.max_len={cfg.max_len}); set pos.max_len to at least {cfg.randomized_max}")

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.table = nn.Embedding(cfg.max_len, d_model)

    def embed(self, x, ctx):
        if ctx.n_pos > self.cfg.max_len:
            raise PositionOutOfRange(
                f"position {ctx.n_pos - 1} is beyond the learned position table (size pos.max_len={self.cfg.max_len}); "
                f"learned absolute positions cannot extrapolate: use inputs of at most {self.cfg.max_len} tokens"
            )
        return x + self.table(ctx.q_pos).to(x.dtype)
