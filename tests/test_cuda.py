"""The CUDA paths against CPU references: attention (fused causal, explicit mask, additive bias), the fused
cross-entropy, the model of every scheme forward and backward, KV-cache decoding, fp16 with a GradScaler, bf16
and torch.compile.

Marked ``cuda`` and skipped without a GPU; ``python -m pytest -m cuda`` runs them, and scripts/gpu_check.py runs
them on a lent GPU. References are float64 on the CPU, computed from the same (rounded) inputs. Errors are
relative Frobenius norms ``|x - ref| / |ref|``, held to a bound per arithmetic: fp32 must be as good as fp32 gets
(a few 1e-6; TF32 or a wrong kernel would fail), fp16/bf16 as good as their rounding allows. Each check would fail
on a wrong kernel: a lost causal mask or bias, a bias applied to the wrong positions, a gradient lost to underflow
or to an overflowing loss scale, a compiled graph that differs from eager.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import markov_tokens

from roformer.kernels import LOSS_IMPLS, attention, cross_entropy
from roformer.model import KVCache, ModelConfig, TransformerLM
from roformer.optim import OptimConfig
from roformer.positional import SCHEMES, PosConfig
from roformer.runtime import COMPILE_SCOPES, Runtime, compile_model, resolve_precision
from roformer.training import Progress, TrainConfig, TrainerConfig, build, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = torch.device("cuda")
# Bounds on the relative error against float64, per arithmetic. fp32: rounding only, no TF32 (PyTorch's default
# for matmuls), so a few 1e-6. bf16 (8-bit mantissa, unit roundoff 2^-9 = 2e-3) and fp16 (2^-12 = 2.4e-4): a few
# hundred roundings deep in a model, about ten times the unit roundoff, as the same model shows on a CPU.
TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(s, "softmax") for s in sorted(SCHEMES)] + [("rope", "linear")]
ids = lambda v: str(v).removeprefix("torch.")


def rel(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    """|x - ref| / |ref| in float64 on the CPU (|x| where ref is exactly zero; inf for a missing gradient)."""
    if x is None:  # a gradient that did not arrive
        return math.inf
    x, ref = x.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert torch.isfinite(x).all(), "non-finite values"
    if ref.norm() == 0:  # e.g. the query gradient of attention over one key: then the error is |x| itself
        return x.norm().item()
    return ((x - ref).norm() / ref.norm()).item()


def autocast(dtype: torch.dtype, device: torch.device | None = None):
    return torch.autocast((device or DEV).type, dtype=dtype, enabled=dtype != torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Attention kernels


def reference_attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + mask) v in float64; mask None: causal with the keys being the queries."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is None:
        T = q.shape[-2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    else:
        s = s + mask.double()
    return s.softmax(-1) @ v


def leaf(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.detach().to(device, dtype).requires_grad_()


def attention_errors(dtype, T, S=None, mask_shape=None, device=None, seed=0) -> dict[str, float]:
    """Errors of kernels.attention (output and gradients) on ``device`` against float64 on the CPU. ``mask_shape``
    None: the fused causal path; else an ALiBi-like additive mask of that shape (broadcast to (B, H, T, S)),
    trainable, for T queries at the last T of S positions, with -inf on the keys after each query."""
    device = device or DEV
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 4, 64
    S = S or T
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
    mask = None
    if mask_shape is not None:
        q_pos, k_pos = torch.arange(S - T, S), torch.arange(S)
        dist = (q_pos[:, None] - k_pos[None, :]).float()  # (T, S)
        slopes = torch.rand(mask_shape[:-2] + (1, 1), generator=g) * 0.5
        mask = (-slopes * dist).masked_fill(dist < 0, float("-inf")).expand(mask_shape).contiguous()
    ins = [q, k, v] + ([mask] if mask is not None else [])
    types = [dtype] * 3 + [torch.float32] * (mask is not None)  # the mask stays fp32, as the model passes it
    dev_ins = [leaf(t, device, ty) for t, ty in zip(ins, types, strict=True)]
    ref_ins = [leaf(t.to(ty), "cpu", torch.float64) for t, ty in zip(ins, types, strict=True)]
    out = attention(*dev_ins)
    ref = reference_attention(*ref_ins)
    up = torch.randn(ref.shape, generator=g)
    out.backward(up.to(device, dtype))
    ref.backward(up.to(dtype).double())
    names = ["out", "dq", "dk", "dv"] + (["dmask"] if mask is not None else [])
    got = [out] + [t.grad for t in dev_ins]
    want = [ref] + [t.grad for t in ref_ins]
    if mask is not None:  # -inf entries have no gradient to compare
        ok = torch.isfinite(mask)
        got[-1], want[-1] = got[-1].cpu()[ok], want[-1][ok]
    return {n: rel(a, b) for n, a, b in zip(names, got, want, strict=True)}


@pytest.mark.parametrize("T", [77, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_causal_attention_matches_float64(dtype, T):
    """The fused causal path (flash or memory-efficient SDPA): output and the three input gradients."""
    errors = attention_errors(dtype, T)
    assert max(errors.values()) < TOL[dtype] / 3, errors  # one attention, not a model: tighter than TOL


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_causal_attention_of_one_token(dtype):
    """One query over one key: the output is v and dv is the upstream gradient, to the rounding of the inputs'
    dtype; dq and dk are exactly zero in exact arithmetic (a softmax over one key is constant), so no relative
    error exists for them. The kernel computes d score = dp - delta with dp = dO . v and delta = dO . out, two
    length-D dot products of the same products summed in other orders (out equals v), so |d score| is at most
    2 gamma_D sum_i |dO_i v_i| with gamma_D = D u / (1 - D u) (Higham, Accuracy and Stability, Lemma 3.1; u the
    unit roundoff of the kernel's accumulation, fp32 for every dtype here), and dq = d score k / sqrt(D), dk =
    d score q / sqrt(D). Those bounds are asserted per (batch, head): they hold for any summation order and fail
    for a kernel that leaks a real gradient into q or k."""
    g = torch.Generator().manual_seed(1)
    B, H, D = 2, 4, 64
    q, k, v, up = (torch.randn(B, H, 1, D, generator=g).to(dtype) for _ in range(4))
    qd, kd, vd = (leaf(t, DEV, dtype) for t in (q, k, v))
    out = attention(qd, kd, vd)
    out.backward(up.to(DEV))
    u = unit_roundoff(dtype)
    assert rel(out, v.double()) <= u and rel(vd.grad, up.double()) <= u  # v and dO, rounded once at most
    u32 = unit_roundoff(torch.float32)
    gamma = D * u32 / (1 - D * u32)
    dscore = 2 * gamma * (up.double() * v.double()).abs().sum(-1)  # (B, H, 1)
    for grad, other in ((qd.grad, k), (kd.grad, q)):
        bound = dscore * other.double().norm(dim=-1) / math.sqrt(D) + u * 1e-30  # (B, H, 1); + a denormal margin
        got = grad.detach().double().cpu().norm(dim=-1)
        assert torch.isfinite(got).all() and (got <= bound).all(), (got.max().item(), bound.min().item())


@pytest.mark.parametrize("mask_shape", [(1, 4, 48, 112), (2, 4, 48, 112), (1, 4, 200, 200)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_additive_mask_attention_matches_float64(dtype, mask_shape):
    """The additive-mask path (bias schemes; queries after cached keys): output and gradients of q, k, v and of
    the mask, which is how relative and T5 biases learn."""
    errors = attention_errors(dtype, mask_shape[2], mask_shape[3], mask_shape)
    assert max(errors.values()) < TOL[dtype] / 3, errors


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy


def ce_case(N=1400, V=50304, seed=0):
    """Logits over two CUDA blocks of rows, the second one short (1334 rows a block at GPT-2's padded
    vocabulary), some rows ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    return logits, targets


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_cross_entropy_matches_float64(dtype, reduction, impl):
    """Both cross-entropy kernels on CUDA (the device's choice is LOSS_BY_DEVICE["cuda"]; the other is a model's
    loss_impl away)."""
    logits, targets = ce_case()
    a = leaf(logits, DEV, dtype)
    ref_in = leaf(logits.to(dtype), "cpu", torch.float64)
    loss = cross_entropy(a, targets.to(DEV), reduction, impl=impl)
    ref = F.cross_entropy(ref_in, targets, reduction=reduction)
    assert loss.dtype == torch.float32
    assert rel(loss, ref) < 1e-5
    w = torch.randn(ref.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    (loss * w.to(DEV, torch.float32)).sum().backward()
    (ref * w).sum().backward()
    assert a.grad.dtype == dtype
    # the gradient is stored in the logits' dtype: one rounding of the float64 value
    assert rel(a.grad, ref_in.grad.to(dtype)) < {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}[dtype]
    assert a.grad[::7].abs().max() == 0  # ignored rows


@pytest.mark.parametrize("scale", [1024.0, 65536.0])
def test_cross_entropy_gradient_survives_fp16_loss_scaling(scale):
    """fp16 training backpropagates ``loss * scale`` (GradScaler's scale, 65536 at the start) so that small
    gradients stay representable: the fp16 gradient of the logits must be the float64 one times the scale, rounded
    once to fp16, as ``F.cross_entropy(logits.float())`` gives (checked first, so the bar is one PyTorch clears). A
    kernel that rounds (softmax - onehot) / n to fp16 before the scale arrives flushes most non-target entries to
    zero at a real batch (n V above 2^24), and one that casts the scale to fp16 turns 65536 into inf."""
    logits, targets = ce_case(N=4096, V=8192)
    ref_in = leaf(logits.half(), "cpu", torch.float64)
    (F.cross_entropy(ref_in, targets) * scale).backward()
    want = ref_in.grad.half()
    for name, loss_fn in (("F.cross_entropy(logits.float())", lambda x, t: F.cross_entropy(x.float(), t)),
                          ("kernels.cross_entropy", cross_entropy)):  # fmt: skip
        a = leaf(logits, DEV, torch.float16)
        (loss_fn(a, targets.to(DEV)) * scale).backward()
        assert torch.isfinite(a.grad).all(), f"{name}: non-finite gradients at scale {scale:g}"
        lost = ((a.grad.cpu() == 0) & (want != 0)).float().mean().item()
        assert lost == 0, f"{name}: {lost:.1%} of the gradient entries underflowed to zero at scale {scale:g}"
        assert rel(a.grad, want) < 1e-3, name


# ----------------------------------------------------------------------------------------------------------
# The model: every scheme, forward and backward, on CUDA against float64 on the CPU

SHAPE = dict(vocab_size=512, n_layer=2, n_head=4, d_model=128, bias_block=40, linear_chunk=16, init_std=0.1)
T_LEN = 96


def model_pair(name, attention_kind="softmax", device=None, **kw):
    """(model on CUDA in fp32, the same weights in float64 on the CPU). Weights larger than the default init and
    trained-looking positional parameters, so that attention is peaked and every scheme's positions matter."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(attention=attention_kind, **{**SHAPE, **kw}),
                          PosConfig(name=name, max_len=128, clip=16))  # fmt: skip
    for p in model.pos.parameters():
        torch.nn.init.normal_(p, std=0.5)
    ref = copy.deepcopy(model).double()
    return model.to(device or DEV), ref


def forward_backward(model, x, dtype, device):
    """logits, loss (the model's own, through the fused kernel) and every gradient by parameter name, under
    autocast ``dtype``. ``model`` may be compiled (its parameter names then start with ``_orig_mod.``)."""
    model.zero_grad(set_to_none=True)
    with autocast(dtype, device):
        logits, loss = model(x[:, :-1].to(device), x[:, 1:].to(device))
    loss.backward()
    return logits, loss, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}


def reference_forward_backward(ref, x):
    """The float64 reference with PyTorch's own cross-entropy (not the fused kernel under test)."""
    ref.zero_grad(set_to_none=True)
    logits, _ = ref(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    return logits, loss, {n: p.grad for n, p in ref.named_parameters()}


def model_errors(model, ref, x, dtype, device=None) -> dict[str, float]:
    logits, loss, grads = forward_backward(model, x, dtype, device or DEV)
    r_logits, r_loss, r_grads = reference_forward_backward(ref, x)
    errors = {"logits": rel(logits, r_logits), "loss": rel(loss, r_loss)}
    errors |= {f"d{n}": rel(grads[n], r_grads[n]) for n in r_grads if r_grads[n] is not None and r_grads[n].norm() > 0}
    return errors


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("name,attention_kind", CASES)
def test_model_forward_backward_matches_float64(name, attention_kind, dtype):
    """Logits, loss and every parameter's gradient (the bias schemes' tables included) of a two-layer model in
    fp32, bf16 and fp16 autocast, through the fused kernels and the bias blocks (3 blocks at this length)."""
    model, ref = model_pair(name, attention_kind)
    x = torch.randint(0, SHAPE["vocab_size"], (2, T_LEN + 1), generator=torch.Generator().manual_seed(1))
    errors = model_errors(model, ref, x, dtype)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if v > TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]:g}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_model_is_causal_on_cuda(name, dtype):
    """Changing a token changes no logit before it (a lost causal mask or a bias on the wrong side would)."""
    model, _ = model_pair(name)
    model.eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, T_LEN), device=DEV)
    with torch.no_grad(), autocast(dtype):
        base, _ = model(x)
        for t in (0, 41, T_LEN - 2):
            x2 = x.clone()
            x2[:, t + 1] = (x2[:, t + 1] + 1) % SHAPE["vocab_size"]
            logits, _ = model(x2)
            assert rel(logits[:, : t + 1], base[:, : t + 1]) < 1e-6, t  # masked keys add exact zeros
            assert rel(logits[:, t + 1], base[:, t + 1]) > 1e-3, t


