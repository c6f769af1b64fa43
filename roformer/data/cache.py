"""The token cache: `prepare` builds (or reuses) a corpus's tokenizer and token streams, `open_cache` reads one,
`open_prepared` finds the one `prepare` would use without building it.

A cache folder is keyed on everything that changes the tokens, built in a hidden temporary folder, published by
one rename, and valid only when its meta.json (written last) holds the same key. The layout and the rules for
concurrent builds and distributed runs are described in the roformer.data docstring.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from roformer.data import fetch, tasks
from roformer.data import tokenizer as toklib
from roformer.data.config import SPLITS, TASK, DataConfig, DataError
from roformer.data.corpora import CORPUS_REGISTRY, Corpus
from roformer.files import atomic_write, ensure_writable

log = logging.getLogger(__name__)

# Part of every cache key: bump when the files of a cache folder change meaning, so old caches are rebuilt.
CACHE_FORMAT = "roformer-token-cache-v1"


# ----------------------------------------------------------------------------------------------------------
# What a cache holds


@dataclass
class TokenSplit:
    """One split's token stream. Document i is tokens[doc_offsets[i]:doc_offsets[i+1]] and ends with EOD."""

    name: str
    tokens: np.ndarray  # (n_tokens,) uint16 or uint32, memory-mapped
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    eod_id: int
    meta: dict = field(default_factory=dict)  # n_docs, n_bytes, n_words, n_tokens, source, ...
    # task examples (data=task) only: document i is a prompt (ending in a separator), an answer and EOD, its first
    # prompt_lens[i] tokens the prompt; scored marks the tokens the loss and the score are on (the answer's, less
    # any the asker supplies); pad_id fills their padded batches (ExampleSampler)
    prompt_lens: np.ndarray | None = None  # (n_docs,) int64
    pad_id: int | None = None
    scored: np.ndarray | None = None  # (n_tokens,) bool

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def doc(self, i: int, *, eod: bool = True) -> np.ndarray:
        """Tokens of document i, with its trailing EOD unless eod=False."""
        if not -self.n_docs <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for {self.n_docs} documents in {self.name}")
        i %= self.n_docs
        start, end = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return self.tokens[start : end if eod else end - 1]

    def documents(self, *, eod: bool = True) -> Iterator[np.ndarray]:
        """Every document's tokens in order."""
        for i in range(self.n_docs):
            yield self.doc(i, eod=eod)


@dataclass
class PreparedData:
    """What `prepare` returns: the tokenizer and the three token streams of one cache folder."""

    tokenizer: Tokenizer
    tokenizer_json: str  # carry this in checkpoints; roformer.data.tokenizer.from_json restores it
    vocab_size: int  # actual vocabulary size (a small corpus may yield fewer merges than asked)
    eod_id: int
    splits: dict[str, TokenSplit]
    cache_path: Path
    meta: dict = field(default_factory=dict)

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer_hash"]


def prepare(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, progress: bool = True) -> PreparedData:
    """Build (or reuse) the tokenizer and token caches of `cfg` and return them.

    A valid cache is loaded without touching the corpus or the network. Under DDP (world_size > 1) only
    rank 0 builds; other ranks wait for its finished cache (see the roformer.data docstring). data=task is
    generated in memory (:func:`task_data`) and nothing is cached.
    """
    if cfg.name == TASK:
        return task_data(cfg)
    corpus, key_inputs, key, cache = _locate(cfg)
    found = _open_valid(cache, key)
    if found is not None:
        log.info("using cached %s tokens at %s", cfg.name, cache)
        return found
    if world_size > 1 and rank != 0:
        return _wait_for_cache(cache, key, cfg.wait_timeout)
    return _build(cfg, corpus, cache, key, key_inputs, progress)


def open_prepared(cfg: DataConfig) -> PreparedData | None:
    """The finished cache that `prepare(cfg)` would use, or None: builds, writes and waits for nothing.

    For readers that have another way to get their tokens (evaluation falls back to the checkpoint's tokenizer).
    data=task has no cache: its examples are generated in memory, as `prepare` does.
    """
    if cfg.name == TASK:
        return task_data(cfg)
    try:
        _, _, key, cache = _locate(cfg)
    except (DataError, OSError):  # e.g. a data.tokenizer_path or corpus file that is gone: no cache to find
        return None
    return _open_valid(cache, key)


