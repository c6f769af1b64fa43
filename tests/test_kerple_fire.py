"""KERPLE and FIRE checked against their formulas (float64, by hand), their constraints and invariances, the model's
cached decoding, FlexAttention's score_mod and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch.nn.attention.flex_attention import flex_attention

from roformer.model import KVCache, ModelConfig, TransformerLM, check_positional
from roformer.positional import PosConfig, build_positional
from roformer.positional.base import KerpleKind
from roformer.positional.fire import FIRE_L, FireLayer
from roformer.positional.kerple import KERPLE_MIN

POSITIONS = [0, 1, 4, 9, 10, 35, 200]  # not consecutive, as randomized positions are
VARIANTS = [("kerple", {"kerple_kind": "log"}), ("kerple", {"kerple_kind": "power"}), ("fire", {})]
IDS = ["kerple-log", "kerple-power", "fire"]


def make(name, n_head=3, n_layer=2, **kw):
    return build_positional(PosConfig(name=name, **kw), d_model=8 * n_head, n_head=n_head, n_layer=n_layer)


def bias_at(scheme, q_pos, k_pos, layer=0):
    """The scheme's bias (H, t, S) for queries at q_pos against keys at k_pos."""
    q_pos, k_pos = torch.as_tensor(q_pos), torch.as_tensor(k_pos)
    ctx = scheme.context(q_pos, k_pos, int(k_pos.max()) + 1, torch.float32)
    H, t, S = scheme.n_head, len(q_pos), len(k_pos)
    b = scheme.bias(torch.zeros(1, H, t, 8), torch.zeros(1, H, S, 8), ctx, layer, slice(0, t))
    assert b.shape == (1, H, t, S) and b.dtype == torch.float32
    return b[0]


def set_kerple(scheme, r1, r2):
    with torch.no_grad():
        scheme.r1.copy_(torch.tensor(r1))
        scheme.r2.copy_(torch.tensor(r2))


def kerple_reference(r1, r2, kind, positions):
    """-r1 log(1 + r2 |m - n|) or -r1 |m - n|^r2 for every pair, in Python floats (float64)."""
    out = torch.empty(len(r1), len(positions), len(positions), dtype=torch.float64)
    for h in range(len(r1)):
        for a, m in enumerate(positions):
            for b, n in enumerate(positions):
                d = abs(m - n)
                out[h, a, b] = -r1[h] * (math.log(1 + r2[h] * d) if kind == "log" else d ** r2[h])
    return out


# ---- KERPLE


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_bias_is_the_paper_kernel(kind):
    scheme = make("kerple", kerple_kind=kind)
    r1, r2 = [0.5, 1.3, 2.0], [0.2, 0.7, 1.5]
    set_kerple(scheme, r1, r2)
    ref = kerple_reference(r1, r2, kind, POSITIONS)
    got = bias_at(scheme, POSITIONS, POSITIONS)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-5)
    # float positions (a caller may cast them) give the same bias; a suffix of queries (after a cache) its rows
    floats = torch.tensor(POSITIONS, dtype=torch.float32)
    torch.testing.assert_close(bias_at(scheme, floats, floats), got)
    torch.testing.assert_close(bias_at(scheme, POSITIONS[4:], POSITIONS), got[:, 4:])
    # shared by all layers, as in the official code
    assert torch.equal(bias_at(scheme, POSITIONS, POSITIONS, layer=1), got)


