"""Static-cache decoding (roformer/decoding.py) against today's path, TransformerLM.decode_step.

On a CPU the static step runs as Python (``decode="static"``) and, once, compiled: per-step logits equal
decode_step's to float rounding and greedy ids are equal, for every scheme and option the step serves; the others
(score biases, dynamic NTK past its length, linear attention, training mode) fall back to decode_step and stay
correct, as do graphs or compiles that fail to build or fail mid-way. The CUDA tests (marked ``cuda``, skipped
without a GPU) run the ``graph`` and ``compile`` steps against the eager path in fp32 and bf16 autocast:

    python -m pytest tests/test_decoding.py            # CPU
    python -m pytest -m cuda tests/test_decoding.py    # the CUDA graph and compiled steps
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_generation import TEXT, _overfit_checkpoint

from roformer import decoding
from roformer.generation import generate
from roformer.model import KVCache, ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig, RopeScaling

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (name, pos options, model options): everything the static step serves
SERVED = {
    "rope": ("rope", {}, {}),
    "rope_interleaved": ("rope", {"layout": "interleaved"}, {}),
    "rope_partial": ("rope", {"rotary_fraction": 0.5, "layout": "interleaved"}, {}),
    "rope_pi": ("rope", {"scaling": "pi", "scaling_factor": 2.0, "original_len": 16}, {}),
    "rope_yarn": ("rope", {"scaling": "yarn", "scaling_factor": 4.0, "original_len": 16}, {}),  # qk temperature
    "rope_ntk_within": ("rope", {"scaling": "dynamic_ntk", "scaling_factor": 1.0, "original_len": 512}, {}),
    "sinusoidal": ("sinusoidal", {}, {}),
    "sinusoidal_scaled": ("sinusoidal", {"scale_embeddings": True}, {}),
    "learned": ("learned", {"max_len": 64}, {}),
    "nope": ("nope", {}, {}),
    "rope_values": ("rope", {"rotate_values": True}, {}),  # the ablation that also rotates values
    "rope_biases_untied": ("rope", {}, {"bias": True, "tie_embeddings": False, "activation": "gelu_tanh"}),
}
# and every other scheme without a bias, as its YAML trains it (a new scheme is covered without being listed)
SERVED |= {n: (n, {}, {}) for n in sorted(SCHEMES) if not SCHEMES[n].has_bias and SCHEMES[n].qk_alike
           and n not in SERVED}


def tiny(name="rope", seed=0, pos=None, **model):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, **model)
    m = TransformerLM(cfg, PosConfig(name=name, **(pos or {}))).eval()
    if cfg.bias:  # nonzero biases, so that a bias the step forgot would show
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.02)
    return m


def served(key, seed=0):
    name, pos, model = SERVED[key]
    return tiny(name, seed, pos, **model)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def prompt_of(n=7, seed=1):
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----------------------------------------------------------------------------------------------------------
# The step against decode_step


@pytest.mark.parametrize("key", list(SERVED))
def test_static_step_logits_equal_decode_step(key):
    """Teacher-forced: the same tokens fed to both paths give the same logits at every step, past the PI/YaRN
    original length (16) and up to the learned table's end (64)."""
    model = served(key)
    with torch.inference_mode():
        _teacher_forced(model)


def _teacher_forced(model):
    prompt, n = prompt_of(), 64 - 7 - 1
    feed = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = KVCache(capacity=len(prompt) + n)
    ref, _ = model(torch.tensor([prompt]), cache=cache)
    dec = decoding.StaticDecoder(model, decoding.capacity_for(model, len(prompt) + n))
    got = dec.prefill(torch.tensor([prompt]))
    torch.testing.assert_close(got, ref[:, -1], rtol=0, atol=0)  # the same forward
    for i, t in enumerate(feed):
        tok = torch.tensor([[t]])
        ref = model.decode_step(tok, cache)[:, -1]
        logits, nxt = dec.step(tok)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
        assert torch.equal(nxt, logits.argmax(-1, keepdim=True))
    assert int(dec.pos_t) == len(prompt) + n


