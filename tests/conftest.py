"""Shared fixtures: the real Hydra configs composed and shrunk, a tiny learnable corpus, wandb file readers."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A tiny model that trains in well under a second per scheme (fp32 so bit-exact checks do not depend on the CPU).
# The shape is repeated by key because data=task's preset (configs/data_preset/task.yaml) sets it by key.
TINY = [
    "model=tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64",
    "logger=none", "trainer.seq_len=32", "trainer.batch_size=8", "trainer.max_steps=20",
    "trainer.eval_interval=10", "trainer.eval_iters=2", "trainer.log_interval=1", "trainer.progress=false",
    "trainer.precision=fp32", "optim.warmup_steps=2", "optim.lr=1e-2",
]


def compose(*overrides: str, return_hydra_config: bool = False):
    """configs/train.yaml composed with ``overrides`` (a DictConfig)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="test"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny_config(*overrides: str):
    """A TrainConfig from the real configs, shrunk by TINY, then ``overrides``."""
    from roformer.config import to_config

    return to_config(compose(*TINY, *overrides))


def markov_tokens(n: int, vocab: int, seed: int, p_follow: float = 0.9) -> np.ndarray:
    """Token t+1 = (5 t + 3) mod vocab with probability p_follow, else uniform: learnable from one token."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.uint16)
    out[0] = 0
    follow = rng.random(n) < p_follow
    noise = rng.integers(0, vocab, n)
    for i in range(1, n):
        out[i] = (5 * int(out[i - 1]) + 3) % vocab if follow[i] else noise[i]
    return out


@pytest.fixture(scope="session")
def toy_data():
    """A PreparedData of a 64-token Markov chain (no tokenizer training, no download)."""
    from roformer.data import PreparedData, TokenSplit

    vocab = 64
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    splits = {}
    for seed, (name, n) in enumerate((("train", 20_000), ("validation", 4_000), ("test", 4_000))):
        tokens = markov_tokens(n, vocab, seed)
        splits[name] = TokenSplit(name=name, tokens=tokens, doc_offsets=np.array([0, n], dtype=np.int64),
                                  eod_id=0, meta={"n_tokens": n})
    return PreparedData(tokenizer=tok, tokenizer_json=tok.to_str(), vocab_size=vocab, eod_id=0, splits=splits,
                        cache_path=Path("toy"), meta={"tokenizer_hash": "toy"})


@pytest.fixture(scope="session")
def toy_data_other_tokenizer(toy_data):
    """toy_data's splits re-tokenized by another (32-word) tokenizer: what a checkpoint of toy_data must refuse."""
    vocab = 32
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    splits = {name: type(s)(name=name, tokens=markov_tokens(len(s.tokens), vocab, i), doc_offsets=s.doc_offsets,
                            eod_id=0, meta=s.meta) for i, (name, s) in enumerate(toy_data.splits.items())}
    return type(toy_data)(tokenizer=tok, tokenizer_json=tok.to_str(), vocab_size=vocab, eod_id=0, splits=splits,
                          cache_path=Path("toy32"), meta={"tokenizer_hash": "toy32"})


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> list[str]:
    """CLI overrides for a small text_files corpus (20 documents of a 16-word language) cached in a tmp dir."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = "the cat dog sat on a mat log ran fast slow big red blue green house".split()
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 1500)) + "\n")
    return ["data=text_files", f"data.train_files=[{root}/doc*.txt]", f"data.cache_dir={root}/cache",
            "data.vocab_size=300"]


WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "tree", "cloud"]


def word_corpus(root: Path, n_docs: dict[str, int], n_words: int) -> list[str]:
    """Write ``<split>.txt`` files of ``n_docs[split]`` documents of ``n_words`` random WORDS each (seed 0), one
    document per paragraph; return the CLI overrides of a text_files corpus on them, cached under root/cache."""
    rng = np.random.default_rng(0)
    for split, n in n_docs.items():
        (root / f"{split}.txt").write_text("\n\n".join(" ".join(rng.choice(WORDS, n_words)) + "." for _ in range(n)))
    return ["data=text_files", f"data.train_files=[{root / 'train.txt'}]", f"data.test_files=[{root / 'test.txt'}]",
            "data.txt_sample_by=paragraph", f"data.cache_dir={root / 'cache'}", "data.vocab_size=300"]


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_wandb_records(path: Path) -> list:
    """Every protobuf Record of a ``run-<id>.wandb`` file (LevelDB log format: 32 KiB blocks of
    crc32/length/type-prefixed chunks after a 7-byte header), read offline with no wandb service."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = Path(path).read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk wandb's service is still writing: read it next time
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    out = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


@dataclass
class WandbRun:
    """What an offline wandb run recorded, read back from its ``.wandb`` file."""

    run: object  # the RunRecord: run_id, run_group, display_name, job_type, tags
    config: dict  # nested, as wandb.init(config=...) got it
    history: list[dict]  # a dict per logged row, keys as logged ("eval/nonoverlapping/ppl"), not wandb's _step...
    metrics: dict  # define_metric: name or glob -> its step metric
    exit_code: int | None

    def get(self, dotted: str):
        """A config value by its dotted path, as a wandb workspace names it: ``pos.name``."""
        node = self.config
        for part in dotted.split("."):
            node = node[part]
        return node


def read_wandb_run(path: Path, timeout: float = 60.0) -> WandbRun:
    """An ``offline-run-*`` folder (or its ``.wandb`` file), once wandb's service has flushed its exit record."""
    import json
    import time

    from google.protobuf.message import DecodeError

    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        try:
            recs = read_wandb_records(path)
        except DecodeError:  # read in the middle of a write; the file is whole once the service flushed it
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        exits = [r.exit for r in recs if r.WhichOneof("record_type") == "exit"]
        if exits or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    kind = [(r.WhichOneof("record_type"), r) for r in recs]
    run = next(r.run for k, r in kind if k == "run")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    config.update({u.key: json.loads(u.value_json) for k, r in kind if k == "config" for u in r.config.update})
    history = [{key: json.loads(i.value_json) for i in r.history.item
                if not (key := i.key or "/".join(i.nested_key)).startswith("_")} for k, r in kind if k == "history"]
    metrics = {r.metric.name or r.metric.glob_name: r.metric.step_metric for k, r in kind if k == "metric"}
    return WandbRun(run, config, history, metrics, exits[-1].exit_code if exits else None)


def wandb_runs(folder: Path) -> list[WandbRun]:
    """Every offline run under ``folder`` (a run or evaluation folder: ``<folder>/wandb/offline-run-*``)."""
    return [read_wandb_run(p) for p in sorted(Path(folder).glob("wandb/offline-run-*"))]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU spinning threads slow them 10x."""
    import torch  # like the other imports here that only some fixtures need

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_data(monkeypatch):
    """Preparing data fails the test: a refusal (of a resume, of an init_from) must come before any data work."""
    from roformer import training  # like the other imports here that only some fixtures need

    def prepare(*a, **k):
        raise AssertionError("the data was prepared before the run was refused")

    monkeypatch.setattr(training, "prepare", prepare)
