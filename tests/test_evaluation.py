"""Evaluation protocols on toy models with known losses, n/a handling, RoPE scaling, and the CLI end to end."""

import contextlib
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from roformer.checkpoint import CheckpointError
from roformer.eval_run import find_checkpoints
from roformer.evaluation import (
    EvalSettings,
    Protocol,
    ShortInput,
    evaluate_fixed_target,
    evaluate_model,
    evaluate_stream,
    nonoverlapping_windows,
    sliding_windows,
)
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig, RopeScaling
from roformer.reporting import add_ratios, terminal_summary, terminal_table

ROOT = Path(__file__).resolve().parents[1]


class Bigram(nn.Module):
    """logits(t) = table[x_t]: its loss on a target does not depend on the context, so a protocol's NLL sum
    equals the direct sum over the targets it scores, once each."""

    def __init__(self, V=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 2
        self.pos_cfg = PosConfig(name="nope")
        self.calls = 0

    def forward(self, idx):
        self.calls += 1
        return self.table[idx], None

    def nll(self, prev, nxt):
        return float(-torch.log_softmax(self.table[torch.as_tensor(prev)], -1)[torch.as_tensor(nxt)])


def direct_sum(model, stream, targets):
    return sum(model.nll(stream[t - 1], stream[t]) for t in targets)


@pytest.mark.parametrize("M, L", [(100, 10), (101, 10), (7, 10), (64, 64), (1000, 33)])
def test_nonoverlapping_windows_cover_each_target_once(M, L):
    scored = []
    for start, n_in, n_sc in nonoverlapping_windows(M, L):
        assert n_in <= L and n_sc == n_in
        scored += list(range(start + 1, start + n_in + 1))
    assert scored == list(range(1, M + 1))


@pytest.mark.parametrize("M, L, S", [(100, 10, 5), (101, 10, 3), (100, 10, 10), (1000, 64, 1), (50, 64, 16)])
def test_sliding_windows_cover_each_target_once_with_context(M, L, S):
    scored = []
    for i, (start, n_in, n_sc) in enumerate(sliding_windows(M, L, S)):
        assert n_in <= L and 0 < n_sc <= n_in
        targets = list(range(start + n_in - n_sc + 1, start + n_in + 1))
        if i > 0:  # after the first window, every scored target has at least L - S tokens of context
            assert targets[0] - start >= L - S  # inputs up to and including the one that predicts it
        scored += targets
    assert scored == list(range(1, M + 1))


@pytest.mark.parametrize("protocol", [Protocol.nonoverlapping, Protocol.sliding])
@pytest.mark.parametrize("L", [8, 13, 50])
def test_stream_protocols_score_every_token_once(protocol, L):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 11, 400).astype(np.uint16)
    model = Bigram()
    M = 317
    s = evaluate_stream(model, stream, protocol, L, n_targets=M, stride=3, batch_tokens=64)
    assert s.n_tokens == M
    assert s.nll_sum == pytest.approx(direct_sum(model, stream, range(1, M + 1)), rel=1e-9)
    assert s.ppl == pytest.approx(math.exp(s.nll_sum / M))


def test_fixed_target_scores_the_same_targets_at_every_length():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 11, n).astype(np.uint16) for n in (30, 200, 90, 150, 300)]
    model = Bigram()
    K = 20
    usable = [d for d in docs if len(d) >= 128 + 1]
    expected = sum(direct_sum(model, d, range(len(d) - K, len(d))) for d in usable)
    for L in (20, 64, 128):
        s = evaluate_fixed_target(model, usable, L, target_tokens=K, batch_tokens=100)
        assert s.n_tokens == K * len(usable) == 60
        assert s.nll_sum == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ShortInput, match="length >= eval.target_tokens=20"):
        evaluate_fixed_target(model, usable, 10, target_tokens=K)


