"""Positional schemes behind one interface, selected by name from a registry.

Every scheme implements the same three hooks; the ones it does not use are the identity (or ``None``), so the
model has no per-scheme branches:

* ``embed(x, ctx)``      additive schemes act once on the token embeddings (``sinusoidal``, ``learned``);
* ``rotate(q, k, v, ctx)`` rotary acts on queries and keys inside every attention layer (``rope``);
* ``bias(q, ctx, layer, q_idx)`` bias schemes add to the attention scores (``alibi``, ``relative``, ``t5``).

Code elsewhere asks a scheme about itself instead of branching on its name: ``max_positions(cfg)`` (a
classmethod, also ``PosConfig.max_positions``: the learned table's size, else None), ``check(cfg, d_model=,
n_head=)`` (a classmethod that refuses a model shape the scheme cannot serve, e.g. RoPE's odd rotary dimension, so
a run's config is checked when it is made, before any data work), ``supports_linear``,
``supports_scaling`` (also on ``PosConfig``), ``with_scaling(kind, factor, original_len)``, which returns a
RoPE with a zero-shot context extension and leaves the original alone, and ``same_rotation(n_cached, n_pos)``
(whether a KV cache built at one length is still valid at another: False only for dynamic NTK's changing tables).

``ctx`` is a :class:`PosContext` built once per forward by :meth:`PositionalScheme.context`: it holds the query
and key positions and whatever the scheme precomputes from them (RoPE's cos/sin), so layers do not repeat it.

References
----------
* RoPE: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), eq. (34).
* Sinusoidal: Vaswani et al., "Attention Is All You Need" (2017), section 3.5.
* Learned absolute: Radford et al., GPT-2 (2019).
* ALiBi: Press et al., "Train Short, Test Long" (ICLR 2022), section 3 and its slope recipe.
* Relative: Shaw et al., "Self-Attention with Relative Position Representations" (2018), eq. (4)-(5).
* T5: Raffel et al. (2020), bucketed relative attention bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import Enum
from typing import ClassVar

import torch
import torch.nn as nn


class RopeLayout(str, Enum):
    """How RoPE pairs the dimensions of a head."""

    interleaved = "interleaved"  # RoFormer / GPT-J: pairs (0, 1), (2, 3), ...
    half = "half"  # GPT-NeoX / LLaMA: dimension i pairs with i + d/2


class RopeScaling(str, Enum):
    """Zero-shot context extension applied to RoPE's frequencies at evaluation time."""

    none = "none"
    pi = "pi"  # linear position interpolation (Chen et al., 2023)
    ntk = "ntk"  # NTK-aware base scaling
    dynamic_ntk = "dynamic_ntk"  # NTK base scaling chosen from the current length
    yarn = "yarn"  # Peng et al., 2023


