"""The schemes of 2022-2024 against their papers' formulas: xPos, CoPE, randomized positions; and the relative
property of every registered scheme, with the ones it must fail for named."""

import math

import pytest
import torch
from conftest import tiny_config

from roformer.eval_run import EvalConfig, run_evaluation
from roformer.evaluation import EvalSettings
from roformer.generation import generate
from roformer.logger import LoggerConfig
from roformer.model import KVCache, ModelConfig, TransformerLM, check_positional
from roformer.positional import SCHEMES, PosConfig, PositionOutOfRange, build_positional
from roformer.positional.xpos import xpos_zeta
from roformer.training import train


def tiny(pos: PosConfig, seed=0, n_layer=2, **kw):
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(vocab_size=64, n_layer=n_layer, n_head=2, d_model=32, bias_block=5, **kw), pos)
    for name, p in model.pos.named_parameters():  # CoPE's and T5's tables start at zero: make them matter
        if name in ("pos_emb", "buckets.weight"):
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def as_complex(x):
    """(..., d) real in the half layout -> (..., d/2) complex pairs (i, i + d/2)."""
    h = x.shape[-1] // 2
    return torch.complex(x[..., :h], x[..., h:])


# ---- xPos


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_xpos_scores_are_ropes_times_zeta_to_the_distance(layout):
    """Sun et al. eq. 9 / Algorithm 1, in float64: score(n, m) = Re sum_i q_i conj(k_i) e^{i (n - m) theta_i}
    zeta_i^((n - m) / B), zeta_i = (2i/d + 0.4) / 1.4."""
    torch.manual_seed(0)
    B, d = 8.0, 16
    x = build_positional(PosConfig(name="xpos", xpos_scale_base=B, layout=layout), d_model=32, n_head=2, n_layer=1)
    q, k = torch.randn(1, 1, 40, d), torch.randn(1, 1, 40, d)
    pos = torch.arange(40)
    ctx = x.context(pos, pos, 40, torch.float32)
    qr, kr, _ = x.rotate(q, k, k, ctx)
    got = (qr @ kr.transpose(-1, -2))[0, 0].double()
    if layout == "interleaved":  # the same pairs, stored (0, 1), (2, 3), ...: to the half layout
        perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))
        q, k = q[..., perm], k[..., perm]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    zeta = (torch.arange(0, d, 2, dtype=torch.float64) / d + 0.4) / 1.4
    torch.testing.assert_close(zeta, xpos_zeta(d))
    qc, kc = as_complex(q[0, 0].double()), as_complex(k[0, 0].double())  # (T, d/2)
    dist = (pos[:, None] - pos[None, :]).double()[..., None]  # (T, T, 1)
    want = (qc[:, None] * kc[None, :].conj() * torch.exp(1j * dist * theta) * zeta ** (dist / B)).real.sum(-1)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_xpos_is_relative_across_its_centre_and_decodes_as_the_full_forward():
    """The centre moves every 2B positions (B = 4 here): scores stay functions of n - m, and a KV cache is
    recomputed when it moves, so token-by-token decoding equals one full forward."""
    model = tiny(PosConfig(name="xpos", xpos_scale_base=4.0))
    x = torch.randint(0, 64, (1, 30))
    a, _ = model(x)
    b, _ = model(x, offset=37)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cache = KVCache(capacity=30)
    pieces = [model(x[:, :3], cache=cache)[0]] + [model.decode_step(x[:, t : t + 1], cache) for t in range(3, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), a, atol=1e-5, rtol=1e-4)
    assert model.pos.centre(30) == 12 and not model.pos.same_rotation(7, 8) and model.pos.same_rotation(8, 15)


def test_xpos_decays_where_rope_does_not():
    """With q = k constant, RoPE's score oscillates with the distance; xPos's envelope shrinks."""
    d = 16
    q = torch.ones(1, 1, 2048, d)
    pos = torch.arange(2048)
    env = {}
    for name in ("rope", "xpos"):
        s = build_positional(PosConfig(name=name), d_model=d, n_head=1, n_layer=1)
        qr, kr, _ = s.rotate(q, q, q, s.context(pos, pos, 2048, torch.float32))
        row = (qr[0, 0, -1] * kr[0, 0]).sum(-1).abs()  # |score(2047, m)| for every m
        env[name] = row[:1024].max() / row[1024:].max()  # the far half of the keys against the near half
    assert env["xpos"] < env["rope"] / 3


