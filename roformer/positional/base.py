"""The registry, the positional config, and the interface every scheme implements.

A scheme is a subclass of :class:`PositionalScheme` registered by name (``@register("rope")``). It states what
it is by what it defines, so nothing about it is kept in a second place:

* ``options``: the ``pos.*`` keys it reads besides ``pos.name``. Any other key with a value other than its default
  is refused when a run's config is made (:meth:`PosConfig.check_options`), and a resume compares only these;
* ``has_bias`` follows from overriding :meth:`PositionalScheme.bias` and ``supports_scaling`` from overriding
  :meth:`PositionalScheme.with_scaling`; they cannot be set by hand, so neither can be forgotten;
* ``supports_linear`` is False unless the scheme declares it: linear attention never forms the score matrix a
  bias would be added to, and a scheme that has not been checked with it is refused rather than run wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
    llama3 = "llama3"  # Llama 3's reference code: by wavelength, PI for the long ones, none for the short ones


class KerpleKind(str, Enum):
    """KERPLE's kernel (Chi et al., 2022): the bias -r1 log(1 + r2 |m - n|) or -r1 |m - n|^r2."""

    log = "log"
    power = "power"


DEFAULT_FREQ_FACTORS = (1.0, 4.0)  # Llama 3.1's low and high frequency factors


@dataclass
class PosConfig:
    """Positional scheme. ``name`` selects a class from :data:`SCHEMES`; each other field is read by the schemes
    whose ``options`` name it (the comment says which), and given to any other scheme it is refused."""

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
    # rope, scaling llama3: wavelengths above original_len / low_freq_factor are interpolated by the factor, those
    # below original_len / high_freq_factor are kept, a ramp in between (Llama 3.1's values: 1 and 4).
    low_freq_factor: float = DEFAULT_FREQ_FACTORS[0]
    high_freq_factor: float = DEFAULT_FREQ_FACTORS[1]
    # xpos: the exponent's scale: query n is scaled by zeta^(n / B), key m by zeta^(-m / B) (the reference code: 512).
    xpos_scale_base: float = 512.0
    # xpos, evaluation: blockwise causal attention of the xPos paper: with the training length l given here, each
    # query attends to its own block of l/2 positions and the previous block only. 0: off (full causal attention).
    bca_len: int = 0
    # kerple: the kernel, log (the paper's best) or power.
    kerple_kind: KerpleKind = KerpleKind.log
    # cope: contextual positions are capped at cope_max - 1; one learned embedding per integer position below it.
    cope_max: int = 64
    # every scheme that takes integer positions: randomized positions of Ruoss et al. (2023): each sequence gets a
    # sorted random subset of [0, randomized_max) as its positions, in training and in evaluation. 0: off.
    randomized_max: int = 0
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
        if self.scale_embeddings and "scale_embeddings" not in SCHEMES[self.name].options:
            raise ValueError(
                f"pos.scale_embeddings=true applies to {readers('scale_embeddings')} only, not pos.name={self.name}; "
                "drop it"
            )
        for key in ("bca_len", "randomized_max"):
            if getattr(self, key) < 0:
                raise ValueError(f"pos.{key}={getattr(self, key)} must be >= 0 (0: off)")
        if self.bca_len % 2:
            raise ValueError(f"pos.bca_len={self.bca_len} is split into blocks of half of it: give an even length")
        if self.cope_max < 2:
            raise ValueError(f"pos.cope_max={self.cope_max} must be at least 2 (positions 0 .. cope_max - 1)")
        if self.xpos_scale_base <= 0:
            raise ValueError(f"pos.xpos_scale_base={self.xpos_scale_base} must be positive")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"pos.low_freq_factor={self.low_freq_factor}, pos.high_freq_factor="
                             f"{self.high_freq_factor}: need 0 < low_freq_factor < high_freq_factor")
        self.kerple_kind = KerpleKind(self.kerple_kind)
        self.scaling = RopeScaling(self.scaling)
        factors = (self.low_freq_factor, self.high_freq_factor) != DEFAULT_FREQ_FACTORS
        if factors and self.scaling not in (RopeScaling.none, RopeScaling.llama3):
            raise ValueError(f"pos.low_freq_factor/pos.high_freq_factor shape pos.scaling=llama3 only, not "
                             f"{self.scaling.value}: drop them or use scaling llama3")
        if self.scaling_factor < 1.0:
            raise ValueError(f"pos.scaling_factor={self.scaling_factor} must be >= 1 (1 means no scaling)")
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

    def unread(self) -> list[str]:
        """The options given a value other than their default that the selected scheme does not read."""
        read = SCHEMES[self.name].options
        return [k for k, v in DEFAULTS.items() if k not in read and getattr(self, k) != v]

    def check_options(self) -> None:
        """Refuse, in one line naming them, options the selected scheme does not read: they would do nothing.
        Run when a run's config is made (a checkpoint's config keeps every key and is not refused for them)."""
        unread = self.unread()
        if not unread:
            return
        given = ", ".join(f"pos.{k}={_shown(getattr(self, k))}" for k in unread)
        read = ", ".join(f"pos.{k}" for k in sorted(SCHEMES[self.name].options)) or "no pos.* option besides pos.name"
        what = [f"{self.name} reads {read}"]
        by_readers: dict[tuple[str, ...], list[str]] = {}
        for k in unread:
            by_readers.setdefault(tuple(readers(k)), []).append(f"pos.{k}")
        what += [f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} read by {' and '.join(names)}"
                 for names, keys in by_readers.items() if names]
        them = "it" if len(unread) == 1 else "them"
        raise ValueError(f"{given}: pos={self.name} does not read {them} ({'; '.join(what)}); drop {them}")