def test_fixed_target_context_really_changes_with_length():
    """With a real model only the context differs between lengths, and longer context lowers the loss on
    text with long-range structure (a repeated random sequence)."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=32), PosConfig(name="rope"))
    rng = np.random.default_rng(0)
    motif = rng.integers(0, 16, 24)
    doc = np.tile(motif, 12).astype(np.uint16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(doc.astype(np.int64))[None]
    for _ in range(150):  # learn to copy from one period back
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        short = evaluate_fixed_target(model, [doc], 16, target_tokens=16)
        long = evaluate_fixed_target(model, [doc], 64, target_tokens=16)
    assert short.n_tokens == long.n_tokens == 16
    assert long.nll_sum < 0.5 * short.nll_sum


def test_per_position_loss_of_nonoverlapping():
    stream = np.arange(200, dtype=np.uint16) % 11
    model = Bigram()
    s = evaluate_stream(model, stream, Protocol.nonoverlapping, 20, n_targets=199)
    assert s.pos_count.sum() == 199 and s.pos_count[0] == 10 and s.pos_count[-1] == 9
    assert s.pos_sum.sum() == pytest.approx(s.nll_sum)


def test_short_stream_is_reported():
    with pytest.raises(ShortInput, match="needs at least 65 tokens but the scored stretch has 31"):
        evaluate_stream(Bigram(), np.zeros(31, dtype=np.uint16), Protocol.nonoverlapping, 64, n_targets=30)


def tiny_lm(name, **pos):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16)
    return TransformerLM(cfg, PosConfig(name=name, **pos)).eval()


def test_learned_is_na_beyond_its_table_and_the_rest_still_runs():
    model = tiny_lm("learned", max_len=32)
    stream = np.random.default_rng(0).integers(0, 32, 600).astype(np.uint16)
    settings = EvalSettings(lengths=[16, 32, 64], protocols=["nonoverlapping", "sliding"], target_tokens=8)
    with torch.inference_mode():
        cells, per_pos = evaluate_model(
            model,
            stream=stream,
            docs=[stream],
            lengths=[16, 32, 64],
            settings=settings,
            scaling=RopeScaling.none,
            train_len=32,
            counter=None,
            device="cpu",
        )
    status = {(c.protocol, c.length): (c.status, c.note) for c in cells}
    assert status[("nonoverlapping", 64)] == ("n/a", "n/a (table size 32)")
    assert status[("sliding", 64)] == ("n/a", "n/a (table size 32)")
    assert status[("nonoverlapping", 32)][0] == status[("sliding", 16)][0] == "ok"
    assert sorted(per_pos) == [16, 32]


@pytest.mark.parametrize("kind", [k for k in RopeScaling if k != RopeScaling.none])
def test_rope_scaling_at_the_training_length_equals_plain_rope(kind):
    model = tiny_lm("rope")
    stream = np.random.default_rng(0).integers(0, 32, 300).astype(np.uint16)
    settings = EvalSettings(lengths=[32, 64], protocols=["nonoverlapping"])
    with torch.inference_mode():
        plain, _ = evaluate_model(
            model,
            stream=stream,
            docs=[],
            lengths=[32, 64],
            settings=settings,
            scaling=RopeScaling.none,
            train_len=32,
            counter=None,
            device="cpu",
        )
        scaled, _ = evaluate_model(
            model,
            stream=stream,
            docs=[],
            lengths=[32, 64],
            settings=settings,
            scaling=kind,
            train_len=32,
            counter=None,
            device="cpu",
        )
    assert scaled[0].score.nll_sum == plain[0].score.nll_sum  # factor 1 at L = training length: identical
    assert scaled[1].score.nll_sum != plain[1].score.nll_sum  # factor 2 at 2L: a different model
    assert model.pos.cfg.scaling == RopeScaling.none  # evaluation leaves the model as it found it


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"lengths": [0]}, "eval.lengths: 0 is not a positive integer"),
        ({"lengths": [128], "stride": 256}, "eval.stride=256 is larger than the length 128"),
        ({"protocols": ["overlapping"]}, "overlapping"),
    ],
)
def test_bad_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        EvalSettings(**kwargs)


class AnyLengthBigram(Bigram):
    """The Bigram with the hooks evaluate_model asks a model for: any length, no RoPE scaling."""

    class pos:
        max_positions = staticmethod(lambda cfg: None)

    def scaled_positions(self, *args):
        return contextlib.nullcontext()


def split_into_documents(stream: np.ndarray, seed: int) -> list[np.ndarray]:
    cuts = np.cumsum(np.random.default_rng(seed).integers(200, 3000, len(stream) // 200))
    return [d for d in np.split(stream, cuts[cuts < len(stream)]) if len(d)]


@pytest.mark.parametrize("n_stream", [5_000, 50_000])
def test_defaults_cap_what_each_cell_scores(n_stream):
    """With the default settings every stream cell scores min(eval.max_tokens, split) targets and fixed_target
    the last K tokens of at most eval.max_docs documents, so an evaluation's cost does not grow with the split."""
    s = EvalSettings()
    assert s.max_tokens > 0 and s.max_docs > 0
    stream = np.random.default_rng(n_stream).integers(0, 11, n_stream).astype(np.uint16)
    docs = split_into_documents(stream, 0)
    lengths = s.lengths_for(64)
    with torch.inference_mode():
        cells, _ = evaluate_model(AnyLengthBigram(), stream=stream, docs=docs, lengths=lengths, settings=s,
                                  scaling=RopeScaling.none, train_len=64, counter=None, device="cpu")
    long_docs = sum(len(d) >= max(lengths) + 1 for d in docs)
    assert {c.status for c in cells} == {"ok"} and len(cells) == 3 * len(lengths)
    for c in cells:
        if c.protocol == "fixed_target":
            assert c.score.n_tokens == 64 * min(s.max_docs, long_docs)  # K = 64, the smallest length
        else:
            assert c.score.n_tokens == min(s.max_tokens, n_stream - 1)