# ----------------------------------------------------------------------------------------------------------
# Explicit masks and KV caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids)
@pytest.mark.parametrize("name,attention_kind", CASES)
def test_cache_windows_and_decoding_match_the_full_forward(name, attention_kind, dtype):
    """On CUDA: a prompt, then token-by-token decoding, then a block after the cache (the explicit boolean-mask
    path) give the full forward's logits; decode_step gives the cached forward's; explicit positions equal an
    offset. And the full forward equals the float64 CPU reference."""
    model, ref = model_pair(name, attention_kind)
    model.eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, T_LEN), generator=torch.Generator().manual_seed(2))
    xd = x.to(DEV)
    with torch.inference_mode(), autocast(dtype):
        full, _ = model(xd)
        cache, pieces = KVCache(), []
        pieces.append(model(xd[:, :40], cache=cache)[0])
        for t in range(40, 50):
            pieces.append(model(xd[:, t : t + 1], cache=cache)[0])
        pieces.append(model(xd[:, 50:], cache=cache)[0])  # several queries after the cache: explicit mask
        assert len(cache) == T_LEN
        fast, slow = KVCache(), KVCache()
        model(xd[:, :40], cache=fast)
        model(xd[:, :40], cache=slow)
        for t in range(40, 44):
            a = model.decode_step(xd[:, t : t + 1], fast)
            b, _ = model(xd[:, t : t + 1], cache=slow)
            torch.testing.assert_close(a, b, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)
        off, _ = model(xd[:, 30:70], offset=30)
        explicit, _ = model(xd[:, 30:70], positions=torch.arange(30, 70, device=DEV))  # boolean-mask path
    with torch.no_grad():
        want, _ = ref(x)
    assert rel(torch.cat(pieces, dim=1), full) < TOL[dtype] / 2
    assert rel(explicit, off) < TOL[dtype] / 2
    assert rel(full, want) < TOL[dtype]


