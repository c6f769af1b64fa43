"""Hand-written fast paths that the model calls instead of PyTorch's general ops.

* :func:`cross_entropy`: fp32 cross-entropy of low-precision logits; on CPU in cache-sized blocks of rows, with the
  gradient made in the forward pass instead of by autograd over full-size fp32 copies of the logits; or PyTorch's
  own, which torch.compile fuses (each device's choice: :data:`LOSS_BY_DEVICE`).
* :func:`attention`: softmax attention that, for bf16 on CPU over short key lengths, runs as batched matmuls
  with an fp32 softmax (:class:`_MatmulAttention` in training, :func:`_attention_forward` without autograd);
  there PyTorch's CPU flash kernel is the slower one. Everything else goes to
  ``F.scaled_dot_product_attention``.
* :class:`DecodeWeights`: the linear weights of a decoding step in the layout one row reads fastest.
* :func:`bias_flex`: a bias scheme's attention through FlexAttention with its ``score_mod`` and a causal
  BlockMask from the positions (compiled on CUDA), so the (H, T, S) bias is never materialised; where it does
  not apply (:class:`BiasKernel`), the model's additive-mask path. Tested against that path in
  ``tests/test_flex_attention.py``.
* :func:`rotate_pairs`: RoPE's rotation written straight into one new tensor (:func:`_rotate_into`), and in
  training one autograd node (:class:`_Rotary`) whose backward is the rotation by the opposite angle.

They exist because, in a CPU training step of this project's shape, the fp32 loss and the flash attention kernel
were among the largest costs after the matmuls, and RoPE's overhead was that of many small kernels
(docs/performance.md, "Where the time went"). Each must give what the plain PyTorch formula gives: their references
(PyTorch's own ops, fp64 textbook formulas, RoPE's autograd composition) live in ``tests/test_kernels.py``.
Measured speeds and errors are in ``docs/performance.md``, not here: they change with each torch release.
"""

from __future__ import annotations

import functools
from enum import Enum

import torch
import torch.nn.functional as F