@dataclass
class PosConfig:
    """Positional scheme. ``name`` selects a class from :data:`SCHEMES`; other fields apply where they say."""

    name: str = "rope"
    # rope, sinusoidal: base of the geometric frequency ladder theta_i = base^(-2i/d).
    base: float = 10000.0
    # rope: which dimensions form a rotated pair (the two are equal up to a fixed permutation).
    layout: RopeLayout = RopeLayout.half
    # rope: rotate only the first fraction * head_dim dimensions of each head; the rest pass through.
    rotary_fraction: float = 1.0
    # rope ABLATION, not RoFormer: also rotate the values by their position. RoFormer rotates q and k only.
    rotate_values: bool = False
    # rope: zero-shot context extension (evaluation), its factor s, and the training length it extends from.
    scaling: RopeScaling = RopeScaling.none
    scaling_factor: float = 1.0
    original_len: int = 0
    # sinusoidal: fairseq's form, which the ALiBi paper used: token embeddings times sqrt(d_model) plus the sinusoid
    # unscaled. Off: the sinusoid times d_model^-0.5 plus the embeddings unscaled (the same ratio of sizes at init
    # only if the embeddings had std d_model^-0.5; ours start at GPT-2's 0.02).
    scale_embeddings: bool = False
    # learned: size of the absolute position table (positions 0 .. max_len-1).
    max_len: int = 1024
    # relative: clip distance K of Shaw et al.; distances are clip(m - n, -K, K).
    clip: int = 16
    # t5: number of buckets and the distance beyond which all keys share the last bucket.
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"pos.name={self.name!r} is not a positional scheme; choose one of {sorted(SCHEMES)}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"pos.rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if self.base <= 1.0:
            raise ValueError(f"pos.base={self.base} must be greater than 1")
        if self.max_len < 1:
            raise ValueError(f"pos.max_len={self.max_len} must be at least 1")
        if self.clip < 1:
            raise ValueError(f"pos.clip={self.clip} is the relative clip distance K and must be at least 1")
        if self.num_buckets < 2 or self.max_distance <= self.num_buckets // 2:
            raise ValueError(
                f"pos.num_buckets={self.num_buckets}, pos.max_distance={self.max_distance}: need at least 2 "
                "buckets and max_distance > num_buckets // 2"
            )
        if self.scale_embeddings and not SCHEMES[self.name].scales_embeddings:
            raise ValueError(
                f"pos.scale_embeddings=true applies to {[n for n, c in SCHEMES.items() if c.scales_embeddings]} only, "
                f"not pos.name={self.name}; drop it"
            )
        if self.scaling_factor < 1.0:
            raise ValueError(f"pos.scaling_factor={self.scaling_factor} must be >= 1 (1 means no scaling)")
        self.scaling = RopeScaling(self.scaling)
        self.layout = RopeLayout(self.layout)
        if self.scaling != RopeScaling.none and self.original_len < 1:
            raise ValueError(f"pos.scaling={self.scaling.value} needs pos.original_len (the training length)")

    @property
    def max_positions(self) -> int | None:
        """Largest number of positions the selected scheme can represent (None: unbounded), asked of its class,
        so a config can be checked before any module is built."""
        return SCHEMES[self.name].max_positions(self)

    @property
    def supports_scaling(self) -> bool:
        """Whether the selected scheme accepts a zero-shot RoPE context extension (``pos.scaling``)."""
        return SCHEMES[self.name].supports_scaling


@dataclass
class PosContext:
    """Positions for one forward pass, plus what a scheme precomputed from them."""

    q_pos: torch.Tensor  # (T,) positions of the current tokens
    k_pos: torch.Tensor  # (S,) positions of all keys (cache + current)
    n_pos: int  # 1 + the largest position, known on the host (no device sync)
    is_causal: bool = True  # keys are exactly positions 0..T-1 of the queries: use the fused causal kernel
    mask: torch.Tensor | None = None  # otherwise (T, S) bool, True where a query may attend a key
    cos: torch.Tensor | None = None  # rope: (T, rot/2) in the activation dtype
    sin: torch.Tensor | None = None
    # YaRN's attention temperature: q and k are multiplied by it before attention (softmax: scores scale by its
    # square; linear: before the feature map, so numerator and normaliser see the same sharpened features)
    qk_scale: float = 1.0