# ----------------------------------------------------------------------------------------------------------
# Training steps: fp16 with a GradScaler, bf16, against fp32


VOCAB = 8192  # the default vocabulary: with 16 x 128 tokens a step, softmax / n is about 6e-8, fp16's smallest step


def trainee(precision: str, device: torch.device | None = None):
    """A Trainee built as train.py builds one, with a learnable Markov-chain corpus."""
    device = device or DEV
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=128),
        pos=PosConfig(name="rope"),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        trainer=TrainerConfig(seq_len=128, batch_size=16, max_steps=10, device=device.type, precision=precision),
    )
    dtype, scaler = resolve_precision(cfg.trainer.precision, device)
    rt = Runtime(device, autocast_dtype=dtype, use_scaler=scaler)
    torch.manual_seed(0)
    return build(cfg, rt, markov_tokens(50_000, VOCAB, seed=0)), rt, cfg


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_training_steps_follow_fp32(precision):
    """Ten steps of train_step (same init, same batches) in fp16 with a GradScaler or in bf16: every loss finite,
    with fp16 no step skipped (a healthy model at the scaler's initial scale, 65536, does not overflow), every loss
    within 5e-3 of fp32's (a CPU run of this in bf16 stays within 1e-4), and the loss falls."""
    ref, ref_rt, cfg = trainee("fp32")
    tr, rt, _ = trainee(precision)
    assert rt.use_scaler == (precision == "fp16") and tr.scaler.is_enabled() == rt.use_scaler
    p_ref, p = Progress(), Progress()
    want, got, norms, scales = [], [], [], [tr.scaler.get_scale()]
    for _ in range(cfg.trainer.max_steps):
        want.append(train_step(ref, ref_rt, cfg.trainer, cfg.optim, p_ref)[0])
        loss, grad_norm = train_step(tr, rt, cfg.trainer, cfg.optim, p)
        got.append(loss)
        norms.append(grad_norm)
        scales.append(tr.scaler.get_scale())
    assert all(math.isfinite(x) for x in got), got
    assert scales == sorted(scales), f"steps were skipped (the scale fell): {scales}, gradient norms {norms}"
    assert all(math.isfinite(x) for x in norms), norms
    close = [abs(a - b) / b for a, b in zip(got, want, strict=True)]
    assert max(close) < 5e-3, f"relative differences from fp32, by step: {close}"
    assert got[-1] < got[0] - 0.3, f"the loss did not fall: {got}"