def test_max_tokens_is_raised_to_the_largest_length():
    """A cap below the largest length would leave that length without a window: the stretch grows to fit it."""
    stream = np.random.default_rng(0).integers(0, 11, 5_000).astype(np.uint16)
    s = EvalSettings(max_tokens=100, protocols=["nonoverlapping", "sliding"])
    with torch.inference_mode():
        cells, _ = evaluate_model(AnyLengthBigram(), stream=stream, docs=[], lengths=[64, 1024], settings=s,
                                  scaling=RopeScaling.none, train_len=64, counter=None, device="cpu")
    assert [(c.status, c.score.n_tokens) for c in cells] == [("ok", 1024)] * 4


def test_fixed_target_below_target_tokens_scores_the_same_targets_at_every_length():
    """Trained at 16 tokens with eval.target_tokens=256: K follows the smallest length (16) at every length, so
    with a model whose loss does not depend on context the NLL is identical at every length."""
    stream = np.random.default_rng(1).integers(0, 11, 6_000).astype(np.uint16)
    docs = split_into_documents(stream, 1)
    s = EvalSettings(protocols=["fixed_target"], max_docs=0)
    model = AnyLengthBigram()
    with torch.inference_mode():
        cells, _ = evaluate_model(model, stream=stream, docs=docs, lengths=[16, 24, 64, 256], settings=s,
                                  scaling=RopeScaling.none, train_len=16, counter=None, device="cpu")
    usable = [d for d in docs if len(d) >= 257]
    expected = sum(direct_sum(model, d, range(len(d) - 16, len(d))) for d in usable)
    assert [c.status for c in cells] == ["ok"] * 4
    assert {c.target_tokens for c in cells} == {16} and {c.as_dict()["target_tokens"] for c in cells} == {16}
    for c in cells:
        assert c.score.n_tokens == 16 * len(usable)
        assert c.score.nll_sum == pytest.approx(expected, rel=1e-9)


def _row(variant, seed, L, ppl=None, status="ok", note="", protocol="nonoverlapping"):
    return {"label": f"{variant}{seed}", "variant": variant, "scheme": variant, "rope_scaling": "none", "seed": seed,
            "train_len": 32, "protocol": protocol, "length": L, "status": status, "note": note, "ppl": ppl,
            "tokens": 1000 if status == "ok" else None}


