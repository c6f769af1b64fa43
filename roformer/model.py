"""A decoder-only transformer whose positional scheme is a plug-in (see the ``roformer.positional`` package).

Token embedding -> n_layer pre-norm blocks (causal self-attention, GELU MLP) -> final norm -> LM head, tied to
the embedding by default. Attention goes through ``kernels.attention``: ``F.scaled_dot_product_attention``, or
for bf16 on CPU over short lengths a hand-written matmul path; the loss is ``kernels.cross_entropy``, in fp32.
Schemes that add to the scores use the same call with an additive mask, computed in blocks of queries so
memory stays bounded at long lengths; on CUDA, those whose bias depends on positions alone go through FlexAttention
with their ``score_mod`` instead, which never materialises it (``model.bias_kernel``). ``attention=linear`` is
RoFormer's section 3.3: causal linear attention with an elu+1 feature map, RoPE on the mapped queries/keys in the
numerator and the unrotated ones in the normaliser.

The forward takes an ``offset`` (or explicit ``positions``) and an optional :class:`KVCache`, so a window in the
middle of a document, or token-by-token decoding, gives the same logits as one full forward. When the scheme's
tables depend on the total length (``pos.same_rotation``: dynamic NTK past its original length), the cache is
recomputed from its token ids at each step, since every cached key and value is stale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F

from roformer.kernels import BiasKernel, DecodeWeights, attention, bias_flex, check_bias_kernel, cross_entropy
from roformer.positional import SCHEMES, PosConfig, PosContext, PositionalScheme, RopeScaling, build_positional


class AttentionKind(str, Enum):
    softmax = "softmax"
    linear = "linear"


class Activation(str, Enum):
    gelu = "gelu"  # exact (erf), as in BERT and RoFormer
    gelu_tanh = "gelu_tanh"  # GPT-2's tanh approximation; the only one before this option existed


@dataclass
class ModelConfig:
    """Shape of the transformer."""

    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    # hidden width of the MLP as a multiple of d_model
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # biases in linear layers and norms (GPT-2 had them; off is faster and as good)
    bias: bool = False
    # LM head shares the token embedding matrix
    tie_embeddings: bool = True
    attention: AttentionKind = AttentionKind.softmax
    # MLP activation. The exact GELU is also the faster one on CPU (PyTorch's bf16 forward; backward about equal);
    # figures in docs/performance.md.
    activation: Activation = Activation.gelu
    # additive-bias path: queries per block (bounds memory at long lengths: H x block x keys floats)
    bias_block: int = 512
    # bias schemes' kernel: flex (FlexAttention with the scheme's score_mod: the bias is never materialised; no
    # dropout), mask (its bias() as an additive mask, in blocks of bias_block queries), or auto: flex on CUDA (torch
    # with it, heads of 16+ dims) for a scheme with a score_mod, while no dropout is active; else mask (BiasKernel)
    bias_kernel: BiasKernel = BiasKernel.auto
    # linear attention: chunk length of the chunked causal scan
    linear_chunk: int = 64
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "bias_block", "linear_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "pick n_head among the divisors of d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={self.mlp_ratio} must be positive")
        self.attention = AttentionKind(self.attention)
        self.activation = Activation(self.activation)
        self.bias_kernel = check_bias_kernel(self.bias_kernel, self.dropout)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def check_positional(cfg: ModelConfig, pos_cfg: PosConfig) -> None:
    """The rules between a model and its positional scheme, asked of the scheme: its own (RoPE: an even rotary
    dimension per head) and linear attention's (only for schemes that declare ``supports_linear``; never a bias
    scheme: linear attention never forms the score matrix it adds to). Run when a run's config is made, before any
    data work, and again when a model is built."""
    scheme = SCHEMES[pos_cfg.name]
    scheme.check(pos_cfg, d_model=cfg.d_model, n_head=cfg.n_head)
    if cfg.attention == AttentionKind.linear and not scheme.supports_linear:
        why = ("it adds to an attention matrix that linear attention never forms" if scheme.has_bias
               else "its class does not declare supports_linear: not checked with it")
        usable = ", ".join(sorted(n for n, c in SCHEMES.items() if c.supports_linear))
        raise ValueError(f"model.attention=linear cannot use pos={pos_cfg.name} ({why}); use one of {usable}")


class KVCache:
    """Per-layer keys/values (softmax) or running state (linear) of the tokens seen so far, with positions.

    Softmax keys/values live in preallocated buffers that grow by doubling (``capacity`` tokens up front when
    the final length is known), so a decoding step writes one slice instead of concatenating the whole cache.
    The token ids are kept too: when a scheme's rotation depends on the total length (dynamic NTK), every cached
    key and value is stale once the length changes, and the model recomputes them from the ids.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}  # softmax: (k, v) buffers (B, H, cap, D); linear: state
        self.positions: torch.Tensor | None = None  # (S,) positions of cached keys
        self.ids: torch.Tensor | None = None  # (B, S) their token ids
        self.n_pos = 0  # 1 + largest cached position
        self.start: int | None = 0  # first position when the positions are start, start+1, ...; else None
        # randomized positions (pos.randomized_max): the draw for the whole capacity, made by the first forward
        self.planned: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.numel()

    def clear(self) -> None:
        self.layers, self.positions, self.ids, self.n_pos, self.start, self.planned = {}, None, None, 0, 0, None

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values (B, H, T, D) after the cached ones; return all of them (views)."""
        n, T = len(self), k.shape[2]
        buf = self.layers.get(layer)
        if buf is None or buf[0].shape[2] < n + T:
            cap = max(n + T, self.capacity, 2 * buf[0].shape[2] if buf is not None else 0)
            new = tuple(t.new_empty(t.shape[0], t.shape[1], cap, t.shape[3]) for t in (k, v))
            if buf is not None:
                for b, old in zip(new, buf, strict=True):
                    b[:, :, :n] = old[:, :, :n]
            buf = self.layers[layer] = new
        buf[0][:, :, n : n + T], buf[1][:, :, n : n + T] = k, v
        return buf[0][:, :, : n + T], buf[1][:, :, : n + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x, pos: PositionalScheme, ctx: PosContext, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B,H,T,D)
        if ctx.qk_scale != 1.0:  # YaRN's temperature, before the rotation and (linear) the feature map
            q, k = q * ctx.qk_scale, k * ctx.qk_scale
        if self.cfg.attention == AttentionKind.linear:
            y = self._linear(q, k, v, pos, ctx, cache)
        else:
            q, k, v = pos.rotate(q, k, v, ctx)
            if cache is not None:
                k, v = cache.append(self.layer, k, v)  # (B, H, S, D)
            y = self._softmax(q, k, v, pos, ctx)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def step(self, x, pos: PositionalScheme, ctx: PosContext, cache: KVCache, w: DecodeWeights) -> torch.Tensor:
        """forward() for softmax attention without a bias, one query per row after a cache (it sees every key, so
        no mask), in eval mode: the same operations without module calls, the projections through ``w``."""
        B, T, C = x.shape
        qkv = w.linear(x, 4 * self.layer, self.qkv.bias)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if ctx.qk_scale != 1.0:
            q, k = q * ctx.qk_scale, k * ctx.qk_scale
        q, k, v = pos.rotate(q, k, v, ctx)
        k, v = cache.append(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v)
        return w.linear(y.transpose(1, 2).reshape(B, T, C), 4 * self.layer + 1, self.proj.bias)

    def _softmax(self, q, k, v, pos, ctx):
        p = self.cfg.dropout if self.training else 0.0
        if not pos.has_bias:
            if ctx.is_causal:
                return attention(q, k, v, dropout_p=p)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, dropout_p=p)
        if (y := bias_flex(q, k, v, pos, ctx, self.layer, self.cfg.bias_kernel, p)) is not None:
            return y  # FlexAttention with the scheme's score_mod, where model.bias_kernel chooses it
        # Additive bias: one block of queries at a time, so the (H, block, S) bias is all that is materialised.
        # When the keys are the queries themselves (no cache), a block [s, e) only needs keys [0, e): the later
        # ones are all masked, so leaving them out halves the work of a long causal sequence.
        T, blk, out = q.shape[2], self.cfg.bias_block, []
        for s in range(0, T, blk):
            e = min(s + blk, T)
            idx = slice(s, e)
            bctx, kb, vb = (
                (replace(ctx, k_pos=ctx.k_pos[:e]), k[:, :, :e], v[:, :, :e]) if ctx.is_causal else (ctx, k, v)
            )
            bias = pos.bias(q[:, :, idx], kb, bctx, self.layer, idx)
            allowed = bctx.k_pos[None, :] <= ctx.q_pos[idx, None]  # (t, S)
            bias = bias.masked_fill(~allowed, float("-inf"))
            out.append(attention(q[:, :, idx], kb, vb, bias, dropout_p=p))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _linear(self, q, k, v, pos, ctx, cache):
        """Causal linear attention, chunked: exact within a chunk, running sums (state) across chunks.

        num_m = sum_{n<=m} (R_m phi(q_m))^T (R_n phi(k_n)) v_n,  den_m = sum_{n<=m} phi(q_m)^T phi(k_n).
        Computed in fp32: the running sums would lose too much in bf16.
        """
        dtype = q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf, kf, v = F.elu(q.float()) + 1, F.elu(k.float()) + 1, v.float()
            fctx = PosContext(
                ctx.q_pos,
                ctx.k_pos,
                ctx.n_pos,
                cos=None if ctx.cos is None else ctx.cos.float(),
                sin=None if ctx.sin is None else ctx.sin.float(),
            )
            qr, kr, v = pos.rotate(qf, kf, v, fctx)
            B, H, T, D = qf.shape
            if cache is not None and self.layer in cache.layers:
                S0, z0 = cache.layers[self.layer]
            else:
                S0, z0 = qf.new_zeros(B, H, D, D), qf.new_zeros(B, H, D)
            C = self.cfg.linear_chunk
            N = math.ceil(T / C)
            pad = N * C - T

            def chunks(t):  # (B, H, T, D) -> (B, H, N, C, D), zero padded (zeros add nothing to the sums)
                return F.pad(t, (0, 0, 0, pad)).view(B, H, N, C, t.shape[-1])

            qr_, kr_, qf_, kf_, v_ = map(chunks, (qr, kr, qf, kf, v))
            tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            # state entering each chunk: S0 + sum of the previous chunks' kr^T v (exclusive cumulative sum)
            kv = kr_.transpose(-1, -2) @ v_  # (B, H, N, D, D)
            ksum = kf_.sum(dim=3)  # (B, H, N, D)
            S_in = S0[:, :, None] + kv.cumsum(dim=2) - kv
            z_in = z0[:, :, None] + ksum.cumsum(dim=2) - ksum
            num = qr_ @ S_in + ((qr_ @ kr_.transpose(-1, -2)) * tri) @ v_  # (B, H, N, C, D)
            den = (qf_ @ z_in.unsqueeze(-1)).squeeze(-1) + ((qf_ @ kf_.transpose(-1, -2)) * tri).sum(-1)
            y = (num / den.clamp_min(1e-6).unsqueeze(-1)).view(B, H, N * C, D)[:, :, :T]
            if cache is not None:
                cache.layers[self.layer] = (S_in[:, :, -1] + kv[:, :, -1], z_in[:, :, -1] + ksum[:, :, -1])
        return y.to(dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == Activation.gelu_tanh else "none"

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, ctx, cache):
        x = x + self.drop(self.attn(self.ln_1(x), pos, ctx, cache))
        return x + self.mlp(self.ln_2(x))

    def step(self, x, pos, ctx, cache, w: DecodeWeights):
        """forward() for one decoding step in eval mode (dropout is the identity): see TransformerLM.decode_step."""
        ln_1, ln_2, mlp, i = self.ln_1, self.ln_2, self.mlp, 4 * self.attn.layer
        h = F.layer_norm(x, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps)
        x = x + self.attn.step(h, pos, ctx, cache, w)
        h = F.layer_norm(x, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps)
        h = w.linear(h, i + 2, mlp.fc.bias)
        return x + w.linear(F.gelu(h, approximate=mlp.approximate), i + 3, mlp.proj.bias)


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, pos_cfg: PosConfig):
        super().__init__()
        check_positional(cfg, pos_cfg)
        self.cfg, self.pos_cfg = cfg, pos_cfg
        self.pos = build_positional(pos_cfg, d_model=cfg.d_model, n_head=cfg.n_head, n_layer=cfg.n_layer)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._decode_weights: DecodeWeights | None = None  # built by the first decode_step
        # the cross-entropy kernel (kernels.LOSS_IMPLS); None: the device's measured choice (kernels.LOSS_BY_DEVICE)
        self.loss_impl: str | None = None
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights are counted once."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (matmuls, forward + backward) + 12 n_layer seq_len d_model (attention)."""
        n = self.num_params() - sum(p.numel() for p in self.pos.parameters())
        if not self.cfg.tie_embeddings:  # the input embedding is a lookup, not a matmul
            n -= self.wte.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * seq_len * self.cfg.d_model

    def decode_weights(self) -> DecodeWeights:
        """The linear weights as :meth:`decode_step` reads them, rebuilt when any of them changed."""
        ws = [m.weight for b in self.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)]
        ws.append(self.lm_head.weight)
        dw = self._decode_weights
        if dw is None or dw.key != DecodeWeights.key_of(ws):
            self._decode_weights = None  # free the old copies before making the new ones
            dw = self._decode_weights = DecodeWeights(ws)
        return dw

    def drop_decode_weights(self) -> None:
        """Free the copies of the weights that decoding keeps (they are rebuilt on the next :meth:`decode_step`)."""
        self._decode_weights = None

    def train(self, mode: bool = True):
        if mode:  # training changes the weights: the decoding copies would be stale and take memory meanwhile
            self.drop_decode_weights()
        return super().train(mode)

    @contextmanager
    def scaled_positions(self, kind: RopeScaling, factor: float, original_len: int) -> Iterator[bool]:
        """Evaluate with a zero-shot context extension, e.g. ``with model.scaled_positions(RopeScaling.yarn,
        L / train_len, train_len):``. Yields whether a scaling is in effect (``kind`` is not ``none``).

        ``self.pos`` is swapped for ``self.pos.with_scaling(...)`` for the duration of the block and put back
        afterwards, also on an exception; neither the scheme's config nor ``self.pos_cfg`` (what was trained, and
        what a checkpoint records) is changed. ``none`` leaves the positions as trained (a checkpoint fine-tuned
        with a scaling keeps it). Schemes without RoPE raise ValueError for any kind but ``none``.
        """
        if RopeScaling(kind) == RopeScaling.none:
            yield False
            return
        trained = self.pos
        self.pos = trained.with_scaling(kind, factor, original_len)
        try:
            yield True
        finally:
            self.pos = trained

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        offset: int | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, with targets, the cross-entropy loss.

        Positions of idx are ``positions`` (T,) if given, else ``offset + arange(T)`` where offset defaults to
        the cache's length. With a cache, keys are the cached ones followed by these, and the cache grows.
        """
        B, T = idx.shape
        dev = idx.device
        cached = cache is not None and len(cache) > 0
        drawn = positions is None and self.pos.randomized
        if drawn:
            positions = self._drawn_positions(T, cache, offset, dev)
        if positions is None:
            start = (cache.n_pos if cache is not None else 0) if offset is None else offset
            q_pos = torch.arange(start, start + T, device=dev)
            n_pos = start + T
        else:
            q_pos = positions.to(dev)
            n_pos = int(q_pos.max()) + 1
        k_pos = torch.cat((cache.positions, q_pos)) if cached else q_pos
        if cached:
            n_pos = max(n_pos, cache.n_pos)
            # still consecutive positions: no explicit positions, and this block starts where the cache ends
            follows = positions is None and start == cache.n_pos and cache.start is not None
            if not self.pos.same_rotation(cache.n_pos, n_pos):
                return self._recompute(idx, targets, k_pos, cache, reduction, cache.start if follows else None)
        ctx = self.pos.context(
            q_pos,
            k_pos,
            n_pos,
            torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.wte.weight.dtype,
        )
        # The fused causal kernel applies when the keys are exactly the queries in increasing order; a lone
        # query after a cache sees every key. Anything else gets an explicit boolean mask from the positions.
        contiguous = positions is None or drawn  # drawn positions increase with the index, as counted ones do
        if contiguous and not cached:
            ctx.is_causal = True
        elif contiguous and T == 1:
            ctx.is_causal, ctx.mask = False, None
        else:
            ctx.is_causal, ctx.mask = False, k_pos[None, :] <= q_pos[:, None]
        if ctx.block:  # blockwise causal attention (xPos's BCA): this block and the previous one
            qb, kb = q_pos // ctx.block, k_pos // ctx.block
            ctx.is_causal, ctx.mask = False, (k_pos[None, :] <= q_pos[:, None]) & (kb[None, :] >= qb[:, None] - 1)

        x = self.drop(self.pos.embed(self.wte(idx), ctx))
        for block in self.blocks:
            x = block(x, self.pos, ctx, cache)
        logits, loss = self.head(x, targets, reduction)
        if cache is not None:
            if not cached:
                cache.start = start if positions is None else None
            elif not follows:
                cache.start = None
            cache.ids = torch.cat((cache.ids, idx), dim=1) if cached else idx
            cache.positions, cache.n_pos = k_pos, n_pos
        return logits, loss

    def _drawn_positions(self, T: int, cache: KVCache | None, offset: int | None, dev) -> torch.Tensor:
        """Randomized positions for T tokens: a fresh draw for a sequence from its start; with an empty cache, a
        draw for the cache's whole capacity, kept in it (``planned``), of which these are the first T; after a
        cache, the next T of its plan (so cached decoding meets the full forward of the same length)."""
        if cache is None or len(cache) == 0:
            if offset:
                raise ValueError(f"offset={offset} with randomized positions (pos.randomized_max): a window is drawn "
                                 "its own positions; score it from its start or pass positions")
            if cache is None:
                return self.pos.draw_positions(T, dev)
            cache.planned = self.pos.draw_positions(max(T, cache.capacity), dev)
        n, planned = len(cache), 0 if cache.planned is None else cache.planned.numel()
        if n + T > planned:
            raise ValueError(f"randomized positions: the cache planned {planned} positions and {n + T} are asked; "
                             "give KVCache(capacity=) the final length")
        return cache.planned[n : n + T]

    def head(self, x: torch.Tensor, targets: torch.Tensor | None, reduction: str = "mean"):
        """Final norm, LM head and loss: (logits, loss or None). Its own method so that regional compilation
        (runtime.compile_model, scope ``blocks``) can compile it apart from the blocks, fusing the loss."""
        logits = self.lm_head(self.ln_f(x))
        return logits, self._loss(logits, targets, reduction)

    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, 1, V) of one new token per row placed after ``cache``: what ``forward(idx, cache=cache)[0]``
        returns, up to float rounding (exactly, off CPU), and the cache grows the same way.

        Decoding a small model on a CPU is bound by reading the weights and by per-token overhead, not by
        arithmetic, so this path multiplies by the weights in the layout a single row reads fastest
        (:class:`DecodeWeights`) and skips what one query after a cache does not need: module calls, dropout,
        the mask and the cache bookkeeping of the general forward. It applies in eval mode to softmax attention
        without a score bias and a scheme whose cache stays valid; anything else (and an empty cache) goes through
        ``forward``. Call it without autograd (``torch.inference_mode()``), as :func:`roformer.generation.generate`
        does.
        """
        n = cache.n_pos
        if (
            self.training
            or len(cache) == 0
            or idx.shape[1] != 1
            or self.cfg.attention != AttentionKind.softmax
            or self.pos.has_bias
            or not self.pos.same_rotation(n, n + 1)
            or self.pos.randomized
        ):
            return self.forward(idx, cache=cache)[0]
        dev = idx.device
        q_pos = torch.arange(n, n + 1, device=dev)
        k_pos = torch.cat((cache.positions, q_pos))
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.wte.weight.dtype
        ctx = self.pos.context(q_pos, k_pos, n + 1, dtype)
        if ctx.block:
            return self.forward(idx, cache=cache)[0]
        ctx.is_causal = False  # as in forward: a lone query after the cache sees every key, no mask
        w = self.decode_weights()
        x = self.pos.embed(self.wte(idx), ctx)
        for block in self.blocks:
            x = block.step(x, self.pos, ctx, cache, w)
        logits = w.linear(self.ln_f(x), len(w.mats) - 1, None)
        cache.ids = torch.cat((cache.ids, idx), dim=1)
        cache.positions, cache.n_pos = k_pos, n + 1
        return logits

    def _loss(self, logits, targets, reduction):
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction,
                                 impl=self.loss_impl)  # fmt: skip
            if reduction == "none":
                loss = loss.view(targets.shape)
        return loss

    def _recompute(self, idx, targets, k_pos, cache: KVCache, reduction, start: int | None):
        """The scheme's rotation depends on the total length (dynamic NTK) and the length moved to other tables:
        every cached key and value is stale, and past the first layer so are the hidden states they came from, so
        re-rotating cached keys would not be enough. Run the whole sequence again into the emptied cache, which
        is exactly one full forward of it, and return the logits of the new tokens (O(length) per call)."""
        ids, T = torch.cat((cache.ids, idx), dim=1), idx.shape[1]
        cache.clear()
        if start is not None:
            logits, _ = self.forward(ids, offset=start, cache=cache)
        else:
            logits, _ = self.forward(ids, positions=k_pos, cache=cache)
        logits = logits[:, -T:]
        return logits, self._loss(logits, targets, reduction)
