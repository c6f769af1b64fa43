"""The transformer with every scheme and both attention kinds: causality, caches, lengths, learning."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from roformer.checkpoint import configs_from_checkpoint
from roformer.files import to_plain
from roformer.model import AttentionKind, CausalSelfAttention, KVCache, ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig, PositionOutOfRange, RopeScaling, build_positional

TRAIN_LEN = 24
LINEAR_OK = sorted(n for n, c in SCHEMES.items() if c.supports_linear)
CASES = [(s, "softmax") for s in sorted(SCHEMES)] + [(s, "linear") for s in LINEAR_OK]


def tiny(name, attention="softmax", seed=0, **model_kw):
    torch.manual_seed(seed)
    shape = dict(vocab_size=64, n_layer=2, n_head=4, d_model=32, bias_block=7, linear_chunk=5)
    cfg = ModelConfig(attention=attention, **{**shape, **model_kw})
    return TransformerLM(cfg, PosConfig(name=name, max_len=TRAIN_LEN))


@pytest.mark.parametrize("name, attention", CASES)
def test_causal(name, attention):
    model = tiny(name, attention).eval()
    x = torch.randint(0, 64, (2, TRAIN_LEN))
    base, _ = model(x)
    for t in (0, 9, TRAIN_LEN - 2):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 64
        logits, _ = model(x2)
        assert torch.allclose(logits[:, : t + 1], base[:, : t + 1], atol=1e-5)
        assert not torch.allclose(logits[:, t + 1], base[:, t + 1], atol=1e-5)


@pytest.mark.parametrize("name, attention", CASES)
def test_cache_and_windows_match_full_forward(name, attention):
    model = tiny(name, attention).eval()
    x = torch.randint(0, 64, (2, TRAIN_LEN))
    full, _ = model(x)
    cache, pieces = KVCache(), []
    pieces.append(model(x[:, :5], cache=cache)[0])  # a prompt, then token by token
    for t in range(5, 15):
        pieces.append(model(x[:, t : t + 1], cache=cache)[0])
    pieces.append(model(x[:, 15:], cache=cache)[0])  # then a block of several tokens after the cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)
    assert len(cache) == TRAIN_LEN and cache.n_pos == TRAIN_LEN
    # explicit positions and an offset say the same thing
    a, _ = model(x[:, 8:16], offset=8)
    b, _ = model(x[:, 8:16], positions=torch.arange(8, 16))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("kind", list(RopeScaling))
def test_cache_matches_full_forward_with_every_rope_scaling(kind, attention):
    """Decoding past original_len with a cache gives the logits of one full forward of the same prefix, for every
    RoPE scaling. Dynamic NTK's tables depend on the total length, so its reference is the forward of exactly the
    prefix decoded so far (one forward of the whole sequence would use other tables for every position)."""
    model, original_len = tiny("rope", attention), 8
    x = torch.randint(0, 64, (2, 3 * TRAIN_LEN // 2))
    with torch.no_grad(), model.scaled_positions(kind, 2.0, original_len):
        cache = KVCache()
        torch.testing.assert_close(model(x[:, :5], cache=cache)[0], model(x[:, :5])[0])
        for t in range(5, 30):  # token by token, across original_len and well past it
            step = model(x[:, t : t + 1], cache=cache)[0][:, -1]
            torch.testing.assert_close(step, model(x[:, : t + 1])[0][:, -1], atol=2e-5, rtol=1e-4)
        block = model(x[:, 30:], cache=cache)[0]  # several tokens after the cache
        torch.testing.assert_close(block, model(x)[0][:, 30:], atol=2e-5, rtol=1e-4)
        assert len(cache) == x.shape[1] and cache.n_pos == x.shape[1]


@pytest.mark.parametrize("kind", list(RopeScaling))
def test_cache_is_recomputed_only_when_the_rotation_depends_on_the_length(kind):
    """The fast path (rotated keys written once into a preallocated buffer) for every scaling whose tables do not
    depend on the length; dynamic NTK keeps it up to original_len and recomputes the cache past it."""
    model, original_len = tiny("rope"), 8
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad(), model.scaled_positions(kind, 2.0, original_len):
        cache = KVCache(capacity=16)
        model(x[:, :4], cache=cache)
        buffer = cache.layers[0][0]
        for t in range(4, 16):
            model(x[:, t : t + 1], cache=cache)
            same = cache.layers[0][0] is buffer
            assert same == (kind != RopeScaling.dynamic_ntk or t < original_len), t


@pytest.mark.parametrize("name, attention", CASES)
def test_forward_backward_at_train_length_and_4x(name, attention):
    model = tiny(name, attention)
    for T in (TRAIN_LEN, 4 * TRAIN_LEN):
        x = torch.randint(0, 64, (2, T))
        limit = model.pos_cfg.max_positions
        if limit is not None and T > limit:
            with pytest.raises(PositionOutOfRange, match=f"size pos.max_len={TRAIN_LEN}"):
                model(x, x)
            continue
        model.zero_grad()
        logits, loss = model(x, x)
        assert logits.shape == (2, T, 64) and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert model.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, attention", CASES)
def test_overfits_a_tiny_batch(name, attention):
    model = tiny(name, attention)
    torch.manual_seed(1)
    x = torch.randint(0, 64, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(80):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > math.log(64) - 0.5  # started near chance
    assert loss.item() < 0.3, f"{name}/{attention} did not memorise: {loss.item():.3f}"


def naive_attention(q, k, v, bias=None):
    """Textbook softmax attention with a causal mask, float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.double()
    T = q.shape[-2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1) @ v.double()