def test_terminal_table():
    rows = [_row("rope", 0, 32, 10.0), _row("rope", 0, 64, 12.0), _row("rope", 1, 32, 20.0), _row("rope", 1, 64, 30.0),
            _row("learned", 0, 32, 1234.5), _row("learned", 0, 64, status="n/a", note="n/a (table size 32)"),
            _row("rope", 0, 32, 99.0, protocol="sliding")]
    add_ratios(rows)
    assert terminal_table({"results": rows, "checkpoints": []}).splitlines() == [
        "nonoverlapping perplexity, mean over seeds, and its ratio to the perplexity at the training length; "
        "1,000 tokens per cell",
        "variant  seeds          L=32   L=64",
        "rope     2      ppl    15.00  21.00",  # means over the two seeds; the sliding row is not shown
        "                ratio   1.00   1.35",  # mean of the seeds' ratios, 1.2 and 1.5
        "learned  1      ppl    1,234    n/a",
        "                ratio   1.00    n/a",
        "n/a: learned (table size 32)",
    ]
    assert terminal_table({"results": rows[-1:], "checkpoints": []}) == "no nonoverlapping cells were scored"


def test_terminal_summary_shows_every_protocol_that_was_scored():
    """eval.protocols=[sliding] printed "no nonoverlapping cells were scored" (issue 22); now each protocol present
    gets its table, in the results' order."""
    sliding = [_row("rope", 0, 32, 10.0, protocol="sliding"), _row("rope", 0, 64, 11.0, protocol="sliding")]
    add_ratios(sliding)
    text = terminal_summary({"results": sliding, "checkpoints": []})
    assert text.startswith("sliding perplexity, mean over seeds") and "nonoverlapping" not in text
    assert "rope     1      ppl    10.00  11.00" in text.splitlines()
    both = [_row("rope", 0, 32, 9.0, protocol="fixed_target"), *sliding, _row("rope", 0, 32, 8.0)]
    add_ratios(both)
    heads = [line.split(" perplexity")[0] for line in terminal_summary({"results": both}).splitlines()
             if " perplexity, mean over seeds" in line]  # fmt: skip
    assert heads == ["fixed_target", "sliding", "nonoverlapping"]
    assert terminal_summary({"results": []}) == "no perplexity cells were scored"


# ---- end to end: two tiny training runs, then evaluate.py over both ----