@pytest.mark.parametrize("key", list(SERVED))
def test_static_greedy_and_sampled_ids_equal_decode_step(key):
    model = served(key)
    prompt = prompt_of()
    n = 64 - len(prompt)  # the learned table's end
    eager = list(generate(model, prompt, max_new_tokens=n, decode="eager"))
    assert decoding.last_path(model) == "decode_step"
    static = list(generate(model, prompt, max_new_tokens=n, decode="static"))
    assert decoding.last_path(model) == "static:eager"
    assert static == eager and len(eager) == n
    draw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = list(generate(model, prompt, max_new_tokens=30, generator=torch.Generator().manual_seed(3), decode="eager",
                      **draw))
    b = list(generate(model, prompt, max_new_tokens=30, generator=torch.Generator().manual_seed(3), decode="static",
                      **draw))
    assert a == b


def test_stop_token_and_prompt_of_one_token():
    model = served("rope")
    first = list(generate(model, [5], max_new_tokens=20, decode="eager"))
    assert list(generate(model, [5], max_new_tokens=20, decode="static")) == first
    stop = first[4]
    got = list(generate(model, [5], max_new_tokens=20, decode="static", stop_id=stop))
    assert got == first[: first.index(stop)]
    assert list(generate(model, [5], max_new_tokens=1, decode="static")) == first[:1]


def test_scaled_positions_get_their_own_tables():
    """A decoder is tied to the scheme object it was built from: inside model.scaled_positions the step uses the
    scaled angles (the ids equal decode_step's there), and after the block the trained ones again."""
    model = served("rope", seed=3)
    prompt = prompt_of(20)

    def ids(decode):
        return list(generate(model, prompt, max_new_tokens=40, temperature=1.0,
                             generator=torch.Generator().manual_seed(0), decode=decode))

    plain = ids("eager")
    with model.scaled_positions(RopeScaling.pi, 4.0, 16):
        assert ids("static") == ids("eager")
        inside = decoding.registered(model, "eager")
        assert inside.pos is model.pos
    assert ids("static") == plain
    after = decoding.registered(model, "eager")
    assert after is not inside and after.pos is model.pos
    # PI divides every angle by 4: position 4 scaled is position 1 plain
    torch.testing.assert_close(inside.cos[4], after.cos[1])
    assert not torch.allclose(inside.cos[4], after.cos[4])


def test_decoder_is_reused_and_rebuilt_when_it_no_longer_fits():
    model = served("rope")
    prompt = prompt_of()
    list(generate(model, prompt, max_new_tokens=10, decode="static"))
    dec = decoding.registered(model, "eager")
    assert dec is not None and dec.capacity == decoding.CAPACITY_STEP
    list(generate(model, prompt, max_new_tokens=20, decode="static"))
    assert decoding.registered(model, "eager") is dec  # fits: reused
    list(generate(model, prompt, max_new_tokens=decoding.CAPACITY_STEP, decode="static"))
    bigger = decoding.registered(model, "eager")
    assert bigger is not dec and bigger.capacity == 2 * decoding.CAPACITY_STEP
    other = served("rope", seed=5)  # new weights, loaded in place: the same tensors, new versions
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    got = list(generate(model, prompt, max_new_tokens=20, decode="static"))
    assert decoding.registered(model, "eager") is not bigger
    assert got == list(generate(other, prompt, max_new_tokens=20, decode="eager"))


def test_two_interleaved_generations_of_one_model():
    """The decoder's buffers hold one sequence: a second generation while the first is unfinished decodes
    through decode_step, and both are right."""
    model = served("rope")
    p1, p2 = prompt_of(seed=1), prompt_of(seed=2)
    ref1 = list(generate(model, p1, max_new_tokens=15, decode="eager"))
    ref2 = list(generate(model, p2, max_new_tokens=15, decode="eager"))
    g1, g2 = generate(model, p1, max_new_tokens=15, decode="static"), None
    got1, got2 = [next(g1)], []
    g2 = generate(model, p2, max_new_tokens=15, decode="static")
    got2.append(next(g2))
    assert decoding.last_path(model) == "decode_step"  # g1 holds the decoder
    for a, b in zip(g1, g2, strict=False):
        got1.append(a)
        got2.append(b)
    got2.extend(g2)
    assert got1 == ref1 and got2 == ref2


# ----------------------------------------------------------------------------------------------------------
# What falls back