def test_kerple_init_follows_the_official_code():
    torch.manual_seed(0)
    log, power = make("kerple", n_head=256, kerple_kind="log"), make("kerple", n_head=256, kerple_kind="power")
    # log: multiplier r1 ~ U(0, 2), r2 ~ U(0, 1); power: multiplier r1 ~ U(0, 1), exponent r2 ~ U(0, 2)
    for p, hi in ((log.r1, 2), (log.r2, 1), (power.r1, 1), (power.r2, 2)):
        top, mean = p.max().item(), p.mean().item()
        assert p.min() >= KERPLE_MIN and 0.9 * hi < top <= hi and mean == pytest.approx(hi / 2, rel=0.2)
    assert log.r1.shape == (256,) and len(list(log.parameters())) == 2  # per head, no per-layer copies


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_parameters_are_clamped_positive(kind):
    scheme = make("kerple", kerple_kind=kind).eval()
    set_kerple(scheme, [-1.0, 0.5, 0.0], [-0.5, 0.3, 5.0])
    r2_used = [KERPLE_MIN, 0.3, 2.0 if kind == "power" else 5.0]  # the power exponent is also capped at 2
    ref = kerple_reference([KERPLE_MIN, 0.5, KERPLE_MIN], r2_used, kind, POSITIONS)
    torch.testing.assert_close(bias_at(scheme, POSITIONS, POSITIONS).double(), ref, rtol=1e-6, atol=1e-5)
    assert scheme.r1[0] == -1.0  # evaluation leaves the stored values alone ...
    scheme.train()
    bias_at(scheme, POSITIONS, POSITIONS)  # ... a training forward projects them, as the official code does
    assert scheme.r1.tolist() == pytest.approx([KERPLE_MIN, 0.5, KERPLE_MIN])
    assert scheme.r2.tolist() == pytest.approx(r2_used)
    # a parameter projected onto the bound still gets a gradient, so it can move back up
    bias_at(scheme, POSITIONS, POSITIONS).sum().backward()
    assert scheme.r1.grad[0] != 0 and scheme.r2.grad[0] != 0


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_depends_on_the_distance_only(kind):
    scheme = make("kerple", kerple_kind=kind)
    base = bias_at(scheme, POSITIONS, POSITIONS)
    for shift in (1, 777, 100_000):
        shifted = [p + shift for p in POSITIONS]
        assert torch.equal(bias_at(scheme, shifted, shifted), base)


# ---- FIRE


def set_fire(layer: FireLayer, c: float, L: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.w1, layer.b1, layer.w2, layer.b2):
            p.copy_(torch.randn(p.shape, generator=g))
        layer.c.fill_(c)
        layer.L_scale.fill_(L / FIRE_L)


def fire_reference(layer: FireLayer, positions):
    """b(i, j) = MLP(log(|c (i - j)| + 1) / (log(|c max(i, L)| + 1) + 1e-6)) by hand in Python floats, for j <= i
    (nan elsewhere: the model masks those keys)."""
    c, L = layer.c.item(), abs(layer.L_scale.item()) * FIRE_L
    w1, b1, w2, b2 = (p.tolist() for p in (layer.w1, layer.b1, layer.w2, layer.b2))
    out = torch.full((len(b2), len(positions), len(positions)), math.nan, dtype=torch.float64)
    for a, i in enumerate(positions):
        for b, j in enumerate(positions[: a + 1]):
            x = math.log(abs(c * (i - j)) + 1) / (math.log(abs(c * max(i, L)) + 1) + 1e-6)
            hidden = [max(0.0, w1[n] * x + b1[n]) for n in range(len(w1))]
            for h in range(len(b2)):
                out[h, a, b] = b2[h] + sum(w2[h][n] * hidden[n] for n in range(len(w1)))
    return out


def test_fire_bias_is_the_mlp_of_the_normalised_log_distance():
    scheme = make("fire")
    set_fire(scheme.layers[0], c=0.1, L=FIRE_L, seed=0)
    set_fire(scheme.layers[1], c=0.3, L=100.0, seed=1)  # a query at 200 is past this layer's threshold
    for layer in (0, 1):
        ref = fire_reference(scheme.layers[layer], POSITIONS)
        got = bias_at(scheme, POSITIONS, POSITIONS, layer)
        causal = ~ref.isnan()
        torch.testing.assert_close(got.double()[causal], ref[causal], rtol=1e-5, atol=1e-5)
        floats = torch.tensor(POSITIONS, dtype=torch.float32)
        torch.testing.assert_close(bias_at(scheme, floats, floats, layer), got)
        torch.testing.assert_close(bias_at(scheme, POSITIONS[4:], POSITIONS, layer), got[:, 4:])
    # one FIRE per layer
    assert not torch.allclose(bias_at(scheme, POSITIONS, POSITIONS, 0), bias_at(scheme, POSITIONS, POSITIONS, 1))


def test_fire_is_relative_below_its_threshold_and_interpolates_beyond_it():
    """While every query position is below L the normaliser is psi(L), the same for all: shifting the positions
    changes nothing. Past L it is psi(i), so the same distance gets a smaller input at a later query."""
    scheme = make("fire")
    set_fire(scheme.layers[0], c=0.1, L=FIRE_L, seed=2)
    pos = list(range(0, 40, 3))
    base = bias_at(scheme, pos, pos)
    for shift in (1, 100, int(FIRE_L) - 1 - pos[-1]):  # every position still below L = 512
        shifted = [p + shift for p in pos]
        torch.testing.assert_close(bias_at(scheme, shifted, shifted), base, rtol=0, atol=1e-6)
    causal = torch.ones(len(pos), len(pos)).tril().bool()
    for shift in (600, 5000):  # every query past L: the property fails, as FIRE intends
        shifted = [p + shift for p in pos]
        diff = (bias_at(scheme, shifted, shifted) - base)[:, causal]
        assert diff.abs().max() > 1e-2, shift


