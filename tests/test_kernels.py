"""Hand-written autograd nodes (roformer/kernels.py: fused cross-entropy, CPU causal attention, RoPE's fused
rotation) against PyTorch's own ops and fp64 references, and the allocator setting that CPU training relies on."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import roformer.kernels as kernels
from roformer.kernels import CPU_ATTENTION_MAX_LEN, attention, cross_entropy
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig, RopeLayout, build_positional


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_pytorch(reduction, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(300, 4096) * 3).to(dtype)  # 3 blocks of rows at this vocabulary, the last one short
    targets = torch.randint(0, 4096, (300,))
    targets[::7] = -100  # ignored rows
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = cross_entropy(a, targets, reduction)
    ref = F.cross_entropy(b.float(), targets, reduction=reduction)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert a.grad[::7].abs().max() == 0  # ignored rows get no gradient


def test_cross_entropy_is_exact_for_targets_far_below_the_best_logit():
    """Softmax of the target underflows fp32 here (210 nats); the loss must still be the exact logsumexp - x."""
    logits = torch.zeros(3, 50)
    logits[0, 7], logits[0, 3] = 90.0, -120.0  # target 3: 210 nats below the best logit
    logits[1, 2] = 1e4  # a huge logit that is the target
    targets = torch.tensor([3, 2, 0])
    ours = cross_entropy(logits, targets, "none")
    torch.testing.assert_close(ours, F.cross_entropy(logits.double(), targets, reduction="none").float())
    assert ours[0].item() == pytest.approx(210.0, rel=1e-6) and ours[1].item() == 0.0


@pytest.mark.parametrize("scale", [1024.0, 65536.0])
def test_cross_entropy_gradient_of_fp16_logits_survives_loss_scaling(scale):
    """GradScaler multiplies the loss by up to 65536 (inf in fp16) and the per-token gradients are ~1 / (N V): the
    backward must scale in fp32 and round once, or the first fp16 step is always skipped and most entries are 0."""
    torch.manual_seed(0)
    N, V = 4096, 512
    logits = (torch.randn(N, V) * 2).half().requires_grad_()
    targets = torch.randint(0, V, (N,))
    (cross_entropy(logits, targets) * scale).backward()
    ref = logits.detach().float().requires_grad_()
    (F.cross_entropy(ref, targets) * scale).backward()
    assert logits.grad.dtype == torch.float16 and torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).float().mean() > 0.99  # ~1e-6 x 1024 is representable once scaled first
    torch.testing.assert_close(logits.grad.float(), ref.grad, rtol=2e-3, atol=1e-3 * scale / (N * V) + 1e-7)


def test_cross_entropy_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction='avg'"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "avg")


@pytest.mark.parametrize("layout", list(RopeLayout))
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_fused_rotation_matches_the_autograd_composition(layout, fraction):
    torch.manual_seed(1)
    rope = build_positional(PosConfig(layout=layout, rotary_fraction=fraction), d_model=64, n_head=2, n_layer=1)
    pos = torch.arange(40)
    ctx = rope.context(pos, pos, 40, torch.float32)
    x = torch.randn(2, 2, 40, 32, requires_grad=True)
    y = torch.randn(2, 2, 40, 32, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    fused = rope.apply_rotary(x, ctx.cos, ctx.sin)
    ref = rope._apply_rotary_autograd(y, ctx.cos, ctx.sin)
    torch.testing.assert_close(fused, ref)
    g = torch.randn_like(fused)
    fused.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, y.grad)


def _attention_fp64(q, k, v, mask=None):
    """The textbook formula; mask None: causal, else added to the scores."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is None:
        T = q.shape[2]
        return torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1) @ v
    return torch.softmax(s + mask, -1) @ v


def _rel_rms(a, b):
    return ((a.double() - b) ** 2).mean().sqrt() / (b**2).mean().sqrt()