def _shown(value) -> str:
    """A value as a command line writes it."""
    if isinstance(value, Enum):
        return value.value
    return str(value).lower() if isinstance(value, bool) else str(value)


# Every option and its default: the PosConfig fields but name, which every scheme reads.
DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(PosConfig) if f.name != "name"}


def readers(option: str) -> list[str]:
    """The registered schemes that read ``option``, sorted."""
    return sorted(n for n, c in SCHEMES.items() if option in c.options)


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
    scale: torch.Tensor | None = None  # xpos: (T, rot/2) zeta^((q_pos - centre) / B), the queries' factor; keys' 1/it
    # YaRN's attention temperature: q and k are multiplied by it before attention (softmax: scores scale by its
    # square; linear: before the feature map, so numerator and normaliser see the same sharpened features)
    qk_scale: float = 1.0
    # blockwise causal attention (xPos's BCA): a query sees the keys of its own block of this many positions and of
    # the previous block only; 0: every earlier key
    block: int = 0
    # FlexAttention's causal BlockMask for these positions (kernels.bias_flex), made by the first layer that needs it
    flex_mask: object = None


class PositionOutOfRange(ValueError):
    """A position beyond what a scheme can represent (the learned table)."""


SCHEMES: dict[str, type[PositionalScheme]] = {}


def register(name: str):
    """Class decorator: the scheme is ``pos=<name>`` (its YAML is configs/pos/<name>.yaml)."""

    def deco(cls):
        if name in SCHEMES and SCHEMES[name] is not cls:
            raise TypeError(f"positional scheme {name!r} is registered twice: {SCHEMES[name].__qualname__} and "
                            f"{cls.__qualname__}")
        cls.name = name
        SCHEMES[name] = cls
        return cls

    return deco