def open_cache(path: str | os.PathLike) -> PreparedData:
    """Open a finished cache folder (one holding meta.json) without a config."""
    path = Path(path)
    try:
        key = json.loads((path / "meta.json").read_text())["key"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is not a finished token cache (no readable meta.json: {e})") from None
    found = _open_valid(path, key)
    if found is None:
        raise DataError(f"{path} is damaged (files do not match meta.json); delete it and prepare again")
    return found


def task_data(cfg: DataConfig) -> PreparedData:
    """data=task: the task's tokenizer and its examples, generated in memory from ``data.task_seed`` (seconds; the
    same settings give the same tokens on every machine and rank, so there is nothing to cache or wait for).

    train and validation draw instance lengths from 1..L (a task with ``train_at_max``: exactly L), test from
    1..mult x L (see roformer.data.tasks); every split's documents are its examples, with their prompt lengths and
    scored tokens (`TokenSplit.prompt_lens`, `TokenSplit.scored`)."""
    tok = tasks.tokenizer(cfg.task, cfg.eod_token)
    trained = tasks.train_lengths(cfg.task, cfg.task_max_len)
    plan = {"train": (cfg.task_train_size, *trained), "validation": (cfg.task_val_size, *trained),
            "test": (cfg.task_val_size, 1, cfg.task_max_len * cfg.task_test_max_mult)}
    splits = {}
    for split, (n, lo, hi) in plan.items():
        ex = tasks.generate(cfg.task, n, lo, hi, cfg.task_seed, tasks.STREAMS[split])
        meta = {"n_docs": len(ex), "n_tokens": len(ex.tokens), "n_bytes": ex.n_bytes,
                "n_words": len(ex.tokens) - len(ex), "lengths": [lo, hi]}
        splits[split] = TokenSplit(split, ex.tokens, ex.offsets, tasks.EOD_ID, meta, prompt_lens=ex.prompt_lens,
                                   pad_id=tasks.PAD_ID, scored=ex.scored)
    tok_json = toklib.to_json(tok)
    meta = {"name": TASK, "task": cfg.task, "unit": tasks.TASKS[cfg.task].unit,
            "tokenizer_hash": toklib.tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(),
            "eod_token": cfg.eod_token, "eod_id": tasks.EOD_ID, "pad_id": tasks.PAD_ID,
            "splits": {s: sp.meta for s, sp in splits.items()}}
    return PreparedData(tokenizer=tok, tokenizer_json=tok_json, vocab_size=tok.get_vocab_size(), eod_id=tasks.EOD_ID,
                        splits=splits, cache_path=Path(cfg.cache_dir) / TASK, meta=meta)


def format_counts(data: PreparedData) -> str:
    """A small table of the per-split counts."""
    cols = ("split", "docs", "lines", "bytes", "words", "tokens", "bytes/token")
    rows = [cols]
    for name, split in data.splits.items():
        m = split.meta
        rows.append((
            name,
            f"{m['n_docs']:,}",
            f"{m['n_lines']:,}" if "n_lines" in m else "-",
            f"{m['n_bytes']:,}",
            f"{m['n_words']:,}",
            f"{m['n_tokens']:,}",
            f"{m['n_bytes'] / max(m['n_tokens'], 1):.2f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    fmt = lambda r: "  ".join(r[i].ljust(w) if i == 0 else r[i].rjust(w) for i, w in enumerate(widths))
    return "\n".join(fmt(r) for r in rows)


# ----------------------------------------------------------------------------------------------------------
# Building a cache


def _locate(cfg: DataConfig) -> tuple[Corpus, dict, str, Path]:
    """The corpus, the key's inputs, the key, and the cache folder of `cfg` (reads no corpus, only checksums)."""
    corpus = CORPUS_REGISTRY[cfg.name](cfg)
    key_inputs = {
        "format": CACHE_FORMAT,
        "corpus": corpus.identity(),
        "tokenizer": _tokenizer_identity(cfg),
    }
    key = fetch.sha256_text(json.dumps(key_inputs, sort_keys=True))
    return corpus, key_inputs, key, Path(cfg.cache_dir) / cfg.name / key[:16]


def _tokenizer_identity(cfg: DataConfig) -> dict:
    """What about the tokenizer changes the tokens: the given file's sha256, or the training settings."""
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path)
        if not path.is_file():
            raise DataError(f"data.tokenizer_path={cfg.tokenizer_path!r} does not exist")
        return {"file_sha256": fetch.file_sha256(path), "eod_token": cfg.eod_token}
    return {"trainer": toklib.TRAINER_VERSION, "vocab_size": cfg.vocab_size, "min_frequency": cfg.min_frequency,
            "eod_token": cfg.eod_token, "tokenizers": tokenizers.__version__}


def _build(cfg: DataConfig, corpus: Corpus, cache: Path, key: str, key_inputs: dict, progress: bool):
    """Load the corpus, make the tokenizer and tokenize every split into a hidden folder, then publish it."""
    import datasets  # heavy (datasets, pyarrow); only needed when a cache is built

    ensure_writable(cache.parent, "data.cache_dir", DataError)
    _remove_stale(cache.parent)
    tmp = cache.parent / f".tmp-{cache.name}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
    tmp.mkdir()
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    try:
        t0 = time.time()
        log.info("building %s token cache %s", cfg.name, cache)
        docs, source = corpus.load(progress)
        per_split = source.pop("per_split", {})
        for split in SPLITS:
            if len(docs[split]) == 0:
                raise DataError(f"{cfg.name}: the {split} split has no (non-empty) documents")
        t_load = time.time()

        tok, eod_id, dtype = _make_tokenizer(cfg, docs["train"], progress)
        toklib.save(tok, tmp / "tokenizer.json")
        t_tok = time.time()

        splits_meta = {}
        for split in SPLITS:
            splits_meta[split] = _write_split(docs[split], split, tok, eod_id, dtype, tmp, key, cfg, progress)
            splits_meta[split].update(per_split.get(split, {}))
        for f in tmp.glob("*.arrow"):
            f.unlink()
        meta = {
            "key": key,
            "key_inputs": key_inputs,
            "name": cfg.name,
            "source": source,
            "tokenizer_hash": toklib.tokenizer_hash(tok),
            "vocab_size": tok.get_vocab_size(),
            "eod_token": cfg.eod_token,
            "eod_id": eod_id,
            "eod_position": "end",  # every document's tokens end with one EOD id
            "dtype": dtype.name,
            "splits": splits_meta,
            "seconds": {"load": round(t_load - t0, 2), "tokenizer": round(t_tok - t_load, 2),
                        "tokenize": round(time.time() - t_tok, 2)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")  # last
        _publish(tmp, cache, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
    found = _open_valid(cache, key)
    if found is None:
        raise DataError(f"the cache just built at {cache} does not load; delete it and try again")
    return found


def _make_tokenizer(cfg: DataConfig, train, progress: bool) -> tuple[Tokenizer, int, np.dtype]:
    """The given tokenizer, or one trained on the training split only; with its EOD id and token id dtype."""
    if cfg.tokenizer_path:
        tok = toklib.load(cfg.tokenizer_path)
    else:
        texts = (t for batch in train.iter(batch_size=1000) for t in batch["text"])
        tok = toklib.train_bpe(texts, cfg.vocab_size, length=len(train), min_frequency=cfg.min_frequency,
                               eod_token=cfg.eod_token, progress=progress)
    eod_id = toklib.ensure_eod(tok, cfg.eod_token)
    try:
        dtype = toklib.id_dtype(tok.get_vocab_size())
    except toklib.TokenizerError as e:
        raise DataError(str(e)) from None
    return tok, eod_id, dtype


def _write_split(ds, split: str, tok, eod_id: int, dtype: np.dtype, tmp: Path, key: str, cfg: DataConfig,
                 progress: bool) -> dict:
    """Tokenize one split with a batched datasets.map and write <split>.tokens.npy and <split>.offsets.npy."""
    import pyarrow.compute as pc  # heavy (pyarrow); only needed when a cache is built

    def encode(batch):
        texts = batch["text"]
        ids = [e.ids + [eod_id] for e in tok.encode_batch(texts)]
        return {"ids": ids, "n_tokens": [len(i) for i in ids],
                "n_bytes": [len(t.encode("utf-8")) for t in texts], "n_words": [len(t.split()) for t in texts]}

    mapped = ds.map(encode, batched=True, batch_size=64, num_proc=cfg.num_proc, remove_columns=ds.column_names,
                    cache_file_name=str(tmp / f"{split}.arrow"), load_from_cache_file=False,
                    new_fingerprint=fetch.sha256_text(f"{key}/{split}")[:32], desc=f"tokenizing {split}")
    cols = mapped.with_format("numpy")
    n_tokens = np.asarray(cols["n_tokens"], dtype=np.int64)
    offsets = np.zeros(len(n_tokens) + 1, dtype=np.int64)
    np.cumsum(n_tokens, out=offsets[1:])
    total = int(offsets[-1])
    arr = np.lib.format.open_memmap(tmp / f"{split}.tokens.npy", mode="w+", dtype=dtype, shape=(total,))
    pos = 0
    for table in mapped.with_format("arrow").iter(batch_size=4096):
        flat = pc.list_flatten(table["ids"]).to_numpy()
        arr[pos : pos + len(flat)] = flat
        pos += len(flat)
    assert pos == total, (pos, total)
    arr.flush()
    del arr
    np.save(tmp / f"{split}.offsets.npy", offsets)
    return {"n_docs": len(n_tokens), "n_tokens": total, "n_bytes": int(np.sum(cols["n_bytes"])),
            "n_words": int(np.sum(cols["n_words"]))}


def _publish(tmp: Path, cache: Path, key: str) -> None:
    """Rename the finished temporary folder into place in one step."""
    try:
        os.rename(tmp, cache)
        return
    except OSError:
        pass
    if _open_valid(cache, key) is not None:  # a concurrent build finished first: keep its result
        return
    trash = cache.parent / f".trash-{cache.name}-{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
    os.rename(cache, trash)  # an invalid leftover (e.g. a damaged cache): move it aside, then replace it
    os.rename(tmp, cache)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(folder: Path) -> None:
    """Remove .tmp-/.trash- folders left by killed builds of this host (their process is gone)."""
    host = socket.gethostname()
    for p in folder.glob(".t*-*"):
        m = re.match(rf"\.(?:tmp|trash)-[0-9a-f]+-{re.escape(host)}-(\d+)-[0-9a-f]+$", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------
# Opening a cache


def _open_valid(cache: Path, key: str) -> PreparedData | None:
    """Open `cache` if it is a finished cache for `key` whose files match meta.json, else None."""
    meta_path = cache / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        tok_json = (cache / "tokenizer.json").read_text(encoding="utf-8")
        if toklib.tokenizer_hash(tok_json) != meta["tokenizer_hash"]:
            raise ValueError("tokenizer.json does not match meta.json")
        splits = {}
        for split in SPLITS:
            m = meta["splits"][split]
            tokens = np.load(cache / f"{split}.tokens.npy", mmap_mode="r")
            offsets = np.load(cache / f"{split}.offsets.npy")
            if tokens.shape != (m["n_tokens"],) or tokens.dtype.name != meta["dtype"] \
                    or offsets.shape != (m["n_docs"] + 1,) or int(offsets[-1]) != m["n_tokens"]:
                raise ValueError(f"{split} arrays do not match meta.json")
            splits[split] = TokenSplit(split, tokens, offsets, meta["eod_id"], {**m, "source": meta["source"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring damaged token cache %s: %s", cache, e)
        return None
    tok = toklib.from_json(tok_json)
    return PreparedData(tokenizer=tok, tokenizer_json=tok_json, vocab_size=meta["vocab_size"],
                        eod_id=meta["eod_id"], splits=splits, cache_path=cache, meta=meta)


def _wait_for_cache(cache: Path, key: str, timeout: float, poll: float = 2.0) -> PreparedData:
    """Poll until rank 0 has published a valid cache for `key`, or fail after `timeout` seconds."""
    log.info("waiting for rank 0 to build %s", cache)
    deadline = time.monotonic() + timeout
    while True:
        found = _open_valid(cache, key)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            break
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
    raise DataError(f"waited {timeout:.0f}s for rank 0 to build the token cache {cache}; "
                    f"check rank 0's log or run scripts/prepare_data.py first")