@pytest.mark.parametrize("name", ["rope", "alibi", "relative", "t5", "nope"])
def test_attention_layer_matches_textbook(name):
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, bias_block=3)
    pos = build_positional(PosConfig(name=name), d_model=16, n_head=2, n_layer=1)
    if name == "t5":
        torch.nn.init.normal_(pos.buckets.weight)
    attn = CausalSelfAttention(cfg, 0)
    x = torch.randn(1, 10, 16)
    p = torch.arange(10)
    ctx = pos.context(p, p, 10, torch.float32)
    got = attn(x, pos, ctx, None)
    q, k, v = attn.qkv(x).view(1, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = pos.rotate(q, k, v, ctx)
    bias = pos.bias(q, k, ctx, 0, slice(0, 10))
    y = naive_attention(q, k, v, bias).float()
    ref = attn.proj(y.transpose(1, 2).reshape(1, 10, 16))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def naive_linear_rope(q, k, v, cos, sin, rope):
    """RoFormer eq. (19) literally: O(T^2) sums, numerator rotated, denominator not."""
    fq, fk = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    rq, rk = rope.apply_rotary(fq, cos.double(), sin.double()), rope.apply_rotary(fk, cos.double(), sin.double())
    T = q.shape[-2]
    out = torch.zeros_like(fq)
    for m in range(T):
        num = sum((rq[..., m, :] * rk[..., n, :]).sum(-1, keepdim=True) * v[..., n, :].double() for n in range(m + 1))
        den = sum((fq[..., m, :] * fk[..., n, :]).sum(-1, keepdim=True) for n in range(m + 1))
        out[..., m, :] = num / den
    return out


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_linear_attention_matches_roformer_formula(chunk):
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, attention="linear", linear_chunk=chunk)
    rope = build_positional(PosConfig(name="rope"), d_model=16, n_head=2, n_layer=1)
    attn = CausalSelfAttention(cfg, 0)
    x = torch.randn(2, 11, 16)
    p = torch.arange(11)
    ctx = rope.context(p, p, 11, torch.float32)
    got = attn(x, rope, ctx, None)
    q, k, v = attn.qkv(x).view(2, 11, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = naive_linear_rope(q, k, v, ctx.cos, ctx.sin, rope).float()
    ref = attn.proj(y.transpose(1, 2).reshape(2, 11, 16))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_linear_attention_rejects_bias_schemes():
    with pytest.raises(ValueError, match="model.attention=linear cannot use pos=alibi"):
        tiny("alibi", "linear")


def test_bias_blocks_do_not_change_the_result():
    x = torch.randint(0, 64, (1, 40))
    out = [tiny("alibi", bias_block=b)(x)[0] for b in (1, 7, 40, 1000)]
    for o in out[1:]:
        torch.testing.assert_close(o, out[0], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_runs_and_is_close():
    model = tiny("rope").eval()
    x = torch.randint(0, 64, (2, TRAIN_LEN))
    ref, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = model(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1


def test_tied_head_and_flops():
    model = tiny("rope")
    assert model.lm_head.weight is model.wte.weight
    ref = TransformerLM(ModelConfig(vocab_size=8192, n_layer=4, n_head=4, d_model=256), PosConfig(name="rope"))
    # the reference CPU shape of the performance issue: about 34.6 MFLOP per token at seq_len 256
    assert ref.flops_per_token(256) == pytest.approx(34.6e6, rel=2e-3)
    assert ref.num_params() == 8192 * 256 + 4 * (12 * 256 * 256 + 2 * 256) + 256


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"d_model": 30, "n_head": 4}, "model.d_model=30 is not divisible by model.n_head=4"),
        ({"n_layer": 0}, "model.n_layer=0 must be a positive integer"),
        ({"dropout": 1.0}, "model.dropout=1.0"),
        ({"attention": "quadratic"}, "quadratic"),
        ({"activation": "relu"}, "relu"),
    ],
)
def test_bad_model_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ModelConfig(**kwargs)