@pytest.mark.parametrize("T", [2, 37, 128, 300])  # 300: several query blocks, the last one short
@pytest.mark.parametrize("score_scale", [1.0, 3.0])
def test_cpu_causal_attention_is_as_precise_as_flash(T, score_scale):
    """bf16 training path (matmuls, fp32 softmax) against fp64 on the same bf16 inputs, with the flash kernel's
    own error as the yardstick: outputs and all three gradients."""
    torch.manual_seed(T)
    q, k = ((torch.randn(2, 3, T, 32) * score_scale).to(torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 3, T, 32).to(torch.bfloat16)
    g = torch.randn(2, 3, T, 32).to(torch.bfloat16)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _attention_fp64(*ref_in)
    ref.backward(g.double())
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = attention(*ours_in)
    assert ours.grad_fn.name() == "_MatmulAttentionBackward"  # the matmul path was taken
    ours.backward(g)
    flash_in = [t.clone().requires_grad_() for t in (q, k, v)]
    flash = F.scaled_dot_product_attention(*flash_in, is_causal=True)
    flash.backward(g)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert _rel_rms(ours, ref) < max(2 * _rel_rms(flash, ref), 2e-3)
    with torch.inference_mode():  # evaluation: the blocked forward, same arithmetic
        forward_only = attention(q, k, v)
    torch.testing.assert_close(forward_only, ours.detach(), atol=1e-2, rtol=1e-2)
    assert _rel_rms(forward_only, ref) < max(2 * _rel_rms(flash, ref), 2e-3)
    for a, f, r in zip(ours_in, flash_in, ref_in, strict=True):
        assert a.grad.dtype == torch.bfloat16
        assert _rel_rms(a.grad, r.grad) < max(2 * _rel_rms(f.grad, r.grad), 1e-2)


@pytest.mark.parametrize("bias_shape", [(1, 3, 20, 50), (2, 3, 20, 50)])
def test_cpu_attention_with_a_learned_bias_gives_its_gradient(bias_shape):
    """20 queries against 50 keys (a block of queries after earlier keys) with an additive bias that has -inf
    entries: output and the gradients of q, k, v and the bias against fp64."""
    torch.manual_seed(5)
    q = torch.randn(2, 3, 20, 16).to(torch.bfloat16)
    k, v = (torch.randn(2, 3, 50, 16).to(torch.bfloat16) for _ in range(2))
    bias = torch.randn(bias_shape)
    bias[..., 45:] = float("-inf")  # hidden keys
    g = torch.randn(2, 3, 20, 16).to(torch.bfloat16)
    ours_in = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ours = attention(*ours_in)
    assert ours.grad_fn.name() == "_MatmulAttentionBackward"
    ours.backward(g)
    ref_in = [t.double().requires_grad_() for t in (q, k, v, bias)]
    ref = _attention_fp64(*ref_in)
    ref.backward(g.double())
    assert _rel_rms(ours, ref) < 5e-3
    for a, r in zip(ours_in, ref_in, strict=True):
        assert a.grad.shape == r.grad.shape
        assert _rel_rms(a.grad, r.grad) < 1e-2
    assert ours_in[3].grad[..., 45:].abs().max() == 0  # hidden keys get no gradient
    with torch.inference_mode():
        torch.testing.assert_close(attention(q, k, v, bias), ours.detach(), atol=1e-2, rtol=1e-2)


def test_cpu_causal_attention_of_one_token_is_its_value():
    q, k, v = (torch.randn(2, 3, 1, 16).to(torch.bfloat16).requires_grad_() for _ in range(3))
    out = attention(q, k, v)
    assert out.grad_fn.name() == "_MatmulAttentionBackward"
    assert torch.equal(out, v)
    out.sum().backward()
    assert q.grad.abs().max() == 0 and k.grad.abs().max() == 0 and torch.equal(v.grad, torch.ones_like(v))


@pytest.mark.parametrize("scheme", ["rope", "alibi", "t5", "relative"])
def test_cpu_matmul_attention_under_autocast_inside_a_model_step(scheme, monkeypatch):
    """Inside autocast the scores must still be fp32: same loss and gradients (the bias tables' included) as the
    model on the flash kernel, causal and with each kind of additive bias (fixed, bucketed table, q-dependent)."""
    torch.manual_seed(0)
    m = TransformerLM(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32), PosConfig(scheme, max_len=64))
    x = torch.randint(0, 64, (3, 65))
    calls = []
    matmul_attention = kernels._MatmulAttention.apply
    monkeypatch.setattr(kernels._MatmulAttention, "apply", lambda *a: calls.append(1) or matmul_attention(*a))

    def step(max_len):
        monkeypatch.setattr(kernels, "CPU_ATTENTION_MAX_LEN", max_len)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    l1, g1 = step(CPU_ATTENTION_MAX_LEN)
    assert len(calls) == 2  # one per layer
    l2, g2 = step(0)  # every length is above the limit: the flash kernel
    assert len(calls) == 2
    torch.testing.assert_close(l1, l2, atol=2e-3, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=3e-3, rtol=5e-2)


def test_cpu_causal_attention_falls_back_where_it_does_not_pay():
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    assert attention(q, q, q).grad_fn.name() == "_MatmulAttentionBackward"
    long = torch.randn(1, 1, CPU_ATTENTION_MAX_LEN + 1, 16, dtype=torch.bfloat16, requires_grad=True)
    cases = {
        "fp32": (q.detach().float().requires_grad_(),) * 3,
        "longer than the limit": (long,) * 3,
    }
    for name, args in cases.items():
        out = attention(*args)
        assert out.grad_fn is None or "MatmulAttention" not in out.grad_fn.name(), name
        torch.testing.assert_close(out, F.scaled_dot_product_attention(*args, is_causal=True), msg=name)
    with torch.no_grad():
        assert attention(q, q, q).grad_fn is None  # the forward-only path
    assert "MatmulAttention" not in attention(q, q, q, dropout_p=0.1).grad_fn.name()


_FAULTS = """
import resource, sys, torch
from roformer.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
for _ in range(12):  # like a training step: the same large tensor made, written and freed, again and again
    torch.ones(64 << 20, dtype=torch.uint8)
f0, r0 = faults(), rss_mb()
for _ in range(5):
    torch.ones(64 << 20, dtype=torch.uint8)
print(faults() - f0, rss_mb() - r0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt: Linux only")
def test_kept_freed_memory_ends_page_faults_of_repeated_large_tensors():
    """A 64 MB tensor made and freed 17 times; the last 5 are counted. glibc's default maps fresh pages each time
    and faults them all in again (16,384 faults of 4 kB per tensor). With keep_freed_memory the heap grows to a
    few copies in the first iterations (glibc's bins) and then serves every one from pages already there: no
    faults and no growth."""
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        counts[mode] = [int(x) for x in out.stdout.split()]
    assert counts["default"][0] > 5 * 8000, counts  # at least half the pages of each tensor faulted again
    assert counts["keep"][0] < 1000, counts
    assert counts["keep"][1] < 32, counts  # MB of resident memory gained over the 5 counted tensors
