"""Issue 16's model-side changes: YaRN's temperature for both attention kinds, the fairseq-style sinusoidal, scoring
under any grad mode, checkpoints fine-tuned with a scaling scored as trained, and variants named from config."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from roformer.eval_run import variant_name
from roformer.evaluation import EvalSettings, Protocol, evaluate_model, evaluate_stream
from roformer.files import to_plain
from roformer.model import CausalSelfAttention, ModelConfig, TransformerLM
from roformer.positional import PosConfig, RopeScaling, build_positional, sinusoid_table

D, H = 32, 4
L = 16


def attention_and_yarn(kind: str, factor: float = 24.0):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=H, d_model=D, attention=kind, linear_chunk=5)
    attn = CausalSelfAttention(cfg, layer=0).eval()
    pos = build_positional(
        PosConfig(scaling="yarn", scaling_factor=factor, original_len=L), d_model=D, n_head=H, n_layer=1
    )
    return attn, pos


def context(pos, T: int):
    q = torch.arange(T)
    return pos.context(q, q, T, torch.float32)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_yarn_temperature_leaves_a_single_token_its_own_value(kind):
    """One token attends only to itself: the output is its value, whatever the temperature. Folding the
    temperature into cos/sin multiplied linear attention's output by m^2 (1.74 at s = 24)."""
    attn, pos = attention_and_yarn(kind)
    ctx = context(pos, 1)
    assert ctx.qk_scale == pytest.approx(0.1 * math.log(24.0) + 1)  # the temperature is there
    x = torch.randn(2, 1, D)
    v = attn.qkv(x)[..., 2 * D :]
    with torch.no_grad():
        torch.testing.assert_close(attn(x, pos, ctx, None), attn.proj(v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_yarn_temperature_is_q_and_k_scaled_before_attention(kind):
    """The temperature m acts as q and k multiplied by m before the rotation and (linear) the feature map: the same
    module with those projection rows scaled by m and no temperature gives the same output."""
    attn, pos = attention_and_yarn(kind)
    T = 13
    ctx = context(pos, T)
    m = ctx.qk_scale
    scaled = CausalSelfAttention(attn.cfg, layer=0).eval()
    scaled.load_state_dict(attn.state_dict())
    with torch.no_grad():
        scaled.qkv.weight[: 2 * D] *= m
        x = torch.randn(2, T, D)
        want = scaled(x, pos, replace(ctx, qk_scale=1.0), None)
        got = attn(x, pos, ctx, None)
        plain = attn(x, pos, replace(ctx, qk_scale=1.0), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)  # and it does something


def test_fairseq_sinusoidal_scales_the_embeddings_not_the_table():
    x = torch.randn(1, 6, D)
    q = torch.arange(6)
    table = sinusoid_table(q, D, 10000.0)
    for scale, want in ((False, x + table * D**-0.5), (True, x * D**0.5 + table)):
        pos = build_positional(PosConfig(name="sinusoidal", scale_embeddings=scale), d_model=D, n_head=H, n_layer=1)
        torch.testing.assert_close(pos.embed(x, pos.context(q, q, 6, torch.float32)), want)


@pytest.mark.parametrize("name", ["rope", "learned", "alibi"])
def test_scale_embeddings_is_refused_where_it_means_nothing(name):
    with pytest.raises(ValueError, match=rf"pos.scale_embeddings=true applies to \['sinusoidal'\] only, not "
                                         rf"pos.name={name}; drop it"):  # fmt: skip
        PosConfig(name=name, scale_embeddings=True)


def tiny_lm(pos_cfg: PosConfig) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=64, n_layer=2, n_head=H, d_model=D), pos_cfg).eval()


def test_evaluate_stream_works_under_any_grad_mode():
    model = tiny_lm(PosConfig())
    stream = np.random.default_rng(0).integers(0, 64, 200)
    scores = []
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            scores.append(evaluate_stream(model, stream, Protocol.nonoverlapping, L, n_targets=160).nll_sum)
    assert scores[0] == scores[1] == scores[2] and math.isfinite(scores[0])


def test_a_checkpoint_fine_tuned_with_a_scaling_is_scored_as_trained():
    """Scaling 'none' at evaluation keeps the trained PI, rather than resetting the scheme to plain RoPE."""
    pi = PosConfig(scaling="pi", scaling_factor=4.0, original_len=L)
    model = tiny_lm(pi)
    stream = np.random.default_rng(1).integers(0, 64, 400)
    s = EvalSettings(protocols=[Protocol.nonoverlapping], max_tokens=256)
    cells, _ = evaluate_model(model, stream=stream, docs=[], lengths=[4 * L], settings=s, scaling=RopeScaling.none,
                              train_len=4 * L, counter=None, device="cpu")  # fmt: skip
    with torch.no_grad():
        as_trained = evaluate_stream(model, stream, Protocol.nonoverlapping, 4 * L, n_targets=256).nll_sum
        model.pos = model.pos.with_scaling(RopeScaling.none, 1.0, L)
        plain = evaluate_stream(model, stream, Protocol.nonoverlapping, 4 * L, n_targets=256).nll_sum
    assert cells[0].score.nll_sum == as_trained != plain


def checkpoint(pos: PosConfig, *, seq_len: int = 128, attention: str = "softmax", init_from: str = "") -> dict:
    return {"model_cfg": to_plain(ModelConfig(attention=attention)), "pos_cfg": to_plain(pos),
            "train_cfg": {"trainer": {"seq_len": seq_len, "init_from": init_from}}}  # fmt: skip


@pytest.mark.parametrize("ck, want", [
    (checkpoint(PosConfig()), "rope"),
    (checkpoint(PosConfig(), attention="linear"), "rope+linear"),
    (checkpoint(PosConfig(name="learned", max_len=128)), "learned"),
    (checkpoint(PosConfig(name="learned", max_len=4096)), "learned-32L"),
    (checkpoint(PosConfig(name="sinusoidal")), "sinusoidal"),
    (checkpoint(PosConfig(name="sinusoidal", scale_embeddings=True)), "sinusoidal-fairseq"),
    (checkpoint(PosConfig(), seq_len=512, init_from="runs/a"), "rope-ft"),
    (checkpoint(PosConfig(scaling="yarn", scaling_factor=4, original_len=128), seq_len=512, init_from="a.pt"),
     "rope+yarn-ft"),
    (checkpoint(PosConfig(randomized_max=2048)), "rope+rand"),
    (checkpoint(PosConfig(name="learned", max_len=2048, randomized_max=2048)), "learned-16L+rand"),
    (checkpoint(PosConfig(base=500000.0), seq_len=512, init_from="a.pt"), "rope+abf-ft"),
    (checkpoint(PosConfig(base=500000.0)), "rope+base500000"),
    (checkpoint(PosConfig(scaling="llama3", scaling_factor=4, original_len=128), seq_len=512, init_from="a.pt"),
     "rope+llama3-ft"),
])  # fmt: skip
def test_variants_are_named_from_the_config(ck, want):
    assert variant_name(ck, ck["train_cfg"]["trainer"]["seq_len"]) == want