def test_attention_kind_accepts_strings():
    assert ModelConfig(attention="linear").attention is AttentionKind.linear


@pytest.mark.parametrize("activation, approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_mlp_activation(activation, approximate):
    m = tiny("nope", activation=activation)
    x = torch.randn(2, 5, 32)
    mlp = m.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.proj(F.gelu(mlp.fc(x), approximate=approximate)), rtol=0, atol=0)
    other = "tanh" if approximate == "none" else "none"
    assert not torch.allclose(mlp(x), mlp.proj(F.gelu(mlp.fc(x), approximate=other)), rtol=0, atol=1e-7)


def test_checkpoints_from_before_the_activation_option_load_as_tanh_gelu():
    old = to_plain(ModelConfig(activation="gelu_tanh"))
    del old["activation"]  # what a checkpoint written before the option holds
    cfg, _ = configs_from_checkpoint({"model_cfg": old, "pos_cfg": to_plain(PosConfig())})
    assert cfg.activation.value == "gelu_tanh"
    new, _ = configs_from_checkpoint({"model_cfg": to_plain(ModelConfig()), "pos_cfg": to_plain(PosConfig())})
    assert new.activation.value == "gelu"


# ---- zero-shot RoPE scaling through TransformerLM.scaled_positions ----


def _set_scaling_in_place(model, kind, factor, original_len):
    """What evaluation did before scaled_positions existed: change the RoPE module's config in place."""
    cfg = model.pos.cfg
    cfg.scaling, cfg.scaling_factor, cfg.original_len = RopeScaling(kind), max(1.0, float(factor)), original_len


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", list(RopeScaling))
def test_scaled_positions_give_the_logits_of_the_in_place_settings(kind, bf16):
    """Bit for bit, over the lengths of an evaluation grid in order (factors below 1 are clamped to 1), on a
    model whose RoPE cache already holds the unscaled table, as after validation."""
    hooked, in_place = tiny("rope").eval(), tiny("rope").eval()
    x = torch.randint(0, 64, (2, 4 * TRAIN_LEN))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), amp:
        torch.testing.assert_close(hooked(x)[0], in_place(x)[0], rtol=0, atol=0)  # same weights, caches filled
        for L in (TRAIN_LEN // 2, TRAIN_LEN, 2 * TRAIN_LEN, 4 * TRAIN_LEN):
            with hooked.scaled_positions(kind, L / TRAIN_LEN, TRAIN_LEN) as scaled:
                got, _ = hooked(x[:, :L])
            assert scaled == (kind != RopeScaling.none)
            _set_scaling_in_place(in_place, kind, L / TRAIN_LEN, TRAIN_LEN)
            want, _ = in_place(x[:, :L])
            assert torch.equal(got, want), f"{kind.value} at L={L}"
        _set_scaling_in_place(in_place, RopeScaling.none, 1.0, TRAIN_LEN)
        assert torch.equal(hooked(x)[0], in_place(x)[0])  # and afterwards both are plain RoPE again


def test_scaled_positions_restore_the_scheme_and_change_no_config():
    model = tiny("rope")
    rope, trained = model.pos, replace(model.pos_cfg)
    keys = list(model.state_dict())
    with model.scaled_positions(RopeScaling.yarn, 4.0, TRAIN_LEN):
        assert model.pos is not rope and model.pos.cfg.scaling == RopeScaling.yarn
        assert list(model.state_dict()) == keys  # RoPE has nothing in a checkpoint
    assert model.pos is rope and rope.cfg == trained and model.pos_cfg == trained
    with pytest.raises(RuntimeError, match="inside"):
        with model.scaled_positions(RopeScaling.pi, 2.0, TRAIN_LEN):
            raise RuntimeError("inside")
    assert model.pos is rope and rope.cfg == trained


def test_scaled_positions_none_keeps_a_trained_scaling():
    """A checkpoint fine-tuned with PI keeps it under ``none`` (evaluation's default and scripts/generate.py's),
    instead of falling back to plain RoPE."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32)
    model = TransformerLM(cfg, PosConfig(scaling="pi", scaling_factor=4.0, original_len=TRAIN_LEN)).eval()
    x = torch.randint(0, 64, (1, 2 * TRAIN_LEN))
    trained = model.pos
    with torch.inference_mode():
        want, _ = model(x)
        with model.scaled_positions(RopeScaling.none, 1.0, TRAIN_LEN) as scaled:
            assert not scaled and model.pos is trained
            assert torch.equal(model(x)[0], want)


def test_scaled_positions_on_schemes_without_rope():
    model = tiny("alibi")
    alibi = model.pos
    x = torch.randint(0, 64, (1, TRAIN_LEN))
    with model.scaled_positions(RopeScaling.none, 2.0, TRAIN_LEN) as scaled:
        assert not scaled and model.pos is alibi
        model(x)
    with pytest.raises(ValueError, match="pos=alibi .*RoPE scaling applies to pos=rope only"):
        with model.scaled_positions(RopeScaling.yarn, 2.0, TRAIN_LEN):
            pass
    assert model.pos is alibi


@pytest.mark.parametrize("name, attention", CASES)
def test_decode_step_equals_the_cached_forward(name, attention):
    """The fast one-token path gives the cached forward's logits (on CPU up to float rounding: it multiplies by
    transposed copies of the weights, summing in another order) and leaves the same cache."""
    model = tiny(name, attention).eval()
    x = torch.randint(0, 64, (2, 12))
    with torch.inference_mode():
        fast, slow = KVCache(), KVCache()
        model(x[:, :8], cache=fast)
        model(x[:, :8], cache=slow)
        for t in range(8, 12):
            a = model.decode_step(x[:, t : t + 1], fast)
            b, _ = model(x[:, t : t + 1], cache=slow)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"position {t}")
        assert torch.equal(fast.positions, slow.positions) and fast.n_pos == slow.n_pos == 12
        assert torch.equal(fast.ids, slow.ids)
        for layer, (k, v) in fast.layers.items():
            torch.testing.assert_close(k[:, :, :12], slow.layers[layer][0][:, :, :12], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v[:, :, :12], slow.layers[layer][1][:, :, :12], rtol=1e-5, atol=1e-6)


def decode_after(model, x):
    """(decode_step's logits, the forward's) for the last token of x after a cache of the others."""
    with torch.inference_mode():
        cache = KVCache()
        model(x[:, :-1], cache=cache)
        return model.decode_step(x[:, -1:], cache), model(x)[0][:, -1:]


def test_decode_weights_follow_the_weights():
    """The decoding copies are reused while the weights stay the same and rebuilt after an optimizer step, a
    load_state_dict and a dtype change, so decode_step always multiplies by the current weights."""
    model = tiny("rope").eval()
    x = torch.randint(0, 64, (1, 10))
    decode_after(model, x)
    first = model._decode_weights
    a, b = decode_after(model, x)
    assert model._decode_weights is first  # unchanged weights: reused, not copied again
    # an optimizer step (in place, outside inference mode)
    model.train()
    assert model._decode_weights is None  # training drops them
    loss = model(x, x)[1]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=10.0).step()
    model.eval()
    a2, b2 = decode_after(model, x)
    assert (b2 - b).abs().max() > 1e-2  # the step moved the logits...
    torch.testing.assert_close(a2, b2, rtol=1e-5, atol=1e-6)  # ...and decoding follows them
    # load_state_dict with the weights of another model, without a train() in between
    other = tiny("rope", seed=1).eval()
    model.load_state_dict(other.state_dict())
    a3, b3 = decode_after(model, x)
    torch.testing.assert_close(a3, decode_after(other, x)[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a3, b3, rtol=1e-5, atol=1e-6)
    # another dtype: new storage
    model.to(torch.float64)
    a4, b4 = decode_after(model, x)
    assert a4.dtype == torch.float64 and model._decode_weights.mats[0].dtype == torch.float64
    torch.testing.assert_close(a4, b4)


def test_decode_weights_are_transposed_copies_on_cpu():
    model = tiny("rope", bias=True).eval()
    w = model.decode_weights()
    linears = [m for blk in model.blocks for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc, blk.mlp.proj)]
    assert len(w.mats) == len(linears) + 1 and w.transposed
    for i, m in enumerate(linears):
        assert torch.equal(w.mats[i], m.weight.t()) and w.mats[i].is_contiguous()
        assert w.mats[i].data_ptr() != m.weight.data_ptr()
        h = torch.randn(3, 1, m.in_features)
        torch.testing.assert_close(w.linear(h, i, m.bias), m(h))
    assert torch.equal(w.mats[-1], model.lm_head.weight.t())
