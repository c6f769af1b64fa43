"""xPos: RoPE whose rotation also decays with distance, one rate per rotated pair.

Sun et al., "A Length-Extrapolatable Transformer" (arXiv 2212.10554, ACL 2023), section 3.2 (eq. 9 and
Algorithm 1): the query at position n is rotated as RoPE does and multiplied by zeta_i^(n / B), the key at position
m by zeta_i^(-m / B), so the score of pair i carries zeta_i^((n - m) / B): a decay with the distance that RoPE's
rotation alone does not have. zeta_i = (2i/d + gamma) / (1 + gamma) for the pairs i = 0 .. d/2 - 1 of the d rotated
dimensions: the fastest-rotating pair decays most (zeta_0 = gamma / (1 + gamma) = 0.286), the slowest barely.

What the paper leaves open follows the reference code (torchscale's ``xpos_relative_position.py``, which
x-transformers repeats): gamma = 0.4 and B = 512 (``pos.xpos_scale_base``), and positions centred before the
power, so that zeta^(+-n/B) stays representable at long lengths: at 32k positions uncentred, zeta_0^(n/B) is 1e-35,
at the edge of float32. The reference centres on half the current length, which changes with every decoded token;
here the centre moves in steps of B (``centre``), and the model recomputes a KV cache when it moves
(``same_rotation``), so cached decoding still equals the full forward. The centre cancels in every score
(zeta^((n - c) / B) zeta^(-(m - c) / B) = zeta^((n - m) / B)); only rounding depends on it.

Blockwise causal attention (the paper's section 3.3, "BCA"), an evaluation trick: with the training length l in
``pos.bca_len``, queries are cut into blocks of l/2 positions and each attends to its own block and the previous one.
Off by default (0). The paper applies it at 2x and 4x the training length (Table 2; Table 5 is the ablation).
"""

from __future__ import annotations

import torch

from roformer.positional.base import PosConfig, PositionalScheme, RopeLayout, register
from roformer.positional.rotary import RoPE

GAMMA = 0.4  # torchscale and x-transformers: (arange(0, d, 2) + 0.4 d) / (1.4 d)


def xpos_zeta(rot_dim: int, gamma: float = GAMMA) -> torch.Tensor:
    """zeta_i = (2i/d + gamma) / (1 + gamma) for i = 0 .. d/2 - 1, in float64."""
    return (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim + gamma) / (1 + gamma)


@register("xpos")
class XPos(RoPE):
    """RoPE times a per-pair exponential decay in the query-key distance. Values are not scaled or rotated."""

    options = frozenset({"base", "layout", "rotary_fraction", "xpos_scale_base", "bca_len", "randomized_max"})
    supports_linear = False  # the decay needs the scores; not checked with the linear feature map
    qk_alike = False  # queries get zeta^(n/B), keys zeta^(-m/B)
    # no zero-shot RoPE scaling: xPos was not defined with one (the base class's refusal, not RoPE's)
    with_scaling = PositionalScheme.with_scaling

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.register_buffer("zeta", xpos_zeta(self.rot_dim), persistent=False)

    def centre(self, n_pos: int) -> int:
        """The position the exponents are measured from: a multiple of B near the middle of 0 .. n_pos - 1."""
        b = max(1, round(self.cfg.xpos_scale_base))
        return b * (n_pos // (2 * b))

    def same_rotation(self, n_cached: int, n_pos: int) -> bool:
        return self.centre(n_cached) == self.centre(n_pos)

    def context(self, q_pos, k_pos, n_pos, dtype):
        ctx = super().context(q_pos, k_pos, n_pos, dtype)
        power = (q_pos.to(torch.float64) - self.centre(n_pos)) / self.cfg.xpos_scale_base  # (T,)
        scale = self.zeta.to(q_pos.device)[None, :] ** power[:, None]  # (T, rot/2), float64
        ctx.scale, ctx.block = scale.to(dtype), self.cfg.bca_len // 2
        return ctx

    def _pair_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """(T, rot/2) per pair -> (T, rot) per dimension, in the layout's pairing."""
        if self.cfg.layout == RopeLayout.half:
            return torch.cat((scale, scale), dim=-1)
        return scale.repeat_interleave(2, dim=-1)

    def rotate(self, q, k, v, ctx):
        q, k, v = super().rotate(q, k, v, ctx)
        s, r = self._pair_scale(ctx.scale), self.rot_dim
        if r == q.shape[-1]:
            return q * s, k / s, v
        return (torch.cat((q[..., :r] * s, q[..., r:]), dim=-1), torch.cat((k[..., :r] / s, k[..., r:]), dim=-1), v)
