"""RoPE and the other schemes checked against properties and independent references."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from roformer.positional import (
    SCHEMES,
    PosConfig,
    RopeLayout,
    RopeScaling,
    alibi_slopes,
    build_positional,
    rope_inv_freq,
    scaled_inv_freq,
    sinusoid_table,
    t5_bucket,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LAYOUTS = [RopeLayout.interleaved, RopeLayout.half]


def make_rope(layout=RopeLayout.half, head_dim=16, fraction=1.0, **kw):
    cfg = PosConfig(name="rope", layout=layout, rotary_fraction=fraction, **kw)
    return build_positional(cfg, d_model=head_dim * 2, n_head=2, n_layer=1)


def rotate_at(rope, x, positions):
    """Rotate x (..., T, D) at the given integer positions with the module under test."""
    pos = torch.as_tensor(positions)
    ctx = rope.context(pos, pos, int(pos.max()) + 1, x.dtype)
    return rope.apply_rotary(x, ctx.cos, ctx.sin)


def reference_rope(x, positions, layout, base=10000.0, rot_dim=None):
    """Independent reference: pair dimensions into complex numbers and multiply by e^{i m theta_j} (float64)."""
    x = x.double()
    D = x.shape[-1]
    r = rot_dim or D
    out = x.clone()
    for t, m in enumerate(positions):
        for j in range(r // 2):
            a, b = (2 * j, 2 * j + 1) if layout == RopeLayout.interleaved else (j, j + r // 2)
            theta = base ** (-2.0 * j / r)
            z = complex(x[..., t, a].item(), x[..., t, b].item()) * complex(math.cos(m * theta), math.sin(m * theta))
            out[..., t, a], out[..., t, b] = z.real, z.imag
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_matches_complex_reference(layout, fraction):
    torch.manual_seed(0)
    rope = make_rope(layout, head_dim=16, fraction=fraction)
    x = torch.randn(5, 16)
    positions = [0, 1, 7, 100, 2047]
    got = rotate_at(rope, x, positions)
    ref = reference_rope(x, positions, layout, rot_dim=int(16 * fraction))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    if fraction < 1:  # the un-rotated tail passes through untouched
        assert torch.equal(got[:, 8:], x[:, 8:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_preserves_norms(layout):
    torch.manual_seed(1)
    rope = make_rope(layout, head_dim=32)
    x = torch.randn(3, 50, 32)
    y = rotate_at(rope, x, list(range(0, 5000, 100)))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_score_depends_only_on_offset(layout):
    torch.manual_seed(2)
    rope = make_rope(layout, head_dim=16)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    scores = {}
    for m, n in [(10, 3), (110, 103), (1010, 1003), (7, 0)]:  # all offset 7
        scores[(m, n)] = (rotate_at(rope, q, [m]) * rotate_at(rope, k, [n])).sum().item()
    values = list(scores.values())
    assert max(values) - min(values) < 1e-4, scores
    other = (rotate_at(rope, q, [10]) * rotate_at(rope, k, [5])).sum().item()  # offset 5: a different score
    assert abs(other - values[0]) > 1e-3


def test_layouts_equal_up_to_a_permutation():
    torch.manual_seed(3)
    D = 16
    inter, half = make_rope(RopeLayout.interleaved, D), make_rope(RopeLayout.half, D)
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))  # interleaved pair (2j, 2j+1) -> (j, j+D/2)
    q, k = torch.randn(6, D), torch.randn(6, D)
    pos = list(range(0, 600, 100))
    assert torch.allclose(rotate_at(half, q[:, perm], pos), rotate_at(inter, q, pos)[:, perm], atol=1e-6)
    s_inter = rotate_at(inter, q, pos) @ rotate_at(inter, k, pos).T
    s_half = rotate_at(half, q[:, perm], pos) @ rotate_at(half, k[:, perm], pos).T
    torch.testing.assert_close(s_half, s_inter, atol=1e-5, rtol=1e-5)
    # and without the permutation the two layouts really are different maps
    assert not torch.allclose(rotate_at(half, q, pos), rotate_at(inter, q, pos), atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_angles_stay_fp32_under_bf16_autocast(layout):
    torch.manual_seed(4)
    rope = make_rope(layout, head_dim=64)
    positions = [3999, 4000, 4001, 16000, 16383]
    inv = rope_inv_freq(64, 10000.0)
    ref_cos = torch.cos(torch.tensor(positions, dtype=torch.float64)[:, None] * inv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos32, _ = rope.cos_sin(16384, "cpu")
        q = torch.randn(5, 64).bfloat16()
        y = rotate_at(rope, q, positions)
    assert cos32.dtype == torch.float32
    assert (cos32[positions].double() - ref_cos).abs().max() < 1e-6
    ref = reference_rope(q.float(), positions, layout).float()
    # the only error left is bf16 rounding of the inputs and outputs, a few parts in a thousand
    assert (y.float() - ref).abs().max() < 0.05 * q.float().abs().max()
    # the test can fail: angles formed in bf16 (as a naive implementation under autocast would) are far off
    naive = torch.tensor(positions, dtype=torch.bfloat16)[:, None] * inv.bfloat16()
    assert (naive.double().cos() - ref_cos).abs().max() > 0.5


def test_values_untouched_by_default_and_rotated_by_the_ablation():
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    for rotate_values in (False, True):
        rope = make_rope(head_dim=16, rotate_values=rotate_values)
        pos = torch.arange(8)
        ctx = rope.context(pos, pos, 8, torch.float32)
        q2, k2, v2 = rope.rotate(q, k, v, ctx)
        assert not torch.allclose(q2, q) and not torch.allclose(k2, k)
        assert torch.equal(v2, v) != rotate_values


def test_rope_cache_grows_and_matches_fresh_computation():
    rope = make_rope(head_dim=32)
    cos_a, _ = rope.cos_sin(300, "cpu")
    first = cos_a[:300].clone()
    cos_b, sin_b = rope.cos_sin(8 * 300, "cpu")
    assert cos_b.shape[0] >= 2400
    fresh_cos, fresh_sin = make_rope(head_dim=32).cos_sin(2400, "cpu")
    assert torch.equal(cos_b[:2400], fresh_cos[:2400]) and torch.equal(sin_b[:2400], fresh_sin[:2400])
    assert torch.equal(cos_b[:300], first)


def test_alibi_slopes_follow_the_paper():
    # powers of two: 2^(-8i/n), i = 1..n
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** (-2 * i) for i in range(1, 5)]))
    # 6 heads: the 4-head slopes, then the odd-indexed... every other slope of the 8-head sequence
    expected6 = [2.0 ** (-2 * i) for i in range(1, 5)] + [2.0**-1, 2.0**-3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expected6))
    assert alibi_slopes(12).shape == (12,) and len(set(alibi_slopes(12).tolist())) == 12


def test_alibi_bias_is_minus_slope_times_distance():
    alibi = build_positional(PosConfig(name="alibi"), d_model=32, n_head=4, n_layer=1)
    pos = torch.arange(6)
    ctx = alibi.context(pos, pos, 6, torch.float32)
    b = alibi.bias(torch.zeros(1, 4, 6, 8), torch.zeros(1, 4, 6, 8), ctx, 0, slice(0, 6))
    for h, slope in enumerate(alibi_slopes(4).tolist()):
        for m in range(6):
            for n in range(m + 1):
                assert b[0, h, m, n].item() == pytest.approx(-slope * (m - n))


def test_relative_bias_matches_shaw_reference():
    torch.manual_seed(6)
    K = 3
    rel = build_positional(PosConfig(name="relative", clip=K), d_model=16, n_head=2, n_layer=2)
    q = torch.randn(1, 2, 10, 8)
    pos = torch.arange(10)
    ctx = rel.context(pos, pos, 10, torch.float32)
    b = rel.bias(q, q, ctx, 1, slice(0, 10))
    table = rel.tables[1]
    for m in range(10):
        for n in range(10):
            a = table[max(-K, min(K, m - n)) + K]
            torch.testing.assert_close(b[0, :, m, n], (q[0, :, m] @ a) / math.sqrt(8))


def test_t5_buckets_exact_then_logarithmic():
    n = torch.arange(0, 1000)
    b = t5_bucket(n, 32, 128)
    assert torch.equal(b[:16], torch.arange(16))  # exact for small distances
    assert bool((b[1:] >= b[:-1]).all())  # monotone
    assert int(b[128:].min()) == 31 and int(b.max()) == 31  # everything past max_distance shares the last
    assert int(b[64]) == 16 + 16 * 2 // 3 and int(b[100]) < 31  # log-spaced: 64 = 16 * 8^(2/3)


def test_sinusoidal_table_reference():
    pe = sinusoid_table(torch.tensor([0, 5, 1000]), 8, 10000.0)
    for r, p in enumerate([0, 5, 1000]):
        for i in range(4):
            w = 10000.0 ** (-2 * i / 8)
            assert pe[r, 2 * i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert pe[r, 2 * i + 1].item() == pytest.approx(math.cos(p * w), abs=1e-6)


# ---- zero-shot RoPE scaling (used at evaluation time) ----


@pytest.mark.parametrize("kind", list(RopeScaling))
def test_scaling_with_factor_one_is_plain_rope(kind):
    cfg = PosConfig(name="rope", scaling=kind, scaling_factor=1.0, original_len=64)
    inv, mscale = scaled_inv_freq(cfg, 32, seq_len=64)
    assert torch.equal(inv, rope_inv_freq(32, 10000.0)) and mscale == 1.0


def test_scaling_formulas():
    d, L, s = 32, 128, 4.0
    plain = rope_inv_freq(d, 10000.0)
    pi, _ = scaled_inv_freq(PosConfig(scaling="pi", scaling_factor=s, original_len=L), d, 4 * L)
    torch.testing.assert_close(pi, plain / s)
    ntk, _ = scaled_inv_freq(PosConfig(scaling="ntk", scaling_factor=s, original_len=L), d, 4 * L)
    torch.testing.assert_close(ntk, rope_inv_freq(d, 10000.0 * s ** (d / (d - 2))))
    # NTK leaves the highest frequency alone and divides the lowest by exactly s
    assert ntk[0] == plain[0] and ntk[-1].item() == pytest.approx(plain[-1].item() / s)
    dyn_short, _ = scaled_inv_freq(PosConfig(scaling="dynamic_ntk", scaling_factor=s, original_len=L), d, L)
    torch.testing.assert_close(dyn_short, plain)  # within the training length: unchanged
    dyn_long, _ = scaled_inv_freq(PosConfig(scaling="dynamic_ntk", scaling_factor=s, original_len=L), d, 2 * L)
    torch.testing.assert_close(dyn_long, rope_inv_freq(d, 10000.0 * 2.0 ** (d / (d - 2))))
    yarn, mscale = scaled_inv_freq(PosConfig(scaling="yarn", scaling_factor=s, original_len=L), d, 4 * L)
    assert mscale == pytest.approx(0.1 * math.log(s) + 1)
    rotations = L * plain / (2 * math.pi)
    for j in range(d // 2):
        r = rotations[j].item()
        if r > 32:
            assert yarn[j] == plain[j]
        elif r < 1:
            assert yarn[j].item() == pytest.approx(plain[j].item() / s)
        else:
            g = (r - 1) / 31
            assert yarn[j].item() == pytest.approx(plain[j].item() * ((1 - g) / s + g))


def test_rope_with_scaling_is_a_new_scheme_and_leaves_the_original_alone():
    rope = make_rope(head_dim=16).eval()
    before = replace(rope.cfg)
    plain_cos, _ = rope.cos_sin(64, "cpu")
    plain_cos = plain_cos.clone()
    scaled = rope.with_scaling(RopeScaling.yarn, 4.0, 64)
    assert scaled is not rope and scaled.cfg is not rope.cfg and not scaled.training
    assert (scaled.cfg.scaling, scaled.cfg.scaling_factor, scaled.cfg.original_len) == (RopeScaling.yarn, 4.0, 64)
    assert replace(scaled.cfg, scaling=RopeScaling.none, scaling_factor=1.0, original_len=0) == before
    assert rope.cfg == before and torch.equal(rope.cos_sin(64, "cpu")[0], plain_cos)  # untouched
    inv, mscale = scaled_inv_freq(scaled.cfg, 16, 64)
    ref = torch.outer(torch.arange(64, dtype=torch.float64), inv).cos().float()
    assert torch.equal(scaled.cos_sin(64, "cpu")[0][:64], ref) and scaled.mscale == mscale != 1.0
    assert rope.with_scaling("pi", 0.5, 64).cfg.scaling_factor == 1.0  # shorter than training: no scaling
    with pytest.raises(ValueError, match="needs pos.original_len"):
        rope.with_scaling(RopeScaling.ntk, 2.0, 0)


def test_rope_with_scaling_stays_on_the_device_of_the_original():
    rope = make_rope(head_dim=16).to("meta")
    assert rope.with_scaling(RopeScaling.pi, 2.0, 64).cos_cached.device.type == "meta"


@pytest.mark.parametrize("name", sorted(n for n, c in SCHEMES.items() if not c.supports_scaling))
def test_schemes_without_rope_refuse_scaling(name):
    scheme = build_positional(PosConfig(name=name, max_len=32), d_model=32, n_head=2, n_layer=1)
    assert scheme.with_scaling(RopeScaling.none, 4.0, 32) is scheme
    for kind in set(RopeScaling) - {RopeScaling.none}:
        with pytest.raises(ValueError, match=f"^pos={name} .*RoPE scaling applies to pos=rope only"):
            scheme.with_scaling(kind, 4.0, 32)


def test_max_positions_and_supports_scaling_answer_from_the_config():
    for name in SCHEMES:
        cfg = PosConfig(name=name, max_len=77)
        scheme = build_positional(cfg, d_model=32, n_head=2, n_layer=1)
        assert cfg.max_positions == scheme.max_positions(cfg)
        assert cfg.supports_scaling == scheme.supports_scaling
    assert {n: PosConfig(name=n, max_len=77).max_positions for n in ("learned", "rope", "alibi")} == {
        "learned": 77, "rope": None, "alibi": None}
    assert [n for n in ("rope", "sinusoidal", "learned", "alibi", "nope", "relative", "t5")
            if SCHEMES[n].supports_scaling] == ["rope"]


# ---- registry and bad input ----


def test_registry_matches_config_group():
    files = {p.stem for p in (CONFIGS / "pos").glob("*.yaml")}
    names = {yaml.safe_load(p.read_text())["name"] for p in (CONFIGS / "pos").glob("*.yaml")}
    assert files == names == set(SCHEMES)
    assert {"rope", "sinusoidal", "learned", "alibi", "nope", "relative", "t5"} <= set(SCHEMES)  # none went missing


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "rotary"}, f"choose one of {sorted(SCHEMES)}"),
        ({"rotary_fraction": 0.0}, "pos.rotary_fraction=0.0 must be in (0, 1]"),
        ({"rotary_fraction": 1.5}, "pos.rotary_fraction=1.5 must be in (0, 1]"),
        ({"name": "relative", "clip": 0}, "pos.clip=0"),
        ({"scaling": "yarn", "scaling_factor": 2.0}, "needs pos.original_len"),
    ],
)
def test_bad_pos_config(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        PosConfig(**kwargs)
    assert fragment in str(e.value)


def test_odd_rotary_dimensions_rejected():
    with pytest.raises(ValueError, match=r"0.75 \* 10 = 7.5 dimensions, which must be a positive even integer"):
        build_positional(PosConfig(rotary_fraction=0.75), d_model=20, n_head=2, n_layer=1)
    with pytest.raises(ValueError, match="positive even integer"):
        build_positional(PosConfig(), d_model=18, n_head=2, n_layer=1)  # head_dim 9


def test_rope_cache_does_not_grow_when_settings_alternate():
    rope = make_rope(head_dim=16)
    for i in range(30):  # evaluation switches scaling factors per length
        rope.cfg.scaling, rope.cfg.original_len = RopeScaling.pi, 64
        rope.cfg.scaling_factor = 1.0 + i % 3
        cos, _ = rope.cos_sin(300, "cpu")
    assert cos.shape[0] == 300
