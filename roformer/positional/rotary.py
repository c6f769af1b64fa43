"""Rotary position embedding (RoPE) and its context extensions (PI, NTK, dynamic NTK, YaRN, Llama 3).

RoPE rotates each (q, k) pair of dimensions by position x theta_i inside every attention layer, so scores depend
on the offset only. Its fused rotation kernel is :func:`roformer.kernels.rotate_pairs`; the composition of autograd
ops here is its reference, and the path under torch.compile or differentiable angles.

References
----------
* Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), eq. (34); section 3.3 for
  linear attention.
* Chen et al., "Extending Context Window of Large Language Models via Positional Interpolation" (2023): PI.
* NTK-aware base scaling (bloc97, 2023) and its dynamic form (emozilla, 2023), both first posted on Reddit.
* Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models" (2023).
* Llama 3's scaling: meta-llama/llama-models, ``models/llama3/reference_impl/model.py`` (``apply_scaling``; the
  Llama 3 paper, arXiv:2407.21783, does not describe it), as Hugging Face's rope_type ``llama3``.
* Xiong et al., "Effective Long-Context Scaling of Foundation Models" (2023), arXiv:2309.16039: adjusted base
  frequency (ABF), a larger ``pos.base`` when fine-tuning at a longer length; nothing here but the base itself.

Each extension is zero-shot (evaluation sets it on a trained model) or fine-tuned (``trainer.init_from`` with
``pos.scaling``, or with a larger ``pos.base`` for ABF, at a longer ``trainer.seq_len``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from roformer.kernels import rotate_pairs
from roformer.positional.base import PosConfig, PosContext, PositionalScheme, RopeLayout, RopeScaling, register


def rope_inv_freq(rot_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i = 0 .. d/2-1, in float64 (cast where used)."""
    return base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


