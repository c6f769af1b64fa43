"""FIRE: functional interpolation for relative positions (Li et al., ICLR 2024, arXiv:2310.04418).

A learned function of the query-key distance, normalised by the query's position ("progressive interpolation"), is
added to the scores:

    b(i, j) = f_theta( psi(i - j) / psi(max(L, i)) ),   psi(x) = log(c x + 1),

with f_theta a small MLP from one input to one output per head, c > 0 and the threshold L learned. Dividing by
psi(i) maps every distance a query can see into [0, 1], so a query past the training length sees the same
range of inputs; the threshold keeps short sequences from being stretched onto the whole range (L matters for short
sequences, per the paper's ablation as the reviewers summarise it).

The formula above is as the project's literature notes give it (from reviewer summaries and the reference code);
it is NOT checked against the paper's PDF. The parametrisation follows the reference implementation that the notes
name, mcleish7/arithmetic ``cramming/architectures/embeddings.py`` class ``FIRE`` (read at commit 55af9d5):

* f_theta: Linear(1, 32) -> ReLU -> Linear(32, n_head), PyTorch's default nn.Linear initialisation there
  (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases; whether that project's model-wide init later
  overwrites it was not checked). Here the weights are plain parameters, not nn.Linear modules, because
  ``TransformerLM`` re-initialises every nn.Linear it contains with N(0, 0.02) and zero biases: that would start
  FIRE with a bias of about 1e-4 everywhere, which is not the reference's starting point;
* c: learned, initialised to 0.1; both psi terms take |c x| (so the sign of c is irrelevant);
* L: a fixed 512 times a learned multiplier initialised to 1, threshold = |multiplier * 512|;
* normalised distance = log(|c (i - j)| + 1) / (log(|c max(i, L)| + 1) + 1e-6).

One FIRE (MLP, c and L) PER LAYER, as in the reference implementation, where every attention layer builds its own
``FIRE``; the paper is recalled (not verified) to use per-layer FIRE in its main models and to treat sharing across
layers as a cheaper variant. It costs n_layer * (66 + 33 n_head) parameters, nothing at this project's sizes.

With the threshold L above every position of a sequence, the normaliser is the constant psi(L) and the bias depends
on i - j alone (shift-invariant); once i > L it depends on i too: that is the interpolation, not a bug.

``score_mod`` evaluates the MLP with scalar operations only (its 32 hidden units unrolled), so FlexAttention can
compile it into its kernel like any pointwise score modification and the bias is never materialised (checked on a
CPU, forward only, eager and compiled; the GPU backward, which must sum gradients for the captured weights over every
score, is not checked here). ``bias`` materialises a (t, S, 32) hidden layer per block of queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from roformer.positional.base import PosConfig, PositionalScheme, register

FIRE_WIDTH = 32  # hidden units of f_theta (the reference's mlp_width)
FIRE_C = 0.1  # initial c of psi(x) = log(c x + 1)
FIRE_L = 512.0  # the threshold's fixed part; a learned multiplier (initially 1) scales it
FIRE_EPS = 1e-6  # added to the normaliser


def fire_input(dist: torch.Tensor, q_pos: torch.Tensor, c: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The MLP's input psi(i - j) / psi(max(L, i)) for fp32 distances i - j and query positions i (broadcastable),
    with psi(x) = log(|c x| + 1) as in the reference implementation."""
    num = torch.log1p(torch.abs(c * dist))
    den = torch.log1p(torch.abs(c * torch.maximum(q_pos, threshold))) + FIRE_EPS
    return num / den


class FireLayer(nn.Module):
    """One layer's FIRE: f_theta's weights, c and the threshold's multiplier."""

    def __init__(self, n_head: int, width: int = FIRE_WIDTH):
        super().__init__()
        # nn.Linear's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 1 then width
        bound2 = 1.0 / math.sqrt(width)
        self.w1 = nn.Parameter(torch.empty(width).uniform_(-1.0, 1.0))  # (W,) Linear(1, W).weight[:, 0]
        self.b1 = nn.Parameter(torch.empty(width).uniform_(-1.0, 1.0))  # (W,)
        self.w2 = nn.Parameter(torch.empty(n_head, width).uniform_(-bound2, bound2))  # (H, W) Linear(W, H).weight
        self.b2 = nn.Parameter(torch.empty(n_head).uniform_(-bound2, bound2))  # (H,)
        self.c = nn.Parameter(torch.tensor(FIRE_C))
        self.L_scale = nn.Parameter(torch.tensor(1.0))  # threshold L = |L_scale| * FIRE_L

    @property
    def threshold(self) -> torch.Tensor:
        return torch.abs(self.L_scale.float() * FIRE_L)

    def forward(self, dist: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Bias (..., H) fp32 for fp32 distances ``dist`` (...) of queries at ``q_pos`` (broadcastable to dist)."""
        with torch.autocast(dist.device.type, enabled=False):  # fp32 bias, also under bf16 autocast
            x = fire_input(dist, q_pos, self.c.float(), self.threshold)
            # (..., W): one fused multiply-add and an in-place ReLU, so only one tensor W times the bias is made
            h = torch.relu_(torch.addcmul(self.b1.float(), x[..., None], self.w1.float()))
            return h @ self.w2.float().T + self.b2.float()  # (..., H)


@register("fire")
class FIRE(PositionalScheme):
    """FIRE: a per-layer MLP of the log-distance normalised by the log of the query's position (or of L)."""

    options = frozenset({"randomized_max"})
    # shifting every position changes nothing only while every query stays below the threshold L: not relative
    relative = False

    def __init__(self, cfg: PosConfig, *, d_model: int, n_head: int, n_layer: int):
        super().__init__(cfg, d_model=d_model, n_head=n_head, n_layer=n_layer)
        self.layers = nn.ModuleList(FireLayer(n_head) for _ in range(n_layer))

    def bias(self, q, k, ctx, layer, q_idx):
        q_pos = ctx.q_pos[q_idx]
        dist = (q_pos[:, None] - ctx.k_pos[None, :]).to(torch.float32)  # (t, S)
        b = self.layers[layer](dist, q_pos.to(torch.float32)[:, None])  # (t, S, H)
        return b.permute(2, 0, 1).unsqueeze(0)  # (1, H, t, S)

    def score_mod(self, ctx, layer):
        f = self.layers[layer]
        q_pos, k_pos = ctx.q_pos, ctx.k_pos
        c, threshold = f.c.float(), f.threshold
        # one tensor per hidden unit (unbind), each read once: FlexAttention's backward refuses a score_mod that
        # indexes one tensor needing gradients several times
        w1, b1 = f.w1.float().unbind(0), f.b1.float().unbind(0)  # 32 scalars each
        w2, b2 = f.w2.float().unbind(1), f.b2.float()  # 32 (H,) columns

        def fire_score(score, b, h, q_idx, kv_idx):
            dist = (q_pos[q_idx] - k_pos[kv_idx]).to(torch.float32)
            x = fire_input(dist, q_pos[q_idx].to(torch.float32), c, threshold)
            out = b2[h]
            for w1n, b1n, w2n in zip(w1, b1, w2, strict=True):  # the hidden layer, unrolled: scalar operations only
                out = out + w2n[h] * torch.relu(w1n * x + b1n)
            return score + out.to(score.dtype)

        return fire_score