def test_fp16_scaler_skips_an_overflowing_step_and_backs_off():
    """With a loss scale the fp16 gradients cannot hold, the step is skipped (weights unchanged, loss still
    reported), the scale halves, and at a sane scale the next step trains."""
    tr, rt, cfg = trainee("fp16")
    tr.scaler.scale(torch.zeros((), device=DEV))  # the scaler makes its scale tensor on first use
    tr.scaler.update(2.0**40)  # sets the scale
    before = [q.detach().clone() for q in tr.raw.parameters()]
    loss, grad_norm = train_step(tr, rt, cfg.trainer, cfg.optim, Progress())
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.raw.parameters(), strict=True))
    assert tr.scaler.get_scale() == 2.0**39
    tr.scaler.update(1024.0)
    train_step(tr, rt, cfg.trainer, cfg.optim, Progress())
    assert not any(torch.equal(a, b) for a, b in zip(before, tr.raw.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("scope", COMPILE_SCOPES)
@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_compiled_model_matches_eager_and_float64(name, scope):
    """The compiled model (one graph, or one block graph reused and the head apart: the two ways training compiles
    it) in bf16 autocast: forward and backward as close to float64 as eager is, and close to eager; then an
    inference-mode call and a training call again on the same compiled module (validation inside training does
    this)."""
    torch._dynamo.reset()  # each model is a new guard set
    model, ref = model_pair(name)
    x = torch.randint(0, SHAPE["vocab_size"], (2, T_LEN + 1), generator=torch.Generator().manual_seed(3))
    e_logits, e_loss, grads = forward_backward(model, x, torch.bfloat16, DEV)
    e_grads = {n: g.clone() for n, g in grads.items() if g is not None}  # the compiled call zeroes them
    compiled = torch.compile(model, fullgraph=True) if scope == "model" else compile_model(model, scope)
    c_logits, c_loss, c_grads = forward_backward(compiled, x, torch.bfloat16, DEV)
    r_logits, r_loss, r_grads = reference_forward_backward(ref, x)
    assert rel(c_logits, r_logits) < TOL[torch.bfloat16] and rel(c_loss, r_loss) < TOL[torch.bfloat16]
    assert rel(c_logits, e_logits) < TOL[torch.bfloat16] and rel(c_loss, e_loss) < 1e-2
    for n, g in e_grads.items():
        assert rel(c_grads[n], g) < TOL[torch.bfloat16], n
        if r_grads[n].norm() > 0:
            assert rel(c_grads[n], r_grads[n]) < TOL[torch.bfloat16], n
    with torch.inference_mode(), autocast(torch.bfloat16):
        compiled(x[:, :-1].to(DEV))
    _, again, _ = forward_backward(compiled, x, torch.bfloat16, DEV)
    assert rel(again, c_loss) < 1e-3
