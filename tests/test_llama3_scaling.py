"""Llama 3's RoPE scaling (pos.scaling=llama3): the formula in float64, Hugging Face's rope_type llama3, the
properties that define it (short wavelengths kept, long ones divided by the factor exactly, a monotone ramp between,
factor 1 the identity, no attention temperature), and the zero-shot path evaluation takes."""

from __future__ import annotations

import math

import pytest
import torch

from roformer.evaluation import EvalSettings
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig, RopeScaling, rope_inv_freq, scaled_inv_freq

# (rotated dims, base, factor s, original length L0, low_freq_factor, high_freq_factor): each reaches all three
# regions (kept, ramp, divided), the first with Llama 3.1's factors
CASES = [
    (64, 10000.0, 4.0, 128, 1.0, 4.0),
    (128, 500000.0, 8.0, 8192, 1.0, 4.0),  # Llama 3.1's own settings, head_dim 128
    (32, 10000.0, 2.5, 64, 0.5, 3.0),
    (16, 500.0, 4.0, 16, 0.5, 2.0),  # the export test's tiny model
]


def reference(d: int, base: float, s: float, L0: int, low: float, high: float) -> list[float]:
    """The definition, one frequency at a time in Python floats (float64), written from the Llama 3 reference code's
    description: wavelength < L0 / high -> theta; wavelength > L0 / low -> theta / s; else the smooth mix."""
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        wavelen = 2 * math.pi / theta
        if wavelen < L0 / high:
            out.append(theta)
        elif wavelen > L0 / low:
            out.append(theta / s)
        else:
            smooth = (L0 / wavelen - low) / (high - low)
            out.append((1 - smooth) * theta / s + smooth * theta)
    return out


def ours(d: int, base: float, s: float, L0: int, low: float, high: float) -> tuple[torch.Tensor, float]:
    cfg = PosConfig(base=base, scaling="llama3", scaling_factor=s, original_len=L0, low_freq_factor=low,
                    high_freq_factor=high)
    return scaled_inv_freq(cfg, d, 4 * L0)


def regions(d: int, base: float, L0: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the kept (short wavelength) and the divided (long wavelength) frequencies."""
    wavelen = 2 * math.pi / rope_inv_freq(d, base)
    return wavelen < L0 / high, wavelen > L0 / low


@pytest.mark.parametrize("case", CASES)
def test_matches_the_formula_in_float64(case):
    inv_freq, temperature = ours(*case)
    assert inv_freq.dtype == torch.float64 and temperature == 1.0
    torch.testing.assert_close(inv_freq, torch.tensor(reference(*case), dtype=torch.float64), rtol=1e-14, atol=0)
    kept, divided = regions(*case[:2], *case[3:])
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # the case reaches every region


@pytest.mark.parametrize("case", CASES)
def test_matches_hugging_face(case):
    """transformers' ROPE_INIT_FUNCTIONS["llama3"] (float32) on a config with the same settings."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, base, s, L0, low, high = case
    params = {"rope_type": "llama3", "factor": s, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": L0}
    config = transformers.LlamaConfig(hidden_size=d, num_attention_heads=1, head_dim=d, max_position_embeddings=4 * L0,
                                      rope_theta=base, rope_scaling=params)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0
    torch.testing.assert_close(ours(*case)[0].float(), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_short_wavelengths_kept_long_ones_divided_exactly_and_a_monotone_ramp(case):
    d, base, s, L0, low, high = case
    inv_freq, plain = ours(*case)[0], rope_inv_freq(d, base)
    kept, divided = regions(d, base, L0, low, high)
    assert torch.equal(inv_freq[kept], plain[kept]) and torch.equal(inv_freq[divided], plain[divided] / s)
    # the factor each frequency is multiplied by falls from 1 to 1/s as the wavelength grows, never back (up to the
    # rounding of theta / s / theta, an ulp apart between the divided ones)
    ratio = inv_freq / plain
    assert (ratio[1:] <= ratio[:-1] + 1e-15).all() and ratio[0] == 1.0 and ratio[-1] == pytest.approx(1 / s, rel=1e-15)
    ramp = ~kept & ~divided
    assert ((ratio[ramp] < 1.0) & (ratio[ramp] > 1 / s)).all()
    assert (inv_freq[1:] < inv_freq[:-1]).all()  # still a ladder: each frequency below the one before


@pytest.mark.parametrize("case", CASES)
def test_factor_one_is_the_identity(case):
    d, base, _, L0, low, high = case
    inv_freq, temperature = ours(d, base, 1.0, L0, low, high)
    assert torch.equal(inv_freq, rope_inv_freq(d, base)) and temperature == 1.0


def test_zero_shot_evaluation_uses_the_trained_factors_and_no_temperature():
    """Evaluation's path (model.scaled_positions, what eval.rope_scaling=[..., llama3] runs): the same logits as a
    model trained with the scaling, the checkpoint's low/high_freq_factor kept, q and k not rescaled."""
    assert RopeScaling.llama3 in EvalSettings(rope_scaling=["none", "llama3"]).rope_scaling
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, init_std=0.3)
    trained = TransformerLM(cfg, PosConfig(low_freq_factor=0.5, high_freq_factor=2.0)).eval()
    scaled = TransformerLM(cfg, PosConfig(scaling="llama3", scaling_factor=4.0, original_len=16, low_freq_factor=0.5,
                                          high_freq_factor=2.0)).eval()
    scaled.load_state_dict(trained.state_dict())
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = trained(ids)[0]
        with trained.scaled_positions(RopeScaling.llama3, 4.0, 16):
            pos = trained.pos
            zero_shot = trained(ids)[0]
        assert torch.equal(zero_shot, scaled(ids)[0]) and not torch.allclose(zero_shot, plain)
    assert (pos.cfg.low_freq_factor, pos.cfg.high_freq_factor) == (0.5, 2.0) and pos.mscale == 1.0
    assert trained.pos.cfg.scaling == RopeScaling.none  # put back after the block


def test_frequency_factors_with_another_scaling_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^pos.low_freq_factor/pos.high_freq_factor shape pos.scaling=llama3 only, "
                                         r"not yarn: drop them or use scaling llama3$"):
        PosConfig(scaling="yarn", scaling_factor=2.0, original_len=8, high_freq_factor=8.0)
    assert PosConfig(scaling="llama3", scaling_factor=2.0, original_len=8, high_freq_factor=8.0).high_freq_factor == 8