class PositionalScheme(nn.Module):
    """Identity hooks; subclasses override the ones they need. Code elsewhere asks a scheme about itself
    (``max_positions``, ``supports_scaling``, ``with_scaling``) instead of branching on its name."""

    name: ClassVar[str] = ""
    options: ClassVar[frozenset[str]] = frozenset()  # the pos.* keys it reads besides name (PosConfig fields)
    supports_linear: ClassVar[bool] = False  # usable with model.attention=linear: declared, never assumed
    # rotate() treats queries and keys alike from ctx.cos/ctx.sin alone, so the static decoder (roformer.decoding)
    # may rotate them as one tensor; a scheme that scales them apart (xPos) says False
    qk_alike: ClassVar[bool] = True
    # the scores depend on the query-key offset alone: shifting every position changes no logit (tests/test_zoo.py
    # checks the claim both ways for every registered scheme); an absolute scheme says False
    relative: ClassVar[bool] = True
    # Derived from the class in __init_subclass__, never set by hand:
    has_bias: ClassVar[bool] = False  # overrides bias(): adds to attention scores (the additive-bias path)
    supports_scaling: ClassVar[bool] = False  # overrides with_scaling(): a zero-shot context extension

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for derived in ("has_bias", "supports_scaling"):
            if derived in vars(cls):
                raise TypeError(f"{cls.__qualname__} sets {derived}; it follows from overriding "
                                f"{'bias()' if derived == 'has_bias' else 'with_scaling()'}: remove it")
        cls.has_bias = cls.bias is not PositionalScheme.bias
        cls.supports_scaling = cls.with_scaling is not PositionalScheme.with_scaling
        cls.options = frozenset(cls.options)
        unknown = sorted(cls.options - DEFAULTS.keys())
        if unknown:
            raise TypeError(f"{cls.__qualname__}.options names {unknown}, which are not PosConfig fields; "
                            f"choose from {sorted(DEFAULTS)}")
        if cls.has_bias and cls.supports_linear:
            raise TypeError(f"{cls.__qualname__} adds a bias to the attention scores, which linear attention never "
                            "forms: it cannot declare supports_linear")

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__()
        self.cfg = cfg
        self.d_model, self.n_head, self.n_layer = d_model, n_head, n_layer
        self.head_dim = d_model // n_head

    @classmethod
    def max_positions(cls, cfg: PosConfig) -> int | None:
        """Largest number of positions (0 .. n-1) this scheme can represent with ``cfg``; None when unbounded.
        A classmethod, so configs can be checked without building the module. With randomized positions, a
        sequence takes at most pos.randomized_max of them."""
        return cfg.randomized_max or None if "randomized_max" in cls.options else None

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

    def bias(self, q: torch.Tensor, k: torch.Tensor, ctx: PosContext, layer: int, q_idx: slice) -> torch.Tensor | None:
        """Additive score bias (B or 1, H, t, S) for queries ``q`` (B, H, t, D) at ``ctx.q_pos[q_idx]`` against the
        keys ``k`` (B, H, S, D) at ``ctx.k_pos``, both after ``rotate``. Masked entries are overwritten with -inf by
        the model; a scheme whose bias reads the scores (CoPE) masks them itself."""
        return None

    def score_mod(self, ctx: PosContext, layer: int):
        """The same bias as FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx) -> score``, where q_idx and
        kv_idx index ``ctx.q_pos`` and ``ctx.k_pos``; None when the scheme has none (then the model adds
        ``bias`` as a mask). Only for biases that depend on positions alone, so FlexAttention never materialises
        them (``model.bias_kernel`` decides when it is used: kernels.bias_flex)."""
        return None

    @property
    def randomized(self) -> bool:
        """Whether positions are drawn at random (:meth:`draw_positions`) rather than counted 0, 1, 2, ..."""
        return bool(self.cfg.randomized_max) and "randomized_max" in self.options

    def draw_positions(self, n: int, device) -> torch.Tensor | None:
        """Randomized positions (Ruoss et al., 2023, section 3): for a sequence starting at position 0, a sorted
        random subset of [0, pos.randomized_max) of size n, or None when off or the scheme takes no integer
        positions. As in the paper, evaluation draws too (the model never saw consecutive positions); there the
        draw is fixed per length (seed n), so a score is reproducible and a cached decode of n positions meets the
        full forward's. Training draws from torch's global generator, which checkpoints save."""
        if not self.randomized:
            return None
        R = self.cfg.randomized_max
        if n > R:
            raise PositionOutOfRange(
                f"{n} positions drawn from [0, pos.randomized_max={R}): a sequence cannot be longer than "
                "randomized_max; train with a larger pos.randomized_max"
            )
        gen = None if self.training else torch.Generator().manual_seed(n)
        return torch.randperm(R, generator=gen)[:n].sort().values.to(device)


@register("nope")
class NoPE(PositionalScheme):
    """No positional information beyond the causal mask (Kazemnejad et al., 2023): the identity hooks themselves."""

    supports_linear = True


def build_positional(cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int) -> PositionalScheme:
    if cfg.name not in SCHEMES:
        raise ValueError(f"pos.name={cfg.name!r} is not a positional scheme; choose one of {sorted(SCHEMES)}")
    return SCHEMES[cfg.name](cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