try:  # FlexAttention (torch >= 2.5): the bias schemes' score_mod path; without it they keep the additive mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy in fp32 from logits of any dtype, computed in blocks of rows, with the gradient made in the
    same pass: (softmax - onehot) / n is stored in the logits' dtype and the backward only scales it.

    ``F.cross_entropy(logits.float())`` makes a fp32 copy of the (N, V) logits, a fp32 log-softmax, and in the
    backward a zero-filled one-hot, a log-softmax gradient and a cast back: about eight passes over 4 N V bytes,
    a sizeable share of a CPU training step at this project's vocabulary (figures in docs/performance.md). Here
    each block's fp32 work stays in cache (CPU: 2 MB blocks), and the softmax is PyTorch's fused row kernel. The
    loss is logsumexp - target logit, with logsumexp = max + log(sum exp(x - max)) = max - log(softmax's largest
    value), which is at least 1 / V: exact however far the target lies below the best logit (log(softmax[target])
    would underflow past ~87 nats).
    """

    @staticmethod
    def forward(ctx, logits, targets, reduction: str, ignore_index: int):
        N, V = logits.shape
        want_grad = ctx.needs_input_grad[0]
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        n = valid.sum().clamp_min(1) if reduction == "mean" else None
        losses = torch.empty(N, dtype=torch.float32, device=logits.device)
        # the gradient is kept in the logits' dtype, except fp16: its range would turn GradScaler's scale (65536) into
        # inf in the backward, and flush most of (softmax - onehot) / n to zero before the scale lifts it
        ctx.out_dtype = logits.dtype
        grad_dtype = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        grad = torch.empty(logits.shape, dtype=grad_dtype, device=logits.device) if want_grad else None
        # CPU: 2 MB of fp32 per block, so it stays in L2 (faster than larger blocks; figures in docs/performance.md);
        # GPU: a few large blocks
        rows = max(1, (1 << 19 if logits.device.type == "cpu" else 1 << 26) // V)
        for s in range(0, N, rows):
            e = min(s + rows, N)
            lf = logits[s:e].float()  # (rows, V)
            tgt = safe[s:e, None]
            p = torch.softmax(lf, dim=-1)
            lse = lf.amax(dim=-1, keepdim=True) - p.amax(dim=-1, keepdim=True).log()
            losses[s:e] = (lse - lf.gather(1, tgt)).squeeze(1)
            if want_grad:
                w = valid[s:e, None] / n if n is not None else valid[s:e, None].float()  # (rows, 1) row weights
                p.scatter_add_(1, tgt, torch.full_like(w, -1.0))  # softmax - onehot
                torch.mul(p, w, out=grad[s:e])  # scaled and cast to the logits' dtype in one pass
        losses = losses.masked_fill(~valid, 0.0)
        if want_grad:
            ctx.save_for_backward(grad)
        ctx.reduction = reduction
        if reduction == "mean":
            return losses.sum() / n
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return (grad * g[:, None].to(grad.dtype)).to(ctx.out_dtype), None, None, None
        # loss.backward(): skip a pass over N x V (no sync on CPU). Not under torch.compile: .item() would break
        # the graph before the loss, and torch 2.13 then replays the logits' aliases wrongly from its cache.
        if g.device.type == "cpu" and not torch.compiler.is_compiling() and g.item() == 1.0:
            return grad.to(ctx.out_dtype), None, None, None
        return (grad * g.to(grad.dtype)).to(ctx.out_dtype), None, None, None


# The cross-entropy each device runs unless a model asks for another (TransformerLM.loss_impl):
# * "blocked": _CrossEntropy, whose cache-sized blocks beat autograd over fp32 copies of the logits on a CPU
#   (measured, docs/performance.md);
# * "plain": F.cross_entropy on an fp32 view of the logits, which torch.compile fuses with the upcast, saving no
#   (N, V) gradient; under compile, _CrossEntropy's loop over row blocks is unrolled into the graph instead.
# cuda stays "blocked", the configuration measured on an H200 (issue 23: 0.91x nanoGPT), until a GPU times the two
# in one run (scripts/gpu_check.py's benchmark step does: rope[plain:...] against rope[blocked:...]); then the
# faster one goes here, with its figures in docs/performance.md ("GPU").
LOSS_IMPLS = ("blocked", "plain")
LOSS_BY_DEVICE = {"cpu": "blocked", "cuda": "blocked"}


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: str | None = None,
):
    """fp32 cross-entropy of (N, V) logits against (N,) targets, like ``F.cross_entropy(logits.float(), ...)``.
    ``impl``: ``blocked`` (:class:`_CrossEntropy`), ``plain`` (PyTorch's), or None: the device's choice
    (:data:`LOSS_BY_DEVICE`)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be one of 'mean', 'sum', 'none'")
    impl = impl or LOSS_BY_DEVICE.get(logits.device.type, "plain")
    if impl == "plain":
        return F.cross_entropy(logits.float(), targets, reduction=reduction, ignore_index=ignore_index)
    if impl != "blocked":
        raise ValueError(f"cross-entropy impl={impl!r} must be one of {', '.join(LOSS_IMPLS)}")
    return _CrossEntropy.apply(logits, targets, reduction, ignore_index)


# bf16 attention on CPU over at most this many keys runs as matmuls (faster than the flash kernel there, slower
# beyond): _MatmulAttention in training, _attention_forward without autograd.
CPU_ATTENTION_MAX_LEN = 512


def _probs(qf, kf, mask3, dtype):
    """softmax(q k^T / sqrt(D) + mask) for fp32 (N, T, D), (N, S, D) and a mask broadcastable to (N, T, S): scores
    and softmax in fp32 (products of bf16 q and k are exact in fp32), probabilities rounded to ``dtype``."""
    scores = torch.baddbmm(mask3, qf, kf.transpose(1, 2), alpha=qf.shape[-1] ** -0.5)
    return torch.softmax(scores, dim=-1).to(dtype)


def _flat_mask(mask, B, H, T, S):
    """An additive mask as baddbmm's (T, S) or (B H, T, S) input, fp32."""
    mask = mask.float()
    return mask if mask.dim() == 2 else mask.expand(B, H, T, S).reshape(B * H, T, S)


class _MatmulAttention(torch.autograd.Function):
    """Softmax attention for bf16 training on CPU, as batched matmuls: faster than the CPU flash kernel's
    forward + backward over short key lengths, slower over long ones, hence CPU_ATTENTION_MAX_LEN (figures in
    docs/performance.md). ``mask`` is additive (-inf hides a key), broadcastable to (B, H, T, S): the causal
    mask, or a positional bias with the causal mask in it, whose gradient is returned.

    As precise as the flash kernel (tests/test_kernels.py holds it to flash's own error against fp64): the
    scores and the softmax are fp32, the probabilities are rounded to bf16 for the product with v, as flash does,
    and kept (2 bytes per score) for the backward, whose softmax gradient is computed in fp32 inside the kernel.
    The (B H, T, S) probabilities are what bounds it to short sequences.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):  # q (B, H, T, D); k, v (B, H, S, D)
        B, H, T, D = q.shape
        S = k.shape[2]
        q3, k3, v3 = q.reshape(B * H, T, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D)
        with torch.autocast(q.device.type, enabled=False):
            p = _probs(q3.float(), k3.float(), _flat_mask(mask, B, H, T, S), q.dtype)  # (B H, T, S)
            ctx.save_for_backward(q3, k3, v3, p)
            ctx.mask_shape = mask.shape
            return torch.bmm(p, v3).view(B, H, T, D)

    @staticmethod
    def backward(ctx, g):
        q3, k3, v3, p = ctx.saved_tensors
        B, H, T, D = g.shape
        S = k3.shape[1]
        g3 = g.reshape(B * H, T, D).to(q3.dtype)
        with torch.autocast(g.device.type, enabled=False):
            dv = torch.bmm(p.transpose(1, 2), g3)
            ds = torch._softmax_backward_data(torch.bmm(g3, v3.transpose(1, 2)), p, -1, p.dtype)  # d scores
            dq = torch.bmm(ds, k3).mul_(D**-0.5)  # the scale on the (T, D) results, not the (T, S) scores
            dk = torch.bmm(ds.transpose(1, 2), q3).mul_(D**-0.5)
            dmask = None
            if ctx.needs_input_grad[3]:  # a learned bias: d mask = d scores, summed over broadcast dimensions
                dmask = ds.view(B, H, T, S).float().sum_to_size(ctx.mask_shape)
        return dq.view(B, H, T, D), dk.view(B, H, S, D), dv.view(B, H, S, D), dmask


def _attention_forward(q, k, v, mask):
    """Forward only (no autograd), the arithmetic of _MatmulAttention. Causal (mask None): by blocks of queries,
    each against only the keys it can see, which skips most of the masked half of the scores and makes it faster
    than the flash kernel up to CPU_ATTENTION_MAX_LEN (figures in docs/performance.md)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    q3, k3, v3 = q.reshape(B * H, T, D), k.reshape(B * H, S, D), v.reshape(B * H, S, D)
    qf, kf = q3.float(), k3.float()
    if mask is not None:
        return torch.bmm(_probs(qf, kf, _flat_mask(mask, B, H, T, S), q.dtype), v3).view(B, H, T, D)
    step = max(64, -(-T // 4))
    out = []
    for s in range(0, T, step):
        e = min(s + step, T)
        causal = torch.full((e - s, e), float("-inf"), device=q.device).triu_(s + 1)  # key j > query s + i
        out.append(torch.bmm(_probs(qf[:, s:e], kf[:, :e], causal, q.dtype), v3[:, :e]))
    return torch.cat(out, dim=1).view(B, H, T, D)


def attention(q, k, v, mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with the fastest kernel for the case. q (B, H, T, D), k and v
    (B, H, S, D); ``mask`` None: causal with the keys being the queries; else additive (fp32, -inf hides a key),
    broadcastable to (B, H, T, S)."""
    if (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and k.shape[2] <= CPU_ATTENTION_MAX_LEN
        and dropout_p == 0.0
        and not torch.compiler.is_compiling()
    ):
        inputs = (q, k, v) if mask is None else (q, k, v, mask)
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            if mask is None:
                T = q.shape[2]
                mask = torch.full((T, T), float("-inf"), device=q.device).triu_(1)
            return _MatmulAttention.apply(q, k, v, mask)
        with torch.autocast("cpu", enabled=False):
            return _attention_forward(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------------------
# FlexAttention for bias schemes: the bias as a score_mod, never materialised


class BiasKernel(str, Enum):
    """How softmax attention adds a bias scheme's term to the scores (``model.bias_kernel``)."""

    auto = "auto"  # flex where flex_available(device, head_dim), with a score_mod and no dropout active; else mask
    mask = "mask"  # the scheme's bias() as an additive mask, in blocks of queries: every device, dropout, any scheme
    flex = "flex"  # FlexAttention with the scheme's score_mod wherever torch has it (CPU: eager, forward only)


# FlexAttention's CUDA kernels need heads of at least this many dimensions (Triton's dot product); torch refuses less
FLEX_MIN_HEAD_DIM = 16


def flex_available(device, head_dim: int = FLEX_MIN_HEAD_DIM) -> bool:
    """Whether ``bias_kernel=auto`` may use FlexAttention on ``device`` for heads of ``head_dim``: this torch has
    it, the device is CUDA and the heads are wide enough. A CPU runs its forward but not its backward (torch
    raises), so CPU training stays on the mask path."""
    return flex_attention is not None and torch.device(device).type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM


def check_bias_kernel(kind, dropout: float) -> BiasKernel:
    """``model.bias_kernel`` as a :class:`BiasKernel`, refusing in one line what FlexAttention cannot do: run on a
    torch without it, or apply attention dropout (it has none)."""
    try:
        kind = BiasKernel(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in BiasKernel)
        raise ValueError(f"model.bias_kernel={kind!r} is not a bias kernel; choose one of {allowed}") from None
    if kind == BiasKernel.flex and flex_attention is None:
        raise ValueError(f"model.bias_kernel=flex needs torch.nn.attention.flex_attention, which torch "
                         f"{torch.__version__} lacks (torch >= 2.5 has it); use bias_kernel=auto or mask")
    if kind == BiasKernel.flex and dropout > 0:
        raise ValueError(f"model.bias_kernel=flex has no attention dropout (model.dropout={dropout}); set "
                         "model.dropout=0, or use bias_kernel=auto (the mask path while dropout is active)")
    return kind


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process, at its first use; eager flex is a slow reference that
    materialises every score. ``dynamic`` is left to torch: the first length compiles a static kernel, a second
    one recompiles with symbolic lengths, which then serves every further length (evaluation's grid of lengths, a
    growing KV cache) without compiling again."""
    return torch.compile(flex_attention)


def causal_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor):
    """FlexAttention's BlockMask of the causal mask by position: query i sees key j where k_pos[j] <= q_pos[i], the
    mask of the additive path, so it serves a KV cache (keys before the queries) and non-consecutive positions."""

    def causal(b, h, q_idx, kv_idx):
        return k_pos[kv_idx] <= q_pos[q_idx]

    return create_block_mask(causal, None, None, q_pos.numel(), k_pos.numel(), device=q_pos.device)


def flex_bias_attention(q, k, v, score_mod, q_pos: torch.Tensor, k_pos: torch.Tensor, block_mask=None):
    """softmax(q k^T / sqrt(D) + bias) v over the keys at or before each query's position, through FlexAttention:
    ``score_mod(score, b, h, q_idx, kv_idx)`` adds the bias (q_idx, kv_idx index ``q_pos`` (T,) and ``k_pos``
    (S,)), ``block_mask`` is :func:`causal_block_mask` of them (made here when None). q (B, H, T, D), k and v
    (B, H, S, D) -> (B, H, T, D) in q's dtype.

    Which flex: inside a compiled model, the plain function (the model's graph takes it in); else on CUDA the
    compiled one (:func:`_compiled_flex`); else (CPU) eager flex, the reference, which materialises the scores.

    Precision, as the additive path's: scores are fp32 whatever q's dtype. Eager flex multiplies q and k upcast to
    fp32 and takes the softmax in fp32; the compiled kernel accumulates q k^T in fp32, as flash attention does. The
    score_mod sees that fp32 score and the schemes' captured tables stay fp32 (autocast casts q, k and v only), so
    the bias is added in fp32 too; the probabilities are rounded to v's dtype for their product with v.
    """
    if block_mask is None:
        block_mask = causal_block_mask(q_pos, k_pos)
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        run = flex_attention
    else:
        run = _compiled_flex()
    return run(q, k, v, score_mod=score_mod, block_mask=block_mask)



def bias_flex(q, k, v, pos, ctx, layer: int, kind: BiasKernel, dropout_p: float) -> torch.Tensor | None:
    """The attention of bias scheme ``pos`` (its ``score_mod(ctx, layer)``) through FlexAttention when ``kind``
    chooses it (see :class:`BiasKernel`), else None: the caller takes the additive-mask path. ``bias_kernel=flex``
    is refused in one line where it cannot run: a scheme without a score_mod, dropout, or a backward on a device
    where FlexAttention has none."""
    auto_ok = dropout_p == 0 and flex_available(q.device, q.shape[-1])
    if kind == BiasKernel.mask or (kind == BiasKernel.auto and not auto_ok):
        return None
    score_mod = pos.score_mod(ctx, layer)
    if kind == BiasKernel.auto and score_mod is None:
        return None
    if score_mod is None:
        raise ValueError(f"model.bias_kernel=flex: pos={pos.name} has no score_mod (its bias is not a function of "
                         "the positions alone); use bias_kernel=auto or mask")
    if dropout_p > 0:
        raise ValueError(f"model.bias_kernel=flex has no attention dropout (dropout_p={dropout_p}); use "
                         "bias_kernel=auto or mask")
    if q.device.type == "cuda" and q.shape[-1] < FLEX_MIN_HEAD_DIM:
        raise ValueError(f"model.bias_kernel=flex: heads of {q.shape[-1]} dimensions, and FlexAttention on CUDA "
                         f"needs at least {FLEX_MIN_HEAD_DIM}; use bias_kernel=auto or mask")
    if torch.is_grad_enabled() and q.requires_grad and not flex_available(q.device):
        raise ValueError(f"model.bias_kernel=flex: FlexAttention has no backward on {q.device.type} in torch "
                         f"{torch.__version__}; train there with bias_kernel=auto or mask")
    # the layers of one forward share its context, and so the BlockMask made for it; under torch.compile the mask
    # is traced into the graph instead
    if ctx.flex_mask is None and not torch.compiler.is_compiling():
        ctx.flex_mask = causal_block_mask(ctx.q_pos, ctx.k_pos)
    return flex_bias_attention(q, k, v, score_mod, ctx.q_pos, ctx.k_pos, ctx.flex_mask)


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


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int, interleaved: bool) -> torch.Tensor:
    """RoPE's rotation of the first ``r`` dimensions of x (..., T, D) by cos/sin (T, r/2), the rest passed through;
    pairs (2i, 2i+1) when ``interleaved``, else (i, i + r/2). For constant angles (cos/sin need no gradient) and
    eager code: under torch.compile, or with differentiable angles, use the plain composition of autograd ops
    (``RoPE._apply_rotary_autograd``, the reference this is tested against)."""
    if not torch.is_grad_enabled():  # inference (decoding): no autograd node to build, the kernels alone
        return _rotate_into(x, cos, sin, r, interleaved)
    return _Rotary.apply(x, cos, sin, r, interleaved)


class DecodeWeights:
    """The weight matrices of the linear layers (each block's qkv, proj, fc, mlp proj, then the LM head) in the
    layout one decoding step reads fastest; :meth:`TransformerLM.decode_weights` builds them once and reuses them
    while the weights stay the same.

    A decoding step multiplies one row per sequence by every matrix, so on a CPU it is bound by reading the weights
    (21 MB in fp32 for the default model, more than the caches keep), not by arithmetic. There that product runs
    about twice as fast on a contiguous (in, out) copy, multiplied as ``x @ W``, as on nn.Linear's (out, in) weight
    through ``F.linear`` (figures in docs/performance.md), so on CPU this holds such copies: one more copy of the
    linear weights in memory while the model decodes. On other devices it holds the weights themselves.

    The copies are keyed by each weight's storage and version counter, which an optimizer step, ``load_state_dict``
    and ``model.to(...)`` all change. A write through ``weight.data`` changes neither: call
    ``model.train()`` or ``model.drop_decode_weights()`` after one.
    """

    # the CPU layout switch, for A/B timing (scripts/benchmark_generate.py); takes effect at the next rebuild
    transpose_on_cpu = True

    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.key = self.key_of(weights)
        self.transposed = weights[0].device.type == "cpu" and DecodeWeights.transpose_on_cpu
        # normal tensors even when built under inference_mode, so a later call outside it may still use them
        with torch.inference_mode(False), torch.no_grad():
            self.mats = [w.detach().t().contiguous() if self.transposed else w for w in weights]

    @staticmethod
    def key_of(weights: list[torch.Tensor]) -> tuple:
        return tuple((w.data_ptr(), w._version) for w in weights)

    def linear(self, x: torch.Tensor, i: int, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight i, bias)`` for x (..., in); on CPU equal up to float rounding (another summation
        order)."""
        if not self.transposed:
            return F.linear(x, self.mats[i], bias)
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ self.mats[i] if bias is None else torch.addmm(bias, x2, self.mats[i])
        return y.view(*x.shape[:-1], y.shape[-1])
