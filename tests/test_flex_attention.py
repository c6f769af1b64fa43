"""FlexAttention for the bias schemes (roformer/kernels.py: bias_flex, flex_bias_attention; each scheme's
``score_mod``) against the additive path: the scheme's ``bias()`` plus the causal mask by position, through
``F.scaled_dot_product_attention``.

Every registered scheme whose ``score_mod`` is not None is checked (the list derives from the registry). On the
CPU, FlexAttention runs eagerly and forward only, so the CPU tests run under ``torch.no_grad``; forward and backward
with the compiled flex are the ``cuda``-marked tests at the end, skipped without a GPU. Positions (``CASES``):
consecutive, a KV cache (queries at 8..11 against keys 0..11), non-consecutive sorted ones, and those with a cache.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config

import roformer.kernels as kernels
from roformer.kernels import BiasKernel, bias_flex, causal_block_mask, flex_available, flex_bias_attention
from roformer.model import KVCache, ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig, build_positional

# eager flex (the CPU reference) warns once that it is not compiled: that is the point here
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
              pytest.mark.usefixtures("one_thread")]
needs_flex = pytest.mark.skipif(kernels.flex_attention is None, reason="this torch has no FlexAttention")

H, D, N_LAYER = 4, 16, 2
_sparse = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:60].sort().values
CASES = {  # (query positions, key positions)
    "consecutive": (torch.arange(150), torch.arange(150)),  # two of FlexAttention's 128-blocks, the second partial
    "kv_cache": (torch.arange(8, 12), torch.arange(12)),
    "sparse": (_sparse, _sparse),
    "sparse_cache": (_sparse[45:], _sparse),
}


def scheme(name: str):
    """The scheme with its learned parameters moved off their initial values (T5's table starts at zero), by
    positive amounts so parameters that must stay positive do."""
    torch.manual_seed(0)
    pos = build_positional(PosConfig(name=name), d_model=H * D, n_head=H, n_layer=N_LAYER)
    with torch.no_grad():
        for p in pos.parameters():
            p.add_(0.3 * torch.rand_like(p))
    return pos


def context(pos, q_pos, k_pos):
    return pos.context(q_pos, k_pos, int(max(q_pos.max(), k_pos.max())) + 1, torch.float32)


def _has_score_mod(name: str) -> bool:
    pos, p = scheme(name), torch.arange(4)
    return pos.score_mod(context(pos, p, p), 0) is not None


FLEX_SCHEMES = [n for n in sorted(SCHEMES) if _has_score_mod(n)]


def additive(pos, q, k, v, ctx, layer):
    """The model's mask path in one block: bias() with -inf on the keys after each query, as an additive fp32 mask,
    through kernels.attention (for fp32 and float64 inputs: F.scaled_dot_product_attention)."""
    bias = pos.bias(q, k, ctx, layer, slice(0, q.shape[2]))
    allowed = ctx.k_pos[None, :] <= ctx.q_pos[:, None]  # (T, S)
    return kernels.attention(q, k, v, bias.masked_fill(~allowed, float("-inf")))


def qkv(T: int, S: int, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, n, D, generator=g).to(dtype) for n in (T, S, S)]


def test_the_schemes_with_a_score_mod_include_alibi_and_t5_and_all_have_a_bias():
    assert {"alibi", "t5"} <= set(FLEX_SCHEMES)
    assert all(SCHEMES[n].has_bias for n in FLEX_SCHEMES)


@needs_flex
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", FLEX_SCHEMES)
def test_score_mod_equals_the_additive_bias(name, case):
    pos = scheme(name)
    ctx = context(pos, *CASES[case])
    q, k, v = qkv(len(ctx.q_pos), len(ctx.k_pos))
    with torch.no_grad():
        for layer in range(N_LAYER):  # per-layer schemes (FIRE) differ by layer
            ours = flex_bias_attention(q, k, v, pos.score_mod(ctx, layer), ctx.q_pos, ctx.k_pos)
            torch.testing.assert_close(ours, additive(pos, q, k, v, ctx, layer), atol=1e-5, rtol=1e-5)


@needs_flex
@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_flex_in_bf16_is_as_precise_as_the_mask_path(name):
    """Scores in fp32 inside flex (kernels.flex_bias_attention's docstring): its bf16 error against float64 is
    that of the mask path, which adds an fp32 bias to fp32 scores too."""
    pos = scheme(name)
    ctx = context(pos, *CASES["sparse_cache"])
    q, k, v = qkv(len(ctx.q_pos), len(ctx.k_pos), torch.bfloat16)
    with torch.no_grad():
        ref = additive(scheme(name).double(), q.double(), k.double(), v.double(), ctx, 0)
        flex = flex_bias_attention(q, k, v, pos.score_mod(ctx, 0), ctx.q_pos, ctx.k_pos)
        mask = additive(pos, q, k, v, ctx, 0)

    def err(x):
        return ((x.double() - ref).norm() / ref.norm()).item()

    assert flex.dtype == torch.bfloat16
    assert err(flex) <= 2 * err(mask) + 1e-3, (err(flex), err(mask))


def model_pair(name: str, bias_kernels=("flex", "mask")):
    """Two models with the same weights, one per ``bias_kernels``, in eval mode on the CPU."""
    models = []
    for kernel in bias_kernels:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, n_layer=N_LAYER, n_head=H, d_model=H * D, bias_block=16, bias_kernel=kernel)
        models.append(TransformerLM(cfg, PosConfig(name=name)).eval())
    with torch.no_grad():
        for p in models[0].pos.parameters():
            p.add_(0.3 * torch.rand_like(p))
    models[1].load_state_dict(models[0].state_dict())
    return models


@needs_flex
@pytest.mark.parametrize("name", FLEX_SCHEMES)
def test_model_with_flex_equals_the_mask_path(name, monkeypatch):
    """Forward only (CPU flex has no backward): a full sequence, a KV cache filled then extended, explicit
    non-consecutive positions. Every layer of every call goes through flex; the layers of a forward share one
    BlockMask, and each forward makes its own."""
    flex, mask = model_pair(name)
    calls, masks = [], []
    monkeypatch.setattr(kernels, "flex_bias_attention", lambda *a: calls.append(1) or flex_bias_attention(*a))
    monkeypatch.setattr(kernels, "causal_block_mask", lambda *a: masks.append(1) or causal_block_mask(*a))
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = mask(x)[0]
        torch.testing.assert_close(flex(x)[0], full, atol=1e-5, rtol=1e-5)
        cache = KVCache()
        flex(x[:, :30], cache=cache)
        torch.testing.assert_close(flex(x[:, 30:], cache=cache)[0], full[:, 30:], atol=1e-5, rtol=1e-5)
        positions = _sparse[:40]
        torch.testing.assert_close(flex(x, positions=positions)[0], mask(x, positions=positions)[0],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    assert len(calls) == 4 * N_LAYER and len(masks) == 4


def test_auto_takes_the_mask_path_on_the_cpu():
    pos = scheme("alibi")
    ctx = context(pos, *CASES["kv_cache"])
    q, k, v = qkv(4, 12)
    assert not flex_available("cpu") and not flex_available(torch.device("cpu"))
    assert flex_available("cuda") == (kernels.flex_attention is not None)
    assert not flex_available("cuda", head_dim=8)  # below FlexAttention's CUDA minimum: the mask path
    assert bias_flex(q, k, v, pos, ctx, 0, BiasKernel.auto, 0.0) is None
    assert bias_flex(q, k, v, pos, ctx, 0, BiasKernel.mask, 0.0) is None


@pytest.mark.parametrize(("name", "dropout", "chosen"), [("alibi", 0.0, True), ("alibi", 0.1, False),
                                                         ("relative", 0.0, False)])  # fmt: skip
def test_auto_chooses_flex_where_available_without_dropout_and_with_a_score_mod(name, dropout, chosen, monkeypatch):
    """auto's rule, with the device's availability faked (relative, Shaw et al., has a bias but no score_mod)."""
    monkeypatch.setattr(kernels, "flex_available", lambda device, head_dim: True)
    monkeypatch.setattr(kernels, "flex_bias_attention", lambda *a: "flex")
    pos = scheme(name)
    ctx = context(pos, *CASES["kv_cache"])
    q, k, v = qkv(4, 12)
    out = bias_flex(q, k, v, pos, ctx, 0, BiasKernel.auto, dropout)
    assert out == ("flex" if chosen else None)


@contextmanager
def one_line_error(match: str):
    with pytest.raises(ValueError, match=match) as info:
        yield
    assert "\n" not in str(info.value), str(info.value)


def test_flex_is_refused_with_dropout_and_unknown_kernels_are_refused():
    with one_line_error(r"model.bias_kernel=flex has no attention dropout \(model.dropout=0.1\)"):
        ModelConfig(bias_kernel="flex", dropout=0.1)
    with one_line_error("model.bias_kernel='fast' is not a bias kernel; choose one of auto, mask, flex"):
        ModelConfig(bias_kernel="fast")
    assert ModelConfig(dropout=0.1).bias_kernel == BiasKernel.auto  # auto: the mask path while dropout is active


def test_flex_is_refused_on_a_torch_without_it_where_auto_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "flex_attention", None)
    with one_line_error(r"model.bias_kernel=flex needs torch.nn.attention.flex_attention, which torch .* lacks"):
        ModelConfig(bias_kernel="flex")
    assert not flex_available("cuda")
    auto, mask = model_pair("alibi", ("auto", "mask"))
    x = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(auto(x)[0], mask(x)[0])


@needs_flex
def test_flex_is_refused_for_a_scheme_without_score_mod():
    model = TransformerLM(ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, bias_kernel="flex"),
                          PosConfig(name="relative")).eval()  # fmt: skip
    with one_line_error("model.bias_kernel=flex: pos=relative has no score_mod"), torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long))


@needs_flex
def test_flex_refuses_to_train_where_flex_has_no_backward():
    """CPU FlexAttention has no backward (torch raises deep in autograd); the model says so before the forward."""
    model = TransformerLM(ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, bias_kernel="flex"),
                          PosConfig(name="alibi"))  # fmt: skip
    with one_line_error("model.bias_kernel=flex: FlexAttention has no backward on cpu"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_bias_kernel_is_a_model_option_of_the_real_configs():
    assert tiny_config().model.bias_kernel == BiasKernel.auto
    assert tiny_config("model.bias_kernel=mask").model.bias_kernel == BiasKernel.mask


# ----------------------------------------------------------------------------------------------------------
# CUDA: the compiled flex, forward and backward (what bias_kernel=auto runs there)


def rel(x: torch.Tensor | None, ref: torch.Tensor) -> float:
    """|x - ref| / |ref| in float64 on the CPU (inf for a gradient that did not arrive)."""
    if x is None:
        return math.inf
    x, ref = x.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    return ((x - ref).norm() / ref.norm()).item()


def forward_backward(pos, ctx, q, k, v, up, layer: int, flex: bool) -> list[torch.Tensor | None]:
    """Output and gradients (q, k, v, then the scheme's parameters) of the flex or the mask path."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pos.zero_grad(set_to_none=True)
    if flex:
        out = flex_bias_attention(*leaves, pos.score_mod(ctx, layer), ctx.q_pos, ctx.k_pos)
    else:
        out = additive(pos, *leaves, ctx, layer)
    out.backward(up.to(out.device, out.dtype))
    return [out] + [t.grad for t in leaves] + [p.grad for p in pos.parameters()]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", FLEX_SCHEMES)
def test_compiled_flex_matches_float64_forward_and_backward_on_cuda(name, dtype):
    """Every case and layer against float64 on the CPU: the errors of the compiled flex (output, dq, dk, dv and the
    scheme's parameters: T5's table, KERPLE's r1 and r2, FIRE's MLP) within fp32's rounding, and in bf16 no larger
    than twice the mask path's on the same GPU (which rounds the bias to bf16; flex keeps it fp32)."""
    bound = {torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    cases = sorted(CASES.items()) + [("long", (torch.arange(300), torch.arange(300)))]  # three 128-blocks
    for case, (q_pos, k_pos) in cases:
        pos, ref_pos = scheme(name).cuda(), scheme(name).double()
        ctx, ref_ctx = context(pos, q_pos.cuda(), k_pos.cuda()), context(ref_pos, q_pos, k_pos)
        q, k, v = qkv(len(q_pos), len(k_pos), dtype)
        up = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        for layer in range(N_LAYER):
            ref = forward_backward(ref_pos, ref_ctx, q.double(), k.double(), v.double(), up, layer, flex=False)
            dev = [t.cuda() for t in (q, k, v)]
            flex = forward_backward(pos, ctx, *dev, up, layer, flex=True)
            mask = forward_backward(pos, ctx, *dev, up, layer, flex=False)
            for i, r in enumerate(ref):
                if r is not None and r.norm() > 0:
                    e_flex, e_mask = rel(flex[i], r), rel(mask[i], r)
                    assert e_flex < max(bound, 2 * e_mask), (case, layer, i, e_flex, e_mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["alibi", "t5"])
def test_model_trains_the_same_with_auto_and_mask_on_cuda(name, monkeypatch):
    """A training step's loss and every gradient, fp32: bias_kernel=auto (which must choose flex on CUDA, in every
    layer) against mask, at three lengths (the compiled flex recompiles once for a new length, then serves any)."""
    calls = []
    monkeypatch.setattr(kernels, "flex_bias_attention", lambda *a: calls.append(1) or flex_bias_attention(*a))
    auto, mask = (m.cuda().train() for m in model_pair(name, ("auto", "mask")))
    for T in (96, 64, 200):
        x = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(T)).cuda()
        results = []
        for m in (auto, mask):
            m.zero_grad(set_to_none=True)
            _, loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            results.append([loss] + [p.grad for p in m.parameters()])
        for a, b in zip(*results, strict=True):
            if b is not None and b.norm() > 0:
                assert rel(a, b) < 1e-4
    assert len(calls) == 3 * N_LAYER