def test_xpos_blockwise_causal_attention_sees_two_blocks():
    """pos.bca_len = l: blocks of l/2 positions, each query sees its block and the previous one (one layer)."""
    x = torch.randint(0, 64, (1, 12))
    for bca, changes in ((0, True), (4, False)):
        model = tiny(PosConfig(name="xpos", bca_len=bca), n_layer=1)
        a, _ = model(x)
        x2 = x.clone()
        x2[0, 1] = (x2[0, 1] + 1) % 64  # block 0; position 5 is in block 2 and sees blocks 1, 2 only
        b, _ = model(x2)
        assert torch.allclose(a[0, 3], b[0, 3]) is False  # block 1 still sees block 0
        assert torch.allclose(a[0, 5], b[0, 5], atol=1e-6) is not changes
    cache = KVCache(capacity=12)
    pieces = [model(x[:, :3], cache=cache)[0]] + [model.decode_step(x[:, t : t + 1], cache) for t in range(3, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(x)[0], atol=1e-5, rtol=1e-4)


def test_xpos_refuses_rope_scaling_and_linear_attention():
    cfg = PosConfig(name="xpos")
    cfg.scaling = "pi"
    with pytest.raises(ValueError, match="pos.scaling=pi: pos=xpos does not read it"):
        cfg.check_options()
    with pytest.raises(ValueError, match="pos=xpos has no zero-shot scaling"):
        build_positional(PosConfig(name="xpos"), d_model=32, n_head=2, n_layer=1).with_scaling("yarn", 2.0, 16)
    with pytest.raises(ValueError, match="model.attention=linear cannot use pos=xpos"):
        check_positional(ModelConfig(attention="linear"), PosConfig(name="xpos"))


# ---- CoPE


def test_cope_bias_is_the_papers_interpolated_contextual_position():
    """Golovneva et al. eq. 3-5 by loops in float64: p_ij = sum_{t=j..i} sigmoid(q_i.k_t / sqrt d), capped at
    cope_max - 1; bias = q_i . (frac(p) e[ceil p] + (1 - frac(p)) e[floor p]) / sqrt d (the official code's scaling)."""
    torch.manual_seed(1)
    cope = build_positional(PosConfig(name="cope", cope_max=5), d_model=16, n_head=2, n_layer=2)
    torch.nn.init.normal_(cope.pos_emb)
    T, d = 9, 8
    q, k = torch.randn(1, 2, T, d) * 2, torch.randn(1, 2, T, d) * 2
    pos = torch.arange(T)
    got = cope.bias(q, k, cope.context(pos, pos, T, torch.float32), 1, slice(0, T))
    e = cope.pos_emb[1].double()  # (d, cope_max)
    qd, kd = q.double(), k.double()
    for h in range(2):
        for i in range(T):
            for j in range(i + 1):
                p = sum(torch.sigmoid(qd[0, h, i] @ kd[0, h, t] / math.sqrt(d)) for t in range(j, i + 1))
                p = min(float(p), 4.0)
                lo, hi, w = math.floor(p), math.ceil(p), p - math.floor(p)
                want = qd[0, h, i] @ (w * e[:, hi] + (1 - w) * e[:, lo]) / math.sqrt(d)
                torch.testing.assert_close(got[0, h, i, j].double(), want, atol=1e-5, rtol=1e-5)


def test_cope_starts_as_nope_and_learns_a_position_term():
    cope, nope = tiny(PosConfig(name="cope")), tiny(PosConfig(name="nope"))
    torch.nn.init.zeros_(cope.pos.pos_emb)
    nope.load_state_dict({k: v for k, v in cope.state_dict().items() if not k.startswith("pos.")})
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(cope(x)[0], nope(x)[0])
    assert cope.pos.score_mod(None, 0) is None  # reads the keys: no position-only score_mod


# ---- randomized positions (Ruoss et al., 2023)


def test_drawn_positions_are_a_sorted_subset_fixed_per_length_in_evaluation():
    s = build_positional(PosConfig(name="rope", randomized_max=100), d_model=32, n_head=2, n_layer=1)
    s.eval()
    p = s.draw_positions(40, "cpu")
    assert p.shape == (40,) and bool((p[1:] > p[:-1]).all()) and 0 <= int(p[0]) and int(p[-1]) < 100
    assert torch.equal(p, s.draw_positions(40, "cpu"))  # evaluation: the same draw for a length
    s.train()
    torch.manual_seed(0)
    draws = {tuple(s.draw_positions(40, "cpu").tolist()) for _ in range(5)}
    assert len(draws) == 5  # training: a fresh draw each time
    with pytest.raises(PositionOutOfRange, match="randomized_max=100"):
        s.draw_positions(101, "cpu")
    assert SCHEMES["rope"].max_positions(s.cfg) == 100 and SCHEMES["nope"].max_positions(s.cfg) is None


@pytest.mark.parametrize("name", sorted(n for n, c in SCHEMES.items() if "randomized_max" in c.options))
def test_randomized_positions_give_the_forward_of_those_positions_and_decode_alike(name):
    pos = PosConfig(name=name, randomized_max=64, max_len=64)
    model = tiny(pos)
    x = torch.randint(0, 64, (1, 20))
    drawn = model.pos.draw_positions(20, "cpu")
    full, _ = model(x)
    torch.testing.assert_close(full, model(x, positions=drawn)[0])
    if name not in ("nope",):
        assert not torch.allclose(full, model(x, positions=torch.arange(20))[0], atol=1e-4)
    cache = KVCache(capacity=20)
    pieces = [model(x[:, :6], cache=cache)[0]] + [model.decode_step(x[:, t : t + 1], cache) for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    made = list(generate(model, [1, 2, 3], max_new_tokens=10))  # greedy, one draw planned for all 13 positions
    logits, _ = model(torch.tensor([[1, 2, 3] + made]))  # 13 tokens: the same draw
    assert logits[0, 2:-1].argmax(-1).tolist() == made


def test_randomized_positions_refusals():
    with pytest.raises(ValueError, match=r"pos.randomized_max=256 draws positions beyond the learned table"):
        check_positional(ModelConfig(), PosConfig(name="learned", max_len=128, randomized_max=256))
    model = tiny(PosConfig(name="alibi", randomized_max=64))
    with pytest.raises(ValueError, match="offset=3 with randomized positions"):
        model(torch.zeros(1, 4, dtype=torch.long), offset=3)
    with pytest.raises(ValueError, match="give KVCache\\(capacity=\\) the final length"):
        cache = KVCache()
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_training_draws_new_positions_every_step():
    model = tiny(PosConfig(name="rope", randomized_max=64)).train()
    x = torch.randint(0, 64, (1, 16))
    torch.manual_seed(3)
    a, b = model(x)[0], model(x)[0]
    assert not torch.allclose(a, b, atol=1e-4)


# ---- the relative property, asked of every scheme


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_shifting_every_position_changes_nothing_exactly_for_the_schemes_that_claim_it(name):
    """A scheme's ``relative`` claim, both ways: shifting every position by 895 changes no logit for a relative
    scheme, and changes them for the others (sinusoidal and learned add absolute embeddings; FIRE normalises by
    psi(max(L, i)), relative only while the query position stays below its threshold L: tests/test_kerple_fire.py)."""
    model = tiny(PosConfig(name=name, max_len=1024, xpos_scale_base=16.0))
    for p in model.pos.parameters():  # trained-looking, so that an absolute term is not lost in rounding
        p.data.add_(torch.randn_like(p) * 0.5)
    x = torch.randint(0, 64, (1, 12))
    a, _ = model(x, offset=5)
    b, _ = model(x, offset=900)
    same = torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert same == SCHEMES[name].relative, f"pos={name} claims relative={SCHEMES[name].relative}"


# ---- evaluation


def test_evaluate_scores_xpos_with_blockwise_causal_attention(text_corpus, tmp_path):
    """eval.bca: an xPos checkpoint is scored as xpos+bca, blocks of half its training length: at the training
    length every query still sees all its keys (the same scores), beyond it fewer."""
    cfg = tiny_config("pos=xpos", "trainer.max_steps=4", "trainer.eval_interval=4", *text_corpus)
    train(cfg, tmp_path / "run")
    L = cfg.trainer.seq_len
    got = {}
    for bca in (False, True):
        settings = EvalSettings(device="cpu", progress=False, lengths=[L, 4 * L], protocols=["nonoverlapping"],
                                bca=bca)
        res = run_evaluation(EvalConfig(ckpt=str(tmp_path / "run"), eval=settings,
                                        logger=LoggerConfig(kind="none", job_type="eval")), tmp_path / f"ev{bca}")
        got[bca] = {(r["variant"], r["length"]): r["nll_sum"] for r in res["results"]}
    assert set(got[True]) == {("xpos+bca", L), ("xpos+bca", 4 * L)}
    assert got[True][("xpos+bca", L)] == pytest.approx(got[False][("xpos", L)], rel=1e-6)
    assert got[True][("xpos+bca", 4 * L)] != pytest.approx(got[False][("xpos", 4 * L)], rel=1e-6)