@pytest.mark.parametrize("name, pos, model_kw, why", [
    *[(n, {}, {}, "bias to the attention scores") for n in sorted(SCHEMES) if SCHEMES[n].has_bias],
    *[(n, {}, {}, "transforms queries and keys differently") for n in sorted(SCHEMES)
      if not SCHEMES[n].has_bias and not SCHEMES[n].qk_alike],
    ("rope", {"scaling": "dynamic_ntk", "scaling_factor": 1.0, "original_len": 16}, {}, "dynamic NTK"),
    ("rope", {}, {"attention": "linear"}, "running state"),
])  # fmt: skip
def test_unsupported_models_decode_with_decode_step(name, pos, model_kw, why, caplog):
    """Each falls back with its reason logged, and still gives the argmax of one full forward per token (here past
    dynamic NTK's original length, where every cached key goes stale)."""
    model = tiny(name, 0, pos, **model_kw)
    prompt = prompt_of(10)
    with caplog.at_level(logging.WARNING, logger="roformer.generation"):
        got = list(generate(model, prompt, max_new_tokens=20, decode="static"))
    assert decoding.last_path(model) == "decode_step"
    assert why in caplog.text
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(got)):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_randomized_positions_decode_with_decode_step():
    """A drawn position plan is the forward's (KVCache.planned), not the static step's counted positions."""
    model = tiny("rope", 0, {"randomized_max": 64})
    assert "positions are drawn" in decoding.unsupported(model, 32)
    assert len(list(generate(model, prompt_of(), max_new_tokens=5, decode="static"))) == 5
    assert decoding.last_path(model) == "decode_step"


def test_training_mode_and_auto_on_cpu_use_decode_step():
    model = served("rope")
    list(generate(model, prompt_of(), max_new_tokens=3))  # auto on a CPU: today's path
    assert decoding.last_path(model) == "decode_step"
    assert "training mode" in decoding.unsupported(model.train(), 64)


def test_a_build_that_fails_falls_back_and_is_not_retried(monkeypatch, caplog):
    model = served("rope")
    prompt = prompt_of()
    ref = list(generate(model, prompt, max_new_tokens=12, decode="eager"))
    calls = []

    def broken(self):
        calls.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(decoding.StaticDecoder, "_compile", broken)
    with caplog.at_level(logging.WARNING):
        assert list(generate(model, prompt, max_new_tokens=12, decode="compile")) == ref
        assert list(generate(model, prompt, max_new_tokens=12, decode="compile")) == ref
    assert "run=compile failed to build (RuntimeError: no compiler here)" in caplog.text
    assert decoding.last_path(model) == "decode_step" and len(calls) == 1
    assert decoding.failures(model) == {"compile": "RuntimeError: no compiler here"}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_step_that_fails_midway_continues_with_decode_step(temperature, monkeypatch, caplog):
    model = served("rope")
    prompt = prompt_of()
    kw = dict(max_new_tokens=25, temperature=temperature, top_k=10)
    ref = list(generate(model, prompt, generator=torch.Generator().manual_seed(0), decode="eager", **kw))
    real, n = decoding.StaticDecoder._step, [0]

    def flaky(self):
        n[0] += 1
        if n[0] > 9:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(self)

    monkeypatch.setattr(decoding.StaticDecoder, "_step", flaky)
    with caplog.at_level(logging.WARNING):
        got = list(generate(model, prompt, generator=torch.Generator().manual_seed(0), decode="static", **kw))
    assert got == ref
    assert "failed after" in caplog.text and "illegal memory access" in caplog.text
    assert decoding.registered(model, "eager") is None and "eager" in decoding.failures(model)
    assert "then decode_step" in decoding.last_path(model)


def test_self_check_refuses_a_step_that_differs_from_eager():
    model = served("rope")
    dec = decoding.StaticDecoder(model, 64)
    ref = dec._reference_steps()
    real = dec._step
    dec._fn = lambda: (lambda out: (out[0] + 1.0, out[1]))(real())  # a graph that computes something else
    with pytest.raises(RuntimeError, match="differ from the eager step"):
        dec._self_check(ref)

    def stuck():  # a graph with the position baked in: reads, never advances
        out = real()
        dec.pos_t.sub_(1)
        return out

    dec._fn = stuck
    with pytest.raises(RuntimeError, match="differ from the eager step|left the position"):
        dec._self_check(ref)