def scaled_inv_freq(cfg: PosConfig, rot_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Frequencies after context extension, and the attention temperature factor (1 unless YaRN)."""
    inv_freq = rope_inv_freq(rot_dim, cfg.base)
    s, kind = cfg.scaling_factor, cfg.scaling
    if kind == RopeScaling.none or s == 1.0 and kind != RopeScaling.dynamic_ntk:
        return inv_freq, 1.0
    if kind == RopeScaling.pi:
        return inv_freq / s, 1.0
    if kind in (RopeScaling.ntk, RopeScaling.dynamic_ntk):
        if kind == RopeScaling.dynamic_ntk:  # scale only as much as the current length needs
            s = max(1.0, seq_len / cfg.original_len)
            if s == 1.0:
                return inv_freq, 1.0
        base = cfg.base * s ** (rot_dim / (rot_dim - 2))
        return rope_inv_freq(rot_dim, base), 1.0
    if kind == RopeScaling.llama3:
        # wavelength 2 pi / theta above L0 / low (fewer than `low` rotations over L0) -> theta / s, below L0 / high
        # -> theta, between them smooth = (L0 / wavelength - low) / (high - low) and theta' = (1 - smooth) theta / s
        # + smooth theta: YaRN's ramp with alpha = low, beta = high, and no temperature
        return _ramp(inv_freq, s, cfg.original_len, cfg.low_freq_factor, cfg.high_freq_factor), 1.0
    # YaRN: interpolate by the number of rotations r = L / wavelength each dimension makes over the original
    # context; r < alpha -> fully interpolated (divide by s), r > beta -> untouched, linear ramp between.
    return _ramp(inv_freq, s, cfg.original_len, 1.0, 32.0), 0.1 * math.log(s) + 1.0


def _ramp(inv_freq: torch.Tensor, s: float, original_len: int, lo: float, hi: float) -> torch.Tensor:
    """Each frequency divided by ``s`` if it makes fewer than ``lo`` rotations over ``original_len`` positions,
    kept if more than ``hi``, linearly between (in the rotations): YaRN's and Llama 3's interpolation. At the ends
    the weights are exactly 0 and 1, so those frequencies are theta / s and theta to the last bit."""
    rotations = original_len * inv_freq / (2 * math.pi)  # = original_len / wavelength
    ramp = ((rotations - lo) / (hi - lo)).clamp(0.0, 1.0)
    return inv_freq / s * (1 - ramp) + inv_freq * ramp


@register("rope")
class RoPE(PositionalScheme):
    """Rotary position embedding: rotate each (q, k) pair by position * theta_i. Values are not rotated.

    Angles are computed in float64 from integer positions and stored as float32 cos/sin in a non-persistent
    cache that grows (doubling) whenever a longer position is asked for; they are cast to the activation dtype
    only at the end, so bf16 autocast never sees a rounded angle.
    """

    options = frozenset({"base", "layout", "rotary_fraction", "rotate_values", "scaling", "scaling_factor",
                         "original_len", "low_freq_factor", "high_freq_factor", "randomized_max"})
    supports_linear = True  # RoFormer section 3.3: rotated in the numerator, not in the normaliser

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.rot_dim = self.rotary_dim(cfg, d_model=d_model, n_head=n_head)
        self.register_buffer("cos_cached", torch.empty(0, self.rot_dim // 2), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0, self.rot_dim // 2), persistent=False)
        self._cache_key: tuple = ()
        self.mscale = 1.0

    @classmethod
    def check(cls, cfg: PosConfig, *, d_model: int, n_head: int) -> None:
        cls.rotary_dim(cfg, d_model=d_model, n_head=n_head)

    @staticmethod
    def rotary_dim(cfg: PosConfig, *, d_model: int, n_head: int) -> int:
        """The rotated dimensions of each head, pos.rotary_fraction * head_dim: a positive even integer (pairs)."""
        head_dim = d_model // n_head
        rot = cfg.rotary_fraction * head_dim
        if rot != int(rot) or int(rot) % 2 or int(rot) == 0:
            raise ValueError(
                f"RoPE rotates pos.rotary_fraction * head_dim = {cfg.rotary_fraction} * {head_dim} = {rot} dimensions, "
                f"which must be a positive even integer (head_dim = model.d_model / model.n_head = {d_model} / "
                f"{n_head}); change pos.rotary_fraction, model.n_head or model.d_model"
            )
        return int(rot)

    def with_scaling(self, kind: RopeScaling, factor: float, original_len: int) -> RoPE:
        """A new RoPE whose config has the extension (the factor clamped to at least 1), on the same device.
        RoPE has no parameters, so nothing is shared or copied; the new one builds its own cos/sin cache."""
        cfg = replace(
            self.cfg, scaling=RopeScaling(kind), scaling_factor=max(1.0, float(factor)), original_len=original_len
        )
        scaled = type(self)(cfg, d_model=self.d_model, n_head=self.n_head, n_layer=self.n_layer)
        return scaled.to(self.cos_cached.device).train(self.training)

    def same_rotation(self, n_cached: int, n_pos: int) -> bool:
        if self.cfg.scaling != RopeScaling.dynamic_ntk:
            return True
        # dynamic NTK's factor is max(1, length / original_len): equal factors give equal tables
        return max(n_cached, self.cfg.original_len) == max(n_pos, self.cfg.original_len)

    def _angles(self, n: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, self.mscale = scaled_inv_freq(self.cfg, self.rot_dim, seq_len)
        pos = torch.arange(n, dtype=torch.float64)
        ang = torch.outer(pos, inv_freq)  # (n, rot/2), float64
        return ang.cos().float().to(device), ang.sin().float().to(device)

    def cos_sin(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin for positions 0 .. >= n-1 (grows on demand)."""
        c = self.cfg
        dynamic = c.scaling == RopeScaling.dynamic_ntk
        # The table depends on the scaling settings (which evaluation may change between lengths) and, for
        # dynamic NTK, on the current length itself.
        key = (n if dynamic else None, str(device), c.base, c.scaling, c.scaling_factor, c.original_len,
               c.low_freq_factor, c.high_freq_factor)
        same = self._cache_key == key
        if not same or self.cos_cached.shape[0] < n:
            # grow by doubling while the settings stay the same; start afresh when they change
            size = n if dynamic else max(n, 256, 2 * self.cos_cached.shape[0] if same else 0)
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                cos, sin = self._angles(size, n, device)
            self.cos_cached, self.sin_cached, self._cache_key = cos, sin, key
        return self.cos_cached, self.sin_cached

    def context(self, q_pos, k_pos, n_pos, dtype):
        cos, sin = self.cos_sin(n_pos, q_pos.device)
        cos, sin = cos[q_pos], sin[q_pos]  # (T, rot/2)
        # YaRN's temperature is not folded into cos/sin: with linear attention the rotated numerator would be
        # scaled by mscale^2 and the unrotated normaliser not, multiplying the output instead of sharpening it
        return PosContext(q_pos=q_pos, k_pos=k_pos, n_pos=n_pos, cos=cos.to(dtype), sin=sin.to(dtype),
                          qk_scale=self.mscale)

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rot_dim dims of x (..., T, D) by the given cos/sin (T, rot/2)."""
        # Differentiable angles need the composition; so does torch.compile, which fuses it into one kernel anyway
        # (the eager node's out= writes would break the graph).
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)):
            return self._apply_rotary_autograd(x, cos, sin)
        return rotate_pairs(x, cos, sin, self.rot_dim, self.cfg.layout == RopeLayout.interleaved)

    def _apply_rotary_autograd(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Reference composition of autograd ops (slower: about twice the kernels, forward and backward)."""
        r = self.rot_dim
        xr, xp = x[..., :r], x[..., r:]
        if self.cfg.layout == RopeLayout.half:
            x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return out if xp.shape[-1] == 0 else torch.cat((out, xp), dim=-1)

    def rotate(self, q, k, v, ctx):
        q, k = self.apply_rotary(q, ctx.cos, ctx.sin), self.apply_rotary(k, ctx.cos, ctx.sin)
        if self.cfg.rotate_values:  # ablation only
            v = self.apply_rotary(v, ctx.cos, ctx.sin)
        return q, k, v
