"""KERPLE: kernelized relative positional embedding (Chi, Fan, Ramadge, Rudnicky, NeurIPS 2022, arXiv:2205.09921).

A conditionally positive definite kernel of the distance |m - n|, learned per head, is added to the scores
q_m . k_n (the constant offset that makes it positive definite vanishes in the softmax). The paper's two practical
kernels (section 4, "KERPLE"; the section number is from memory, not checked against the PDF) are selected by
``pos.kerple_kind``:

* ``log``:   bias = -r1 log(1 + r2 |m - n|),  r1, r2 > 0  (the variant the paper recommends);
* ``power``: bias = -r1 |m - n|^r2,            r1 > 0, 0 < r2 <= 2.

Parametrisation and initialisation follow the official code, chijames/KERPLE ``megatron/mpu/layers.py`` and
``megatron/model/gpt2_model.py``, read at commit 73f1ee2 (the project's literature notes cite 25be3d7, not compared):

* ``ParallelKerpleLog``: bias = -p log(1 + a |m - n|) with p (our r1) ~ U(0, 2) and a (our r2) ~ U(0, 1);
* ``ParallelKerplePower``: bias = -a |m - n|^p with a (our r1) ~ U(0, 1) and p (our r2) ~ U(0, 2). Note the
  names and ranges swap between the two classes: the multiplier is U(0, 2) for log but U(0, 1) for power;
* both clamp their parameters in place at the start of every forward: >= 0.01, and the power exponent <= 2.

Both parameters are learned here. The official power class can also fix either one (chosen by its ``pos_emb``
string) and has an optional multiplicative "weight kernel"; which settings the paper's tables used was not checked,
and neither option is offered.

One set of (r1, r2) per head, SHARED BY ALL LAYERS: the official ``gpt2_model.py`` builds one ``ParallelKerpleLog``
(or ``ParallelKerplePower``) before its loop over layers and hands that same module to every layer, as GPT-NeoX does
for T5's bias. Not one set per layer, then, although the model passes ``layer`` (it is ignored here).

The clamps are a projection, as in the official code: :meth:`context`, which the model calls once per forward
before any layer, clamps the stored parameters in place while training, so a parameter pushed below 0.01 restarts
from 0.01 rather than drifting where the gradient of a clamp is zero. :meth:`bias` clamps again, functionally, so
what it returns never depends on whether ``context`` ran (tests and FlexAttention's ``score_mod`` call it alone).

The distance is |m - n| in every entry: the model masks future keys itself, but a fractional power of a negative
number is NaN, and 0 * NaN in the backward of the mask would poison the gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from roformer.positional.base import KerpleKind, PosConfig, PositionalScheme, register

# Lower bound of both parameters (the official code's ``eps``) and upper bound of the power kernel's exponent.
KERPLE_MIN = 0.01
KERPLE_MAX_POWER = 2.0


def kerple_bias(dist: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, kind: KerpleKind) -> torch.Tensor:
    """The kernel for distances ``dist`` >= 0 (any shape, float) and already clamped per-head parameters r1, r2
    broadcastable against it: -r1 log(1 + r2 d) or -r1 d^r2."""
    if kind == KerpleKind.log:
        return -r1 * torch.log1p(r2 * dist)
    return -r1 * dist.pow(r2)


@register("kerple")
class Kerple(PositionalScheme):
    """KERPLE's log or power kernel of |m - n|, two learned scalars per head shared by all layers."""

    options = frozenset({"kerple_kind", "randomized_max"})

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.kind = KerpleKind(cfg.kerple_kind)
        # The official scales: the multiplier U(0, 2) for log, U(0, 1) for power; the other parameter the reverse.
        s1, s2 = (2.0, 1.0) if self.kind == KerpleKind.log else (1.0, 2.0)
        self.r1 = nn.Parameter(torch.rand(n_head) * s1)  # (H,) the kernel's multiplier
        self.r2 = nn.Parameter(torch.rand(n_head) * s2)  # (H,) log: the distance's scale; power: the exponent
        # torch.rand can draw values below the bound; start inside the constraint set as the first forward would
        self._project()

    def _project(self) -> None:
        """Clamp the stored parameters into the constraint set (the official code does this in every forward)."""
        with torch.no_grad():
            self.r1.clamp_(min=KERPLE_MIN)
            self.r2.clamp_(min=KERPLE_MIN, max=KERPLE_MAX_POWER if self.kind == KerpleKind.power else None)

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r1, r2), each (H,) fp32, clamped: the values every bias uses. A clamp passes the gradient at its bound,
        so a parameter projected onto 0.01 can still move up."""
        r1 = self.r1.float().clamp(min=KERPLE_MIN)
        r2 = self.r2.float().clamp(min=KERPLE_MIN, max=KERPLE_MAX_POWER if self.kind == KerpleKind.power else None)
        return r1, r2

    def context(self, q_pos, k_pos, n_pos, dtype):
        if self.training:
            self._project()
        return super().context(q_pos, k_pos, n_pos, dtype)

    def bias(self, q, k, ctx, layer, q_idx):
        dist = (ctx.q_pos[q_idx, None] - ctx.k_pos[None, :]).to(torch.float32).abs()  # (t, S)
        r1, r2 = self.params()
        return kerple_bias(dist, r1[:, None, None], r2[:, None, None], self.kind).unsqueeze(0)  # (1, H, t, S)

    def score_mod(self, ctx, layer):
        q_pos, k_pos, kind = ctx.q_pos, ctx.k_pos, self.kind
        r1, r2 = self.params()  # clamped once here, not per score

        def kerple_score(score, b, h, q_idx, kv_idx):
            dist = (q_pos[q_idx] - k_pos[kv_idx]).to(torch.float32).abs()
            return score + kerple_bias(dist, r1[h], r2[h], kind).to(score.dtype)

        return kerple_score
