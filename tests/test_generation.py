"""Generation: the sampling step, cached decoding against full forwards, streaming text, and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from roformer.checkpoint import FORMAT
from roformer.data import tokenizer as toklib
from roformer.files import to_plain
from roformer.generation import (
    GenerationError,
    SamplingConfig,
    filter_logits,
    generate,
    sample_next,
    stream_text,
)
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig, PositionOutOfRange

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat."


def tiny(name="rope", seed=0, max_len=64, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, **kw)
    return TransformerLM(cfg, PosConfig(name=name, max_len=max_len)).eval()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]  # 0.5 reaches 0.5
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]  # 0.5+0.2 < 0.8
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]  # the best always stays
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 5
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order does not matter
    assert kept(filter_logits(shuffled, top_k=3)) == [False, True, False, True, True]


def test_sampling_is_greedy_at_zero_temperature_and_reproducible_per_seed():
    logits = torch.randn(1, 50)
    assert sample_next(logits, 0.0).item() == logits.argmax().item()
    assert sample_next(logits, 1.0, top_k=1).item() == logits.argmax().item()
    draw = lambda seed: [sample_next(logits, 1.0, generator=torch.Generator().manual_seed(seed)).item()  # noqa: E731
                         for _ in range(1)]
    assert draw(3) == draw(3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample_next(logits, 1.0, 5, 1.0, g) for _ in range(300)]).view(-1), minlength=50)
    assert set(counts.nonzero().view(-1).tolist()) <= set(torch.topk(logits, 5).indices.view(-1).tolist())


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(temperature=-0.1), "temperature=-0.1 must be >= 0"),
        (dict(top_k=-1), "top_k=-1 must be >= 0"),
        (dict(num_samples=0), "num_samples=0 must be at least 1"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_bad_sampling_settings(kw, fragment):
    with pytest.raises(GenerationError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SamplingConfig(**kw)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_cached_greedy_generation_equals_full_forward_argmax(name):
    """Every new token is the argmax of one full forward of everything so far, also past the trained length."""
    model = tiny(name)
    prompt = torch.randint(0, 64, (7,)).tolist()
    got = list(generate(model, prompt, max_new_tokens=40 if name != "learned" else 30, temperature=0.0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(got)):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_generation_stops_at_the_stop_token_and_is_reproducible():
    model = tiny()
    first = list(generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.0))
    stop = first[5]
    got = list(generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.0, stop_id=stop))
    assert got == first[: first.index(stop)]
    runs = [list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_k=10, top_p=0.9,
                          generator=torch.Generator().manual_seed(7))) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_learned_table_is_checked_before_generating():
    model = tiny("learned", max_len=16)
    gen = generate(model, list(range(10)), max_new_tokens=7, temperature=0.0)
    with pytest.raises(PositionOutOfRange, match=r"10 tokens\) \+ max_new_tokens=7 = 17 .*pos.max_len=16"):
        next(gen)
    assert len(list(generate(model, list(range(10)), max_new_tokens=6, temperature=0.0))) == 6


def test_stream_text_prints_multibyte_characters_whole():
    text = "naïve café — ✓ 日本語 ok"
    ids = list(text.encode("utf-8"))  # one byte per token: most characters span several tokens
    decode = lambda seen: bytes(seen).decode("utf-8", errors="replace")  # noqa: E731
    pieces = list(stream_text(decode, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def _overfit_checkpoint(path: Path) -> tuple[list[int], object]:
    """A tiny RoPE model fitted to one sentence (then the end-of-document token), saved as a checkpoint."""
    tok = toklib.train_bpe([TEXT] * 4, 300, progress=False)
    eod = toklib.ensure_eod(tok)
    ids = tok.encode(TEXT).ids + [eod]
    torch.manual_seed(0)
    cfg, pos = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4, d_model=64), PosConfig()
    model = TransformerLM(cfg, pos)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.tensor([ids])
    for _ in range(300):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    torch.save({"format": FORMAT, "model_cfg": to_plain(cfg), "pos_cfg": to_plain(pos),
                "train_cfg": {"trainer": {"seq_len": len(ids)}}, "tokenizer_json": toklib.to_json(tok),
                "model": model.state_dict()}, path)
    return ids, model.eval()


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "fit.pt"
    ids, model = _overfit_checkpoint(path)
    return path, ids, model


def test_greedy_decoding_reproduces_the_training_text(overfit):
    _, ids, model = overfit
    got = list(generate(model, ids[:3], max_new_tokens=100, temperature=0.0, stop_id=ids[-1]))
    assert got == ids[3:-1]  # the rest of the sentence, then the end-of-document token stopped it


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_greedy_streams_the_training_text_and_writes_nothing(overfit, tmp_path):
    path, _, _ = overfit
    r = cli(f"ckpt={path}", "prompt=The quick brown", "temperature=0", "max_new_tokens=100", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == TEXT + "\n"
    assert "tokens/s" in r.stderr
    r = cli(f"ckpt={path}", "prompt=The quick", "num_samples=2", "max_new_tokens=5", "seed=3",
            "pos.scaling=dynamic_ntk", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "=== sample 2/2 (seed 4) ===" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, rc, fragment",
    [
        (["top_p=0"], 2, "top_p=0.0 must be in (0, 1]"),
        (["temperature=-1"], 2, "temperature=-1.0 must be >= 0"),
        (["top_k=-3"], 2, "top_k=-3 must be >= 0"),
        (["num_samples=0"], 2, "num_samples=0 must be at least 1"),
        (["top_k=abc"], 2, "top_k:"),
        (["pos.scaling=bogus"], 2, "pos.scaling:"),
        (["max_new_tokens=5000", "ckpt=LEARNED"], 2, "learned position table (size pos.max_len=8)"),
        (["ckpt=MISSING"], 1, "does not exist"),
        (["ckpt=FOREIGN"], 1, "is not a roformer checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line(overfit, tmp_path, args, rc, fragment):
    path, _, _ = overfit
    learned = tmp_path / "learned.pt"
    ckpt = torch.load(path, weights_only=True)
    cfg, pos = ModelConfig(**ckpt["model_cfg"]), PosConfig(name="learned", max_len=8)
    ckpt.update(pos_cfg=to_plain(pos), model=TransformerLM(cfg, pos).state_dict())
    torch.save(ckpt, learned)
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    subs = {"ckpt=LEARNED": f"ckpt={learned}", "ckpt=MISSING": f"ckpt={tmp_path / 'nope.pt'}",
            "ckpt=FOREIGN": f"ckpt={tmp_path / 'foreign.pt'}"}
    args = [subs.get(a, a) for a in args]
    if not any(a.startswith("ckpt=") for a in args):
        args.append(f"ckpt={path}")
    before = sorted(tmp_path.iterdir())
    r = cli(*args, "prompt=The quick", cwd=tmp_path)
    assert r.returncode == rc, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert sorted(tmp_path.iterdir()) == before