def test_compiled_step_is_one_graph_and_equal_on_cpu():
    """torch.compile(fullgraph=True) of the step: no graph break (so no host synchronisation inside, which a CUDA
    graph could not capture either), and the same greedy ids. Inductor on a CPU; on CUDA the same trace is
    CUDA-graphed (test_cuda_graph_and_compile_equal_eager)."""
    torch._dynamo.reset()
    model = served("rope_partial")
    prompt = prompt_of()
    ref = list(generate(model, prompt, max_new_tokens=30, decode="eager"))
    got = list(generate(model, prompt, max_new_tokens=30, decode="compile"))
    assert decoding.last_path(model) == "static:compile", decoding.failures(model)
    assert got == ref
    ref = list(generate(model, prompt, max_new_tokens=30, temperature=1.0, generator=torch.Generator().manual_seed(1),
                        decode="eager"))
    got = list(generate(model, prompt, max_new_tokens=30, temperature=1.0, generator=torch.Generator().manual_seed(1),
                        decode="compile"))
    assert got == ref


# ----------------------------------------------------------------------------------------------------------
# CUDA: the graph and compiled steps


def near_tie_divergence(model, prompt, got, n, margin_bound):
    """Check that greedy ids ``got`` follow decode_step's until a step where decode_step's own top-2 logits are
    within ``margin_bound`` of each other (a near tie that rounding may break either way). Returns how many ids
    were equal."""
    ref, cache = [], KVCache(capacity=len(prompt) + n)
    logits, _ = model(torch.tensor([prompt], device="cuda"), cache=cache)
    logits = logits[:, -1]
    for i in range(n):
        top2 = logits.float().topk(2, dim=-1).values[0]
        tok = logits.argmax(-1, keepdim=True)
        ref.append(int(tok))
        if i >= len(got) or got[i] != ref[i]:
            gap = float(top2[0] - top2[1])
            assert gap <= margin_bound, f"id {i}: {got[i:i + 1]} != {ref[i]} with a top-2 gap of {gap:.3g}"
            return i
        logits = model.decode_step(tok, cache)[:, -1]
    return n


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("run, key", [("graph", k) for k in ("rope", "rope_partial", "learned", "sinusoidal")]
                         + [("compile", "rope_partial"), ("compile-graph", "rope")])  # each compile costs seconds
def test_cuda_graph_and_compile_equal_eager_fp32(run, key):
    """fp32 (no TF32): the same greedy and sampled ids as decode_step, and the step really ran as ``run``."""
    torch._dynamo.reset()
    model = served(key).cuda()
    prompt = prompt_of()
    n = 64 - len(prompt)
    ref = list(generate(model, prompt, max_new_tokens=n, decode="eager"))
    got = list(generate(model, prompt, max_new_tokens=n, decode=run))
    assert decoding.last_path(model) == f"static:{run}", decoding.failures(model)
    assert got == ref
    again = list(generate(model, prompt[:3], max_new_tokens=20, decode=run))  # a reused graph, another prompt
    assert again == list(generate(model, prompt[:3], max_new_tokens=20, decode="eager"))
    g = lambda: torch.Generator(device="cuda").manual_seed(4)  # noqa: E731
    draw = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9)
    assert (list(generate(model, prompt, generator=g(), decode=run, **draw))
            == list(generate(model, prompt, generator=g(), decode="eager", **draw)))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("run", ["graph", "compile"])
