"""Positional schemes behind one interface, selected by name from a registry.

Every scheme implements the same three hooks; the ones it does not use are the identity (or ``None``), so the
model has no per-scheme branches:

* ``embed(x, ctx)``      additive schemes act once on the token embeddings (``sinusoidal``, ``learned``);
* ``rotate(q, k, v, ctx)`` rotary acts on queries and keys inside every attention layer (``rope``);
* ``bias(q, ctx, layer, q_idx)`` bias schemes add to the attention scores (``alibi``, ``relative``, ``t5``).

Code elsewhere asks a scheme about itself instead of branching on its name: ``max_positions(cfg)`` (a
classmethod, also ``PosConfig.max_positions``: the learned table's size, else None), ``check(cfg, d_model=,
n_head=)`` (a classmethod that refuses a model shape the scheme cannot serve, e.g. RoPE's odd rotary dimension, so
a run's config is checked when it is made, before any data work), ``options`` (the ``pos.*`` keys it reads),
``has_bias``, ``supports_linear``, ``supports_scaling`` (also on ``PosConfig``), ``with_scaling(kind, factor,
original_len)``, which returns a RoPE with a zero-shot context extension and leaves the original alone, and
``same_rotation(n_cached, n_pos)`` (whether a KV cache built at one length is still valid at another: False only
for dynamic NTK's changing tables).

``ctx`` is a :class:`PosContext` built once per forward by :meth:`PositionalScheme.context`: it holds the query
and key positions and whatever the scheme precomputes from them (RoPE's cos/sin), so layers do not repeat it.

The package: :mod:`~roformer.positional.base` holds the registry, ``PosConfig`` and the interface (and NoPE, the
interface itself); each family has its own module: :mod:`~roformer.positional.rotary` (RoPE and its scalings),
:mod:`~roformer.positional.absolute` (sinusoidal, learned), :mod:`~roformer.positional.bias` (ALiBi, T5),
:mod:`~roformer.positional.relative` (Shaw et al.). Every module of the package is imported here, so a new scheme is
a new module (``@register("name")``) with its ``configs/pos/<name>.yaml`` and its tests: the help page, the sweep
preset, the study's variants and the tests that cover every scheme all ask :data:`SCHEMES`.
"""

import importlib
import pkgutil

from roformer.positional.absolute import LearnedAbsolute, Sinusoidal, sinusoid_table
from roformer.positional.base import (
    DEFAULTS,
    SCHEMES,
    NoPE,
    PosConfig,
    PosContext,
    PositionalScheme,
    PositionOutOfRange,
    RopeLayout,
    RopeScaling,
    build_positional,
    readers,
    register,
)
from roformer.positional.bias import ALiBi, T5Bias, alibi_slopes, t5_bucket
from roformer.positional.relative import RelativeShaw
from roformer.positional.rotary import RoPE, rope_inv_freq, scaled_inv_freq

# The modules not named above (a new scheme's) register their schemes when imported.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULTS", "SCHEMES", "ALiBi", "LearnedAbsolute", "NoPE", "PosConfig", "PosContext", "PositionOutOfRange",
    "PositionalScheme", "RelativeShaw", "RoPE", "RopeLayout", "RopeScaling", "Sinusoidal", "T5Bias", "alibi_slopes",
    "build_positional", "readers", "register", "rope_inv_freq", "scaled_inv_freq", "sinusoid_table", "t5_bucket",
]