def test_fire_keeps_its_initialisation_inside_the_model():
    """TransformerLM re-initialises every nn.Linear with N(0, 0.02); FIRE's MLP keeps nn.Linear's default init."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, n_layer=2, n_head=2, d_model=16), PosConfig(name="fire"))
    for f in model.pos.layers:
        assert f.w1.abs().max() > 0.5 and f.b1.abs().max() > 0.5 and f.w2.abs().max() <= 1 / math.sqrt(32)
        assert f.c.item() == pytest.approx(0.1) and f.threshold.item() == FIRE_L


# ---- in the model


def tiny_model(name, kw, seed=0):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16), PosConfig(name=name, **kw))


@pytest.mark.parametrize("name, kw", VARIANTS + [("fire", {"randomized_max": 4096})], ids=IDS + ["fire-randomized"])
def test_cached_decoding_equals_the_full_forward(name, kw):
    model = tiny_model(name, kw).eval()
    if name == "fire":  # a threshold below the positions, so the normaliser depends on the query
        for f in model.pos.layers:
            set_fire(f, c=0.2, L=4.0, seed=3)
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(capacity=12)
        parts = [model(idx[:, :5], cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_shifting_every_position_in_the_model(name, kw):
    """The model's logits: KERPLE's do not move with the positions; FIRE's do not while every position stays below
    its threshold L = 512, and do past it (so FIRE says relative = False)."""
    model = tiny_model(name, kw).eval()
    x = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, c = (model(x, offset=offset)[0] for offset in (5, 400, 900))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert torch.allclose(c, a, rtol=1e-5, atol=1e-5) == (name == "kerple")
    assert getattr(type(model.pos), "relative", name == "kerple") == (name == "kerple")


@pytest.mark.parametrize("name", ["kerple", "fire"])
def test_linear_attention_refuses_them(name):
    linear = ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, attention="linear")
    with pytest.raises(ValueError, match=f"cannot use pos={name} \\(it adds to an attention matrix"):
        check_positional(linear, PosConfig(name=name))


@pytest.mark.filterwarnings("ignore::UserWarning")  # flex_attention in eager mode warns that it is slow
@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_score_mod_equals_bias(name, kw):
    """FlexAttention with the scheme's score_mod (eager, CPU, forward) against SDPA with its bias as the mask, for a
    suffix of queries after cached keys at non-consecutive positions, in the last layer."""
    torch.manual_seed(4)
    scheme = make(name, n_head=2, **kw)
    if name == "fire":
        set_fire(scheme.layers[1], c=0.3, L=20.0, seed=5)
    k_pos = torch.tensor(POSITIONS + [201, 260])
    q_pos = k_pos[-4:]
    ctx = scheme.context(q_pos, k_pos, int(k_pos.max()) + 1, torch.float32)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (t, S)
    fn = scheme.score_mod(ctx, 1)

    def causal(score, b, h, q_idx, kv_idx):
        return torch.where(q_pos[q_idx] >= k_pos[kv_idx], fn(score, b, h, q_idx, kv_idx), -float("inf"))

    with torch.no_grad():
        bias = scheme.bias(q, k, ctx, 1, slice(0, 4)).masked_fill(~allowed, float("-inf"))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        got = flex_attention(q, k, v, score_mod=causal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, kw", VARIANTS, ids=IDS)
def test_a_tiny_model_learns_a_fixed_batch(name, kw):
    model = tiny_model(name, kw).train()
    before = [p.detach().clone() for p in model.pos.parameters()]
    idx = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(not torch.equal(a, p) for a, p in zip(before, model.pos.parameters(), strict=True))  # they train
    if name == "kerple":
        model(idx[:, :-1])  # the projection runs at the start of a training forward
        assert min(model.pos.r1.min(), model.pos.r2.min()) >= KERPLE_MIN


def test_the_configs_compose():
    assert tiny_config("pos=kerple").pos.kerple_kind == KerpleKind.log
    assert tiny_config("pos=kerple", "pos.kerple_kind=power").pos.kerple_kind == KerpleKind.power
    assert tiny_config("pos=fire").pos.name == "fire"
    with pytest.raises(ValueError, match=r"^pos.kerple_kind=power: pos=fire does not read it"):
        tiny_config("pos=fire", "pos.kerple_kind=power")