def run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "tree", "cloud"]
    for split, n_docs in (("train", 40), ("test", 6)):
        lines = []
        for _ in range(n_docs):
            lines.append(" ".join(rng.choice(words, 400)) + ".")
        (tmp / f"{split}.txt").write_text("\n\n".join(lines))
    runs = []
    for pos in ("rope", "learned"):
        out = tmp / f"pos={pos}"
        r = run(
            [
                str(ROOT / "train.py"),
                "debug=fast",
                f"pos={pos}",
                "data=text_files",
                f"data.train_files=[{tmp / 'train.txt'}]",
                f"data.test_files=[{tmp / 'test.txt'}]",
                "data.txt_sample_by=paragraph",
                f"data.cache_dir={tmp / 'cache'}",
                "data.vocab_size=300",
                "trainer.seq_len=32",
                "trainer.max_steps=6",
                "pos.max_len=${if_read:max_len,32}",  # learned's table; rope does not read pos.max_len
                "trainer.progress=false",
                f"hydra.run.dir='{out}'",
            ],
            cwd=tmp,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(out)
    return tmp, runs


@pytest.mark.slow
def test_evaluate_cli_writes_every_output(two_runs):
    tmp, runs = two_runs
    out = tmp / "eval"
    r = run(
        [
            str(ROOT / "evaluate.py"),
            f"ckpt=['{runs[0]}','{runs[1]}']",
            "eval.lengths=[32,64,128]",
            "eval.target_tokens=16",
            "eval.rope_scaling=[none,yarn]",
            "logger=none",
            "eval.progress=false",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stdout = r.stdout
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "results.csv", "results.md", "ppl_vs_length.png", "ppl_ratio_vs_length.png",
                 "per_position.png"):
        assert (out / name).stat().st_size > 0, name
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name  # as open() makes them
    res = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in res["checkpoints"]] == ["pos=rope", "pos=learned"]
    cells = {(r["variant"], r["protocol"], r["length"]): r for r in res["results"]}
    assert len(cells) == (2 + 1) * 3 * 3  # rope, rope+yarn, learned x 3 protocols x 3 lengths
    assert cells[("learned", "nonoverlapping", 64)]["status"] == "n/a"
    assert "n/a (table size 32)" in (out / "results.md").read_text()
    log = (out / "evaluate.log").read_text()  # without a progress bar, a line per checkpoint
    assert "checkpoint 1/2 (pos=rope) scored: 18 of 27 cells" in log
    assert "checkpoint 2/2 (pos=learned) scored: 27 of 27 cells" in log
    ok = [r for r in res["results"] if r["status"] == "ok"]
    stream_counts = {r["tokens"] for r in ok if r["protocol"] != "fixed_target"}
    assert len(stream_counts) == 1  # every length and protocol scored the same stretch
    for r in ok:
        assert r["ppl"] == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]))
        assert r["bits_per_byte"] == pytest.approx(r["nll_sum"] / math.log(2) / r["bytes"])
    yarn32 = cells[("rope+yarn", "nonoverlapping", 32)]
    assert yarn32["ppl"] == cells[("rope", "nonoverlapping", 32)]["ppl"]  # factor 1 at the training length
    # the training token cache was read, not rebuilt with the checkpoint's tokenizer
    assert len(list((tmp / "cache" / "text_files").iterdir())) == 1 and not (tmp / "cache" / "tokenizers").exists()
    # on the terminal: what is scored, then the compact nonoverlapping table and where the rest is
    assert "scoring 2 checkpoints, 27 cells; per cell: " in stdout
    assert "that is all of the test split" in stdout
    assert "nonoverlapping perplexity, mean over seeds," in stdout and "n/a: learned (table size 32)" in stdout
    assert f"21 of 27 cells scored; every protocol and metric: {out / 'results.md'}" in stdout  # 6 n/a
    assert "## sliding" not in stdout


@pytest.mark.slow
def test_evaluate_cli_bad_input(two_runs, tmp_path):
    tmp, runs = two_runs
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run([str(ROOT / "evaluate.py"), f"ckpt={bad}", "logger=none", f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp)
    # one line naming the file (checkpoint.py words the reason)
    assert r.returncode != 0 and f"error: {bad} is not a " in r.stderr and "roformer checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()
    r = run(
        [
            str(ROOT / "evaluate.py"),
            f"ckpt='{runs[0]}'",
            "eval.lengths=[32]",
            "eval.stride=64",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'o2'}",
        ],
        cwd=tmp,
    )
    assert r.returncode != 0 and "eval.stride=64 is larger than the length 32" in r.stderr


def test_find_checkpoints_accepts_files_runs_and_sweeps(tmp_path):
    sweep = tmp_path / "multirun"
    for name in ("pos=rope,seed=0", "pos=alibi,seed=0"):
        (sweep / name / "checkpoints").mkdir(parents=True)
        for f in ("last.pt", "best.pt"):
            (sweep / name / "checkpoints" / f).write_bytes(b"x")
    run = sweep / "pos=rope,seed=0"
    assert find_checkpoints(str(run)) == [run / "checkpoints" / "last.pt"]
    assert find_checkpoints(str(run), "best") == [run / "checkpoints" / "best.pt"]
    assert find_checkpoints(str(sweep)) == sorted(sweep.glob("*/checkpoints/last.pt"))
    # a list, with a duplicate given two ways, keeps one of each
    assert len(find_checkpoints([str(run), str(run / "checkpoints" / "last.pt"), str(sweep)])) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no run with checkpoints/last.pt"):
        find_checkpoints(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoints(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        find_checkpoints([])