def test_cuda_graph_and_compile_bf16_autocast(run):
    """bf16 autocast: the static step and decode_step round differently (another attention kernel, over the whole
    buffer), so equal ids cannot be demanded where decode_step's own top two logits nearly tie. Fair: teacher-forced
    logits within bf16's bound (relative 4e-2, as tests/test_cuda.py holds bf16 models), and greedy ids equal up to
    the first step whose top-2 gap is within the largest logit difference seen."""
    torch._dynamo.reset()
    model = served("rope").cuda()
    prompt, n = prompt_of(), 40
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = list(generate(model, prompt, max_new_tokens=n, decode=run))
        assert decoding.last_path(model) == f"static:{run}", decoding.failures(model)
        dec = decoding.registered(model, run)
        assert dec.dtype == torch.bfloat16 and dec.k[0].dtype == torch.bfloat16
        with torch.inference_mode():
            feed = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(2)).tolist()
            cache = KVCache(capacity=len(prompt) + n)
            model(torch.tensor([prompt], device="cuda"), cache=cache)
            dec.prefill(torch.tensor([prompt], device="cuda"))
            worst = 0.0
            for t in feed:
                tok = torch.tensor([[t]], device="cuda")
                ref = model.decode_step(tok, cache)[:, -1].float()
                logits = dec.step(tok)[0].float()
                err = ((logits - ref).norm() / ref.norm()).item()
                assert err < 4e-2, err
                worst = max(worst, (logits - ref).abs().max().item())
            equal = near_tie_divergence(model, prompt, got, n, margin_bound=2 * worst + 1e-3)
    assert equal >= 1  # at least the first id (the prompt's forward is the same code on both paths)


@pytest.mark.cuda
@needs_cuda
def test_cuda_auto_uses_the_graph_and_bias_schemes_fall_back():
    model = served("rope").cuda()
    prompt = prompt_of()
    ref = list(generate(model, prompt, max_new_tokens=20, decode="eager"))
    assert list(generate(model, prompt, max_new_tokens=20)) == ref
    assert decoding.last_path(model) == "static:graph", decoding.failures(model)
    alibi = tiny("alibi").cuda()
    list(generate(alibi, prompt, max_new_tokens=5))
    assert decoding.last_path(alibi) == "decode_step"


# ----------------------------------------------------------------------------------------------------------
# The CLI


def test_generate_cli_takes_a_decode_path(tmp_path):
    """scripts/generate.py decode=static prints what decode_step does; a path that does not exist exits 2."""
    path = tmp_path / "fit.pt"
    _overfit_checkpoint(path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), f"ckpt={path}", "prompt=The quick brown",  # noqa: E731
                                     "temperature=0", "max_new_tokens=100", *a], capture_output=True, text=True,
                                    cwd=tmp_path, timeout=120)
    r = run("decode=static")
    assert r.returncode == 0, r.stderr
    assert r.stdout == TEXT + "\n"
    r = run("decode=fast")
    assert r.returncode == 2 and "decode='fast' must be one of" in r.stderr


def test_benchmark_generate_times_each_path_and_writes_rows(tmp_path):
    """scripts/benchmark_generate.py with several decode paths and transformers cases (a random model, exported in
    memory): a row per case with its rate, greedy ids equal to our first case's, and ours / HF ratios."""
    pytest.importorskip("transformers")
    out = tmp_path / "decode.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_generate.py"
    shape = ["--vocab", "256", "--d-model", "64", "--n-layer", "2", "--n-head", "2", "--threads", "1"]
    r = subprocess.run([sys.executable, str(script), *shape, "--prompt-len", "12", "--new-tokens", "6", "--runs", "2",
                        "--decode", "eager,static", "--hf-cases", "dynamic,static", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    rows = {row["case"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"roformer/eager", "roformer/static", "transformers/dynamic", "transformers/static"}
    for row in rows.values():
        assert row["tok_s"] > 0 and row["runs"] == 2 and row["error"] is None and row["match"] == 6
    assert rows["roformer/static"]["path"].startswith("static:eager")
    assert rows["roformer/eager"]["path"] == "decode_step"
    ratio = rows["roformer/static"]["tok_s"] / rows["transformers/static"]["tok_s"]
    assert rows["roformer/static"]["ratio_vs_hf_static"] == pytest.approx(ratio)
    assert "ratio roformer/static / transformers/dynamic" in r.stdout
    # a scheme without a Hugging Face equivalent: ours still timed (through decode_step), HF skipped with why
    r = subprocess.run([sys.executable, str(script), *shape, "--pos", "alibi", "--prompt-len", "8", "--new-tokens",
                        "4", "--runs", "1", "--decode", "static"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "transformers generate  skipped: pos=alibi has no Hugging Face equivalent" in r.stdout
    assert "decode_step" in r.stdout