SCHEMES: dict[str, type[PositionalScheme]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        SCHEMES[name] = cls
        return cls

    return deco


class PositionalScheme(nn.Module):
    """Identity hooks; subclasses override the ones they need. Code elsewhere asks a scheme about itself
    (``max_positions``, ``supports_scaling``, ``with_scaling``) instead of branching on its name."""

    name: ClassVar[str] = ""
    has_bias: ClassVar[bool] = False  # adds to attention scores (needs the additive-bias attention path)
    supports_linear: ClassVar[bool] = True  # usable with model.attention=linear
    supports_scaling: ClassVar[bool] = False  # accepts a zero-shot context extension (with_scaling), RoPE only
    scales_embeddings: ClassVar[bool] = False  # honours pos.scale_embeddings (fairseq's sinusoidal form)

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.n_head, self.n_layer = d_model, n_head, n_layer
        self.head_dim = d_model // n_head

    @classmethod
    def max_positions(cls, cfg: PosConfig) -> int | None:
        """Largest number of positions (0 .. n-1) this scheme can represent with ``cfg``; None when unbounded.
        A classmethod, so configs can be checked without building the module."""
        return None

    @classmethod
    def check(cls, cfg: PosConfig, *, d_model: int, n_head: int) -> None:
        """Refuse, in one line naming the keys, a model shape this scheme cannot serve with ``cfg``. A classmethod:
        a run's config is checked when it is made (before any data work), and the constructor checks again."""

    def with_scaling(self, kind: RopeScaling, factor: float, original_len: int) -> PositionalScheme:
        """A scheme equal to this one but with the zero-shot context extension ``kind`` (factor s, extending
        from ``original_len`` training positions); ``self`` is not changed. Only RoPE has one: the others return
        themselves for ``none`` and refuse anything else."""
        kind = RopeScaling(kind)
        if kind == RopeScaling.none:
            return self
        raise ValueError(
            f"pos={self.name} has no zero-shot scaling (asked for {kind.value}): RoPE scaling applies to pos=rope "
            "only; use scaling none with this scheme"
        )

    def same_rotation(self, n_cached: int, n_pos: int) -> bool:
        """Whether what a KV cache holds for a sequence of ``n_cached`` positions is still what one full forward
        of ``n_pos`` positions computes. True unless the scheme's tables depend on the total length (dynamic NTK):
        then the model recomputes the cache, so cached decoding keeps equal to the full forward."""
        return True

    def context(self, q_pos: torch.Tensor, k_pos: torch.Tensor, n_pos: int, dtype: torch.dtype) -> PosContext:
        return PosContext(q_pos=q_pos, k_pos=k_pos, n_pos=n_pos)

    def embed(self, x: torch.Tensor, ctx: PosContext) -> torch.Tensor:
        return x

    def rotate(self, q, k, v, ctx: PosContext):
        return q, k, v

    def bias(self, q: torch.Tensor, ctx: PosContext, layer: int, q_idx: slice) -> torch.Tensor | None:
        """Additive score bias for queries ``q`` (B, H, t, D) at ``ctx.q_pos[q_idx]`` against all keys."""
        return None


@register("nope")
class NoPE(PositionalScheme):
    """No positional information beyond the causal mask (Kazemnejad et al., 2023)."""


# ----------------------------------------------------------------------------------------------------------
# Rotary


def rope_inv_freq(rot_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i = 0 .. d/2-1, in float64 (cast where used)."""
    return base ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


def scaled_inv_freq(cfg: PosConfig, rot_dim: int, seq_len: int) -> tuple[torch.Tensor, float]:
    """Frequencies after zero-shot context extension, and the attention temperature factor (1 unless YaRN)."""
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
    # YaRN: interpolate by the number of rotations r = L / wavelength each dimension makes over the original
    # context; r < alpha -> fully interpolated (divide by s), r > beta -> untouched, linear ramp between.
    alpha, beta = 1.0, 32.0
    rotations = cfg.original_len * inv_freq / (2 * math.pi)
    ramp = ((rotations - alpha) / (beta - alpha)).clamp(0.0, 1.0)
    inv_freq = inv_freq / s * (1 - ramp) + inv_freq * ramp
    return inv_freq, 0.1 * math.log(s) + 1.0


@register("rope")
class RoPE(PositionalScheme):
    """Rotary position embedding: rotate each (q, k) pair by position * theta_i. Values are not rotated.

    Angles are computed in float64 from integer positions and stored as float32 cos/sin in a non-persistent
    cache that grows (doubling) whenever a longer position is asked for; they are cast to the activation dtype
    only at the end, so bf16 autocast never sees a rounded angle.
    """

    supports_scaling = True

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
        key = (n if dynamic else None, str(device), c.base, c.scaling, c.scaling_factor, c.original_len)
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
        interleaved = self.cfg.layout == RopeLayout.interleaved
        if not torch.is_grad_enabled():  # inference (decoding): no autograd node to build, the kernels alone
            return _rotate_into(x, cos, sin, self.rot_dim, interleaved)
        return _Rotary.apply(x, cos, sin, self.rot_dim, interleaved)

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


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int, interleaved: bool) -> torch.Tensor:
    """out[:r] = R(angle) x[:r] pairwise, out[r:] = x[r:], written straight into one new tensor (no cat).

    Four fused multiply(-add) kernels instead of six elementwise ops and a concatenation: on a CPU every kernel
    is a pass over memory and a thread barrier, which is what RoPE's step-time overhead was made of.
    """
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    if interleaved:
        x1, x2, o1, o2 = x[..., 0:r:2], x[..., 1:r:2], out[..., 0:r:2], out[..., 1:r:2]
    else:
        h = r // 2
        x1, x2, o1, o2 = x[..., :h], x[..., h:r], out[..., :h], out[..., h:r]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)  # x2 cos + x1 sin
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out


class _Rotary(torch.autograd.Function):
    """RoPE as one autograd node. The rotation is orthogonal, so its backward is the rotation by the opposite
    angle (sin -> -sin): nothing but cos/sin is saved, and the backward costs the same four kernels."""

    @staticmethod
    def forward(ctx, x, cos, sin, r: int, interleaved: bool):
        ctx.save_for_backward(cos, sin)
        ctx.r, ctx.interleaved, ctx.x_dtype = r, interleaved, x.dtype
        return _rotate_into(x, cos, sin, r, interleaved)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        g = _Rotary.apply(grad, cos, -sin, ctx.r, ctx.interleaved)  # differentiable again (double backward)
        return g.to(ctx.x_dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Additive absolute schemes


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

    scales_embeddings = True

    def embed(self, x, ctx):
        pe = sinusoid_table(ctx.q_pos, self.d_model, self.cfg.base)
        if self.cfg.scale_embeddings:
            return x * self.d_model**0.5 + pe.to(x.dtype)
        return x + (pe * self.d_model**-0.5).to(x.dtype)


@register("learned")
class LearnedAbsolute(PositionalScheme):
    """GPT-2-style trainable table of ``pos.max_len`` positions; beyond it the model has nothing to say."""

    @classmethod
    def max_positions(cls, cfg: PosConfig) -> int | None:
        return cfg.max_len

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


class PositionOutOfRange(ValueError):
    """A position beyond what a scheme can represent (the learned table)."""


# ----------------------------------------------------------------------------------------------------------
# Attention-bias schemes


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
    """Linear biases: score(m, n) -= slope_h * (m - n)."""

    has_bias = True
    supports_linear = False

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def bias(self, q, ctx, layer, q_idx):
        dist = (ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]).to(torch.float32)  # (t, S)
        return -(self.slopes[:, None, None] * dist).unsqueeze(0)  # (1, H, t, S)


@register("relative")
class RelativeShaw(PositionalScheme):
    """Shaw et al.: a trainable vector a_r per clipped distance r = clip(m - n, -K, K), one table per layer
    shared by the heads, added on the key side: score(m, n) = q_m . (k_n + a_{r(m,n)}) / sqrt(d)."""

    has_bias = True
    supports_linear = False

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.tables = nn.Parameter(torch.randn(n_layer, 2 * cfg.clip + 1, self.head_dim) * 0.02)

    def bias(self, q, ctx, layer, q_idx):
        K = self.cfg.clip
        rel = (ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]).clamp(-K, K) + K  # (t, S) in [0, 2K]
        qa = torch.einsum("bhtd,rd->bhtr", q, self.tables[layer].to(q.dtype))  # (B, H, t, 2K+1)
        idx = rel.unsqueeze(0).unsqueeze(0).expand(q.shape[0], q.shape[1], -1, -1)
        return torch.gather(qa, -1, idx) / math.sqrt(self.head_dim)  # (B, H, t, S)


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

    has_bias = True
    supports_linear = False

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.buckets = nn.Embedding(cfg.num_buckets, n_head)
        nn.init.zeros_(self.buckets.weight)

    def bias(self, q, ctx, layer, q_idx):
        rel = ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]  # (t, S)
        b = self.buckets(t5_bucket(rel, self.cfg.num_buckets, self.cfg.max_distance))  # (t, S, H)
        return b.permute(2, 0, 1).unsqueeze(0)  # (1, H, t, S)


def build_positional(cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int) -> PositionalScheme:
    if cfg.name not in SCHEMES:
        raise ValueError(f"pos.name={cfg.name!r} is not a positional scheme; choose one of {sorted(SCHEMES)}")
    return SCHEMES[cfg.name](cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
